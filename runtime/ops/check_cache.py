"""Self-check verdicts remembered between processes, keyed by everything that could change them.

The GEMM and attention backend choices run each candidate once against a reference before trusting it.
On an H200 the attention check alone cost ~0.5 s of every `wanpack run` (a float32 reference through kernels that
load lazily, random inputs), all on the thread that must then plan the DiT's attention. The answer only changes
when the software or the card changes, so a pass is kept in ``<cache>/kernel_checks.json`` under a key made of the
card, its driver, torch / CUDA / cuDNN / Triton versions and a hash of the source files of our kernels. Only passes
are kept: a failing candidate is checked again next time. ``WANPACK_RECHECK=1`` ignores what is kept (and renews it).
The fused norms keep their per-process check: it is also what loads their kernels, off the critical path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

RECHECK_ENV = "WANPACK_RECHECK"
_KERNEL_SOURCES = ("attention.py", "sage_attention.py", "linear.py", "triton_kernels.py")
_LOCK = threading.Lock()


def cache_file() -> Path:
    from wanpack.demo import cache_root

    return cache_root() / "kernel_checks.json"


@functools.cache
def _software_key() -> str:
    """Versions of everything below our kernels, and the kernels' own sources."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        with contextlib.suppress(OSError):
            digest.update((here / name).read_bytes())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return f"torch {torch.__version__} cuda {torch.version.cuda} cudnn {cudnn} triton {triton_version} src {digest.hexdigest()[:16]}"


@functools.cache
def _driver_version() -> int | None:
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    except OSError:
        return None
    return None


def check_key(kind: str, candidate: str, device: torch.device) -> str:
    """The key a verdict is kept under: what was checked, on which card, with which software."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card = f"{props.name} sm{props.major}{props.minor} driver {_driver_version()}"
    else:
        card = device.type
    return f"{kind}:{candidate} | {card} | {_software_key()}"


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(data: dict) -> None:
    """Written whole and renamed into place: a reader never sees half a file; a cache we cannot write is skipped."""
    path, tmp = cache_file(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernel_checks.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def checked(kind: str, candidate: str, device: torch.device, check: Callable[[], bool]) -> bool:
    """``check()``'s verdict, or a pass remembered for the same key (see the module docstring)."""
    key = check_key(kind, candidate, device)
    if os.environ.get(RECHECK_ENV, "0") != "1" and _load().get(key) is True:
        return True
    ok = bool(check())
    if ok:
        with _LOCK:
            data = _load()
            data[key] = True
            _store(data)
    return ok
