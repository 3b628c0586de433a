"""The quantized attention kernel (runtime/ops/sage_attention.py) and its place among the attention backends.

CPU: the pre-pass quantizers against torch definitions and the kernel against a float emulation of its own quantized
operands (both through TRITON_INTERPRET=1, with tests/interp.py's fixes for the interpreter's fp8 cast and bf16 dot),
accuracy against fp32 SDPA on realistic inputs, and the backend registry. GPU (marked ``gpu``): per-call accuracy at
Wan 14B sizes, a 14B block's update error, and the final latent of a few-step run of a 1.3B-shaped pack.
"""

from __future__ import annotations

import pytest
import torch
from interp import INTERPRETER_FIXES, run_in_triton_interpreter

from wanpack.errors import UsageError, WanpackError
from wanpack.runtime.ops import attention as attn

_PREPASS_SCRIPT = INTERPRETER_FIXES + r"""
import torch
from wanpack.runtime.ops import sage_attention as sa
from wanpack.runtime.ops.attention import realistic_qkv
from wanpack.runtime.ops.linear import quantize_activation_torch
G = sa.K_GROUP
q, k, v = realistic_qkv(2, 70, 150, 3, 64, seed=1)
q = torch.cat([q, q], dim=2)[:, :, 1:4]  # a head-strided view: the pre-pass reads any batch/token/head strides
q[1, 5] = 0  # an all-zero query row: codes 0, scale 1 (never 0)
b, lq, h, d = q.shape
lk = k.shape[1]

q8, qs = sa.quantize_queries(q)
assert q8.shape == (b * h, 128, d) and qs.shape == (b * h, 128)
rows = q.permute(0, 2, 1, 3).reshape(b * h, lq, d).float()
rq, rs = quantize_activation_torch(rows.reshape(-1, d), torch.int8)
assert torch.equal(q8[:, :lq].reshape(-1, d), rq)
fold = torch.tensor(1.4426950408889634 / d**0.5)  # log2(e) / sqrt(D), in fp32 as the kernel gets it
assert torch.equal(qs[:, :lq].reshape(-1), torch.where(rs[:, 0] > 0, rs[:, 0], 1.0) * fold)
assert qs[1 * h + 0, 5] == fold  # the zero row
assert q8[:, lq:].abs().max().item() == 0  # padding rows

for fp8 in (False, True):
    kv = sa.prepare_kv(k, v, fp8)
    mean = k.mean(dim=1, dtype=torch.float32).reshape(b * h, 1, d)
    sm = k.permute(0, 2, 1, 3).reshape(b * h, lk, d).float() - mean
    pad = torch.zeros(b * h, 256 - lk, d)
    groups = torch.cat([sm, pad], dim=1).reshape(-1, G * d)  # one row per K group of G tokens
    rk, rks = quantize_activation_torch(groups, torch.int8)
    assert torch.equal(kv.k8.reshape(-1, G * d), rk)
    assert torch.equal(kv.k_scale.reshape(-1), torch.where(rks[:, 0] > 0, rks[:, 0], 1.0))
    assert kv.k_scale.shape == (b * h, 256 // G)
    assert kv.k8[:, lk:].abs().max().item() == 0
    if fp8:
        vv = v.permute(0, 2, 1, 3).reshape(b * h, lk, d).float()
        mv = vv.mean(dim=1)
        amax = torch.maximum(vv.amax(dim=1) - mv, mv - vv.amin(dim=1))
        assert torch.allclose(kv.v_mean, mv, rtol=1e-6, atol=1e-6) and torch.equal(kv.v_scale, amax / 448.0)
        codes = ((vv - kv.v_mean[:, None]) * (448.0 / amax)[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert kv.v.shape == (b * h, d, 256) and kv.v.dtype == torch.float8_e4m3fn
        got = kv.v[:, :, sa.key_slots(256)].transpose(1, 2)  # keys back in order
        assert torch.equal(got[:, :lk].view(torch.uint8), codes.view(torch.uint8))
        assert got[:, lk:].float().abs().max().item() == 0
    else:
        assert kv.v is v and kv.v_scale is None
print("ok")
"""


def test_prepass_quantizers_match_torch_in_interpreter():
    """Q per token, smoothed K per group of 64 tokens (codes and scales equal the activation quantizer's on the same
    rows), fp8 V per channel, transposed; zero rows and groups get scale 1; padding is zero."""
    run_in_triton_interpreter(_PREPASS_SCRIPT)


