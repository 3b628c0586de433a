"""Quantized attention for long sequences (SageAttention2's recipe, written for wanpack): softmax(q k^T / sqrt(D)) v
with Q.K^T on INT8 tensor cores and P.V on FP8 (sm89+) or 16-bit tensor cores, fp32 softmax and accumulation.

Algorithm, per (batch, head):
1. K smoothing: K minus its per-channel mean over all tokens. That subtracts q.mean_k from every logit of a query
   row, which softmax ignores; it removes the channel-wise bias that dominates K's range in DiTs, so int8 keeps
   the varying part.
2. Q is quantized per token, K per group of K_GROUP (128) tokens, symmetric int8 (scale = amax / 127, codes rounded
   half away from zero). sm_scale * log2(e) is folded into Q's scale, so the kernel's logits are base-2 and exp2
   applies. A key tile never straddles two K groups, so one tile's logits of a query row share one scale.
3. The kernel, per key tile: S = int8 dot, accumulated on top of 1.5 * 2^23's bit pattern, so reading the int32 as
   a float gives 1.5 * 2^23 + S exactly (no int->float conversion, which runs at a quarter of the fp32 rate).
   Row max on those floats; then one FMA per logit, bits * scale - (1.5 * 2^23 * scale + running max), feeds
   exp2 (the offset is one fp32 value per row, rounded once: ~1e-4 relative in P at Wan's logit ranges). Online
   softmax in fp32 (running max and sum), P.V added into the fp32 accumulator.
   - FP8 (``pv_fp8=True``): V smoothed by its per-channel mean, quantized to e4m3 with a per-channel scale
     (amax / 448) and stored transposed ([D, L], the K-major layout fp8 tensor cores need), its keys in the order
     inside each 32-key block in which a thread's P values already sit for the fp8 product (:func:`key_slots`); P
     then needs no byte permutes or shuffles between the two products (+5-6% on an H200). P is made as
     448 * softmax numerator directly (log2(448) is folded into the exp2 offset), cast to e4m3, and chained into the
     accumulator (on the H200 chaining measured the same error as a fresh fp32 sum per tile, at fewer registers).
     Epilogue: acc * v_scale / l + v_mean.
   - 16-bit (``pv_fp8=False``): P rounded to V's own dtype, dot with the caller's V, fp32 accumulation.
   On Hopper (sm90) K and fp8 V tiles arrive by the tensor-memory accelerator (descriptors each program makes for
   its head): it took ~50 registers per thread off the kernel, so more programs share each multiprocessor and one's
   softmax overlaps another's tensor-core work; elsewhere they are plain loads.

Zero groups get scale 1 (their codes are 0), so no scale is ever 0 and a masked -inf logit never meets a 0 scale.
K lengths that are not a multiple of the key tile are handled by masking the last tile (the quantized K and V are
zero-padded to a multiple of PAD tokens, so loads need no mask).

Pre-pass traffic per element of each [L, H, D] tensor (bf16 in): Q read 2 B + write 1 B; K mean read 2 B, quantize
read 2 B + write 1 B; V (fp8 path) mean and min/max read 4 B, quantize read 2 B + write 1 B. K and V are prepared
once per call site (:class:`SageKV`, reused by every query chunk of a DiT block), so at Wan 14B 720p (75600 tokens,
40 x 128) that is ~4.6 GB per block (~1.6 ms at 3 TB/s) next to 120-200 ms of attention.

Speed and accuracy measured on an H200 are in docs/PERFORMANCE.md; on CPU the Triton interpreter runs the
pointer-load path (``tests/test_sage_attention.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from wanpack.runtime.ops.linear import QMAX
from wanpack.runtime.ops.triton_kernels import CACHE_TUNING, INTERPRET, allow_kernel_descriptors, uses_tma

HEAD_DIMS = (64, 128)  # what the kernel is built for; attention.py sends other head dims to the exact backend
K_GROUP = 128  # tokens sharing one K scale (a multiple of every key tile, so a tile has one scale)
ROWS = 64  # tokens per program in the Q and V pre-passes
PAD = 128  # quantized Q, K and V are padded to a multiple of this many tokens (the largest tile and K_GROUP)
_FP8_MAX = QMAX[torch.float8_e4m3fn]  # the kernels write 127 and 448 (linear.QMAX) as literals
_LOG2E = 1.4426950408889634

# Tile shapes autotuned once per (length buckets, head dim, P.V path). On an H200 (fp8 P.V, TMA loads) 64 x 128 with
# 4 warps and 3 stages ran fastest at 32760 and 75600 tokens (779 / 773 TFLOP/s): two programs per multiprocessor at
# ~180 registers; 128-row tiles with 8 warps hold one program and reached 0.83x that throughput. 64 x 128 with 2
# stages and 64 x 64 fit sm89's 99 KiB of shared memory; configs over a card's shared memory are skipped by the
# autotuner. 128 x 64 with 8 warps was the 16-bit path's pick before.
# Without TMA (sm80-sm89: mma.sync) Triton lays a 64-row tile's 4 warps side by side along the keys (its rule for
# chained dots whose second product is wider than tall), so the row max and sum cross warps and P goes through
# shared memory (PTX for sm89: 128 shuffles, P stored and reloaded); 128-row tiles with 8 warps get one warp per 16
# rows, as on Hopper (16 shuffles, P in registers). 128 x 128 with 8 warps is tried there for that reason (not
# measured on such a card yet); on sm90 it is left out, being one of the slower 128-row shapes on the H200.


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    # no pre_hook (see triton_kernels.allow_kernel_descriptors): the winners stay in Triton's disk cache
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


_ATTN_CONFIGS = [_config(64, 128, 4, 3), _config(64, 128, 4, 2), _config(64, 64, 4, 3), _config(128, 64, 8, 4),
                 _config(128, 128, 8, 2)]
_INTERPRET_TILE = {"BLOCK_M": 32, "BLOCK_N": 32}  # the interpreter cannot time configs; small tiles keep it quick


# ------------------------------------------------------------------------------------------------ pre-pass kernels


@triton.jit
def _load_tokens(x_ptr, L, H, stride_b, stride_l, stride_h, D: tl.constexpr, ROWS: tl.constexpr):
    """This program's ROWS tokens of one (batch, head) of x [B, L, H, D] in fp32 (rows >= L as 0), with the indices."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D)
    valid = rows < L
    src = x_ptr + (bh // H) * stride_b + (bh % H) * stride_h + rows.to(tl.int64)[:, None] * stride_l + d[None, :]
    return pid, bh, rows, d, valid, tl.load(src, mask=valid[:, None], other=0.0).to(tl.float32)


@triton.jit
def _quant_int8_kernel(x_ptr, mean_ptr, out_ptr, scale_ptr, L, H, L_PAD, stride_b, stride_l, stride_h, extra_scale,
                       D: tl.constexpr, ROWS: tl.constexpr, PER_ROW: tl.constexpr,
                       SMOOTH: tl.constexpr):  # fmt: skip
    """One program per ROWS tokens of one (batch, head): x [B, L, H, D] (minus mean[bh, D] with SMOOTH) ->
    out[bh, L_PAD, D] int8 (rows >= L written as 0) and scale * extra_scale per row (PER_ROW) or for the group."""
    pid, bh, rows, d, valid, x = _load_tokens(x_ptr, L, H, stride_b, stride_l, stride_h, D, ROWS)
    if SMOOTH:
        x = tl.where(valid[:, None], x - tl.load(mean_ptr + bh * D + d)[None, :], 0.0)
    if PER_ROW:
        amax = tl.max(tl.abs(x), axis=1)
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    inv = tl.where(amax > 0, tl.div_rn(127.0, tl.where(amax > 0, amax, 1.0)), 0.0)
    scale = tl.where(amax > 0, tl.div_rn(amax, 127.0), 1.0) * extra_scale
    if PER_ROW:
        tl.store(scale_ptr + bh * L_PAD + rows, scale)
        y = x * inv[:, None]
    else:
        tl.store(scale_ptr + bh * (L_PAD // ROWS) + pid, scale)
        y = x * inv
    q = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero; |y| <= 127 (+ rounding)
    tl.store(out_ptr + (bh * L_PAD + rows)[:, None] * D + d[None, :], q)


@triton.jit
def _quant_v_fp8_kernel(v_ptr, mean_ptr, inv_ptr, out_ptr, L, H, L_PAD, stride_b, stride_l, stride_h,
                        D: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """One program per ROWS tokens of one (batch, head): (v - mean) * inv per channel, clamped to +-448, as e4m3
    into out[bh, D, L_PAD] (transposed, keys in :func:`_key_slot` order; rows >= L written as 0)."""
    _, bh, rows, d, valid, v = _load_tokens(v_ptr, L, H, stride_b, stride_l, stride_h, D, ROWS)
    y = (v - tl.load(mean_ptr + bh * D + d)[None, :]) * tl.load(inv_ptr + bh * D + d)[None, :]
    y = tl.where(valid[:, None], tl.minimum(tl.maximum(y, -448.0), 448.0), 0.0)
    tl.store(out_ptr + (bh * D + d)[None, :] * L_PAD + _key_slot(rows)[:, None], y.to(tl.float8e4nv))


# ------------------------------------------------------------------------------------------------ attention kernel


@triton.jit
def _key_slot(key):
    """Where key ``key`` sits in the stored fp8 V^T: bits (i1 i0 q1 q0 j) of its place in a 32-key block become
    (i1 q1 q0 i0 j). A thread's P values, in the order the Q.K^T accumulator leaves them (column pairs 8 apart), then
    are the columns the fp8 tensor-core operand wants from it (runs of four), so P needs no shuffles between threads
    on the way from one product to the next; V's keys are stored in the same order, which keeps the sum over keys."""
    low = key & 31
    return (key - low) | (low & 0b10001) | ((low & 0b00110) << 1) | ((low & 0b01000) >> 2)


@triton.jit
def _operand_order(p, BLOCK_N: tl.constexpr):
    """P [BM, BN] with its columns put in :func:`_key_slot` order (a relabeling of registers, not a data move)."""
    bm: tl.constexpr = p.shape[0]
    return p.reshape(bm, BLOCK_N // 32, 2, 2, 2, 2, 2).permute(0, 1, 2, 4, 5, 3, 6).reshape(bm, BLOCK_N)


@triton.jit
def _sage_tile(acc, l_i, m_i, q, q_scale, k_src, ks_base, v_src, stride_vl, start, Lk, LK_PAD,
               D: tl.constexpr, K_GROUP: tl.constexpr, PV_FP8: tl.constexpr, TMA: tl.constexpr,
               MASK: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax: updates (acc [BM, D] fp32, l_i, m_i [BM] fp32) with keys start..+BLOCK_N.

    k_src / v_src: this head's K [LK_PAD, D] and V, as TMA descriptors (TMA) or base pointers."""
    offs_n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    if TMA:
        k = k_src.load([start, 0])  # [BN, D] int8
    else:
        k = tl.load(k_src + offs_n[:, None] * D + d[None, :])  # zero-padded: no mask
    # 1.5 * 2^23 + S as a float, exactly (|S| < 2^22: int8 x int8 over D <= 256); the compiler folds the add into
    # the dot's accumulator start value
    bits = (tl.dot(q, tl.trans(k), out_dtype=tl.int32) + 0x4B400000).to(tl.float32, bitcast=True)
    if MASK:
        bits = tl.where(offs_n[None, :] < Lk, bits, float("-inf"))
    scale = q_scale * tl.load(ks_base + start // K_GROUP)  # [BM]: the tile lies in one K group; scales are > 0
    m_new = tl.maximum(m_i, (tl.max(bits, axis=1) - 12582912.0) * scale)
    if PV_FP8:  # P is made as 448 * exp2(logit - max): e4m3's full range, no multiply per element
        offset = 12582912.0 * scale + (m_new - 8.807354922057604)  # log2(448)
    else:
        offset = 12582912.0 * scale + m_new
    p = tl.math.exp2(bits * scale[:, None] - offset[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if PV_FP8:
        if TMA:
            vt = v_src.load([0, start])  # [D, BN] e4m3, zero-padded
        else:
            vt = tl.load(v_src + d[:, None] * LK_PAD + offs_n[None, :])
        acc = tl.dot(_operand_order(p.to(tl.float8e4nv), BLOCK_N), tl.trans(vt), acc * alpha[:, None])
    else:
        v_ptrs = v_src + offs_n.to(tl.int64)[:, None] * stride_vl + d[None, :]
        if MASK:
            v = tl.load(v_ptrs, mask=(offs_n < Lk)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["H", "Lq", "Lk", "LQ_BUCKET", "LK_BUCKET"])  # one binary for any lengths
def _sage_attn_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, vm_ptr, o_ptr, H, Lq, Lk, LQ_PAD, LK_PAD,
                      stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh, LQ_BUCKET, LK_BUCKET,
                      D: tl.constexpr, K_GROUP: tl.constexpr, PV_FP8: tl.constexpr, TMA: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One program per BLOCK_M queries of one (batch, head); o [B, Lq, H, D] in its own dtype.

    q [BH, LQ_PAD, D] int8 with qs [BH, LQ_PAD] (base-2 logit scale folded in); k [BH, LK_PAD, D] int8 smoothed with
    ks [BH, LK_PAD / K_GROUP]; PV_FP8: v [BH, D, LK_PAD] e4m3 with vs, vm [BH, D] (scale, mean), else v is the
    caller's [B, Lk, H, D] tensor. TMA: K and fp8 V^T tiles arrive by descriptors the kernel makes per head.
    LQ_BUCKET / LK_BUCKET only key the autotuner.
    """
    tl.static_assert(K_GROUP % BLOCK_N == 0)
    pid_m = tl.program_id(0)  # fastest-varying: consecutive programs share one head's K and V in L2
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * LQ_PAD + offs_m)[:, None] * D + d[None, :])
    q_scale = tl.load(qs_ptr + bh * LQ_PAD + offs_m)
    ks_base = ks_ptr + bh * (LK_PAD // K_GROUP)
    k_src = k_ptr + bh * LK_PAD * D
    if PV_FP8:
        v_src = v_ptr + bh * D * LK_PAD
    else:
        v_src = v_ptr + (bh // H) * stride_vb + (bh % H) * stride_vh
    if TMA:  # descriptors of this head's K and V^T, made here (triton_kernels.allow_kernel_descriptors says why)
        k_src = tl.make_tensor_descriptor(k_src, [LK_PAD, D], [D, 1], [BLOCK_N, D])
        if PV_FP8:
            v_src = tl.make_tensor_descriptor(v_src, [D, LK_PAD], [LK_PAD, 1], [D, BLOCK_N])
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    full = (Lk // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):
        acc, l_i, m_i = _sage_tile(acc, l_i, m_i, q, q_scale, k_src, ks_base, v_src, stride_vl, start, Lk, LK_PAD, D,
                                   K_GROUP, PV_FP8, TMA, False, BLOCK_N)  # fmt: skip
    if full < Lk:
        acc, l_i, m_i = _sage_tile(acc, l_i, m_i, q, q_scale, k_src, ks_base, v_src, stride_vl, full, Lk, LK_PAD, D,
                                   K_GROUP, PV_FP8, TMA, True, BLOCK_N)  # fmt: skip
    out = acc * (1.0 / l_i)[:, None]  # fp8: l_i sums 448 * numerators, as acc does
    if PV_FP8:
        out = out * tl.load(vs_ptr + bh * D + d)[None, :] + tl.load(vm_ptr + bh * D + d)[None, :]
    dst = o_ptr + (bh // H) * stride_ob + (bh % H) * stride_oh + offs_m.to(tl.int64)[:, None] * stride_ol + d[None, :]
    tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=(offs_m < Lq)[:, None])


def _bench_quickly(kernel_call, quantiles):
    """The autotuner's timer with a short budget: a 75600-token call takes ~0.1 s, so the default 100 ms per config
    would triple the tuning time for no better choice."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# The winners are kept in Triton's disk cache where it can (as for the GEMM): tuning took ~11 s per process.
def _configs_for_card(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's pruning: 128 x 128 tiles only where tiles come without TMA (see the note on the configs)."""
    if kwargs.get("TMA", named_args.get("TMA")):
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (128, 128)]
    return configs


_tuned_attn = triton.autotune(configs=_ATTN_CONFIGS, key=["LQ_BUCKET", "LK_BUCKET", "D", "PV_FP8", "TMA"],
                              prune_configs_by={"early_config_prune": _configs_for_card}, do_bench=_bench_quickly,
                              **CACHE_TUNING)(_sage_attn_kernel)  # fmt: skip


# ------------------------------------------------------------------------------------------------ host side


@dataclass(frozen=True)
class SageKV:
    """Keys and values prepared for the kernel: made once per call site, used by every query chunk.

    k8 [B*H, LK_PAD, D] int8 (smoothed), k_scale [B*H, LK_PAD / K_GROUP] fp32; fp8 path: v [B*H, D, LK_PAD] e4m3
    (smoothed, transposed, keys in :func:`key_slots` order) with v_scale, v_mean [B*H, D] fp32; 16-bit path: v is
    the caller's [B, Lk, H, D].
    """

    k8: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    v_mean: torch.Tensor | None
    batch: int
    heads: int
    length: int
    pv_fp8: bool


def _padded(n: int) -> int:
    return triton.cdiv(n, PAD) * PAD


def _check_shapes(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4 or x.shape[-1] not in HEAD_DIMS or x.stride(-1) != 1:
        raise ValueError(f"sage attention takes {what} [B, L, H, D] with D in {HEAD_DIMS} and unit channel stride, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")  # fmt: skip


def _quantize_int8(x: torch.Tensor, mean: torch.Tensor | None, per_row: bool, extra_scale: float):
    """x [B, L, H, D] -> (codes [B*H, L_PAD, D] int8, scales [B*H, L_PAD] per row or [B*H, L_PAD / K_GROUP] per group)."""
    b, n, h, d = x.shape
    n_pad = _padded(n)
    rows = ROWS if per_row else K_GROUP  # a program sees one whole K group
    codes = torch.empty((b * h, n_pad, d), dtype=torch.int8, device=x.device)
    scales = torch.empty((b * h, n_pad if per_row else n_pad // K_GROUP), dtype=torch.float32, device=x.device)
    _quant_int8_kernel[(n_pad // rows, b * h)](x, mean if mean is not None else scales, codes, scales, n, h, n_pad,
                                               x.stride(0), x.stride(1), x.stride(2), extra_scale, D=d, ROWS=rows,
                                               PER_ROW=per_row, SMOOTH=mean is not None,
                                               num_warps=4 if rows * d <= 8192 else 8)  # fmt: skip
    return codes, scales


def quantize_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Lq, H, D] -> (int8 [B*H, LQ_PAD, D], per-token scale [B*H, LQ_PAD] with sm_scale * log2(e) folded in)."""
    _check_shapes(q, "q")
    return _quantize_int8(q, None, per_row=True, extra_scale=_LOG2E / math.sqrt(q.shape[-1]))


def prepare_kv(k: torch.Tensor, v: torch.Tensor, pv_fp8: bool, smooth_k: bool = True) -> SageKV:
    """Smooth and quantize K (and, for fp8 P.V, V) once; ``smooth_k=False`` exists to show what smoothing buys."""
    _check_shapes(k, "k")
    _check_shapes(v, "v")
    b, n, h, d = k.shape
    if v.shape != k.shape:
        raise ValueError(f"sage attention needs k and v of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if n == 0:
        raise ValueError("sage attention needs at least one key")
    mean_k = k.mean(dim=1, dtype=torch.float32).reshape(b * h, d) if smooth_k else None
    k8, k_scale = _quantize_int8(k, mean_k, per_row=False, extra_scale=1.0)
    if not pv_fp8:
        return SageKV(k8, k_scale, v, None, None, b, h, n, False)
    mean_v = v.mean(dim=1, dtype=torch.float32)  # [B, H, D]
    lo, hi = torch.aminmax(v, dim=1)
    amax = torch.maximum(hi.float() - mean_v, mean_v - lo.float()).reshape(b * h, d)
    # the same division pair as the activation quantizer (linear.quantize_activation_torch): scale dequantizes
    fmax = torch.full_like(amax, _FP8_MAX)
    v_scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    inv = torch.where(amax > 0, fmax / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    n_pad = _padded(n)
    vt = torch.empty((b * h, d, n_pad), dtype=torch.float8_e4m3fn, device=v.device)
    mean_v = mean_v.reshape(b * h, d).contiguous()
    _quant_v_fp8_kernel[(n_pad // ROWS, b * h)](v, mean_v, inv.contiguous(), vt, n, h, n_pad, v.stride(0),
                                                    v.stride(1), v.stride(2), D=d, ROWS=ROWS, num_warps=4)  # fmt: skip
    return SageKV(k8, k_scale, vt, v_scale.contiguous(), mean_v, b, h, n, True)


def sage_attention(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                   pv_fp8: bool, kv: SageKV | None = None, tile: dict[str, int] | None = None) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(D)) v, non-causal, no mask. q [B, Lq, H, D], k and v [B, Lk, H, D] (fp16/bf16, unit
    channel stride, D in HEAD_DIMS) -> [B, Lq, H, D] in q's dtype. Pass ``kv`` from :func:`prepare_kv` instead of k
    and v to reuse it; ``tile`` ({'BLOCK_M', 'BLOCK_N'} plus optional 'num_warps', 'num_stages') skips autotuning."""
    if kv is None:
        kv = prepare_kv(k, v, pv_fp8)
    if kv.pv_fp8 != pv_fp8:
        raise ValueError("the prepared K/V were made for the other P.V path")
    b, lq, h, d = q.shape
    if (b, h, d) != (kv.batch, kv.heads, kv.k8.shape[-1]):
        raise ValueError(f"q {tuple(q.shape)} does not match the prepared K/V (batch {kv.batch}, heads {kv.heads})")
    q8, q_scale = quantize_queries(q)
    out = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device)
    if tile is None and INTERPRET:
        tile = _INTERPRET_TILE
    tma = uses_tma(q.device)
    if tma:
        allow_kernel_descriptors()
    v_strides = (0, 0, 0) if kv.pv_fp8 else (kv.v.stride(0), kv.v.stride(1), kv.v.stride(2))
    dummy = q_scale  # any pointer: the 16-bit path reads no V scale or mean
    args = (q8, q_scale, kv.k8, kv.k_scale, kv.v, kv.v_scale if pv_fp8 else dummy, kv.v_mean if pv_fp8 else dummy,
            out, h, lq, kv.length, q8.shape[1], kv.k8.shape[1], *v_strides, out.stride(0), out.stride(1),
            out.stride(2), min(triton.next_power_of_2(lq), 65536), min(triton.next_power_of_2(kv.length), 65536))  # fmt: skip
    # fused multiply-adds keep the exp2 argument's rounding at one step (Triton 3.10 stops fusing by default)
    consts = {"D": d, "K_GROUP": K_GROUP, "PV_FP8": pv_fp8, "TMA": tma, "enable_fp_fusion": True}
    if tile is not None:
        meta = {k_: tile[k_] for k_ in ("BLOCK_M", "BLOCK_N")}
        launch = {k_: tile[k_] for k_ in ("num_warps", "num_stages") if k_ in tile}
        grid = (triton.cdiv(lq, meta["BLOCK_M"]), b * h)
        _sage_attn_kernel[grid](*args, **consts, **meta, **launch)
    else:
        _tuned_attn[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h)](*args, **consts)
    return out


def key_slots(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Where each of n keys sits in a prepared fp8 V^T (``SageKV.v[..., key_slots(n)]`` puts the keys back in order);
    n a multiple of 32, as the padded length is. It runs the kernels' own :func:`_key_slot` (plain bit operations)
    on torch integers, so the host and the kernels share one definition."""
    return _key_slot.fn(torch.arange(n, device=device))


def tuned_configs() -> dict[str, str]:
    """What the autotuner chose so far in this process: {'(Lq bucket, Lk bucket, D, fp8 P.V, ...)': 'BLOCK_M=..'}."""
    return {str(key): str(config) for key, config in getattr(_tuned_attn, "cache", {}).items()}
