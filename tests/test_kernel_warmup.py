"""The session's kernel warm-up (runtime/kernel_warmup.py) and its background DiT build, on the CPU.

On a GPU the warm-up is what takes the first-call costs of the Triton kernels off the text phase; here we check what
it derives from a pack (shapes, tuning buckets, attention shapes), that it finishes its stages and never raises, and
that a run whose DiT engine fails to build while the text encoder runs reports that error and leaves nothing open.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.manifests.format import read_manifest
from wanpack.runtime import kernel_warmup as kw
from wanpack.runtime import session as session_mod
from wanpack.runtime.ops.attention import attention
from wanpack.runtime.ops.linear import linear

runner = CliRunner()


@pytest.fixture(scope="module")
def pack(demo_pack_dir) -> Path:
    return demo_pack_dir


def test_gemm_shapes_are_the_quantized_block_weights(pack):
    manifest = read_manifest(pack)
    dit = manifest.components["dit"]
    want = {(t.shape[0], t.shape[1]) for sh in dit.shards for t in sh.tensors
            if t.quantized and t.block is not None and len(t.shape) == 2}  # fmt: skip
    got = kw.gemm_shapes(manifest, "dit")
    assert want and {(o, i) for o, i, _ in got} == want
    assert {dtype for _, _, dtype in got} == {torch.int8}
    assert kw.gemm_shapes(manifest, "clip") == set()  # a component the pack lacks: nothing to warm


@pytest.mark.parametrize("tokens", [1, 2, 3, 17, 512, 4096, 4097, 8192, 32760, 75600])
def test_warm_rows_land_in_the_same_tuning_bucket(tokens):
    def bucket(m: int) -> int:  # as triton_kernels.int8_gemm buckets M
        return min(1 << max(0, m - 1).bit_length(), 8192)

    rows = kw.warm_rows(tokens)
    assert 1 <= rows <= tokens and bucket(rows) == bucket(tokens)
    assert rows <= 4097  # the warm-up's scratch stays small however long the video


def test_attention_shapes_cover_every_query_chunk_and_context():
    assert kw.attention_shapes(32760, 8192, (512,)) == [(8190, 32760), (8190, 512)]  # four equal chunks
    assert kw.attention_shapes(75600, 8192, (512,)) == [(7560, 75600), (7560, 512)]
    assert kw.attention_shapes(10, 4, (3,)) == [(2, 10), (2, 3), (4, 10), (4, 3)]  # 4 + 4 + 2
    assert kw.attention_shapes(100, 4096, (512, 257)) == [(100, 100), (100, 512), (100, 257)]


def test_warmup_runs_both_stages_and_reports(pack):
    w = kw.KernelWarmup(read_manifest(pack), torch.device("cpu"), 64, torch.float32)
    assert w.wait("encoders") >= 0 and w.wait("dit") >= 0
    w.join(30)
    assert w.error is None and set(w.seconds) >= {"encoders", "total"}
    assert {"import", "backend", "norms"} <= set(w.steps) and any(k.startswith("dit ") for k in w.steps)


def test_a_failing_warmup_is_recorded_never_raised(pack, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(kw.KernelWarmup, "_gemm", broken)
    w = kw.KernelWarmup(read_manifest(pack), torch.device("cpu"), 64, torch.float32)
    w.wait("dit")
    w.join(30)
    assert w.error == "RuntimeError: no kernel today"


def test_prime_attention_calls_each_shape_laid_out_as_the_dit_does(monkeypatch):
    from wanpack.runtime.ops import attention as attention_mod

    calls = []

    def spy(q, k, v, prepared=None):
        calls.append((tuple(q.shape), tuple(k.shape), q.is_contiguous(), k.dtype, bool(q.std() > 0.5 and k.std() > 0.5)))
        return attention(q, k, v, prepared)

    monkeypatch.setattr(attention_mod, "attention", spy)
    seconds = kw.prime_attention([(8, 16), (8, 4)], 2, 3, 8, torch.bfloat16, torch.device("cpu"))
    assert set(seconds) == {"8x16", "8x4"} and min(seconds.values()) >= 0
    # random, not zeros: the sage kernel's autotuner times its tiles on these
    assert calls == [((2, 8, 3, 8), (2, 16, 3, 8), True, torch.bfloat16, True),
                     ((2, 8, 3, 8), (2, 4, 3, 8), True, torch.bfloat16, True)]


def test_priming_scratch_is_counted_for_the_largest_shape():
    # 480p: q 8190 x 40 x 128 bf16 twice (q and the output) and one 32760-row tensor standing for k and v
    assert kw.priming_bytes([(8190, 32760), (8190, 512)], 1, 40, 128, torch.bfloat16) == (2 * 8190 + 32760) * 10240
    # the sage kernel adds its one-byte copies of q, k and v: at 720p (e.g. 4864-row chunks of 75600 tokens) that takes
    # priming over the encoder's 1 GiB of room, so step 1 makes its first call instead
    quantized = kw.priming_bytes([(8190, 32760)], 1, 40, 128, torch.bfloat16, quantized=True)
    assert quantized == (2 * 8190 + 32760) * 10240 + (8190 + 2 * 32760) * 5120
    assert kw.priming_bytes([(4864, 75600)], 1, 40, 128, torch.bfloat16, quantized=True) > 2**30
    assert kw.priming_bytes([(7560, 75600)], 1, 40, 128, torch.bfloat16) < 1 << 30  # 720p still fits the 1 GiB room
    assert kw.priming_bytes([], 1, 40, 128, torch.bfloat16) == 0


def test_linear_is_safe_from_two_threads():
    """The warm-up's linears run beside the main thread's; the GEMM lock keeps both results exact."""
    import threading

    w = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    scale = torch.rand(64, 1) / 127
    x = torch.randn(16, 32)
    want = linear(x, w, None, scale)
    errors = []

    def work():
        for _ in range(20):
            if not torch.equal(linear(x, w, None, scale), want):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_dit_build_failure_during_the_text_phase_is_reported(pack, tmp_path, monkeypatch):
    """The DiT engine is built on a thread while the text encoder runs; its error reaches the user as one line."""
    real = session_mod.StreamEngine

    def engine(component, *args, **kwargs):
        if component.name == "dit":
            raise session_mod.WanpackError("dit shard unreadable (test)")
        return real(component, *args, **kwargs)

    monkeypatch.setattr(session_mod, "StreamEngine", engine)
    out = tmp_path / "v.mp4"
    res = runner.invoke(app, ["run", "--pack", str(pack), "--prompt", "a fox", "--out", str(out), "--frames", "5",
                              "--height", "32", "--width", "32", "--steps", "1"])  # fmt: skip
    assert res.exit_code == 1 and "dit shard unreadable (test)" in res.output
    assert not out.exists()
