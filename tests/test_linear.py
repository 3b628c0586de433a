"""Quantized linear backends against a dequantize-then-matmul reference, and the backend registry's behaviour."""

from __future__ import annotations

import pytest
import torch
from interp import INTERPRETER_FIXES, run_in_triton_interpreter

from wanpack.convert.quantize import dequantize_weight, quantize_weight
from wanpack.errors import UsageError, WanpackError
from wanpack.runtime.ops import linear as lin
from wanpack.runtime.ops.report import report_backends


@pytest.fixture(autouse=True)
def _auto_backend():
    lin.set_gemm_backend(None)
    yield
    lin.set_gemm_backend(None)


def force(backend: str) -> None:
    """Force a backend for CPU tensors, or skip where this torch's CPU kernel cannot do it (2.11's CPU _scaled_mm
    takes per-tensor scales only; CI's 2.13 takes row-wise ones)."""
    why = lin.BACKENDS[backend].unavailable(torch.device("cpu"))
    if why:
        pytest.skip(why)
    lin.set_gemm_backend(backend)


def hard_inputs(m=48, k=256, n=96, seed=0):
    """Activations with outlier channels, an outlier token and all-zero rows; Gaussian weights with one hot row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, 7] *= 60.0  # outlier channel
    x[11] *= 200.0  # outlier token
    x[3] = 0.0
    x[m - 1] = 0.0
    w = torch.randn(n, k, generator=gen) / k**0.5
    w[5, 9] = 4.0  # one large weight
    w[17] = 0.0  # an all-zero weight row -> scale 0
    bias = 0.1 * torch.randn(n, generator=gen)
    return x, w, bias


def exact_w8a8(qx, sx, qw, sw, bias):
    """The value a W8A8 GEMM must produce from these quantized operands, in float64."""
    return (qx.double() @ qw.double().t()) * sx.double() * sw.double().t() + bias.double()


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_dequant_reference_equals_matmul_of_dequantized_weight(scheme):
    x, w, bias = hard_inputs()
    q, s = quantize_weight(w, scheme)
    got = lin.linear(x, q, bias, s)
    assert lin.gemm_backend(q.dtype, "cpu").name == "dequant"
    torch.testing.assert_close(got, torch.nn.functional.linear(x, dequantize_weight(q, s), bias), rtol=0, atol=0)


def test_float_weights_take_plain_matmul():
    x, w, bias = hard_inputs()
    torch.testing.assert_close(lin.linear(x, w.bfloat16(), bias), torch.nn.functional.linear(x, w.bfloat16().float(),
                                                                                              bias))  # fmt: skip


def test_int_mm_backend_matches_exact_w8a8_with_outliers_and_zero_rows():
    x, w, bias = hard_inputs()
    qw, sw = quantize_weight(w, "int8")
    lin.set_gemm_backend("int_mm")
    got = lin.linear(x, qw, bias, sw)
    qx, sx = lin.quantize_activation_torch(x, torch.int8)
    ref = exact_w8a8(qx, sx, qw, sw, bias)
    assert torch.isfinite(got).all()
    assert torch.equal(got[3], bias) and torch.equal(got[-1], bias)  # zero rows give the bias, no NaN
    assert torch.equal(sx[3], torch.zeros(1)) and qx[3].abs().max() == 0
    # int32 accumulation is exact; only the fp32 epilogue rounds
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_scaled_mm_backend_matches_exact_w8a8_with_outliers_and_zero_rows():
    x, w, bias = hard_inputs()
    qw, sw = quantize_weight(w, "fp8")
    force("scaled_mm")
    got = lin.linear(x, qw, bias, sw)
    qx, sx = lin.quantize_activation_torch(x, torch.float8_e4m3fn)
    ref = exact_w8a8(qx, sx, qw, sw, bias)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[3], bias.bfloat16().float())  # bias only, through the bf16 output
    # the GEMM writes bf16 (row-wise scaling requires it): half a bf16 ulp, 2^-9 relative, plus fp32 accumulation
    err = (got.double() - ref).abs() / ref.abs().clamp_min(1e-3 * ref.abs().max().item())
    assert err.max().item() < 2**-8


@pytest.mark.parametrize(("scheme", "backend"), [("int8", "int_mm"), ("fp8", "scaled_mm")])
def test_widths_cublaslt_refuses_still_give_the_w8a8_result(scheme, backend):
    """K = 40, N = 24 (a tiny CLIP's width on the GPU raised "mat1 ... divisible by 16" on an H200): the same
    quantized operands go through an fp32 GEMM instead, also when only the quantized activation exists."""
    x, w, bias = hard_inputs(m=40, k=40, n=24)
    qw, sw = quantize_weight(w, scheme)
    force(backend)
    qdtype = torch.int8 if scheme == "int8" else torch.float8_e4m3fn
    qx, sx = lin.quantize_activation_torch(x, qdtype)
    ref = exact_w8a8(qx, sx, qw, sw, bias)
    quantized_only = lin.QuantizedActivation(None, {qdtype: (qx, sx)}, shape=x.shape, dtype=x.dtype)
    for a in (x, quantized_only):
        got = lin.linear(a, qw, bias, sw)
        assert got.shape == (40, 24) and got.dtype == x.dtype
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("scheme,backend", [("int8", "int_mm"), ("fp8", "scaled_mm"), ("int8", "dequant"),
                                            ("fp8", "dequant")])  # fmt: skip
def test_quantized_activation_is_bit_identical_and_quantizes_once(scheme, backend, monkeypatch):
    x, w, bias = hard_inputs()
    x = x.bfloat16().reshape(2, 24, -1)  # 3-D, as the DiT passes it
    qw, sw = quantize_weight(w, scheme)
    force(backend)
    ref_k, ref_v = lin.linear(x, qw, bias, sw), lin.linear(x, qw[:50], bias[:50], sw[:50])
    calls = []
    real = lin.quantize_activation
    monkeypatch.setattr(lin, "quantize_activation", lambda *a: calls.append(a) or real(*a))
    act = lin.QuantizedActivation(x)
    got_k, got_v = lin.linear(act, qw, bias, sw), lin.linear(act, qw[:50], bias[:50], sw[:50])
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v) and got_k.shape == (2, 24, 96)
    assert len(calls) == (0 if backend == "dequant" else 1)  # dequant uses x itself; W8A8 quantizes once for both
    assert torch.equal(lin.linear(act, w.bfloat16(), bias), lin.linear(x, w.bfloat16(), bias))  # float weights: x
    q, s = act.quantized(qw.dtype)  # what a fused producer must hand in: exactly quantize_activation's values
    rq, rs = lin.quantize_activation_torch(x.reshape(48, -1), qw.dtype)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    handed = lin.QuantizedActivation(x, {qw.dtype: (rq, rs)})
    assert torch.equal(lin.linear(handed, qw, bias, sw), ref_k)


@pytest.mark.parametrize("scheme,backend", [("int8", "int_mm"), ("fp8", "scaled_mm")])
def test_quantized_only_activation_gives_the_same_output(scheme, backend):
    """A producer that keeps only the quantized copy (no 16-bit x) yields exactly what the plain tensor yields."""
    x, w, bias = hard_inputs()
    x = x.bfloat16().reshape(2, 24, -1)
    qw, sw = quantize_weight(w, scheme)
    force(backend)
    assert lin.reads_quantized_only(qw.dtype, "cpu", 48)
    ref = lin.linear(x, qw, bias, sw)
    only = lin.QuantizedActivation(None, {qw.dtype: lin.quantize_activation(x.reshape(48, -1), qw.dtype)},
                                   shape=x.shape, dtype=x.dtype)  # fmt: skip
    assert only.rows == 48 and only.device == x.device
    assert torch.equal(lin.linear(only, qw, bias, sw), ref)
    with pytest.raises(RuntimeError, match="quantized form"):
        lin.linear(only, w.bfloat16(), bias)  # float weights would need the plain activation
    with pytest.raises(ValueError):
        lin.QuantizedActivation(None, shape=x.shape, dtype=x.dtype)  # nothing to compute from


def test_reads_quantized_only_knows_which_backends_need_x():
    lin.set_gemm_backend(None)
    assert not lin.reads_quantized_only(torch.int8, "cpu", 4096)  # CPU default: weight-only dequant reads x
    assert not lin.reads_quantized_only(torch.bfloat16, "cpu", 4096)
    lin.set_gemm_backend("int_mm")
    assert lin.reads_quantized_only(torch.int8, "cpu", 4096)
    assert not lin.reads_quantized_only(torch.int8, "cpu", 16)  # cuBLASLt needs M > 16: small inputs go dequant
    lin.set_gemm_backend(None)


def _predicted_rms_error(x, w, qx, sx, qw, sw, scheme):
    """RMS output error expected from independent rounding of both operands (variance step^2 / 12 per element)."""
    if scheme == "int8":
        vx, vw = (sx**2 / 12).expand_as(x), (sw**2 / 12).expand_as(w)
    else:  # e4m3: step = 2^(e - 3) at binade e of the scaled value, 2^-9 for subnormals
        def var(q, s):
            mag = q.float().abs().clamp_min(2.0**-6)
            return (2.0 ** (torch.floor(torch.log2(mag)) - 3) * s) ** 2 / 12

        vx, vw = var(qx, sx), var(qw, sw)
    var_y = vx @ (w**2).t() + (x**2) @ vw.t()
    return var_y.mean().sqrt().item()


@pytest.mark.parametrize("scheme,backend", [("int8", "int_mm"), ("fp8", "scaled_mm")])
def test_w8a8_error_is_what_quantization_predicts(scheme, backend):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 512, generator=gen)
    w = torch.randn(384, 512, generator=gen) / 512**0.5
    qw, sw = quantize_weight(w, scheme)
    qx, sx = lin.quantize_activation_torch(x, qw.dtype)
    force(backend)
    err = (lin.linear(x, qw, None, sw) - x @ w.t()).pow(2).mean().sqrt().item()
    predicted = _predicted_rms_error(x, w, qx, sx, qw, sw, scheme)
    print(f"{scheme}: rms error {err:.4g}, predicted {predicted:.4g}")
    assert 0.7 * predicted < err < 1.3 * predicted  # bf16 output rounding adds a little for fp8


def test_registry_errors_and_choice():
    with pytest.raises(UsageError, match="unknown --gemm"):
        lin.set_gemm_backend("cublas9000")
    lin.set_gemm_backend("sgl")
    with pytest.raises(WanpackError, match="not available on cpu"):
        lin.gemm_backend(torch.int8, "cpu")
    lin.set_gemm_backend("triton")
    with pytest.raises(UsageError, match="does not handle"):
        lin.gemm_backend(torch.float8_e4m3fn, "cpu")
    lin.set_gemm_backend("auto")
    assert lin.describe_gemm("cpu") == {"bf16": "matmul", "int8": "dequant", "fp8": "dequant"}


def test_backend_report_is_logged_once():
    lines = []
    report_backends("cpu", log=lines.append)
    info = report_backends("cpu", log=lines.append)
    assert info["attention"] == "sdpa" and info["norms"] == "torch"
    assert len(lines) <= 1  # another test may have reported cpu already


_TRITON_SCRIPT = r"""
import torch
from wanpack.runtime.ops import triton_kernels as tk
from wanpack.runtime.ops.linear import quantize_activation_torch
gen = torch.Generator().manual_seed(0)
x = torch.randn(70, 96, generator=gen); x[:, 5] *= 50; x[4] = 0
q, s = tk.quantize_rows(x, "int8")
rq, rs = quantize_activation_torch(x, torch.int8)
assert torch.equal(s, rs), (s - rs).abs().max()
assert torch.equal(q, rq)
w = torch.randint(-127, 128, (40, 96), dtype=torch.int8, generator=gen)
ws = torch.rand(40, 1, generator=gen)
b = torch.randn(40, generator=gen)
for bias, k in ((b, 96), (None, 80)):
    c = tk.int8_gemm(q[:, :k], s, w[:, :k].contiguous(), ws, bias, torch.float32)
    ref = (q[:, :k].double() @ w[:, :k].double().t()) * s.double() * ws.double().t()
    if bias is not None:
        ref = ref + b.double()
    assert torch.isfinite(c).all()
    tol = 1e-6 * ref.abs().max().item()
    assert torch.allclose(c.double(), ref, rtol=1e-6, atol=tol), (c.double() - ref).abs().max()
    assert torch.equal(c[4], torch.zeros(40) if bias is None else b)
print("ok")
"""


def test_triton_int8_kernels_in_interpreter():
    """The Triton quantizer and GEMM (masked K tail too) on CPU through TRITON_INTERPRET=1."""
    run_in_triton_interpreter(_TRITON_SCRIPT)


_GEMM_ADD_SCRIPT = INTERPRETER_FIXES + r"""
import torch
from wanpack.runtime.ops import triton_kernels as tk
gen = torch.Generator().manual_seed(1)
for batch, rows, k, n, gate_rows, dtype in ((1, 70, 96, 40, 1, torch.float32), (2, 37, 80, 72, 2, torch.float32),
                                            (2, 45, 64, 33, 0, torch.bfloat16)):
    q = torch.randint(-127, 128, (batch * rows, k), dtype=torch.int8, generator=gen)
    s = torch.rand(batch * rows, 1, generator=gen) / 50
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    ws = torch.rand(n, 1, generator=gen) / 50
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    gate = torch.randn(gate_rows, 1, n, generator=gen) if gate_rows else None
    stream = torch.randn(batch, rows + 20, n, generator=gen).to(dtype)  # the chunk is tokens 10..10+rows
    before = stream.clone()
    tk.int8_gemm_add_(stream[:, 10 : 10 + rows], q, s, w, ws, bias, gate)
    y = ((q.double() @ w.double().t()) * s.double() * ws.double().t() + bias.double()).reshape(batch, rows, n)
    ref = before[:, 10 : 10 + rows].double() + (y if gate is None else gate.double() * y)
    got = stream[:, 10 : 10 + rows].double()
    tol = (1e-6 if dtype == torch.float32 else 2**-8) * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol, (batch, rows, (got - ref).abs().max().item())
    assert torch.equal(stream[:, :10], before[:, :10]) and torch.equal(stream[:, 10 + rows :], before[:, 10 + rows :])
print("ok")
"""


def test_triton_gemm_residual_add_in_interpreter():
    """The GEMM's residual epilogue (out += gate * product) on chunks of a residual stream: batch 1 and 2, a gate
    per batch entry, one shared, none; fp32 and bf16 streams; tokens outside the chunk untouched."""
    run_in_triton_interpreter(_GEMM_ADD_SCRIPT)


def test_linear_add_without_a_fused_backend_is_linear_then_add():
    """On CPU (dequant backend) linear_add_ is the linear in x's dtype followed by the fp32 add."""
    from wanpack.runtime.ops.linear import add_scaled_, linear, linear_add_

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 32, generator=gen).to(torch.bfloat16)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    ws = torch.rand(16, 1, generator=gen) / 100
    gate = torch.randn(2, 1, 16, generator=gen)
    out = torch.randn(2, 9, 16, generator=gen)
    want = out.clone()
    add_scaled_(want, linear(x, w, None, ws), gate)
    linear_add_(out, x, w, None, ws, gate)
    assert torch.equal(out, want)


