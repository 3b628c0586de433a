"""The whole-forward benchmark's code paths (ours and diffusers'), run on CPU at tiny widths (--smoke)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")


def test_forward_bench_smoke(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "forward.json"
    cmd = [sys.executable, "benchmarks/forward_bench.py", "--smoke", "--iters", "1", "--attn", "sdpa",
           "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["diffusers"]["default"]["forward_s"] > 0
    for variant in ("int8+sdpa", "bf16+sdpa"):
        ours = data["ours"][variant]
        assert ours["forward_s"] > 0 and ours["cold_cache_s"] > 0 and ours["attention"] == "sdpa", ours
    assert "of diffusers default" in res.stdout
