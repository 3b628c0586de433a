"""The Triton preload: started by the commands that launch kernels, gated to machines where it can pay off, and doing
the work Triton would otherwise do at the first launch (its library key, our kernels' source hashes)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.runtime.ops import triton_preload

triton = pytest.importorskip("triton")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not started a preload, on a machine that looks like it has an NVIDIA driver."""
    node = tmp_path / "nvidiactl"
    node.write_text("")
    monkeypatch.setattr(triton_preload, "_state", triton_preload._Preload())
    monkeypatch.setattr(triton_preload, "NVIDIA_DEVICE_NODE", str(node))
    monkeypatch.delenv(triton_preload.ENV_SWITCH, raising=False)
    yield
    triton_preload.join(60)


def test_wanted_only_where_a_gpu_can_use_it(fresh_state, monkeypatch, tmp_path):
    assert triton_preload.wanted(None)
    assert triton_preload.wanted("cuda:0")
    assert not triton_preload.wanted("cpu")
    assert not triton_preload.wanted(" CPU")
    monkeypatch.setenv(triton_preload.ENV_SWITCH, "0")
    assert not triton_preload.wanted(None)
    monkeypatch.delenv(triton_preload.ENV_SWITCH)
    monkeypatch.setattr(triton_preload, "NVIDIA_DEVICE_NODE", str(tmp_path / "absent"))
    assert not triton_preload.wanted(None)


def test_preload_fills_tritons_caches():
    from triton.runtime.cache import triton_key

    from wanpack.runtime.ops import triton_kernels

    kernels = triton_preload.jit_kernels(triton_kernels)
    names = sorted(k.__name__ for k in kernels)
    assert names.count("_int8_gemm_kernel") == 1  # the autotuned wrapper is unwrapped, not counted twice
    assert {"_quant_rows_kernel", "_mod_ln_kernel", "_rms_rope_kernel"} <= set(names)
    triton_key.cache_clear()
    for k in kernels:
        k.hash = None
    seconds = triton_preload.preload()
    assert set(seconds) == {"import", "triton_key", "kernel_keys"}
    assert triton_key.cache_info().currsize == 1
    assert all(k.hash is not None and not k.hash.startswith("recursion:") for k in kernels)


def test_start_runs_once_and_reports(fresh_state):
    assert triton_preload.report() == {"started": False, "seconds": {}, "error": None}
    assert triton_preload.start(None)
    first = triton_preload._state.thread
    assert triton_preload.start(None) and triton_preload._state.thread is first
    triton_preload.join(60)
    report = triton_preload.report()
    assert report["started"] and report["error"] is None
    assert {"import", "triton_key", "kernel_keys", "total"} <= set(report["seconds"])


def test_a_failing_preload_is_recorded_not_raised(fresh_state, monkeypatch):
    def broken(*_):
        raise OSError("no such library")

    monkeypatch.setattr(triton_preload, "preload", broken)
    assert triton_preload.start(None)
    triton_preload.join(60)
    assert triton_preload.report()["error"] == "OSError: no such library"


@pytest.mark.parametrize("command", ["run", "serve"])
def test_commands_start_it_and_honor_device_cpu(fresh_state, command, tmp_path):
    runner = CliRunner()
    missing = str(tmp_path / "no-pack")
    result = runner.invoke(app, [command, "--pack", missing, "--prompt", "x", "--device", "cpu"] if command == "run"
                           else [command, "--pack", missing, "--device", "cpu"])  # fmt: skip
    assert result.exit_code != 0
    assert not triton_preload.report()["started"]
    result = runner.invoke(app, [command, "--pack", missing, "--prompt", "x"] if command == "run"
                           else [command, "--pack", missing])  # fmt: skip
    assert result.exit_code != 0  # the missing pack is still refused; the preload only ran beside the checks
    assert triton_preload.report()["started"]
