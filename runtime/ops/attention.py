"""Attention backends behind one call: ``attention(q, k, v)`` on [B, L, H, D] tensors, no mask, scale 1/sqrt(D).

- ``cudnn``        torch SDPA restricted to the cuDNN kernel: the default on Hopper (582 vs 366 TFLOP/s for SDPA's
                   flash backend measured on an H100 at the 480p sequence).
- ``flash``        flash-attn's flash_attn_func, when installed (default off Hopper when present).
- ``sage``         our quantized kernel (sage_attention.py): int8 Q.K^T with smoothed K, fp8 P.V (sm89+).
- ``sage-pv16``    the same kernel with 16-bit P.V (sm80+).
- ``sageattn-pkg`` the sageattention package's sageattn (int8 Q.K^T, Triton), when installed; only when forced.
- ``sdpa``         torch SDPA with its own kernel choice: the CPU path and the fallback everywhere.

The quantized backends change the numbers (on an H200, per call against fp32 on realistic inputs at Wan 14B sizes:
cosine 0.99994 for self-attention, 0.9995-0.9996 for text and image cross-attention; a 14B int8 block's update error
within 1.2x of the int8 scheme's bound). ``auto`` tries ``sage`` first where it runs (sm89+: fp8 tensor cores), since
on that H200 it measured 1.41-1.46x cuDNN at Wan 14B's 480p and 720p self-attention (docs/PERFORMANCE.md).
WANPACK_SAGE_AUTO picks what ``auto`` considers: ``0`` exact kernels only; unset or ``1`` ``sage`` first; ``all``
also ``sage-pv16`` (meant for sm80-sm86 cards, where it has not been measured; on the H200 it ran at 1.09-1.14x
cuDNN). Every candidate passes a self-check once per device on realistic inputs
(:func:`realistic_qkv`) against fp32 SDPA: cosine similarity >= COSINE_MIN and relative L2 error <= REL_L2_MAX,
else the next one is tried.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanpack.errors import UsageError, WanpackError
from wanpack.runtime.ops.check_cache import checked
from wanpack.runtime.ops.devices import concrete_device

SAGE_AUTO_ENV = "WANPACK_SAGE_AUTO"  # "0" / "1" (default) / "all": which quantized kernels `auto` tries first
COSINE_MIN = 0.999  # per call, against fp32 SDPA on the same inputs
REL_L2_MAX = 0.05  # ||out - ref|| / ||ref||; the fp8 P.V path measures ~0.03 on realistic_qkv

Prepared = dict[tuple, object]  # what a backend made from one K/V pair, kept by the caller for its next calls


@dataclass(frozen=True)
class AttnBackend:
    name: str
    unavailable: Callable[[torch.device], str | None]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Prepared | None], torch.Tensor]
    takes: Callable[[torch.Tensor], bool] = lambda q: True  # shapes it serves; others go to the exact backend
    quantized: bool = False  # makes one-byte copies of q, k and v per call site (what memory plans must count)


def _sdpa(q, k, v, prepared=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _cudnn(q, k, v, prepared=None):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return _sdpa(q, k, v)


def _flash(q, k, v, prepared=None):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def _sageattn_pkg(q, k, v, prepared=None):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sage_runner(pv_fp8: bool):
    def run(q, k, v, prepared=None):
        from wanpack.runtime.ops import sage_attention

        key = ("sage", pv_fp8, id(k), id(v))  # the ids guard against one dict serving two K/V pairs
        kv = prepared.get(key) if prepared is not None else None
        if kv is None:
            kv = sage_attention.prepare_kv(k, v, pv_fp8)
            if prepared is not None:
                prepared[key] = kv
        return sage_attention.sage_attention(q, pv_fp8=pv_fp8, kv=kv)

    return run


def _sage_takes(q: torch.Tensor) -> bool:
    from wanpack.runtime.ops.sage_attention import HEAD_DIMS  # imported late: it needs triton

    return q.shape[-1] in HEAD_DIMS


def _module_or_cuda(module: str):
    def check(device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs a CUDA device"
        return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"

    return check


def _sage_unavailable(min_cc: tuple[int, int], what: str):
    def check(device: torch.device) -> str | None:
        why = _module_or_cuda("triton")(device)
        if why:
            return why
        cc = torch.cuda.get_device_capability(device)
        return None if cc >= min_cc else f"{what} need sm{min_cc[0]}{min_cc[1]}+, this GPU is sm{cc[0]}{cc[1]}"

    return check


def _cudnn_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    return None if torch.backends.cudnn.is_available() else "cuDNN is not available in this torch build"


BACKENDS: dict[str, AttnBackend] = {
    "cudnn": AttnBackend("cudnn", _cudnn_unavailable, _cudnn),
    "flash": AttnBackend("flash", _module_or_cuda("flash_attn"), _flash),
    "sage": AttnBackend("sage", _sage_unavailable((8, 9), "fp8 tensor cores"), _sage_runner(True), _sage_takes,
                        quantized=True),  # fmt: skip
    "sage-pv16": AttnBackend("sage-pv16", _sage_unavailable((8, 0), "int8 tensor cores in Triton"),
                             _sage_runner(False), _sage_takes, quantized=True),  # fmt: skip
    "sageattn-pkg": AttnBackend("sageattn-pkg", _module_or_cuda("sageattention"), _sageattn_pkg, quantized=True),
    "sdpa": AttnBackend("sdpa", lambda device: None, _sdpa),
}
ATTN_CHOICES = ("auto", *BACKENDS)

_forced: str | None = None
_chosen: dict[torch.device, AttnBackend] = {}
_exact: dict[torch.device, AttnBackend] = {}
_ran: dict[torch.device, set[str]] = {}


def set_attn_backend(name: str | None) -> None:
    """Force an attention backend by name (None or 'auto' restores the automatic choice)."""
    global _forced
    if name is not None and name not in ATTN_CHOICES:
        raise UsageError(f"unknown --attn {name!r} - choose one of: {', '.join(ATTN_CHOICES)}")
    _forced = None if name in (None, "auto") else name
    if _forced is None:
        sage_in_auto()  # a bad WANPACK_SAGE_AUTO is a usage error now, not at the first attention call
    _chosen.clear()
    _exact.clear()


def sage_in_auto() -> tuple[str, ...]:
    """The quantized backends ``auto`` tries before the exact ones (WANPACK_SAGE_AUTO), read at each choice."""
    value = os.environ.get(SAGE_AUTO_ENV, "1").strip().lower()
    choices = {"0": (), "1": ("sage",), "all": ("sage", "sage-pv16")}
    if value not in choices:
        raise UsageError(f"{SAGE_AUTO_ENV}={value!r} is not one of 0, 1, all - unset it or pick one")
    return choices[value]


def attn_backend(device: torch.device | str) -> AttnBackend:
    device = concrete_device(device)
    if device not in _chosen:
        _chosen[device] = _choose(device)
    return _chosen[device]


def auto_order(device: torch.device, exact_only: bool = False) -> tuple[str, ...]:
    """The backends ``auto`` tries on a CUDA device, best first (``exact_only``: without the quantized ones)."""
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    order = ("cudnn", "flash", "sdpa") if hopper else ("flash", "sdpa")
    return order if exact_only else sage_in_auto() + order


def may_quantize(device: torch.device | str) -> bool:
    """Whether this device's 16-bit attention will likely run the sage kernel (forced, or first in ``auto`` and
    able to run here), decided without its self-check: what the memory planner counts the kernel's one-byte K/V
    copies by. A self-check that fails later only leaves that room unused."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    device = concrete_device(device)
    if _forced is not None:
        return BACKENDS[_forced].quantized
    return any(BACKENDS[name].unavailable(device) is None for name in sage_in_auto())


