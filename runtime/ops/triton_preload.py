"""Triton's once-per-process start-up, begun on a side thread before the run command imports torch.

A process's first Triton kernel call costs far more than the kernel. Triton builds its cache key from a SHA-256 of
its own compiler library (libtriton.so: 416 MB in Triton 3.6, 500 MB in 3.9) and of its Python sources, and it
parses each kernel's source (and the helpers it calls) to hash it. On an H200 host (py-spy, 2026-12-01) that was
about 1.1 s, and it landed on the text phase: the text encoder's first quantized linear waited for it.

:func:`start` runs those steps on a daemon thread at the top of `wanpack run` / `wanpack serve`, while the main
thread imports torch (about 2-4 s). Triton hashes in 1 MB chunks and releases the GIL for each, so the two overlap;
each chunk then waits for the GIL that the import holds, which stretched the hash to 2.5-3.3 s on that H200 host
(0.45 s alone on a 2-core CI-class machine), still ending about when the session opens. Both results are cached by
Triton itself (``triton_key`` in an lru_cache, each kernel's ``cache_key`` on the kernel object), so the first real
launch finds them ready. Nothing here changes what Triton computes or which binaries it loads; an error is
recorded and the first launch then simply pays as before.

This module imports neither torch nor triton at import time (importing it must stay cheap).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import time

ENV_SWITCH = "WANPACK_TRITON_PRELOAD"  # "0" turns the preload off
NVIDIA_DEVICE_NODE = "/dev/nvidiactl"  # present where the NVIDIA driver is loaded: there is a GPU to use Triton on
KERNEL_MODULES = ("wanpack.runtime.ops.triton_kernels",)  # the kernels every CUDA run launches (GEMM, quant, norms)


class _Preload:
    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.seconds: dict[str, float] = {}
        self.error: str | None = None


_state = _Preload()
_lock = threading.Lock()


def wanted(device: str | None) -> bool:
    """Whether a preload can pay off: triton installed, an NVIDIA driver present, no ``--device cpu``, not off."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if device is not None and device.strip().lower().startswith("cpu"):
        return False
    if not os.path.exists(NVIDIA_DEVICE_NODE):
        return False
    return importlib.util.find_spec("triton") is not None


def start(device: str | None = None) -> bool:
    """Start the preload thread once per process where :func:`wanted`; returns whether one is running or ran."""
    with _lock:
        if _state.thread is None and wanted(device):
            _state.thread = threading.Thread(target=_run, name="wanpack-triton-preload", daemon=True)
            _state.thread.start()
        return _state.thread is not None


def join(timeout: float | None = None) -> None:
    """Wait for a started preload to end (so its work is not done twice in parallel); no-op when none started."""
    thread = _state.thread
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout)


def report() -> dict:
    """What the preload did, for the run record: {"started": bool, "seconds": {...}, "error": str | None}."""
    return {"started": _state.thread is not None, "seconds": dict(_state.seconds), "error": _state.error}


def preload(modules: tuple[str, ...] = KERNEL_MODULES) -> dict[str, float]:
    """Do the work on the calling thread: import triton, compute its library key, hash our kernels' sources.
    Returns the seconds of each step."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    cache = importlib.import_module("triton.runtime.cache")
    seconds["import"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    library_key = getattr(cache, "triton_key", None)  # an lru_cache'd function in Triton 3.x
    if callable(library_key):
        library_key()
    seconds["triton_key"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    for name in modules:  # importing these imports torch: it waits for the main thread's import to finish
        for kernel in jit_kernels(importlib.import_module(name)):
            _ = kernel.cache_key
    seconds["kernel_keys"] = round(time.perf_counter() - t, 3)
    return seconds


def jit_kernels(module) -> list:
    """The Triton JIT functions a module defines, autotuned or heuristic wrappers unwrapped (each once)."""
    from triton.runtime.jit import JITFunction

    found: dict[int, object] = {}
    for value in vars(module).values():
        fn = value
        while fn is not None and not isinstance(fn, JITFunction):
            fn = getattr(fn, "fn", None)  # Autotuner / Heuristics keep the function they wrap in .fn
        if fn is not None and getattr(fn, "__module__", None) == module.__name__:
            found[id(fn)] = fn
    return list(found.values())


def _run() -> None:
    t = time.perf_counter()
    try:
        _state.seconds.update(preload())
    except Exception as exc:  # noqa: BLE001 - a preload never fails a run; the first launch pays instead
        _state.error = f"{type(exc).__name__}: {exc}"
    finally:
        _state.seconds["total"] = round(time.perf_counter() - t, 3)
