"""The batched bitmask op against a per-token Python reference, and the matcher lifecycle."""
import torch

from pagedllm.sample.ops.guided import apply_token_bitmask, unpack_bitmask


def _reference_allowed(bitmask, vocab):
    out = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    for r in range(bitmask.shape[0]):
        for t in range(vocab):
            word, bit = divmod(t, 32)
            if word < bitmask.shape[1]:
                out[r, t] = bool((int(bitmask[r, word]) >> bit) & 1)
    return out


def test_unpack_matches_reference():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    for vocab in (100, 128, 150):  # narrower, exact and wider than the bitmask
        assert torch.equal(unpack_bitmask(bitmask, vocab), _reference_allowed(bitmask, vocab))


def test_apply_masks_only_guided_rows():
    logits = torch.randn(4, 70)
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # tokens 0 and 2
    bitmask[1, 2] = 1  # token 64
    out = apply_token_bitmask(logits.clone(), torch.tensor([1, 3]), bitmask)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(out[3]).nonzero().flatten().tolist() == [64]
    full = apply_token_bitmask(logits[:2].clone(), torch.tensor([0, 1]), bitmask)
    assert torch.equal(full[1].isfinite().nonzero().flatten(), torch.tensor([64]))


def test_compiled_guide_pickles(model_path):
    """The multiprocess executor pickles new requests (with their compiled guide)."""
    import pickle

    import pytest
    pytest.importorskip("xgrammar")
    from transformers import AutoTokenizer

    from pagedllm.guided.compiler import GuidedCompiler
    from pagedllm.guided.params import GuidedDecodingParams
    compiler = GuidedCompiler(AutoTokenizer.from_pretrained(model_path), 512, {2}, "xgrammar")
    guide = compiler.compile(GuidedDecodingParams(regex="ab+"))
    assert compiler.compile(GuidedDecodingParams(regex="ab+")) is guide  # cached
    copy = pickle.loads(pickle.dumps(guide))
    matcher = copy.new_matcher()
    assert matcher.accept_string("abb") and matcher.accept_token(2) and matcher.is_terminated()


def test_batch_fill_mixes_backends(model_path, monkeypatch):
    """On a many-core host xgrammar rows use its batch fill; outlines rows in the same batch
    are filled one by one; both give the same masks as filling each matcher alone."""
    import pytest
    pytest.importorskip("xgrammar")
    pytest.importorskip("outlines_core")
    from transformers import AutoTokenizer

    import pagedllm.guided.matchers as matchers_mod
    from pagedllm.guided.compiler import GuidedCompiler
    from pagedllm.guided.params import GuidedDecodingParams
    tok = AutoTokenizer.from_pretrained(model_path)
    guides = [GuidedCompiler(tok, 512, {2}, backend).compile(GuidedDecodingParams(regex=r))
              for backend in ("xgrammar", "outlines") for r in ("[ab]+c", "x[0-9]{2}")]
    monkeypatch.setattr(matchers_mod.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(matchers_mod, "_MIN_BATCH_FILL", 2)
    batch = matchers_mod.GuidedMatchers(512, torch.device("cpu"))
    for i, guide in enumerate(guides):
        batch.add(f"r{i}", guide, [])
    got = batch.fill([f"r{i}" for i in range(4)]).mask
    for i, guide in enumerate(guides):
        alone = matchers_mod.GuidedMatchers(512, torch.device("cpu"))
        alone.add("x", guide, [])
        assert torch.equal(got[i], alone.fill(["x"]).mask[0])
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[3])  # same regex, same mask
