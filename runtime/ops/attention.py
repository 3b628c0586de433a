"""Attention backends behind one call: ``attention(q, k, v)`` on [B, L, H, D] tensors, no mask, scale 1/sqrt(D).

- ``cudnn``  torch SDPA restricted to the cuDNN kernel: the default on Hopper (582 vs 366 TFLOP/s for SDPA's flash
             backend measured on an H100 at the 480p sequence).
- ``flash``  flash-attn's flash_attn_func, when installed (default off Hopper when present).
- ``sage``   sageattention's sageattn (int8 QK), when installed; only when forced, it changes the numbers.
- ``sdpa``   torch SDPA with its own kernel choice: the CPU path and the fallback everywhere.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wanpack.errors import UsageError, WanpackError
from wanpack.runtime.ops.devices import concrete_device


@dataclass(frozen=True)
class AttnBackend:
    name: str
    unavailable: Callable[[torch.device], str | None]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _cudnn(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return _sdpa(q, k, v)


def _flash(q, k, v):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def _sage(q, k, v):
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _module_or_cuda(module: str):
    def check(device: torch.device) -> str | None:
        if device.type != "cuda":
            return "needs a CUDA device"
        return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"

    return check


def _cudnn_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    return None if torch.backends.cudnn.is_available() else "cuDNN is not available in this torch build"


BACKENDS: dict[str, AttnBackend] = {
    "cudnn": AttnBackend("cudnn", _cudnn_unavailable, _cudnn),
    "flash": AttnBackend("flash", _module_or_cuda("flash_attn"), _flash),
    "sage": AttnBackend("sage", _module_or_cuda("sageattention"), _sage),
    "sdpa": AttnBackend("sdpa", lambda device: None, _sdpa),
}
ATTN_CHOICES = ("auto", *BACKENDS)

_forced: str | None = None
_chosen: dict[torch.device, AttnBackend] = {}


def set_attn_backend(name: str | None) -> None:
    """Force an attention backend by name (None or 'auto' restores the automatic choice)."""
    global _forced
    if name is not None and name not in ATTN_CHOICES:
        raise UsageError(f"unknown --attn {name!r} - choose one of: {', '.join(ATTN_CHOICES)}")
    _forced = None if name in (None, "auto") else name
    _chosen.clear()


def attn_backend(device: torch.device | str) -> AttnBackend:
    device = concrete_device(device)
    if device not in _chosen:
        _chosen[device] = _choose(device)
    return _chosen[device]


def _choose(device: torch.device) -> AttnBackend:
    if _forced is not None:
        why = BACKENDS[_forced].unavailable(device)
        if why:
            raise WanpackError(f"--attn {_forced} is not available on {device}: {why} - install it or pass --attn auto")
        return BACKENDS[_forced]
    if device.type != "cuda":
        return BACKENDS["sdpa"]
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    order = ("cudnn", "flash", "sdpa") if hopper else ("flash", "sdpa")
    for name in order:
        if BACKENDS[name].unavailable(device) is None and _self_check(BACKENDS[name], device):
            return BACKENDS[name]
    return BACKENDS["sdpa"]


def _self_check(backend: AttnBackend, device: torch.device) -> bool:
    """Run once on a small problem against SDPA's math path; a crash or a wrong answer skips the backend."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, 200, 2, 128, device=device, generator=gen).to(torch.bfloat16) for _ in range(3))
        got = backend.run(q, k, v).float()
        with sdpa_kernel([SDPBackend.MATH]):
            ref = _sdpa(q.float(), k.float(), v.float())
        err = ((got - ref).norm() / ref.norm()).item()
        if err > 0.02:
            print(f"wanpack: attention backend {backend.name} failed its self-check (rel err {err:.3g})",
                  file=sys.stderr)  # fmt: skip
        return err <= 0.02
    except Exception as exc:
        print(f"wanpack: attention backend {backend.name} failed its self-check ({exc!r})", file=sys.stderr)
        return False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over all keys (Wan never masks when sequences are not padded).

    Shapes: q [B, Lq, H, D], k and v [B, Lk, H, D] (last dim contiguous) -> [B, Lq, H, D] in q's dtype.
    fp32 (the reference path) always takes plain SDPA: the cuDNN, flash-attn and sage kernels take fp16/bf16 only.
    """
    if q.dtype not in (torch.float16, torch.bfloat16):
        return _sdpa(q, k, v)
    return attn_backend(q.device).run(q, k, v)
