"""Running a Triton script on CPU tensors through the interpreter (TRITON_INTERPRET=1), in a fresh process because
triton reads the switch at import time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_in_triton_interpreter(script: str, timeout: int = 300) -> None:
    """Run ``script`` (which prints ``ok`` when its asserts pass) from the repo root; fail with its stderr tail."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# Prepend to a script to correct three interpreter gaps a kernel's GPU build does not have (all checked on the GPU):
# its fp32 -> e4m3 cast drops the carry when rounding up across a binade (126.3 becomes 64, not 128), its fp32 ->
# bf16 cast truncates instead of rounding to nearest even, and its dot multiplies bfloat16 operands as their raw
# uint16 bit patterns. Both casts go through torch's (round to nearest even, as the GPU's cvt.rn); bf16 dot operands
# are widened to fp32 first (exact), as the tensor cores' products are.
INTERPRETER_FIXES = r"""
import numpy as _np
import torch as _torch
import triton.language as _tl
from triton.runtime import interpreter as _interp

_convert_float = _interp._convert_float


def _fixed_convert_float(x, src, dst, rounding_mode):
    targets = {_tl.float8e4nv: (_torch.float8_e4m3fn, _torch.uint8), _tl.bfloat16: (_torch.bfloat16, _torch.int16)}
    if src == _tl.float32 and dst in targets:
        to, bits = targets[dst]
        t = _torch.from_numpy(_np.frombuffer(x.tobytes(), _np.float32).copy())
        out = t.to(to).view(bits).numpy().reshape(x.shape)
        return out.view(_np.uint16) if dst == _tl.bfloat16 else out
    return _convert_float(x, src, dst, rounding_mode)


_create_dot = _interp.InterpreterBuilder.create_dot


def _fixed_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    def widen(h):
        if h.dtype == _tl.bfloat16:
            return _interp.TensorHandle((h.data.astype(_np.uint32) << 16).view(_np.float32), _tl.float32)
        return h

    return _create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)


_interp._convert_float = _fixed_convert_float
_interp.InterpreterBuilder.create_dot = _fixed_create_dot
"""