_KERNEL_SCRIPT = INTERPRETER_FIXES + r"""
import math
import torch
from wanpack.runtime.ops import sage_attention as sa
from wanpack.runtime.ops.attention import BACKENDS, attention_error, realistic_qkv


def emulate(q, kv):
    # softmax in float64 of the logits the kernel's int8 operands and scales define, times the V it multiplies
    q8, qs = sa.quantize_queries(q)
    b, lq, h, d = q.shape
    lk = kv.length
    qd = q8[:, :lq].double() * qs[:, :lq, None]
    kd = kv.k8[:, :lk].double() * kv.k_scale.repeat_interleave(sa.K_GROUP, dim=1)[:, :lk, None]
    p = torch.softmax((qd @ kd.transpose(1, 2)) * math.log(2), dim=-1)
    if kv.pv_fp8:
        vd = kv.v[:, :, sa.key_slots(kv.v.shape[-1])].double().transpose(1, 2)[:, :lk] * kv.v_scale[:, None] + kv.v_mean[:, None]
    else:
        vd = kv.v.double().permute(0, 2, 1, 3).reshape(b * h, lk, d)
    return (p @ vd).reshape(b, h, lq, d).transpose(1, 2)


tiles = [{"BLOCK_M": 32, "BLOCK_N": 32}, {"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_M": 128, "BLOCK_N": 128}]
cases = [(2, 70, 77, 3, 64, torch.bfloat16), (1, 40, 257, 2, 128, torch.bfloat16), (1, 33, 130, 2, 64, torch.float16)]
for b, lq, lk, h, d, dtype in cases:
    q, k, v = realistic_qkv(b, lq + 5, lk, h, d, dtype=dtype, seed=lk)
    q = q[:, 5:]  # token-offset view
    q[0, 3] = 0  # an all-zero query row attends uniformly, without NaN
    for fp8 in (False, True):
        kv = sa.prepare_kv(k, v, fp8)
        ref = emulate(q, kv)
        for tile in tiles:
            out = sa.sage_attention(q, pv_fp8=fp8, kv=kv, tile=tile)
            assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
            cos, rel = attention_error(out, ref)
            # measured: 16-bit P.V 1.7e-3 (P and the output rounded to bf16), 2e-4 (fp16); fp8 6-9e-3 (e4m3 P)
            bound = 0.02 if fp8 else (4e-3 if dtype == torch.bfloat16 else 1e-3)
            assert rel < bound, (b, lq, lk, h, d, fp8, tile, rel)

# a prepared K/V serves several query chunks: the same bits as one call over all queries
q, k, v = realistic_qkv(1, 96, 150, 2, 128, seed=7)
prepared = {}
run = BACKENDS["sage-pv16"].run
whole = run(q, k, v, None)
parts = torch.cat([run(q[:, :64], k, v, prepared), run(q[:, 64:], k, v, prepared)], dim=1)
assert len(prepared) == 1 and torch.equal(parts, whole)
print("ok")
"""


def test_kernel_matches_its_quantized_operands_in_interpreter():
    """The attention kernel equals exact softmax attention over its own int8 Q/K (and fp8 V) operands: ragged query
    and key lengths (masked last tile), batch 2, strided views, both K-scale tile layouts, both P.V paths."""
    run_in_triton_interpreter(_KERNEL_SCRIPT)


_ACCURACY_SCRIPT = INTERPRETER_FIXES + r"""
import torch
from wanpack.runtime.ops import sage_attention as sa
from wanpack.runtime.ops.attention import COSINE_MIN, REL_L2_MAX, attention_error, realistic_qkv, reference_attention

# (lq, lk, heads, head_dim): ragged self-attention, Wan's text (512) and image (257) cross-attention, a longer key
# sequence, head_dim 64
cases = [(200, 77, 2, 128), (100, 512, 2, 128), (100, 257, 2, 128), (128, 4096, 1, 128), (200, 300, 2, 64)]
tile = {"BLOCK_M": 128, "BLOCK_N": 128}
for lq, lk, h, d in cases:
    q, k, v = realistic_qkv(1, lq, lk, h, d, seed=lq + lk)
    ref = reference_attention(q, k, v)
    for fp8 in (False, True):
        cos, rel = attention_error(sa.sage_attention(q, k, v, pv_fp8=fp8, tile=tile), ref)
        print(lq, lk, h, d, "fp8" if fp8 else "pv16", f"cosine {cos:.6f} rel {rel:.4f}")
        assert cos >= COSINE_MIN and rel <= REL_L2_MAX, (lq, lk, h, d, fp8, cos, rel)
        assert cos >= 0.9995 or fp8, (lq, lk, cos)  # the 16-bit path has twice the margin

# smoothing is what keeps K's biased channels from eating the int8 range
q, k, v = realistic_qkv(1, 200, 300, 2, 128, seed=11)
ref = reference_attention(q, k, v)
errs = {s: attention_error(sa.sage_attention(q, pv_fp8=False, kv=sa.prepare_kv(k, v, False, smooth_k=s), tile=tile),
                           ref)[1] for s in (True, False)}
print("rel err smoothed / not", errs)
assert errs[False] > 1.5 * errs[True]
print("ok")
"""


