"""The multi-step graph advance kernel (``pagedllm.worker.graph_step``) vs its torch
reference: exact ids, positions, slots and lengths; padding rows untouched."""
import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE

graph_step = pytest.importorskip("pagedllm.worker.graph_step")


@pytest.mark.parametrize("n,size,block_size", [(1, 1, 16), (3, 4, 16), (13, 16, 8),
                                               (40, 48, 32)])
def test_advance_matches_reference(n, size, block_size):
    gen = torch.Generator().manual_seed(n)
    width = 9
    buffers = dict(
        input_ids=torch.randint(0, 1000, (size,), generator=gen),
        # a position just before a block boundary moves to the next block's first slot
        positions=torch.randint(0, block_size * (width - 1) - 1, (size,), generator=gen),
        slot_mapping=torch.full((size,), -1, dtype=torch.long),
        seq_lens=torch.randint(1, 500, (size,), generator=gen).int(),
        block_table=torch.randperm(size * width, generator=gen).int().view(size, width))
    buffers["positions"][0] = block_size - 1
    ids = torch.randint(0, 1000, (n,), generator=gen)
    ref = {k: v.clone() for k, v in buffers.items()}
    graph_step.advance_ref(ids, *ref.values(), block_size)
    got = {k: v.to(DEVICE) for k, v in buffers.items()}
    graph_step.advance(ids.to(DEVICE), *got.values(), block_size)
    for name in buffers:
        assert torch.equal(got[name].cpu(), ref[name]), name
    assert ref["slot_mapping"][0] == ref["block_table"][0, 1] * block_size
    assert torch.equal(ref["input_ids"][:n], ids)
    assert (ref["slot_mapping"][n:] == -1).all()  # padding rows keep their inert values


def test_advance_rejects_more_rows_than_buffers():
    bufs = [torch.zeros(2, dtype=torch.long, device=DEVICE) for _ in range(3)]
    with pytest.raises(ValueError, match="at most 2 rows"):
        graph_step.advance(torch.zeros(3, dtype=torch.long, device=DEVICE), *bufs,
                           torch.zeros(2, dtype=torch.int32, device=DEVICE),
                           torch.zeros(2, 4, dtype=torch.int32, device=DEVICE), 16)
