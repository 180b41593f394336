"""Fused Triton ops (``pagedllm.layers.triton_ops``) vs their torch references; interpreter
on CPU, compiled on a GPU (the environment set-up is the attention kernel tests')."""
import pytest
import torch

from tests.kernels.test_triton_attention import DEVICE, ON_GPU, TOL, _rel_err

ops = pytest.importorskip("pagedllm.layers.triton_ops")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,offset,with_res", [(256, 0.0, False), (96, 1.0, True),
                                                    (4096, 0.0, True)])
def test_rms_norm(dtype, hidden, offset, with_res):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(DEVICE)
    res = torch.randn(5, hidden, generator=gen).to(dtype).to(DEVICE) if with_res else None
    res_before = res.clone() if with_res else None
    out = ops.rms_norm(x, w, 1e-6, offset, res)
    ref = ops.rms_norm_ref(x, w, 1e-6, offset, res)
    if not with_res:
        assert _rel_err(out, ref) < TOL[dtype]
        return
    (out, total), (ref, ref_total) = out, ref
    assert _rel_err(out, ref) < TOL[dtype]
    # (the interpreter truncates fp32 -> bf16 where GPUs round: not bit-equal)
    assert _rel_err(total, ref_total) < TOL[dtype]
    assert torch.equal(res, res_before)  # inputs are not written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_per_head_of_a_strided_view(dtype):
    """Qwen3's q/k norm: the heads of q and k, views of one fused qkv output."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype).to(DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    w = (torch.rand(head_dim, generator=gen) + 0.5).to(dtype).to(DEVICE)
    for x in (q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)):
        before = qkv.clone()
        out = ops.rms_norm(x, w, 1e-6)
        assert out.is_contiguous() and out.shape == x.shape
        assert _rel_err(out, ops.rms_norm_ref(x, w, 1e-6)) < TOL[dtype]
        assert torch.equal(qkv, before)
    with pytest.raises(ValueError, match="without residual"):
        ops.rms_norm(q.reshape(tokens, heads, head_dim), w, 1e-6, residual=q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(8, 2, 64, 64), (4, 4, 32, 16),
                                                                 (32, 8, 128, 128)])
def test_rotary_neox(dtype, heads, kv_heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(heads * head_dim)
    num_tokens = 7
    # q and k as views of one fused qkv projection, as the attention layers get them
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype).to(DEVICE)
    q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads,
                                                                    head_dim)
    freqs = torch.randn(100, rotary_dim // 2, generator=gen)
    freqs = torch.cat((freqs, freqs), dim=-1)
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    positions = torch.tensor([0, 5, 99, 3, 3, 50, 1], device=DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    ops.rotary_neox(positions, q, k, cos, sin, rotary_dim)
    ops.rotary_neox_ref(positions, q_ref, k_ref, cos, sin, rotary_dim)
    assert _rel_err(q, q_ref) < TOL[dtype] and _rel_err(k, k_ref) < TOL[dtype]
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 1500])
def test_silu_and_mul(dtype, d):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(4, 2 * d, generator=gen).to(dtype).to(DEVICE)
    assert _rel_err(ops.silu_and_mul(x), ops.silu_and_mul_ref(x)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,bias,gated,config", [
    (96, 256, False, False, (8, 64, 4, 0)),  # K a multiple of the chunk
    (96, 256, False, False, (8, 64, 4, 1)),  # ... with the next chunk prefetched
    (100, 200, True, False, (16, 64, 4, 1)),  # ragged rows and K, bias
    (100, 200, True, False, (1, 128, 4, 0)),  # one row a program
    (128, 96, False, True, (8, 32, 4, 1)),  # fused gate/up with silu
    (66, 130, True, True, (4, 64, 2, 1)),  # gated, ragged, bias on both halves
    (66, 130, True, True, (2, 128, 2, 0)),
])
def test_gemv(dtype, n, k, bias, gated, config):
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    out = ops.gemv(x, w, b, gated=gated, config=config)
    ref = ops.gemv_ref(x, w, b, gated=gated)
    assert out.shape == (1, n // 2 if gated else n)
    # gated bf16 rounds three times; the interpreter truncates each time where GPUs round
    slack = 2.0 if gated and not ON_GPU else 1.0
    assert _rel_err(out, ref) < TOL[dtype] * slack


def test_gemv_fp32_logits_equal_the_rounded_result():
    """The LM head's GEMV stores fp32 logits in its own pass: the same numbers as its bf16
    result cast afterwards (``compute_logits``' unfused ``.float()``)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 192, generator=gen).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(300, 192, generator=gen) / 14).to(torch.bfloat16).to(DEVICE)
    out = ops.gemv(x, w, config=(8, 64, 4, 1), out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, ops.gemv(x, w, config=(8, 64, 4, 1)).float())
    ref = ops.gemv_ref(x, w, out_dtype=torch.float32)
    assert ref.dtype == torch.float32 and _rel_err(out, ref) < TOL[torch.bfloat16]


def test_gemv_rejects_bad_shapes():
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="x \\[1, K\\]"):
        ops.gemv(torch.randn(2, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="2d rows"):
        ops.gemv(torch.randn(1, 16, device=DEVICE), torch.randn(7, 16, device=DEVICE),
                 gated=True)
