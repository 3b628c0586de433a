"""Kernel warm-up on a side thread, so a run's first layers do not pay for getting their kernels ready.

The first call of each Triton kernel in a process costs far more than the kernel: importing triton, hashing
Triton's own sources for its cache key, looking the compiled binary up on disk and loading it, and choosing the
GEMM backend (a self-check on the GPU). Measured on an H200 (py-spy, 2026-12-01) that was ~1.2 s of the text phase
and ~0.3 s of the first denoising step. A session starts this thread as it opens; it runs while the pack's first
bytes are read and the tokenizer loads, and the main thread waits for it only where it needs the kernels. The
hashing part starts earlier still, beside torch's import (ops/triton_preload.py); this thread waits for that first.

Two stages, so the text encoder never waits for the DiT's kernels: ``encoders`` (backend choice, the encoders'
GEMM shapes) then ``dit`` (the DiT's GEMM shapes at its token count, the fused norms' self-checks at its width).
Nothing here can fail a run: an error is recorded and the kernels are then simply prepared at first use.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import threading
import time

import torch

from wanpack.manifests.format import Manifest

ENCODER_ROWS = {"t5": 512, "clip": 257}  # tokens per encoder call (the T5 pads to 512; CLIP sees 257 patches)
BIASED = {"clip", "dit"}  # components whose linears have biases (T5's have none)
CONTEXT_ROWS = 512  # text tokens the DiT's cross-attention keys/values come from, where its config does not say
PRELOAD_JOIN_S = 30.0  # a preload is seconds of hashing; the bound only guards against a stuck file system
QUANTIZED = {"I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn}  # manifest dtype names of quantized weights


def gemm_shapes(manifest: Manifest, component: str) -> set[tuple[int, int, torch.dtype]]:
    """Distinct (out, in, dtype) of the quantized 2-D weights in a component's blocks."""
    entry = manifest.components.get(component)
    if entry is None:
        return set()
    return {(int(t.shape[0]), int(t.shape[1]), QUANTIZED[t.dtype]) for shard in entry.shards for t in shard.tensors
            if t.quantized and t.block is not None and t.dtype in QUANTIZED and len(t.shape) == 2}  # fmt: skip


