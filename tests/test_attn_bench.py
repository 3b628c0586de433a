"""The attention benchmark's code paths on CPU (--smoke: tiny shapes, our kernel in the Triton interpreter), so the
H100/H200 run does not die on a typo and its accuracy columns are wired to the right tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_attn_bench_smoke(tmp_path):
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "attn.json"
    res = subprocess.run([sys.executable, "benchmarks/attn_bench.py", "--smoke", "--json", str(out)], cwd=root,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.rstrip().splitlines()[-1].startswith("wall")  # the table is the last thing printed
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["cudnn"]["skipped"] == "needs CUDA"
    for name in ("sdpa", "sage-pv16", "sage-pv16 K/V prepared", "sage-fp8", "sage-fp8 K/V prepared"):
        assert rows[name]["ms"] > 0 and "error" not in rows[name], name
    # fp16 in the interpreter: the 16-bit P.V path's accuracy is real (the fp8 one suffers the interpreter's cast)
    assert rows["sage-pv16"]["cosine"] >= 0.999 and rows["sdpa"]["cosine"] > 0.99999
    assert set(rows["pre-pass"]["ms_by_part"]) == {"quantize_q", "prepare_kv_fp8", "prepare_kv_pv16"}
