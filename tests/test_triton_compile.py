"""Compile every Triton kernel for an H100 (sm90), and the attention kernel for an RTX 4090 / L40 (sm89) too, on this
CPU-only machine: catches what the interpreter cannot (type errors in lowering, Hopper wgmma use, shared memory over
the 227 KiB limit, lost software pipelining)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from wanpack.runtime.ops import triton_kernels as tk  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024


def compile_sm90(fn, sig: dict[str, str], const: dict, target: GPUTarget = SM90, **opts):
    # what the JIT specializes at launch: 16-byte aligned pointers, strides and padded lengths divisible by 16
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*") or n.startswith("stride") or n.endswith("_PAD")}  # fmt: skip
    src = triton.compiler.ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                                    attrs=attrs)  # fmt: skip
    return triton.compile(src, target=target, options=opts)


GEMM_SIG = {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*bf16", "as_ptr": "*fp32", "bs_ptr": "*fp32", "bias_ptr": "*bf16",
            "gate_ptr": "*fp32", "M": "i32", "N": "i32", "M_BUCKET": "i32", "stride_am": "i32", "stride_bn": "i32",
            "stride_cm": "i32"}


@pytest.mark.parametrize("config", tk._GEMM_CONFIGS, ids=lambda c: "x".join(str(v) for v in c.kwargs.values()))
@pytest.mark.parametrize("k", [5120, 13824])
def test_int8_gemm_compiles_to_pipelined_wgmma(config, k):
    kernel = compile_sm90(tk._int8_gemm_kernel, GEMM_SIG, {"K": k, "HAS_BIAS": True, "EVEN_K": True, "TMA": False,
                                                          "RESIDUAL": False, "STREAM_TMA": False, **config.kwargs},
                          num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip
    assert "wgmma" in kernel.asm["ptx"]
    tile = (config.kwargs["BLOCK_M"] + config.kwargs["BLOCK_N"]) * config.kwargs["BLOCK_K"]
    assert kernel.metadata.shared >= 2 * tile  # multi-buffered, i.e. the K loop is software-pipelined
    assert kernel.metadata.shared <= SMEM_LIMIT


@pytest.mark.parametrize("config", tk._GEMM_CONFIGS, ids=lambda c: "x".join(str(v) for v in c.kwargs.values()))
def test_int8_gemm_tma_path_compiles_for_sm90(config):
    """As sm90 launches it: A and B tiles by TMA (descriptors made in the kernel), not by the threads' loads, and
    every config within shared memory."""
    bm, bn, bk = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    kernel = compile_sm90(tk._int8_gemm_kernel, GEMM_SIG, {"K": 5120, "HAS_BIAS": True, "EVEN_K": True, "TMA": True,
                                                      "RESIDUAL": False, "STREAM_TMA": False, **config.kwargs},
                          num_warps=config.num_warps,
                          num_stages=config.num_stages)  # fmt: skip
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".s32.s8.s8" in ptx
    assert "cp.async.bulk.tensor.2d.shared" in ptx and "tensormap" in ptx  # tiles arrive by TMA
    assert "ld.global.v4" not in ptx  # and not by the threads' vector loads
    assert 2 * (bm + bn) * bk <= kernel.metadata.shared <= SMEM_LIMIT


def test_int8_gemm_ragged_k_compiles():
    compile_sm90(tk._int8_gemm_kernel, GEMM_SIG, {"K": 200, "HAS_BIAS": False, "EVEN_K": False, "TMA": False,
                                                  "RESIDUAL": False, "STREAM_TMA": False, **tk._GEMM_CONFIGS[0].kwargs},
                 num_warps=8, num_stages=3)  # fmt: skip


_RESIDUAL_CASES = [(c, 5120, True) for c in tk._GEMM_CONFIGS] + [(tk._GEMM_CONFIGS[0], 13824, True),
                                                                   (tk._GEMM_CONFIGS[0], 5120, False)]  # fmt: skip


@pytest.mark.parametrize(("config", "k", "stream_tma"), _RESIDUAL_CASES,
                         ids=lambda v: "x".join(str(x) for x in v.kwargs.values()) if hasattr(v, "kwargs") else str(v))
def test_int8_gemm_residual_epilogue_compiles_for_sm90(config, k, stream_tma):
    """The variant that adds into the fp32 residual stream (self_attn.o, cross_attn.o at K 5120; ffn.2 at 13824),
    as sm90 launches it: TMA tiles, the stream's tile by TMA too (by the threads where the stream is unaligned),
    every config within shared memory."""
    sig = {**GEMM_SIG, "c_ptr": "*fp32"}
    kernel = compile_sm90(tk._int8_gemm_kernel, sig, {"K": k, "HAS_BIAS": True, "EVEN_K": True, "TMA": True,
                                                      "RESIDUAL": True, "STREAM_TMA": stream_tma, **config.kwargs},
                          num_warps=config.num_warps, num_stages=config.num_stages)  # fmt: skip
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor.2d.shared" in ptx
    if stream_tma:  # the stream's tile: read and written back by TMA
        assert "cp.async.bulk.tensor.2d.global.shared" in ptx and "st.global" not in ptx
    else:
        assert "ld.global" in ptx and "st.global" in ptx
    assert kernel.metadata.shared <= SMEM_LIMIT


@pytest.mark.parametrize("qdtype", ["*i8", "*fp8e4nv"])
def test_gelu_quant_compiles_without_a_division_per_element(qdtype):
    """GELU + quantize for the 14B FFN width: the row's two IEEE divisions, and GELU's per-element one only in its
    fast form (an IEEE division per element made the first quantizers compute-bound)."""
    sig = {"h_ptr": "*bf16", "out_ptr": "*bf16", "q_ptr": qdtype, "s_ptr": "*fp32", "K": "i32", "stride_h": "i32",
           "stride_o": "i32", "stride_q": "i32"}  # fmt: skip
    const = {"QMAX": 127.0 if qdtype == "*i8" else 448.0, "IS_INT8": qdtype == "*i8", "WRITE_OUT": False,
             "NATIVE": True, "BLOCK": 16384}  # fmt: skip
    ptx = compile_sm90(tk._gelu_quant_kernel, sig, const, num_warps=8).asm["ptx"]
    assert ptx.count("div.rn.f32") <= 6 and "mul.rn.f32" in ptx
    assert "ex2.approx" in ptx


@pytest.mark.parametrize("scheme,block", [("int8", 16384), ("fp8", 8192)])
def test_quantizer_compiles(scheme, block):
    sig = {"x_ptr": "*bf16", "q_ptr": "*i8" if scheme == "int8" else "*fp8e4nv", "s_ptr": "*fp32", "K": "i32",
           "stride_x": "i32", "stride_q": "i32"}  # fmt: skip
    const = {"QMAX": 127.0 if scheme == "int8" else 448.0, "IS_INT8": scheme == "int8", "NATIVE": True, "BLOCK": block}
    kernel = compile_sm90(tk._quant_rows_kernel, sig, const, num_warps=8)
    assert kernel.metadata.shared <= SMEM_LIMIT
    assert_one_division_per_row(kernel.asm["ptx"])


def assert_one_division_per_row(ptx: str) -> None:
    """Quantizers divide once per row (IEEE) and multiply per element: per-element divisions made them
    compute-bound on an H100, and an approximate or contracted multiply would break bit-equality with torch."""
    assert ptx.count("div.rn.f32") <= 6 and "div.full.f32" not in ptx and "div.approx.f32" not in ptx
    assert "mul.rn.f32" in ptx


@pytest.mark.parametrize("rope", [True, False])
def test_rms_rope_compiles(rope):
    sig = {"y_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "L": "i32",
           "stride_y": "i32", "stride_o": "i32", "stride_c": "i32", "eps": "fp32"}  # fmt: skip
    compile_sm90(tk._rms_rope_kernel, sig, {"HALF": 2560, "HALF_HEAD": 64, "ROPE": rope, "BLOCK": 4096}, num_warps=4)


@pytest.mark.parametrize("modulate,quant", [(True, None), (False, None), (True, "int8"), (True, "fp8"),
                                            (False, "int8")])  # fmt: skip
def test_layer_norm_compiles(modulate, quant):
    qtype = {None: "*bf16", "int8": "*i8", "fp8": "*fp8e4nv"}[quant]
    sig = {"x_ptr": "*fp32", "shift_ptr": "*fp32", "scale_ptr": "*fp32", "w_ptr": "*bf16", "bias_ptr": "*bf16",
           "out_ptr": "*bf16", "q_ptr": qtype, "s_ptr": "*fp32" if quant else "*bf16", "L": "i32", "stride_xb": "i32",
           "stride_xl": "i32", "stride_mb": "i32", "stride_o": "i32", "stride_q": "i32", "eps": "fp32"}  # fmt: skip
    const = {"C": 5120, "MODULATE": modulate, "AFFINE": not modulate, "QUANT": quant is not None,
             "QMAX": 127.0 if quant == "int8" else 448.0, "IS_INT8": quant == "int8", "WRITE_OUT": quant != "int8",
             "NATIVE": True, "BLOCK": 8192}  # fmt: skip
    kernel = compile_sm90(tk._mod_ln_kernel, sig, const, num_warps=8)
    assert kernel.metadata.shared <= SMEM_LIMIT
    assert_one_division_per_row(kernel.asm["ptx"])  # the LayerNorm's own divisions are per row too
    if quant == "fp8":
        assert "cvt.rn.satfinite.e4m3x2.f32" in kernel.asm["ptx"]  # hardware e4m3 conversion, as in quantize_rows


# ------------------------------------------------------------------------------------------------ sage attention

SM89 = GPUTarget("cuda", 89, 32)
SM89_SMEM_LIMIT = 99 * 1024


def sage_sig(pv_fp8: bool) -> dict[str, str]:
    """The kernel's signature as the launcher types it (with TMA the kernel makes its own descriptors)."""
    v = "*fp8e4nv" if pv_fp8 else "*bf16"
    return {"q_ptr": "*i8", "qs_ptr": "*fp32", "k_ptr": "*i8", "ks_ptr": "*fp32", "v_ptr": v, "vs_ptr": "*fp32",
            "vm_ptr": "*fp32", "o_ptr": "*bf16", "H": "i32", "Lq": "i32", "Lk": "i32", "LQ_PAD": "i32",
            "LK_PAD": "i32", "stride_vb": "i32", "stride_vl": "i32", "stride_vh": "i32", "stride_ob": "i32",
            "stride_ol": "i32", "stride_oh": "i32", "LQ_BUCKET": "i32", "LK_BUCKET": "i32"}  # fmt: skip