def exact_backend(device: torch.device | str) -> AttnBackend:
    """The best exact backend for ``device``: what serves the shapes a quantized backend does not take (head dims
    other than 64 and 128), whether the quantized one was forced or picked by ``auto``."""
    device = concrete_device(device)
    if device not in _exact:
        _exact[device] = _choose(device, exact_only=True)
    return _exact[device]


def _choose(device: torch.device, exact_only: bool = False) -> AttnBackend:
    if _forced is not None and not exact_only:
        why = BACKENDS[_forced].unavailable(device)
        if why:
            raise WanpackError(f"--attn {_forced} is not available on {device}: {why} - install it or pass --attn auto")
        return BACKENDS[_forced]
    if device.type != "cuda":
        return BACKENDS["sdpa"]
    for name in auto_order(device, exact_only):
        if BACKENDS[name].unavailable(device) is None and checked("attention", name, device,
                                                                  lambda b=BACKENDS[name]: _self_check(b, device)):
            return BACKENDS[name]
    return BACKENDS["sdpa"]


def realistic_qkv(batch: int, lq: int, lk: int, heads: int, head_dim: int, *, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """q [B, lq, H, D], k and v [B, lk, H, D] with what makes quantized attention hard in a DiT: K carries a
    channel-wise bias shared by all tokens, large on a few channels (what smoothing removes), and a few channels of
    4x spread (what it cannot); queries give logits of std ~2.4 (peaked rows); V has a per-channel offset."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q = 2.0 * randn(batch, lq, heads, head_dim)
    bias = randn(heads, head_dim)
    bias[:, :4] *= 15.0
    spread = torch.ones(heads, head_dim, device=device)
    spread[:, 4:8] = 4.0
    k = randn(batch, lk, heads, head_dim) * spread + bias
    v = randn(batch, lk, heads, head_dim) + 0.5 * randn(heads, head_dim)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int = 2**29) -> torch.Tensor:
    """fp32 attention of the given (16-bit) inputs by SDPA's math kernel, what self-checks, tests and benchmarks
    compare with; query chunk by chunk so the logits held at once stay under ``budget`` elements (75600 tokens x
    40 heads would otherwise need 0.9 TB). Returns [B, Lq, H, D] float32."""
    kf, vf = k.float(), v.float()
    rows = max(1, budget // (k.shape[0] * k.shape[1] * k.shape[2]))
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    with sdpa_kernel([SDPBackend.MATH]):
        for s in range(0, q.shape[1], rows):
            out[:, s : s + rows] = _sdpa(q[:, s : s + rows].float(), kf, vf)
    return out


def attention_error(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L2 error) of got against ref, both flattened, in float64."""
    g, r = got.double().flatten(), ref.double().flatten()
    return F.cosine_similarity(g, r, dim=0).item(), ((g - r).norm() / r.norm()).item()


def _self_check(backend: AttnBackend, device: torch.device) -> bool:
    """Run once on a realistic problem (ragged key length) against fp32 SDPA; a crash or a wrong answer skips it."""
    try:
        q, k, v = realistic_qkv(1, 300, 777, 2, 128, device=device)
        cos, rel = attention_error(backend.run(q, k, v, None), reference_attention(q, k, v))
        ok = cos >= COSINE_MIN and rel <= REL_L2_MAX
        if not ok:
            print(f"wanpack: attention backend {backend.name} failed its self-check (cosine {cos:.5f}, rel err "
                  f"{rel:.3g})", file=sys.stderr)  # fmt: skip
        return ok
    except Exception as exc:
        print(f"wanpack: attention backend {backend.name} failed its self-check ({exc!r})", file=sys.stderr)
        return False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Prepared | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over all keys (Wan never masks when sequences are not padded).

    Shapes: q [B, Lq, H, D], k and v [B, Lk, H, D] (last dim contiguous) -> [B, Lq, H, D] in q's dtype.
    fp32 (the reference path) always takes plain SDPA: the other kernels take fp16/bf16 only. Shapes the chosen
    backend does not serve go to the best exact one (:func:`exact_backend`: cuDNN on Hopper). ``prepared``: a dict
    the caller keeps while k and v stay unchanged (all query chunks of one self-attention), where a backend that
    preprocesses K/V (sage quantizes them) keeps its work for the next call.
    """
    backend = attn_backend(q.device) if q.dtype in (torch.float16, torch.bfloat16) else BACKENDS["sdpa"]
    if not backend.takes(q):
        backend = exact_backend(q.device)
    _ran.setdefault(q.device, set()).add(backend.name)
    return backend.run(q, k, v, prepared)


def attention_ran(device: torch.device | str) -> list[str]:
    """The backends that served attention calls on ``device`` so far in this process, sorted."""
    return sorted(_ran.get(concrete_device(device), ()))
