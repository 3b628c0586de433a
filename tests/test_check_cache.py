"""Self-check verdicts kept between processes: a pass is reused for the same key, nothing else is."""

from __future__ import annotations

import json

import pytest
import torch

from wanpack.runtime.ops import check_cache

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WANPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(check_cache.RECHECK_ENV, raising=False)
    return tmp_path / "cache" / "kernel_checks.json"


def counting(result: bool):
    calls = []

    def check() -> bool:
        calls.append(1)
        return result

    return check, calls


def test_a_pass_is_kept_and_reused(cache):
    check, calls = counting(True)
    assert check_cache.checked("attention", "cudnn", CPU, check)
    assert check_cache.checked("attention", "cudnn", CPU, check)
    assert len(calls) == 1
    kept = json.loads(cache.read_text())
    assert list(kept.values()) == [True]
    key = next(iter(kept))
    assert key.startswith("attention:cudnn | cpu | torch ") and torch.__version__ in key


def test_other_candidates_and_kinds_are_checked_on_their_own(cache):
    check, calls = counting(True)
    check_cache.checked("attention", "cudnn", CPU, check)
    check_cache.checked("attention", "flash", CPU, check)
    check_cache.checked("gemm torch.int8", "cudnn", CPU, check)
    assert len(calls) == 3


def test_a_failure_is_not_kept(cache):
    check, calls = counting(False)
    assert not check_cache.checked("gemm torch.int8", "triton", CPU, check)
    assert not check_cache.checked("gemm torch.int8", "triton", CPU, check)
    assert len(calls) == 2
    assert not cache.exists()


def test_recheck_runs_again_and_a_changed_kernel_source_is_a_new_key(cache, monkeypatch):
    check, calls = counting(True)
    check_cache.checked("attention", "cudnn", CPU, check)
    monkeypatch.setenv(check_cache.RECHECK_ENV, "1")
    check_cache.checked("attention", "cudnn", CPU, check)
    assert len(calls) == 2
    monkeypatch.delenv(check_cache.RECHECK_ENV)
    monkeypatch.setattr(check_cache, "_software_key", lambda: "torch 0 src changed")
    check_cache.checked("attention", "cudnn", CPU, check)
    assert len(calls) == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_a_damaged_file_is_ignored_and_replaced(cache, content):
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    check, calls = counting(True)
    assert check_cache.checked("attention", "cudnn", CPU, check)
    assert len(calls) == 1 and json.loads(cache.read_text())


def test_an_unwritable_cache_only_costs_the_check(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("WANPACK_CACHE", str(blocker / "sub"))  # a path under a regular file cannot be made
    check, calls = counting(True)
    assert check_cache.checked("attention", "cudnn", CPU, check)
    assert check_cache.checked("attention", "cudnn", CPU, check)
    assert len(calls) == 2