def compile_sage(config, pv_fp8: bool, target: GPUTarget = SM90, head_dim: int = 128):
    """As the launcher compiles it: TMA descriptors on sm90 (runtime/ops/sage_attention.uses_tma), loads on sm89."""
    from wanpack.runtime.ops import sage_attention as sa

    tma = target.arch >= 90
    const = {"D": head_dim, "K_GROUP": sa.K_GROUP, "PV_FP8": pv_fp8, "TMA": tma, **config.kwargs}
    sig = sage_sig(pv_fp8)
    return compile_sm90(sa._sage_attn_kernel, sig, const, target, num_warps=config.num_warps,
                        num_stages=config.num_stages)  # fmt: skip


def _sage_configs():
    from wanpack.runtime.ops import sage_attention as sa

    return sa._ATTN_CONFIGS


@pytest.mark.parametrize("config", _sage_configs(), ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}"
                         f"w{c.num_warps}s{c.num_stages}")  # fmt: skip
def test_sage_attention_fp8_compiles_to_pipelined_wgmma(config):
    """Every autotuned config on sm90: int8 Q.K^T and fp8 P.V both on wgmma, K and V tiles by TMA and
    multi-buffered (the key loop is software-pipelined), no int->float conversion instruction (the exact bit trick
    replaces it)."""
    kernel = compile_sage(config, pv_fp8=True)
    ptx = kernel.asm["ptx"]
    assert ".s32.s8.s8" in ptx and ".f32.e4m3.e4m3" in ptx and "wgmma.mma_async" in ptx
    assert "cvt.rn.f32.s32" not in ptx
    assert "cp.async.bulk.tensor" in ptx  # K and V tiles by TMA
    kv_tile = 2 * config.kwargs["BLOCK_N"] * 128  # one int8 K tile + one e4m3 V tile
    assert 2 * kv_tile <= kernel.metadata.shared <= SMEM_LIMIT
    # P reaches the fp8 product in place (V's keys are stored in the operand's order): no byte permutes, and
    # shuffles (16-18) only for the row max and row sum; moving P between threads took 16-32 more of each
    assert "prmt.b32" not in ptx
    assert ptx.count("shfl.sync") <= 18