def test_accuracy_against_fp32_sdpa_in_interpreter():
    """Cosine >= 0.999 and rel L2 <= REL_L2_MAX against fp32 SDPA on inputs with biased and wide K channels, for
    self- and cross-attention shapes, a 4096-key sequence and head_dim 64; without K smoothing the error is more
    than 1.5x larger (it is what the biased channels cost)."""
    run_in_triton_interpreter(_ACCURACY_SCRIPT)


# ------------------------------------------------------------------------------------------------ registry (CPU)


@pytest.fixture(autouse=True)
def _auto_attention(monkeypatch):
    monkeypatch.delenv(attn.SAGE_AUTO_ENV, raising=False)
    attn.set_attn_backend(None)
    yield
    attn.set_attn_backend(None)


def test_sage_backends_named_and_refused_without_cuda():
    for name in ("sage", "sage-pv16", "sageattn-pkg"):
        assert name in attn.ATTN_CHOICES
        attn.set_attn_backend(name)
        with pytest.raises(WanpackError, match="needs a CUDA device"):
            attn.attn_backend("cpu")
    with pytest.raises(UsageError, match="choose one of"):
        attn.set_attn_backend("sage2")


def test_auto_tries_sage_first_unless_told_not_to(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda", 0)
    assert attn.auto_order(dev) == ("sage", "cudnn", "flash", "sdpa")  # measured faster than cuDNN on an H200
    monkeypatch.setenv(attn.SAGE_AUTO_ENV, "all")
    assert attn.auto_order(dev) == ("sage", "sage-pv16", "cudnn", "flash", "sdpa")
    monkeypatch.setenv(attn.SAGE_AUTO_ENV, "0")
    assert attn.auto_order(dev) == ("cudnn", "flash", "sdpa")
    monkeypatch.setenv(attn.SAGE_AUTO_ENV, "yes")
    with pytest.raises(UsageError, match="WANPACK_SAGE_AUTO='yes' is not one of 0, 1, all"):
        attn.auto_order(dev)
    with pytest.raises(UsageError, match="WANPACK_SAGE_AUTO"):  # what `run` and `serve` call before any work
        attn.set_attn_backend("auto")
    monkeypatch.delenv(attn.SAGE_AUTO_ENV)


def test_self_check_needs_both_cosine_and_magnitude():
    """The self-check rejects a backend that points the right way but is 10% too large (cosine 1, rel 0.1) and
    one that adds noise (cosine < 0.999), and accepts plain bf16 SDPA."""
    cpu = torch.device("cpu")

    def fake(fn):
        return attn.AttnBackend("fake", lambda d: None, lambda q, k, v, p: fn(attn._sdpa(q, k, v).float()).to(q.dtype))

    assert attn._self_check(fake(lambda o: o), cpu)
    assert not attn._self_check(fake(lambda o: 1.1 * o), cpu)
    assert not attn._self_check(fake(lambda o: o + 0.1 * o.std() * torch.randn_like(o)), cpu)


def test_unserved_head_dim_goes_to_the_exact_backend_and_fp32_to_sdpa(monkeypatch):
    """A chosen sage backend sends head dims it is not built for to the best exact backend (cuDNN on Hopper; here a
    stand-in), fp32 to SDPA, and the report names what served."""
    pytest.importorskip("triton")
    cpu = torch.device("cpu")
    exact = attn.AttnBackend("exact-stand-in", lambda d: None, lambda q, k, v, p: attn._sdpa(q, k, v))
    monkeypatch.setitem(attn._chosen, cpu, attn.BACKENDS["sage"])
    monkeypatch.setitem(attn._exact, cpu, exact)
    monkeypatch.setattr(attn, "_ran", {})
    q, k, v = (torch.randn(1, 9, 2, 32, dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attn.attention(q, k, v), attn._sdpa(q, k, v))
    assert attn.attention_ran(cpu) == ["exact-stand-in"]
    attn.attention(q.float(), k.float(), v.float())
    assert attn.attention_ran(cpu) == ["exact-stand-in", "sdpa"]
    from wanpack.runtime.ops.report import backend_info

    info = backend_info(cpu)
    assert info["attention"] == "sage" and info["attention_ran"] == "exact-stand-in,sdpa"


def test_exact_backend_skips_the_quantized_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert attn.auto_order(torch.device("cuda", 0), exact_only=True) == ("cudnn", "flash", "sdpa")
    assert attn.exact_backend("cpu").name == "sdpa"
    attn.set_attn_backend("sage")  # forced: the exact fallback is still auto's exact choice
    assert attn.exact_backend("cpu").name == "sdpa"


# ------------------------------------------------------------------------------------------------ GPU


DEV = "cuda"


def _sage_variants() -> list[str]:
    dev = torch.device(DEV)
    return [n for n in ("sage", "sage-pv16") if attn.BACKENDS[n].unavailable(dev) is None]


@pytest.mark.gpu
@pytest.mark.parametrize(("lq", "lk"), [(32760, 32760), (32760, 512), (32760, 257)], ids=["self", "text", "image"])
def test_gpu_per_call_accuracy_at_14b_480p(lq, lk):
    """Wan 14B at 480p (40 heads x 128): self-attention over 32760 tokens and cross-attention to 512 text / 257
    image tokens; each sage variant's cosine >= 0.999 and rel L2 <= REL_L2_MAX against fp32, cuDNN's printed."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is fp32 throughout
    q, k, v = attn.realistic_qkv(1, lq, lk, 40, 128, device=DEV)
    ref = attn.reference_attention(q, k, v)
    variants = _sage_variants()
    assert variants, "no sage variant is available on this GPU"
    for name in [*variants, "cudnn"]:
        cos, rel = attn.attention_error(attn.BACKENDS[name].run(q, k, v, None), ref)
        print(f"{name} {lq}x{lk}: cosine {cos:.6f}, rel L2 {rel:.4f}")
        if name != "cudnn":
            assert cos >= attn.COSINE_MIN and rel <= attn.REL_L2_MAX, (name, cos, rel)


@pytest.mark.gpu
def test_gpu_prepared_kv_equals_fresh():
    """The DiT's per-block reuse of quantized K/V gives the same bits as quantizing them for every chunk."""
    q, k, v = attn.realistic_qkv(1, 3000, 3000, 8, 128, device=DEV)
    for name in _sage_variants():
        run, prepared = attn.BACKENDS[name].run, {}
        for s in range(0, 3000, 1024):  # (chunks, not the whole q: another length may autotune to other tiles)
            assert torch.equal(run(q[:, s : s + 1024], k, v, prepared), run(q[:, s : s + 1024], k, v, None)), name
        assert len(prepared) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["wan2.1-t2v-14b", "wan2.1-i2v-14b"])
def test_gpu_int8_block_with_sage_within_1_2x_of_the_int8_bound(arch):
    """A 14B int8 block at 2048 tokens (i2v: 257 + 512 context tokens) with each sage variant: update error against
    the fp32 block below 1.2x the int8 scheme's bound in test_dit_gpu (the cuDNN block's error printed beside)."""
    from test_dit_gpu import BLOCK_BOUNDS

    from wanpack.convert.synth import random_block_weights
    from wanpack.manifests.arch import dit_config, dit_tensors
    from wanpack.runtime.models import dit

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = dit_config(arch, layers=1)
    gen = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(1, 2048, cfg.dim, device=DEV, generator=gen)
    e0 = 0.3 * torch.randn(1, 6, cfg.dim, device=DEV, generator=gen)
    n_ctx = cfg.text_len + (cfg.image_tokens if cfg.model_type == "i2v" else 0)
    ctx = torch.randn(1, n_ctx, cfg.dim, device=DEV, generator=gen)
    rope = dit.rope_tables((4, 16, 32), cfg.head_dim, device=DEV)
    f32 = dit.DiTOptions(dtype=torch.float32, chunk_tokens=1024)
    w = random_block_weights(dit_tensors(cfg), 0, "fp32", DEV)
    ref = dit.block_forward(w, x.clone(), e0, rope, dit.cross_kv(w, ctx, cfg, f32), cfg, f32) - x
    w = random_block_weights(dit_tensors(cfg), 0, "int8", DEV)
    opts = dit.DiTOptions(dtype=torch.bfloat16, chunk_tokens=1024)
    bound = 1.2 * BLOCK_BOUNDS["int8"]
    errs = {}
    for name in ["cudnn", *_sage_variants()]:
        attn.set_attn_backend(name)
        got = dit.block_forward(w, x.clone(), e0, rope, dit.cross_kv(w, ctx.bfloat16(), cfg, opts), cfg, opts) - x
        assert torch.isfinite(got).all(), name
        errs[name] = ((got - ref).norm() / ref.norm()).item()
    print(f"{arch} int8 block update rel err: " + ", ".join(f"{k} {e:.4f}" for k, e in errs.items()) +
          f" (bound for sage {bound:.3f})")  # fmt: skip
    assert len(errs) > 1 and all(e < bound for e in errs.values()), errs


@pytest.mark.gpu
def test_gpu_few_step_run_of_a_1_3b_shaped_pack(tmp_path):
    """Four UniPC steps of a 4-layer pack with Wan 1.3B widths (12 heads x 128), int8, 7800 tokens: the final latent
    with each sage variant against cuDNN's (printed: cosine, rel L2, and for scale how far bf16 weights move it).
    Asserted: finite, and cosine >= 0.99 to the cuDNN latent."""
    from test_stream_dit import resident_weights

    from wanpack.convert.converter import ConvertOptions, convert_checkpoint
    from wanpack.convert.synth import synth_checkpoint
    from wanpack.manifests.arch import dit_config
    from wanpack.runtime.models import dit
    from wanpack.runtime.sampling import make_scheduler
    from wanpack.runtime.sampling.loop import denoise, initial_noise

    arch = "wan2.1-t2v-1.3b"
    synth_checkpoint(tmp_path / "src", arch, layers=4, components=("dit",))
    cfg = dit_config(arch, layers=4)
    noise = initial_noise((1, 16, 5, 60, 104), 0, DEV)  # 5 x 30 x 52 = 7800 tokens
    text = torch.randn(1, 77, cfg.text_dim, generator=torch.Generator().manual_seed(0)).to(DEV, torch.bfloat16)
    opts = dit.DiTOptions(dtype=torch.bfloat16, chunk_tokens=4096)

    def final_latent(quant: str, backend: str) -> torch.Tensor:
        pack = tmp_path / f"pack-{quant}"
        if not pack.exists():
            convert_checkpoint(tmp_path / "src", pack, ConvertOptions(arch=arch, quant=quant))
        weights = {n: t.to(DEV) for n, t in resident_weights(pack).items()}
        attn.set_attn_backend(backend)
        kv: dict = {}

        def velocity(x, t):
            return dit.forward(weights, cfg, x.to(torch.bfloat16), t, text, kv_cache=kv, opts=opts).float()

        return denoise(velocity, noise.clone(), make_scheduler("unipc", 4, 5.0))

    base = final_latent("int8", "cudnn")
    _, moved = attn.attention_error(final_latent("none", "cudnn"), base)
    for name in _sage_variants():
        got = final_latent("int8", name)
        cos, rel = attn.attention_error(got, base)
        print(f"1.3B-shaped, 4 steps: {name} vs cudnn final latent cosine {cos:.6f} rel L2 {rel:.4f} "
              f"(bf16 vs int8 weights, both cudnn: rel L2 {moved:.4f})")  # fmt: skip
        assert torch.isfinite(got).all() and cos >= 0.99, (name, cos, rel)


def test_key_slots_permute_within_32_key_blocks():
    """The stored fp8 V^T key order: a permutation inside each 32-key block, the same for every block."""
    from wanpack.runtime.ops import sage_attention as sa

    slots = sa.key_slots(128)
    assert sorted(slots.tolist()) == list(range(128))
    assert torch.equal(slots // 32, torch.arange(128) // 32)
    assert torch.equal(slots[32:64] - 32, slots[:32])
    # the thread holding accumulator columns 0, 1 and 8, 9 (pairs 8 apart) feeds operand columns 0-3
    assert slots[[0, 1, 8, 9, 16, 17, 24, 25]].tolist() == [0, 1, 2, 3, 16, 17, 18, 19]