def test_gemm_autotuners_are_per_thread_where_tuning_results_are_kept():
    """Two threads launching int8 GEMMs (a session's warm-up beside the main thread) never share an autotuner's
    per-call state: each gets its own when Triton keeps tuning results on disk, else they share one and take turns."""
    import threading

    pytest.importorskip("triton")
    tk = pytest.importorskip("wanpack.runtime.ops.triton_kernels")
    here, here_again = tk._gemm_tuner(False), tk._gemm_tuner(False)
    assert here[0] is here_again[0]
    residual = tk._gemm_tuner(True)[0]
    assert residual is not here[0] and residual.restore_value == ["c_ptr"] and not here[0].restore_value
    other = []
    thread = threading.Thread(target=lambda: other.append(tk._gemm_tuner(False)))
    thread.start()
    thread.join()
    if tk.CACHE_TUNING:
        assert other[0][0] is not here[0]
        assert other[0][0].fn is here[0].fn  # one JIT function: compiled kernels are shared
    else:
        assert other[0][0] is here[0] and other[0][1] is here[1] is tk._shared_turns


@pytest.mark.gpu
def test_concurrent_gemms_from_two_threads_match_one_thread():
    import threading

    from wanpack.runtime.ops.linear import linear

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = [(300, 512, 1024), (700, 1024, 512), (64, 512, 512)]
    cases = []
    for rows, inp, out in shapes:
        x = torch.randn(rows, inp, device=dev, generator=gen).to(torch.bfloat16)
        w = torch.randint(-127, 128, (out, inp), device=dev, dtype=torch.int8, generator=gen)
        s = torch.rand(out, 1, device=dev, generator=gen) / 100
        cases.append((x, w, s))
    alone = [linear(x, w, None, s) for x, w, s in cases]
    got: dict[int, list] = {0: [], 1: []}

    def work(i):
        for _ in range(20):
            got[i].append([linear(x, w, None, s) for x, w, s in cases])

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    for i in (0, 1):
        assert len(got[i]) == 20
        for outs in got[i]:
            assert all(torch.equal(a, b) for a, b in zip(alone, outs, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "plain-loads"])