@pytest.mark.parametrize(("pv_fp8", "target", "at"), [(False, SM90, 0), (True, SM89, 1), (False, SM89, 1),
                                                       (True, SM89, 2)], ids=["pv16-sm90", "fp8-sm89", "pv16-sm89",
                                                                              "fp8-sm89-64x64"])  # fmt: skip
def test_sage_attention_other_paths_compile(pv_fp8, target, at):
    """The 16-bit P.V path on sm90 (wgmma) and both paths on sm89 (mma.sync, e4m3 for fp8), within sm89's shared
    memory for the configs named here (the autotuner skips those that are not)."""
    kernel = compile_sage(_sage_configs()[at], pv_fp8, target)
    ptx = kernel.asm["ptx"]
    mma = "wgmma.mma_async" if target is SM90 else "mma.sync.aligned"
    assert mma in ptx and ".s8.s8" in ptx and (".e4m3.e4m3" in ptx) == pv_fp8
    assert kernel.metadata.shared <= (SMEM_LIMIT if target is SM90 else SM89_SMEM_LIMIT)


def test_sage_attention_sm89_128_row_tiles_keep_p_in_registers():
    """Without TMA (mma.sync), 128-row tiles with 8 warps give each warp 16 whole rows, so the row max and sum need
    only in-warp shuffles and P stays in registers; 64-row tiles put the 4 warps side by side along the keys."""
    from wanpack.runtime.ops import sage_attention as sa

    wide = next(c for c in _sage_configs() if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == (128, 128))
    wide_kernel, narrow_kernel = compile_sage(wide, True, SM89), compile_sage(_sage_configs()[1], True, SM89)
    assert wide_kernel.asm["ptx"].count("shfl.sync") <= 18 < narrow_kernel.asm["ptx"].count("shfl.sync")
    assert wide_kernel.metadata.shared <= SM89_SMEM_LIMIT
    # tried only where tiles come without TMA
    assert wide in sa._configs_for_card(_sage_configs(), {}, TMA=False)
    assert wide not in sa._configs_for_card(_sage_configs(), {}, TMA=True)


