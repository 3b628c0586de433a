"""Triton kernels for W8A8 linears (per-token activation quantization, an int8 GEMM with a fused epilogue) and the
DiT's fused norms (LayerNorm + modulation, optionally writing the quantized copy too; RMS + RoPE).

Imported lazily by :mod:`wanpack.runtime.ops.linear` only when triton is installed. Why our own GEMM: torch._int_mm
writes an int32 [M, N] result that a second pass must read back to apply the scales and bias (for a 75600 x 5120
output that is 3 GB of extra traffic per linear); here the scales, bias and the cast happen in registers.
With TRITON_INTERPRET=1 both kernels run on CPU tensors, which is how CI checks them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading

import torch
import triton
import triton.language as tl

from wanpack.runtime.ops.linear import gemm_rows_bucket

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run on CPU tensors (how CI checks them)


def uses_tma(device: torch.device) -> bool:
    """Whether kernels take tiles by TMA descriptors here: Hopper and newer, compiled (the interpreter loads plainly)."""
    return (hasattr(tl, "make_tensor_descriptor") and not INTERPRET and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)  # fmt: skip


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the TMA descriptors kernels make for themselves (128 bytes per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def allow_kernel_descriptors() -> None:
    """Give Triton the allocator that kernels making TMA descriptors need; a context variable, so each calling
    thread sets it. Descriptors are made in the kernels rather than on the host because a host descriptor carries
    its tile shape, which only an autotuner pre-hook can set per config, and Triton keeps no tuning results on disk
    for configs with a pre-hook (every process then re-tuned every shape: ~10 s of a 480p run on an H200)."""
    triton.set_allocator(_descriptor_scratch)


def _gemm_config(block_m: int, block_n: int, block_k: int, stages: int, warps: int) -> triton.Config:
    # no pre_hook (see allow_kernel_descriptors): the winners stay in Triton's disk cache
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)  # fmt: skip


# Hopper-leaning tile shapes; autotuned once per (N, K, M bucket). BLOCK_K divides both 5120 and 13824.
# (The deeper-pipelined variants were added after the first H100 run; the autotuner keeps whichever is fastest.)
_GEMM_CONFIGS = [
    _gemm_config(128, 256, 128, 3, 8),
    _gemm_config(256, 128, 128, 3, 8),
    _gemm_config(128, 128, 128, 4, 8),
    _gemm_config(64, 128, 128, 4, 4),
    _gemm_config(128, 256, 128, 4, 8),
    _gemm_config(256, 128, 128, 4, 8),
    _gemm_config(128, 256, 64, 5, 8),
    _gemm_config(256, 128, 64, 5, 8),
]


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, IS_INT8: tl.constexpr,
                       NATIVE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One program per row: absmax -> scale = absmax / QMAX, q = x * (QMAX / absmax) (a zero row: scale 0, q 0)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    _quantize_row(x, mask, q_ptr + row * stride_q + offs, s_ptr + row, QMAX, IS_INT8, NATIVE)


@triton.jit
def _mul_rn(a, b, NATIVE: tl.constexpr):
    """a * b rounded once to fp32 and never contracted into an fma with a following add (torch runs them as
    separate kernels, so each rounds on its own). PTX's mul.rn is exempt from contraction; written out because
    libdevice's mul_rn flushes subnormals (mul.rn.ftz) and torch does not. The interpreter runs numpy, which
    does not contract."""
    if NATIVE:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip
    else:
        return a * b


@triton.jit
def _quantize_row(y, mask, q_ptrs, s_ptr, QMAX: tl.constexpr, IS_INT8: tl.constexpr, NATIVE: tl.constexpr):
    """Quantize one fp32 row held in registers and store q and its scale; every quantizing kernel ends here, so
    they agree bit for bit with each other and with quantize_activation_torch. One IEEE division per row (Triton's
    plain '/' may be approximate), then a multiply per element: a division per element made these kernels
    compute-bound (measured 1.2-1.4 TB/s instead of ~3 on an H100)."""
    y = tl.where(mask, y, 0.0)
    amax = tl.max(tl.abs(y), axis=0)
    qscale = tl.div_rn(amax, QMAX)
    inv = tl.where(amax > 0, tl.div_rn(QMAX, amax), 0.0)
    yq = _mul_rn(y, inv, NATIVE)
    if IS_INT8:
        # round half away from zero, then truncate; |yq| <= 127 (+ rounding) so no clamp is needed
        q = tl.where(yq >= 0, yq + 0.5, yq - 0.5).to(tl.int8)
    else:
        q = tl.minimum(tl.maximum(yq, -QMAX), QMAX).to(tl.float8e4nv)
    tl.store(q_ptrs, q, mask=mask)
    tl.store(s_ptr, qscale)


def quantize_rows(x2d: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of x2d [M, K] -> (q [M, K] int8|fp8, scale [M, 1] float32)."""
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    dtype = torch.int8 if scheme == "int8" else torch.float8_e4m3fn
    q = torch.empty((m, k), dtype=dtype, device=x2d.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    block = triton.next_power_of_2(k)
    warps = 8 if block >= 4096 else 4
    _quant_rows_kernel[(m,)](x2d, q, scale, k, x2d.stride(0), q.stride(0), QMAX=127.0 if scheme == "int8" else 448.0,
                             IS_INT8=scheme == "int8", NATIVE=not INTERPRET, BLOCK=block, num_warps=warps)  # fmt: skip
    return q, scale


@triton.jit
def _gelu_tanh(x):
    """GELU, tanh form: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + exp(-2u)),
    the same function without the cancellation 1 + tanh(u) suffers for negative x."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _gelu_quant_kernel(h_ptr, out_ptr, q_ptr, s_ptr, K, stride_h, stride_o, stride_q, QMAX: tl.constexpr,
                       IS_INT8: tl.constexpr, WRITE_OUT: tl.constexpr, NATIVE: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """One program per row: g = GELU(h) rounded to out's dtype, quantized per row as _quant_rows_kernel does (so
    q and scale equal quantize_rows(g)); WRITE_OUT also stores g."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    g = _gelu_tanh(h).to(out_ptr.dtype.element_ty)
    if WRITE_OUT:
        tl.store(out_ptr + row * stride_o + offs, g, mask=mask)
    _quantize_row(g.to(tl.float32), mask, q_ptr + row * stride_q + offs, s_ptr + row, QMAX, IS_INT8, NATIVE)