def test_triton_int8_gemm_matches_exact_product_on_gpu(tma, monkeypatch):
    """Both ways the GEMM takes its tiles (TMA descriptors on sm90+, plain loads elsewhere) against the exact int8
    product, at DiT widths and at ragged shapes (rows and columns past a tile, a K that TMA cannot take)."""
    tk = pytest.importorskip("wanpack.runtime.ops.triton_kernels")
    dev = torch.device("cuda")
    if tma and not tk.uses_tma(dev):
        pytest.skip("no TMA on this card")
    monkeypatch.setattr(tk, "uses_tma", lambda device: tma)
    gen = torch.Generator(device=dev).manual_seed(0)
    # one K per path keeps the autotuner's compiles few; N and M vary (ragged last tiles both ways)
    for m, k, n in ((1000, 5120, 5120), (4100, 5120, 13824), (77, 5120, 1000), (300, 200, 264)):
        q = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
        s = torch.rand(m, 1, device=dev, generator=gen) / 1000
        ws = torch.rand(n, 1, device=dev, generator=gen) / 1000
        b = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
        out = tk.int8_gemm(q, s, w, ws, b, torch.bfloat16)
        assert tk._tma_ready(q, w) == (tma and k % 16 == 0)
        exact = torch._int_mm(q, w.t()).double() * s.double() * ws.double().t() + b.double()  # int32 sums: exact
        err = (out.double() - exact).abs() / exact.abs().clamp_min(1e-3)
        assert err.max().item() <= 2**-8, (m, k, n, err.max().item())  # bf16 rounding of the result only


