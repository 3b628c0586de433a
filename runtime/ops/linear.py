"""Linear layers over the weights a pack stores: bf16/fp32, or int8/fp8 with a per-output-channel scale.

``linear(x, weight, bias, scale)`` is the only entry models use. Float weights take a plain matmul. Quantized weights
go to a GEMM backend from a small registry, picked once per (weight dtype, device) and overridable by name:

- ``dequant``   weight-only: W = q * scale in the activation dtype, then matmul. Runs everywhere and defines the
                numbers (the CPU default and the fallback on GPUs without int8/fp8 tensor-core paths).
- ``sgl``       sgl-kernel's int8_scaled_mm / fp8_scaled_mm (CUTLASS), when that optional package imports.
- ``triton``    int8: our Triton GEMM with the scales, bias and cast fused into the epilogue (triton + CUDA).
- ``int_mm``    int8: torch._int_mm (cuBLASLt, int32 out), then a dequant epilogue in torch.
- ``scaled_mm`` fp8: torch._scaled_mm with row-wise scales (sm89+), scales and bias applied by the GEMM.

All W8A8 backends quantize the activation per token, dynamically and symmetrically (scale = absmax(row) / qmax; a zero
row gets scale 0 and yields bias only, never NaN), with the Triton kernel when it is present, else torch ops.
``linear`` also takes a :class:`QuantizedActivation` in place of x: one activation feeding several quantized linears is
then quantized once (or arrives already quantized from a fused producer, see norms.layer_norm_quantized).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from wanpack.errors import UsageError, WanpackError
from wanpack.runtime.ops.check_cache import checked
from wanpack.runtime.ops.devices import concrete_device

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FP8_FAST_ACCUM = True  # Hopper fp8 accumulation precision loss is far below the e4m3 rounding of the inputs
_MIN_ROWS = {"int_mm": 17}  # cuBLASLt's int8 path needs M > 16
GEMM_ROWS_BUCKET_MAX = 8192


def gemm_rows_bucket(rows: int) -> int:
    """The tuning bucket of a GEMM with ``rows`` rows (M): the next power of two, at most 8192. The int8 Triton GEMM
    is autotuned once per (bucket, N, K); the kernel warm-up aims at the same buckets."""
    return min(1 << max(0, rows - 1).bit_length(), GEMM_ROWS_BUCKET_MAX)


@dataclass(frozen=True)
class GemmBackend:
    """One way to multiply activations by a quantized weight; ``unavailable`` says why not on a device, or None."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    unavailable: Callable[[torch.device], str | None]
    run: Callable[[Activation, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # x2d or its wrapper
    # out += gate * product in one pass, where the backend can (see linear_add_); None: the GEMM, then a torch add
    add_into: Callable[..., None] | None = None


# ----------------------------------------------------------------------------------------------- availability


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "needs a CUDA device"


def _sgl_unavailable(device: torch.device) -> str | None:
    if _needs_cuda(device):
        return _needs_cuda(device)
    return None if _has_module("sgl_kernel") else "sgl_kernel is not installed (pip install sgl-kernel)"


def _triton_unavailable(device: torch.device) -> str | None:
    if _needs_cuda(device):
        return _needs_cuda(device)
    return None if _has_module("triton") else "triton is not installed"


def _scaled_mm_unavailable(device: torch.device) -> str | None:
    if device.type == "cpu":
        return _cpu_scaled_mm_row_wise()  # only chosen when forced (tests)
    if device.type != "cuda":
        return f"no fp8 GEMM on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    return None if (major, minor) >= (8, 9) else f"fp8 tensor cores need sm89+, this GPU is sm{major}{minor}"


@functools.cache
def _cpu_scaled_mm_row_wise() -> str | None:
    """Whether this torch's CPU _scaled_mm takes row-wise scales (2.13 does; 2.11's takes per-tensor scales only)."""
    q = torch.zeros((16, 16), dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(q, q.t(), scale_a=torch.ones((16, 1)), scale_b=torch.ones((1, 16)), out_dtype=torch.bfloat16)
    except RuntimeError as exc:
        return f"this torch's CPU _scaled_mm has no row-wise scales ({str(exc).splitlines()[0][:80]})"
    return None


def _int_mm_unavailable(device: torch.device) -> str | None:
    return None if device.type in ("cuda", "cpu") else f"torch._int_mm does not run on {device.type}"


# ----------------------------------------------------------------------------------------------- activation quant


def quantize_activation(x2d: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization: x2d [M, K] -> (q [M, K] int8|fp8, scale [M, 1] float32)."""
    scheme = "int8" if dtype == torch.int8 else "fp8"
    if x2d.is_cuda and _has_module("triton") and _triton_quant_ok(x2d.device, x2d.shape[-1]):
        from wanpack.runtime.ops import triton_kernels

        return triton_kernels.quantize_rows(x2d, scheme)
    return quantize_activation_torch(x2d, dtype)


def quantize_activation_torch(x2d: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference per-token quantizer (several passes; the Triton kernels do it in one, to the same bits).

    scale = absmax / qmax is what dequantizes; the codes are x * (qmax / absmax), one division per row and a multiply
    per element (a zero row gets scale 0 and codes 0).
    """
    qmax = QMAX[dtype]
    amax = x2d.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    # divide tensors, not by a Python scalar: CUDA computes `t / scalar` as `t * (1 / scalar)`, up to 1 ulp off the
    # IEEE quotient that the CPU kernel and the Triton kernels' div_rn give (and _triton_quant_ok then turns Triton off)
    qmax_t = torch.full_like(amax, qmax)
    scale = amax / qmax_t
    inv = torch.where(amax > 0, qmax_t / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    y = x2d.to(torch.float32) * inv
    if dtype == torch.int8:
        # round half away from zero, as the Triton kernels do
        q = (y + torch.where(y >= 0, 0.5, -0.5)).trunc_().to(torch.int8)
    else:
        q = y.clamp_(-qmax, qmax).to(dtype)
    return q, scale


_QUANT_CHECKED: dict[tuple[torch.device, int], bool] = {}


def _triton_quant_ok(device: torch.device, width: int) -> bool:
    """Check the Triton quantizer once per (device, row width) against the torch one, bit for bit (each width is
    its own compiled variant); a mismatch or a crash keeps torch ops for that width."""
    key = (device, width)
    if key not in _QUANT_CHECKED:
        ok = True
        try:
            from wanpack.runtime.ops import triton_kernels

            gen = torch.Generator(device=device).manual_seed(0)
            x = (3 * torch.randn(64, width, device=device, generator=gen)).to(torch.bfloat16)
            x[:, width // 3] *= 40  # an outlier channel
            x[5] = 0
            for dtype, scheme in ((torch.int8, "int8"), (torch.float8_e4m3fn, "fp8")):
                q, s = triton_kernels.quantize_rows(x, scheme)
                rq, rs = quantize_activation_torch(x, dtype)
                ok &= torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
            if not ok:
                print(f"wanpack: triton quantizer differs from torch at width {width}; using torch ops",
                      file=sys.stderr)  # fmt: skip
        except Exception as exc:  # a compile failure on an unusual GPU must not stop generation
            print(f"wanpack: triton quantizer failed its self-check ({exc!r}); using torch ops", file=sys.stderr)
            ok = False
        _QUANT_CHECKED[key] = ok
    return _QUANT_CHECKED[key]


class QuantizedActivation:
    """An activation x [..., K] plus its per-token quantized copies, made at most once per dtype and then shared.

    Quantizing is a full pass over x; when one activation feeds several W8A8 linears (self-attention k and v) this
    keeps it to one. A producer that already has the copy (the fused LayerNorm kernel) hands it in through
    ``quantized``; it must hold what :func:`quantize_activation` returns for x, so results do not depend on who
    quantized. Such a producer may also skip writing x itself (``x=None`` with ``shape``/``dtype``) when every
    consumer reads only the quantized copy (see :func:`reads_quantized_only`): that saves a write and a buffer.
    """

    def __init__(self, x: torch.Tensor | None,
                 quantized: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] | None = None, *,
                 shape: torch.Size | tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        if x is None and (not quantized or shape is None or dtype is None):
            raise ValueError("a QuantizedActivation without x needs its quantized copy, shape and dtype")
        self.x = x
        self._quantized = dict(quantized or {})
        self.shape = torch.Size(x.shape if x is not None else shape)
        self.dtype = x.dtype if x is not None else dtype
        self.device = x.device if x is not None else next(iter(self._quantized.values()))[0].device

    @property
    def x2d(self) -> torch.Tensor:
        if self.x is None:
            raise RuntimeError("this activation was kept only in quantized form, but a linear asked for the plain one")
        return self.x.reshape(-1, self.x.shape[-1])

    @property
    def rows(self) -> int:
        return self.shape.numel() // self.shape[-1] if len(self.shape) else 0

    def quantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [M, K] int8|fp8, scale [M, 1] float32) of x viewed as [M, K], computed on first use."""
        if dtype not in self._quantized:
            self._quantized[dtype] = quantize_activation(self.x2d, dtype)
        return self._quantized[dtype]


Activation = torch.Tensor | QuantizedActivation


def _plain(a: Activation) -> torch.Tensor:
    return a.x2d if isinstance(a, QuantizedActivation) else a


def _quantized(a: Activation, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return a.quantized(dtype) if isinstance(a, QuantizedActivation) else quantize_activation(a, dtype)


def _rows(a: Activation) -> int:
    return a.rows if isinstance(a, QuantizedActivation) else a.shape[0]


def _gemm_out_dtype(a: Activation) -> torch.dtype:
    """What the fp8/sgl kernels write: they only produce 16-bit floats, so fp32 activations get bf16, cast after."""
    return a.dtype if a.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


# ----------------------------------------------------------------------------------------------- backends


def _run_dequant(a, weight, scale, bias):
    x2d = _plain(a)
    w = (weight.to(torch.float32) * scale.to(torch.float32)).to(x2d.dtype)
    return torch.nn.functional.linear(x2d, w, None if bias is None else bias.to(x2d.dtype))


def _cublaslt_refuses(q: torch.Tensor, weight: torch.Tensor, multiple: int) -> bool:
    """cuBLASLt's int8 and fp8 GEMMs need K and N in multiples of 8 / 16 (real Wan widths always are; the tiny
    models of tests and `wanpack synth --dim-scale tiny` need not be)."""
    return q.shape[1] % multiple != 0 or weight.shape[0] % multiple != 0


def _emulated_gemm(q, xs, weight, scale, bias, dtype: torch.dtype) -> torch.Tensor:
    """The quantized GEMM in fp32 from the same quantized inputs, for shapes the library GEMM refuses."""
    y = (q.to(torch.float32) * xs.to(torch.float32)) @ (weight.to(torch.float32) * scale.to(torch.float32)).t()
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(dtype)


def _run_int_mm(a, weight, scale, bias):
    if _rows(a) < _MIN_ROWS["int_mm"]:
        return _run_dequant(a, weight, scale, bias)
    q, xs = _quantized(a, torch.int8)
    if _cublaslt_refuses(q, weight, 8):
        return _emulated_gemm(q, xs, weight, scale, bias, a.dtype)
    acc = torch._int_mm(q, weight.t())
    y = acc.to(torch.float32).mul_(xs).mul_(scale.reshape(1, -1).to(torch.float32))
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(a.dtype)


def _run_triton_int8(a, weight, scale, bias):
    from wanpack.runtime.ops import triton_kernels

    q, xs = _quantized(a, torch.int8)
    return triton_kernels.int8_gemm(q, xs, weight, scale, bias, a.dtype)


def _add_triton_int8(out, a, weight, scale, bias, gate):
    from wanpack.runtime.ops import triton_kernels

    q, xs = _quantized(a, torch.int8)
    triton_kernels.int8_gemm_add_(out, q, xs, weight, scale, bias, gate)


def _run_scaled_mm(a, weight, scale, bias):
    q, xs = _quantized(a, torch.float8_e4m3fn)
    if _cublaslt_refuses(q, weight, 16):
        return _emulated_gemm(q, xs, weight, scale, bias, a.dtype)
    out_dtype = _gemm_out_dtype(a)
    y = torch._scaled_mm(q, weight.t(), scale_a=xs, scale_b=scale.reshape(1, -1).to(torch.float32),
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                         use_fast_accum=FP8_FAST_ACCUM and q.is_cuda)  # fmt: skip
    return y.to(a.dtype)


def _run_sgl(a, weight, scale, bias):
    import sgl_kernel

    q, xs = _quantized(a, weight.dtype)
    out_dtype = _gemm_out_dtype(a)
    fn = sgl_kernel.int8_scaled_mm if weight.dtype == torch.int8 else sgl_kernel.fp8_scaled_mm
    y = fn(q, weight.t(), xs, scale.reshape(-1).to(torch.float32), out_dtype,
           None if bias is None else bias.to(out_dtype))  # fmt: skip
    return y.to(a.dtype)


_INT8, _FP8 = torch.int8, torch.float8_e4m3fn
BACKENDS: dict[str, GemmBackend] = {
    "sgl": GemmBackend("sgl", (_INT8, _FP8), _sgl_unavailable, _run_sgl),
    "triton": GemmBackend("triton", (_INT8,), _triton_unavailable, _run_triton_int8, _add_triton_int8),
    "int_mm": GemmBackend("int_mm", (_INT8,), _int_mm_unavailable, _run_int_mm),
    "scaled_mm": GemmBackend("scaled_mm", (_FP8,), _scaled_mm_unavailable, _run_scaled_mm),
    "dequant": GemmBackend("dequant", (_INT8, _FP8), lambda device: None, _run_dequant),
}
# Automatic preference on CUDA, best first; CPU always takes the reference ``dequant`` unless forced.
AUTO_ORDER = {_INT8: ("sgl", "triton", "int_mm", "dequant"), _FP8: ("sgl", "scaled_mm", "dequant")}
GEMM_CHOICES = ("auto", *BACKENDS)

_forced: str | None = None
_chosen: dict[tuple[torch.dtype, torch.device], GemmBackend] = {}
# A backend is chosen (self-checked) once, not twice, when two threads (a session's kernel warm-up beside the main
# thread) ask at once. Running GEMMs needs no lock here: triton_kernels keeps its autotuners thread-safe itself.
_CHOICE_LOCK = threading.RLock()


def set_gemm_backend(name: str | None) -> None:
    """Force a backend by name for every quantized linear (None or 'auto' restores the automatic choice)."""
    global _forced
    if name is not None and name not in GEMM_CHOICES:
        raise UsageError(f"unknown --gemm {name!r} - choose one of: {', '.join(GEMM_CHOICES)}")
    _forced = None if name in (None, "auto") else name
    _chosen.clear()


def gemm_backend(dtype: torch.dtype, device: torch.device | str) -> GemmBackend:
    """The backend quantized weights of ``dtype`` use on ``device`` (chosen once, then cached)."""
    device = concrete_device(device)
    key = (dtype, device)
    if key not in _chosen:
        with _CHOICE_LOCK:
            if key not in _chosen:
                _chosen[key] = _choose(dtype, device)
    return _chosen[key]


def _choose(dtype: torch.dtype, device: torch.device) -> GemmBackend:
    if _forced is not None:
        backend = BACKENDS[_forced]
        if dtype not in backend.dtypes:
            kinds = ", ".join(n for n, b in BACKENDS.items() if dtype in b.dtypes)
            raise UsageError(f"--gemm {_forced} does not handle {dtype} weights - choose one of: {kinds}")
        why = backend.unavailable(device)
        if why:
            raise WanpackError(f"--gemm {_forced} is not available on {device}: {why} - install it or pass --gemm auto")
        return backend
    if device.type != "cuda":
        return BACKENDS["dequant"]
    for name in AUTO_ORDER[dtype]:
        if BACKENDS[name].unavailable(device) is None and checked(f"gemm {dtype}", name, device,
                                                                  lambda b=BACKENDS[name]: _self_check(b, dtype, device)):
            return BACKENDS[name]
    return BACKENDS["dequant"]


def _self_check(backend: GemmBackend, dtype: torch.dtype, device: torch.device) -> bool:
    """Run a backend once on a small problem against ``dequant``; a crash or a wrong answer skips it."""
    if backend.name == "dequant":
        return True
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(96, 256, device=device, generator=gen).to(torch.bfloat16)
        w = torch.randn(128, 256, device=device, generator=gen)
        scale = w.abs().amax(dim=1, keepdim=True) / QMAX[dtype]
        q = (w / scale).round().to(dtype) if dtype == torch.int8 else (w / scale).to(dtype)
        bias = torch.randn(128, device=device, generator=gen).to(torch.bfloat16)
        got = backend.run(x, q, scale, bias).float()
        ref = _run_dequant(x.float(), q, scale, bias.float())
        err = ((got - ref).norm() / ref.norm()).item()
        ok = err < (0.03 if dtype == torch.int8 else 0.1)
        if not ok:
            print(f"wanpack: gemm backend {backend.name} failed its self-check (rel err {err:.3g})", file=sys.stderr)
        return ok
    except Exception as exc:
        print(f"wanpack: gemm backend {backend.name} failed its self-check ({exc!r})", file=sys.stderr)
        return False


def linear(x: Activation, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y = x @ W^T + b, where W = weight * scale when the weight is quantized.

    Shapes: x [..., in] (a tensor or a QuantizedActivation of one), weight [out, in], scale [out, 1] float32
    (quantized weights only), bias [out]. Returns [..., out] in x's dtype.
    """
    lead, dtype, device = x.shape[:-1], x.dtype, x.device
    if scale is None or weight.dtype not in QMAX:
        plain = x.x if isinstance(x, QuantizedActivation) else x
        if plain is None:
            raise RuntimeError("float weights need the plain activation, but it was kept only in quantized form")
        w = weight.to(dtype) if scale is None else (weight.float() * scale.float()).to(dtype)
        return torch.nn.functional.linear(plain, w, None if bias is None else bias.to(dtype))
    a = x if isinstance(x, QuantizedActivation) else x.reshape(-1, x.shape[-1])
    y = gemm_backend(weight.dtype, device).run(a, weight, scale, bias)
    return y.reshape(*lead, weight.shape[0])


def add_scaled_(out: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> None:
    """out += y (* gate), summed in at least fp32 (out may be a view, e.g. a chunk of the DiT's residual stream)."""
    wide = out if out.dtype == torch.promote_types(out.dtype, torch.float32) else out.float()
    if gate is None:
        wide.add_(y)
    else:
        wide.addcmul_(y, gate)
    if wide is not out:
        out.copy_(wide)


def _fusable_add(out: torch.Tensor, rows: int, n: int, gate: torch.Tensor | None) -> bool:
    """Whether a backend's fused add can take this out [B, L, N] and gate [B or 1, 1, N]."""
    if out.dim() != 3 or out.shape[-1] != n or out.shape[0] * out.shape[1] != rows or out.stride(-1) != 1:
        return False
    if not out.dtype.is_floating_point or out.dtype == torch.float64:
        return False
    return gate is None or (gate.dim() == 3 and gate.shape[1:] == (1, n) and gate.shape[0] in (1, out.shape[0]))


def linear_add_(out: torch.Tensor, x: Activation, weight: torch.Tensor, bias: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> None:  # fmt: skip
    """out += linear(x, weight, bias, scale) (* gate), in place: the DiT's gated residual add.

    out [B, L, out] (a view of the residual stream), x [B, L, in] or its QuantizedActivation, gate [B or 1, 1, out].
    Where the GEMM backend has a fused form (Triton int8) the product is added in the GEMM's epilogue in fp32 and
    never stored; elsewhere it is the linear in x's dtype, then :func:`add_scaled_`.
    """
    if scale is not None and weight.dtype in QMAX and _fusable_add(out, _rows_of(x), weight.shape[0], gate):
        backend = gemm_backend(weight.dtype, out.device)
        if backend.add_into is not None:
            a = x if isinstance(x, QuantizedActivation) else x.reshape(-1, x.shape[-1])
            backend.add_into(out, a, weight, scale, bias, gate)
            return
    add_scaled_(out, linear(x, weight, bias, scale), gate)


def _rows_of(x: Activation) -> int:
    return x.rows if isinstance(x, QuantizedActivation) else x.numel() // max(1, x.shape[-1])


def reads_quantized_only(weight_dtype: torch.dtype, device: torch.device | str, rows: int) -> bool:
    """Whether a linear with ``weight_dtype`` weights on ``device`` reads only the per-token quantized copy of an
    input of ``rows`` tokens (so a fused producer may skip writing the plain activation)."""
    if weight_dtype not in QMAX:
        return False
    backend = gemm_backend(weight_dtype, device)
    if backend.name == "dequant":
        return False
    return not (backend.name == "int_mm" and rows < _MIN_ROWS["int_mm"])


def describe_gemm(device: torch.device | str) -> dict[str, str]:
    """Which backend each weight kind uses on ``device``: {'bf16': 'matmul', 'int8': ..., 'fp8': ...}.

    A kind the forced backend cannot handle shows as '-' (using such weights raises the UsageError).
    """
    info = {"bf16": "matmul"}
    for kind, dtype in QUANT_DTYPES.items():
        forced_other = _forced is not None and dtype not in BACKENDS[_forced].dtypes
        info[kind] = "-" if forced_other else gemm_backend(dtype, device).name
    return info