def gelu_quant(h2d: torch.Tensor, qdtype: torch.dtype,
               write_out: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:  # fmt: skip
    """GELU (tanh form) of h2d [M, K] in h2d's dtype, and its per-row quantized copy, in one pass: (g or None
    without write_out, q [M, K] qdtype, scale [M, 1] float32). The FFN's hidden activation feeds only ffn.2, so
    with W8A8 weights g itself is never stored (on an H200 a separate GELU pass over 8190 x 13824 took 0.13 ms)."""
    m, k = h2d.shape
    if h2d.stride(1) != 1:
        h2d = h2d.contiguous()
    out = torch.empty((m, k) if write_out else (1, 1), dtype=h2d.dtype, device=h2d.device)
    q = torch.empty((m, k), dtype=qdtype, device=h2d.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=h2d.device)
    block = triton.next_power_of_2(k)
    _gelu_quant_kernel[(m,)](h2d, out, q, scale, k, h2d.stride(0), out.stride(0), q.stride(0),
                             QMAX=127.0 if qdtype == torch.int8 else 448.0, IS_INT8=qdtype == torch.int8,
                             WRITE_OUT=write_out, NATIVE=not INTERPRET, BLOCK=block,
                             num_warps=8 if block >= 4096 else 4)  # fmt: skip
    return (out if write_out else None), q, scale


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, gate_ptr, M, N, K: tl.constexpr, M_BUCKET,
                      stride_am, stride_bn, stride_cm, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                      RESIDUAL: tl.constexpr, STREAM_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """C[M, N] = (A[M, K] int8 @ B[N, K]^T int8) * a_scale[M] * b_scale[N] + bias[N], int32 accumulation.

    RESIDUAL: C is read and C += gate[N] * that product instead (C in any float dtype, the sum in fp32): the
    DiT's gated residual add, done in the epilogue so the product never goes to memory (see :func:`int8_gemm_add_`).
    STREAM_TMA (with RESIDUAL): C's tile moves by TMA too. By the threads' loads and stores an fp32 C tile needs a
    64-bit address per element next to the accumulator and C's own values: compiled for sm90 (Triton 3.9) the
    128 x 128 config then spills 48 bytes per thread and with TMA none (128 x 256 spills 424 bytes either way). On
    an H200 the TMA epilogue was the faster one at 3 of 4 DiT shapes (benchmarks/block_fusions.py).

    K is a compile-time constant: a DiT has two (dim and ffn_dim), and a fixed trip count lets the loop pipeline.
    TMA: the A and B tiles move by the copy engine (descriptors made in the kernel; rows past M or N and columns
    past K read as 0) instead of the threads' loads. The result still leaves by the threads' own stores: on an H200
    (benchmarks/linear_probe.py, 2026-12-01) a TMA store of C was 3% slower over a block's GEMMs at 8190-token
    chunks.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n  # grouped launch order keeps a band of A rows hot in L2
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K])
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = b_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        rows_a = (offs_m % M).to(tl.int64)  # wrap instead of masking; the store is masked
        rows_b = (offs_n % N).to(tl.int64)
        a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + rows_b[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K contiguous
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k0
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    a_s = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_s = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
    c = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        c *= tl.load(gate_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if STREAM_TMA:  # the stream's tile by descriptor: no per-element addresses next to two fp32 tiles
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [stride_cm, 1], [BLOCK_M, BLOCK_N])
        c += c_desc.load([pid_m * BLOCK_M, pid_n * BLOCK_N]).to(tl.float32)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c.to(c_ptr.dtype.element_ty))
    else:
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if RESIDUAL:
            c += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=mask)


# Autotuning times every config (~1 s per shape) in every new process; where Triton can keep the winner in its disk
# cache, a second `wanpack run` starts with tuned GEMMs instead of paying that again for each of a dozen shapes.
CACHE_TUNING = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


STREAM_BY_TMA = True  # residual adds move the stream's tiles by TMA where the A/B tiles do (benchmarks: A/B)


def _make_gemm_tuner(residual: bool):
    # the residual variant updates C in place, so timing configs must put C back after each; both variants have
    # RESIDUAL in their key, so their tuning results on disk never stand in for each other
    restore = {"restore_value": ["c_ptr"]} if residual else {}
    key = ["M_BUCKET", "N", "K", "TMA", "RESIDUAL", "STREAM_TMA"]
    return triton.autotune(configs=_GEMM_CONFIGS, key=key, **restore, **CACHE_TUNING)(_int8_gemm_kernel)


# Triton's autotuner keeps per-call state on itself, so two threads must not run one tuner at once. With the tuning
# results on disk each thread gets its own tuner: they share Triton's compiled kernels and those results, and a
# session's kernel warm-up never makes the text encoder's GEMMs wait (on an H200 the warm-up's first call of a
# DiT shape, which looks up its tuning result and loads the binary, took up to 0.6 s while holding the shared
# tuner's lock). Without results on disk one tuner per variant is shared and callers take turns, so no shape is
# tuned twice.
_thread_tuners = threading.local()
_shared_tuners = None if CACHE_TUNING else {False: _make_gemm_tuner(False), True: _make_gemm_tuner(True)}
_shared_turns = threading.Lock()


def _gemm_tuner(residual: bool):
    """(this thread's tuner of the plain or the residual variant, the lock to hold while launching through it)."""
    if _shared_tuners is not None:
        return _shared_tuners[residual], _shared_turns
    tuners = getattr(_thread_tuners, "gemm", None)
    if tuners is None:
        tuners = _thread_tuners.gemm = {}
    if residual not in tuners:
        tuners[residual] = _make_gemm_tuner(residual)
    return tuners[residual], contextlib.nullcontext()


def _aligned_rows(t: torch.Tensor) -> bool:
    """A base and a row stride in 16-byte units, as a TMA descriptor needs."""
    return t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0


def _tma_ready(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the int8 A and B tiles can move by TMA here (16-byte aligned bases and rows of K values)."""
    return uses_tma(a.device) and _aligned_rows(a) and _aligned_rows(b)


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _gemm_launch(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 bias: torch.Tensor | None, c: torch.Tensor, gate: torch.Tensor | None) -> None:  # fmt: skip
    """Run the GEMM into c [M, N] (unit column stride); with ``gate`` [N] it adds gate * product to c instead."""
    m, k = a.shape
    n = b.shape[0]
    a, b = _unit_columns(a), _unit_columns(b)
    a_s = a_scale.reshape(-1).to(torch.float32)
    b_s = b_scale.reshape(-1).to(torch.float32)
    unused = a_s  # any pointer, for the bias or gate a variant does not read
    residual = gate is not None

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    tma = _tma_ready(a, b)
    stream_tma = residual and tma and STREAM_BY_TMA and _aligned_rows(c)
    if tma:
        allow_kernel_descriptors()
    args = (a, b, c, a_s, b_s, bias if bias is not None else unused, gate if residual else unused, m, n, k,
            gemm_rows_bucket(m), a.stride(0), b.stride(0), c.stride(0))  # fmt: skip
    if INTERPRET:  # the interpreter cannot time configs: one small fixed tile keeps CPU tests quick
        tile = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
        _int8_gemm_kernel[grid(tile)](*args, HAS_BIAS=bias is not None, EVEN_K=k % 32 == 0, RESIDUAL=residual,
                                      STREAM_TMA=False, TMA=False, **tile)  # fmt: skip
    else:
        tuner, turns = _gemm_tuner(residual)
        with turns:
            tuner[grid](*args, HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0, RESIDUAL=residual,
                        STREAM_TMA=stream_tma, TMA=tma)  # fmt: skip


def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """a [M, K] int8, a_scale [M, 1], b [N, K] int8 (the weight as stored), b_scale [N, 1] -> [M, N] out_dtype."""
    c = torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    _gemm_launch(a, a_scale, b, b_scale, bias, c, None)
    return c


def int8_gemm_add_(out: torch.Tensor, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                   b_scale: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor | None) -> None:  # fmt: skip
    """out [B, L, N] += gate * (a @ b^T * scales + bias), in place, in fp32 before out's own rounding; a [B*L, K].

    out is a view of the DiT's residual stream (any batch and token strides, unit channel stride); gate is None or
    [B or 1, 1, N]. Against the GEMM into a 16-bit y and then out.addcmul_(y, gate) this skips writing and reading
    y back (8190 x 5120 x 5120 on an H200: 0.56 ms against 0.83-0.85) and y's rounding to 16 bits. One launch per
    batch entry, so each launch has one gate row and its rows one token stride.
    """
    batch, rows, n = out.shape
    if a.shape[0] != batch * rows or b.shape[0] != n or out.stride(-1) != 1:
        raise ValueError(f"int8_gemm_add_: out {tuple(out.shape)} (channel stride {out.stride(-1)}) does not take "
                         f"a {a.shape[0]} x {b.shape[0]} product")  # fmt: skip
    if gate is None:
        gate = torch.ones(n, dtype=torch.float32, device=out.device)
    gates = gate.reshape(-1, n).expand(batch, n)
    for i in range(batch):
        part = slice(i * rows, (i + 1) * rows)
        _gemm_launch(a[part], a_scale[part], b, b_scale, bias, out[i], _unit_columns(gates[i]))


@triton.jit
def _rms_rope_kernel(y_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, stride_y, stride_o, stride_c, eps,
                     HALF: tl.constexpr, HALF_HEAD: tl.constexpr, ROPE: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    """One program per token row of 2*HALF channels: RMS over the whole row (all heads), gain, then rotate the
    interleaved pairs (2j, 2j+1) by the row's angles (pair j uses column j % HALF_HEAD of the tables)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    mask = j < HALF
    base = y_ptr + row * stride_y + 2 * j
    a = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
    mean_sq = (tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF)
    r = 1.0 / tl.sqrt_rn(mean_sq + eps)
    a = a * r * tl.load(w_ptr + 2 * j, mask=mask, other=0.0).to(tl.float32)
    b = b * r * tl.load(w_ptr + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        tab = (row % L) * stride_c + j % HALF_HEAD
        c = tl.load(cos_ptr + tab, mask=mask, other=1.0)
        s = tl.load(sin_ptr + tab, mask=mask, other=0.0)
        a, b = a * c - b * s, a * s + b * c
    out = out_ptr + row * stride_o + 2 * j
    tl.store(out, a.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + 1, b.to(out_ptr.dtype.element_ty), mask=mask)


def rms_rope(y: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
             head_dim: int, eps: float, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """y [B, L, C] -> RMS-normed (over C), gained and (when cos is given) rotated [B, L, C] in out_dtype."""
    b, n, c = y.shape
    if cos is not None and (cos.shape[0] != n or sin.shape[0] != n):
        raise ValueError(f"rope tables have {cos.shape[0]} rows for {n} tokens")  # the kernel would read wrong rows
    y2 = y.reshape(b * n, c)
    if y2.stride(1) != 1:
        y2 = y2.contiguous()
    out = torch.empty((b * n, c), dtype=out_dtype, device=y.device)
    rope = cos is not None
    tab_c = cos if rope else weight  # unused pointers when ROPE is False
    tab_s = sin if rope else weight
    half = c // 2
    _rms_rope_kernel[(b * n,)](y2, weight, tab_c, tab_s, out, n, y2.stride(0), out.stride(0),
                               cos.stride(0) if rope else 0, eps, HALF=half, HALF_HEAD=head_dim // 2, ROPE=rope,
                               BLOCK=triton.next_power_of_2(half), num_warps=4)  # fmt: skip
    return out.view(b, n, c)


@triton.jit
def _mod_ln_kernel(x_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, out_ptr, q_ptr, s_ptr, L, stride_xb, stride_xl,
                   stride_mb, stride_o, stride_q, eps, C: tl.constexpr, MODULATE: tl.constexpr, AFFINE: tl.constexpr,
                   QUANT: tl.constexpr, QMAX: tl.constexpr, IS_INT8: tl.constexpr, WRITE_OUT: tl.constexpr,
                   NATIVE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One program per token: LayerNorm over C in fp32, then * (1 + scale) + shift (per batch) or the affine.

    With QUANT the row is also quantized per token from the value rounded to out's dtype, with the same arithmetic
    as _quant_rows_kernel, so q and scale equal quantize_rows(out) and the GEMM skips that pass. WRITE_OUT=False
    skips storing out itself (every consumer reads q).
    """
    row = tl.program_id(0).to(tl.int64)
    bi = row // L
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    x = tl.load(x_ptr + bi * stride_xb + (row % L) * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    # explicit roundings (IEEE scalar divisions, one uncontracted multiply, explicit fmas): left to the compiler, '/'
    # became different approximate sequences with and without QUANT. The sums can still differ between variants,
    # whose layouts differ (16 vs 8 elements per thread), hence norms.close_16bit in the self-check
    mean = tl.div_rn(tl.sum(x, axis=0), C)
    d = tl.where(mask, x - mean, 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(d * d, axis=0), C) + eps))
    y = _mul_rn(d, rstd, NATIVE)
    if MODULATE:
        sc = tl.load(scale_ptr + bi * stride_mb + offs, mask=mask, other=0.0)
        sh = tl.load(shift_ptr + bi * stride_mb + offs, mask=mask, other=0.0)
        y = tl.fma(y, 1.0 + sc, sh)
    if AFFINE:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.fma(y, w, tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    yo = y.to(out_ptr.dtype.element_ty)
    if WRITE_OUT:
        tl.store(out_ptr + row * stride_o + offs, yo, mask=mask)
    if QUANT:
        _quantize_row(yo.to(tl.float32), mask, q_ptr + row * stride_q + offs, s_ptr + row, QMAX, IS_INT8, NATIVE)


def _layer_norm_launch(x, eps, out_dtype, shift, scale, weight, bias, qdtype, write_out=True):
    # warps per row measured on an H200 at 4864 x 5120: plain 8 (43 us, 3.5 TB/s); quantizing 4 (55 us vs 62 at 8)
    b, n, c = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    quant = qdtype is not None
    write_out = write_out or not quant
    out = torch.empty((b * n, c) if write_out else (1, c), dtype=out_dtype, device=x.device)
    q = torch.empty((b * n, c), dtype=qdtype, device=x.device) if quant else out
    qs = torch.empty((b * n, 1), dtype=torch.float32, device=x.device) if quant else out
    modulate = shift is not None
    if modulate:
        shift = shift.float().expand(b, 1, c).contiguous()
        scale = scale.float().expand(b, 1, c).contiguous()
    dummy = out
    _mod_ln_kernel[(b * n,)](x, shift if modulate else dummy, scale if modulate else dummy,
                             weight if weight is not None else dummy, bias if bias is not None else dummy, out, q, qs,
                             n, x.stride(0), x.stride(1), c if modulate else 0, out.stride(0), q.stride(0), eps, C=c,
                             MODULATE=modulate, AFFINE=weight is not None, QUANT=quant,
                             QMAX=127.0 if qdtype == torch.int8 else 448.0, IS_INT8=qdtype == torch.int8,
                             WRITE_OUT=write_out, NATIVE=not INTERPRET, BLOCK=triton.next_power_of_2(c),
                             num_warps=8 if c >= 4096 and not quant else 4)  # fmt: skip
    return (out.view(b, n, c) if write_out else None), q, qs


def layer_norm(x: torch.Tensor, eps: float, out_dtype: torch.dtype, shift: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x [B, L, C] (any batch/token strides, unit channel stride) -> LN(x) modulated or affine, [B, L, C] out_dtype.

    shift/scale are fp32 [B or 1, 1, C]; weight/bias [C].
    """
    return _layer_norm_launch(x, eps, out_dtype, shift, scale, weight, bias, None)[0]


def layer_norm_quant(x: torch.Tensor, eps: float, out_dtype: torch.dtype, qdtype: torch.dtype,
                     shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                     weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     write_out: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`layer_norm` that also quantizes its output per token in the same pass.

    Returns (out [B, L, C] out_dtype or None without write_out, q [B*L, C] qdtype (int8 | float8_e4m3fn),
    scale [B*L, 1] float32), where (q, scale) == quantize_rows(out.reshape(-1, C)).
    """
    return _layer_norm_launch(x, eps, out_dtype, shift, scale, weight, bias, qdtype, write_out)
