"""The environment knobs the seed guide documents, each with a CLI flag that wins over it.

PYTORCH_CUDA_ALLOC_CONF  expandable_segments:True unless already set (must happen before CUDA initializes: the
                         allocator reads it once). Expandable segments let the activation pool grow and shrink without
                         fragmenting around the fixed slots, which is what keeps peak reserved close to allocated.
DTYPE                    BF16 (default) | FP16: the compute dtype of activations.
ENABLE_GRAPH_MODE        true|false (default false): capture each unit's compute in CUDA graphs and replay it
                         (`wanpack bench`; `run` and `serve` say they run eagerly).

Not a knob but set the same way, before CUDA starts: threads that wait for the GPU sleep instead of spinning
(``blocking_sync``). By default CUDA busy-waits in every synchronize, so a 16 s run used 16 s of a core doing nothing.
"""

from __future__ import annotations

import ctypes
import os

import torch

from wanpack.errors import UsageError

ALLOC_CONF_DEFAULT = "expandable_segments:True"
DTYPES = {"BF16": torch.bfloat16, "FP16": torch.float16}
TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


def apply_alloc_conf(value: str | None = None) -> str:
    """Set PYTORCH_CUDA_ALLOC_CONF (the flag's value, else keep the user's, else the default); returns what is used."""
    if value is not None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = value
    else:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF_DEFAULT)
    return os.environ["PYTORCH_CUDA_ALLOC_CONF"]


def compute_dtype(flag: str | None = None) -> torch.dtype:
    """--dtype, else DTYPE, else BF16."""
    name = (flag or os.environ.get("DTYPE") or "BF16").upper()
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r} (from --dtype or DTYPE) - choose BF16 or FP16")
    return DTYPES[name]


def graph_mode(flag: bool | None = None) -> bool:
    """--graph-mode/--no-graph-mode, else ENABLE_GRAPH_MODE, else off."""
    if flag is not None:
        return flag
    raw = os.environ.get("ENABLE_GRAPH_MODE", "").strip().lower()
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise UsageError(f"ENABLE_GRAPH_MODE={raw!r} is not true or false - set it to true or false")


def graph_mode_notice() -> str | None:
    """What `run` and `serve` say when ENABLE_GRAPH_MODE asks for CUDA graphs, which only `wanpack bench` uses so far
    (their VRAM and speed in a whole run are not measured yet); None when it is off. A bad value is a UsageError."""
    if not graph_mode():
        return None
    return "ENABLE_GRAPH_MODE: CUDA graphs are used by `wanpack bench` only so far - this run executes eagerly"


_CU_CTX_SCHED_MASK = 0x07
_CU_CTX_SCHED_BLOCKING_SYNC = 0x04
_blocking: list[bool] = []


def blocking_sync() -> bool:
    """Make CUDA put waiting threads to sleep (CU_CTX_SCHED_BLOCKING_SYNC on every visible GPU's primary context).

    Must run before the context is created to be sure to take effect; torch then adopts the primary context with
    these flags. Best effort: returns whether the driver accepted it (False without a driver or GPU), once per process.
    """
    if _blocking:
        return _blocking[0]
    ok = False
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0:
            set_flags = getattr(lib, "cuDevicePrimaryCtxSetFlags_v2", None) or lib.cuDevicePrimaryCtxSetFlags
            ok = True
            for i in range(count.value):
                dev, flags, active = ctypes.c_int(0), ctypes.c_uint(0), ctypes.c_int(0)
                if lib.cuDeviceGet(ctypes.byref(dev), i) or lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags),
                                                                                          ctypes.byref(active)):  # fmt: skip
                    ok = False
                    continue
                wanted = (flags.value & ~_CU_CTX_SCHED_MASK) | _CU_CTX_SCHED_BLOCKING_SYNC
                ok = set_flags(dev, ctypes.c_uint(wanted)) == 0 and ok
    except (OSError, AttributeError):
        ok = False
    _blocking.append(ok)
    return ok