def test_sage_attention_head_dim_64_compiles():
    kernel = compile_sage(_sage_configs()[0], pv_fp8=True, head_dim=64)
    assert ".e4m3.e4m3" in kernel.asm["ptx"]


@pytest.mark.parametrize("per_row", [True, False], ids=["q-per-token", "k-per-group"])
def test_sage_int8_prepass_compiles(per_row):
    from wanpack.runtime.ops import sage_attention as sa

    sig = {"x_ptr": "*bf16", "mean_ptr": "*fp32", "out_ptr": "*i8", "scale_ptr": "*fp32", "L": "i32", "H": "i32",
           "L_PAD": "i32", "stride_b": "i32", "stride_l": "i32", "stride_h": "i32", "extra_scale": "fp32"}  # fmt: skip
    const = {"D": 128, "ROWS": sa.K_GROUP, "PER_ROW": per_row, "SMOOTH": not per_row}
    kernel = compile_sm90(sa._quant_int8_kernel, sig, const, num_warps=4)
    assert kernel.metadata.shared <= SMEM_LIMIT


def test_sage_v_prepass_compiles_to_hardware_e4m3():
    from wanpack.runtime.ops import sage_attention as sa

    sig = {"v_ptr": "*bf16", "mean_ptr": "*fp32", "inv_ptr": "*fp32", "out_ptr": "*fp8e4nv", "L": "i32", "H": "i32",
           "L_PAD": "i32", "stride_b": "i32", "stride_l": "i32", "stride_h": "i32"}  # fmt: skip
    kernel = compile_sm90(sa._quant_v_fp8_kernel, sig, {"D": 128, "ROWS": sa.K_GROUP}, num_warps=4)
    assert "cvt.rn.satfinite.e4m3x2.f32" in kernel.asm["ptx"]
