"""The environment knobs the seed guide documents, each with a CLI flag that wins over it.

PYTORCH_CUDA_ALLOC_CONF  expandable_segments:True unless already set (must happen before CUDA initializes: the
                         allocator reads it once). Expandable segments let the activation pool grow and shrink without
                         fragmenting around the fixed slots, which is what keeps peak reserved close to allocated.
DTYPE                    BF16 (default) | FP16: the compute dtype of activations.
ENABLE_GRAPH_MODE        true|false (default false): capture each unit's compute in CUDA graphs and replay it.
"""

from __future__ import annotations

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