@pytest.mark.gpu
def test_fused_residual_add_adds_once_while_autotuning_on_gpu(monkeypatch):
    """linear_add_ through the Triton backend against the exact int8 product: a fresh tuner (no results on disk)
    times every config on the real stream, so this also proves the autotuner puts the stream back after each
    timing (one update, not dozens). Batch 2 with a gate per entry, and the DiT's width."""
    import contextlib

    tk = pytest.importorskip("wanpack.runtime.ops.triton_kernels")
    dev = torch.device("cuda")
    monkeypatch.setattr(tk, "CACHE_TUNING", {})
    fresh = {True: tk._make_gemm_tuner(True), False: tk._make_gemm_tuner(False)}
    monkeypatch.setattr(tk, "_gemm_tuner", lambda residual: (fresh[residual], contextlib.nullcontext()))
    lin.set_gemm_backend("triton")
    try:
        gen = torch.Generator(device=dev).manual_seed(0)
        for batch, rows, k, n in ((1, 1000, 5120, 5120), (2, 300, 512, 264)):
            x = torch.randn(batch, rows, k, device=dev, generator=gen).to(torch.bfloat16)
            w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
            ws = torch.rand(n, 1, device=dev, generator=gen) / 1000
            bias = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
            gate = torch.randn(batch, 1, n, device=dev, generator=gen)
            stream = torch.randn(batch, rows + 16, n, device=dev, generator=gen)
            before = stream.clone()
            lin.linear_add_(stream[:, 8 : 8 + rows], x, w, bias, ws, gate)
            q, xs = lin.quantize_activation(x.reshape(-1, k), torch.int8)
            exact = torch._int_mm(q, w.t()).double() * xs.double() * ws.double().t() + bias.double()
            ref = before[:, 8 : 8 + rows].double() + gate.double() * exact.reshape(batch, rows, n)
            err = (stream[:, 8 : 8 + rows].double() - ref).abs().max().item() / ref.abs().max().item()
            assert err <= 1e-6, (batch, rows, k, n, err)
            outside = (slice(None), [*range(8), *range(8 + rows, rows + 16)])
            assert torch.equal(stream[outside], before[outside])
        assert fresh[True].cache, "the fused add did not go through the residual tuner"
    finally:
        lin.set_gemm_backend("auto")


def test_autotuned_kernels_keep_their_tuning_results_on_disk():
    """Triton writes no tuning results to disk for configs with a pre-hook: every process would re-tune every GEMM
    and attention shape (measured: ~10 s more in a 480p `wanpack run` on an H200, text phase and first step)."""
    tk = pytest.importorskip("wanpack.runtime.ops.triton_kernels")
    from wanpack.runtime.ops import sage_attention as sa

    for configs in (tk._GEMM_CONFIGS, sa._ATTN_CONFIGS):
        assert configs and not any(config.pre_hook for config in configs)