def warm_rows(tokens: int) -> int:
    """Rows that land in the same GEMM tuning bucket as ``tokens`` rows (``linear.gemm_rows_bucket``), but no more
    than needed, to keep the warm-up's scratch memory small."""
    from wanpack.runtime.ops.linear import gemm_rows_bucket

    bucket = gemm_rows_bucket(tokens)
    return min(tokens, bucket // 2 + 1) if bucket > 1 else 1


class KernelWarmup:
    """Prepares the kernels a run on ``device`` will use; ``wait(stage)`` blocks until that stage is done."""

    def __init__(self, manifest: Manifest, device: torch.device, dit_tokens: int | None, dtype: torch.dtype,
                 batch: int = 1):  # fmt: skip
        """``batch``: 2 when the run uses CFG (prompt and negative prompt go through every linear together)."""
        self.manifest, self.device, self.dit_tokens, self.dtype = manifest, device, dit_tokens, dtype
        self.batch = batch
        self._shapes = {name: gemm_shapes(manifest, name) for name in (*ENCODER_ROWS, "dit")}
        self.seconds: dict[str, float] = {}  # when each stage ended, from the thread's start
        self.steps: dict[str, float] = {}  # what each step took (the sidecar keeps both: where the time goes)
        self.error: str | None = None
        self._stages = {"encoders": threading.Event(), "dit": threading.Event()}
        self._thread = threading.Thread(target=self._run, name="wanpack-warmup", daemon=True)
        self._thread.start()

    def wait(self, stage: str) -> float:
        """Block until ``stage`` is ready; returns the seconds waited."""
        t = time.perf_counter()
        self._stages[stage].wait()
        return time.perf_counter() - t

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (it always does: every step is bounded; a timeout only guards the caller)."""
        self._thread.join(timeout)

    def _run(self) -> None:
        from wanpack.runtime.stream.reader import name_thread

        name_thread("wanpack-warmup")
        t0 = time.perf_counter()
        try:
            on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            with torch.inference_mode(), on_device:
                self._step("import", _import_kernels)
                dtypes = {d for shapes in self._shapes.values() for _, _, d in shapes}
                self._step("backend", lambda: [self._backend(d) for d in sorted(dtypes, key=str)])
                for name, per_item in ENCODER_ROWS.items():
                    rows = per_item * (self.batch if name == "t5" else 1)  # one image, but [prompt, negative]
                    for out, inp, qdtype in sorted(self._shapes[name], key=str):
                        self._step(f"{name} {rows}x{inp}->{out}",
                                   lambda a=(rows, out, inp, qdtype, name in BIASED): self._gemm(*a))  # fmt: skip
                self.seconds["encoders"] = round(time.perf_counter() - t0, 3)
                self._stages["encoders"].set()
                self._warm_dit()
        except Exception as exc:  # noqa: BLE001 - a warm-up never fails a run; first use prepares the kernel instead
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            for event in self._stages.values():
                event.set()
            self.seconds["total"] = round(time.perf_counter() - t0, 3)

    def _warm_dit(self) -> None:
        from wanpack.runtime.ops.activations import fused_gelu_quant
        from wanpack.runtime.ops.norms import fused_norm_quant, fused_norms

        entry = self.manifest.components.get("dit")
        config = entry.config if entry is not None else {}
        context = int(config.get("text_len", CONTEXT_ROWS))
        for rows in sorted({(self.dit_tokens or context) * self.batch, context * self.batch}):
            for out, inp, qdtype in sorted(self._shapes["dit"], key=str):
                self._step(f"dit {rows}x{inp}->{out}", lambda a=(rows, out, inp, qdtype, True): self._gemm(*a))
        width = int(config.get("dim", 0))
        rows = self.dit_tokens or context  # a residual add runs once per batch entry
        for out, inp, qdtype in sorted(self._shapes["dit"], key=str):
            if out == width:  # the linears that end in the residual stream: attention outputs, ffn.2
                self._step(f"dit add {rows}x{inp}->{out}", lambda a=(rows, out, inp, qdtype): self._gemm_add(*a))
        ffn = int(config.get("ffn_dim", 0))
        self._step("norms", lambda: fused_norms(self.device) and width and fused_norm_quant(self.device, width))
        self._step("gelu", lambda: ffn and fused_gelu_quant(self.device, ffn))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, label: str, fn) -> None:
        t = time.perf_counter()
        fn()
        self.steps[label] = round(time.perf_counter() - t, 3)

    def _backend(self, qdtype: torch.dtype) -> str:
        from wanpack.runtime.ops.linear import gemm_backend

        return gemm_backend(qdtype, self.device).name

    def _scratch_linear(self, out: int, inp: int, qdtype: torch.dtype):
        """(zero weight [out, inp] in qdtype, unit scales, zero bias): a linear of that shape to launch on zeros."""
        w = torch.zeros((out, inp), dtype=torch.int8, device=self.device).to(qdtype)
        scale = torch.ones((out, 1), dtype=torch.float32, device=self.device)
        return w, scale, torch.zeros(out, dtype=self.dtype, device=self.device)

    def _gemm(self, tokens: int, out: int, inp: int, qdtype: torch.dtype, bias: bool) -> None:
        """One quantized linear of the given shape on zeros, through the backend the run will use (with a bias
        where the model's linears have one: that is a different compiled kernel)."""
        from wanpack.runtime.ops.linear import linear

        w, scale, zero_bias = self._scratch_linear(out, inp, qdtype)
        x = torch.zeros((warm_rows(tokens), inp), dtype=self.dtype, device=self.device)
        linear(x, w, zero_bias if bias else None, scale)

    def _gemm_add(self, tokens: int, out: int, inp: int, qdtype: torch.dtype) -> None:
        """One residual add through that linear (fused into the GEMM where the backend can) on zeros; every DiT
        linear has a bias."""
        from wanpack.runtime.ops.linear import linear_add_

        w, scale, bias = self._scratch_linear(out, inp, qdtype)
        rows = warm_rows(tokens)
        x = torch.zeros((1, rows, inp), dtype=self.dtype, device=self.device)
        stream = torch.zeros((1, rows, out), dtype=torch.float32, device=self.device)
        linear_add_(stream, x, w, bias, scale, torch.ones((1, 1, out), dtype=torch.float32, device=self.device))


def _import_kernels() -> None:
    """Import triton and our kernels' module, where triton is installed (about 0.4 s of the traced H200 run), after
    the command's Triton preload (if one started) has done Triton's start-up, so it is not done twice at once."""
    from wanpack.runtime.ops import triton_preload

    triton_preload.join(PRELOAD_JOIN_S)
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("wanpack.runtime.ops.triton_kernels")


def attention_shapes(tokens: int, chunk: int, context: tuple[int, ...]) -> list[tuple[int, int]]:
    """(query rows, key rows) of every attention call one DiT forward makes: the query chunks against the whole
    sequence (self-attention) and against each context (text, and image for i2v)."""
    from wanpack.runtime.models.dit import token_chunks

    queries = sorted({s.stop - s.start for s in token_chunks(tokens, chunk)})
    return [(q, k) for q in queries for k in (tokens, *context)]


def priming_bytes(shapes: list[tuple[int, int]], batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                  quantized: bool = False) -> int:  # fmt: skip
    """The most device memory one priming call holds: q, one tensor standing for both k and v, and the output; with
    ``quantized`` (the sage kernel) also its one-byte copies of q, k and v (its per-row scales add under 4%)."""
    item = torch.empty((), dtype=dtype).element_size()
    per_element = [(2 * rows + keys) * item + ((rows + 2 * keys) if quantized else 0) for rows, keys in shapes]
    return max(per_element) * batch * heads * head_dim if shapes else 0


def prime_attention(shapes: list[tuple[int, int]], batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device) -> dict[str, float]:  # fmt: skip
    """Call attention once per (query rows, key rows) on random data laid out as the DiT lays them out; returns the
    seconds each shape took ("8190x32760": ...).

    PyTorch keeps cuDNN's attention plans in a per-thread cache and builds one the first time a thread meets a
    shape, so this runs on the thread that will sample, while it would otherwise wait (the text phase). The sage
    kernel autotunes its tiles at its first call of a length bucket and keeps the choice on disk: random inputs,
    not zeros, so that it times the tensor cores on data like the run's.
    """
    from wanpack.runtime.ops.attention import attention

    seconds = {}
    with torch.inference_mode():
        for rows, keys in shapes:
            t = time.perf_counter()
            q = torch.randn((batch, rows, heads, head_dim), dtype=dtype, device=device)
            kv = torch.randn((batch, keys, heads, head_dim), dtype=dtype, device=device)
            attention(q, kv, kv)
            del q, kv
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so each shape's figure is its own
            seconds[f"{rows}x{keys}"] = round(time.perf_counter() - t, 3)
    return seconds
