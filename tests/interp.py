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
