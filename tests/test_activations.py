"""The FFN's GELU as the input of W8A8 linears (runtime/ops/activations.py): the fused GELU+quantize kernel in the
Triton interpreter against torch's GELU and the reference quantizer, and the unfused path on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interp import INTERPRETER_FIXES, run_in_triton_interpreter

from wanpack.runtime.ops.activations import gelu_quantized
from wanpack.runtime.ops.linear import quantize_activation_torch

_GELU_SCRIPT = INTERPRETER_FIXES + r"""
import pytest
import torch
import torch.nn.functional as F
from wanpack.runtime.ops import triton_kernels as tk
from wanpack.runtime.ops.linear import quantize_activation_torch
from wanpack.runtime.ops.norms import close_16bit
gen = torch.Generator().manual_seed(0)
h = (4 * torch.randn(23, 300, generator=gen)).to(torch.bfloat16)
h[:, 7] = torch.linspace(-12, 12, 23).to(torch.bfloat16)  # far into both tails
h[4] = 0
ref = F.gelu(h.float(), approximate="tanh").to(torch.bfloat16)
for qdtype in (torch.int8, torch.float8_e4m3fn):
    g, q, s = tk.gelu_quant(h, qdtype)
    assert close_16bit(g, ref), (g.float() - ref.float()).abs().max()
    rq, rs = quantize_activation_torch(g, qdtype)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s[4], torch.zeros(1)) and not q[4].float().any()
    none, q2, s2 = tk.gelu_quant(h[:, :257], qdtype, write_out=False)  # a width that is not a power of two
    rq2, rs2 = quantize_activation_torch(g[:, :257].contiguous(), qdtype)  # GELU is elementwise: same g
    assert none is None and torch.equal(s2, rs2) and torch.equal(q2.view(torch.uint8), rq2.view(torch.uint8))
print("ok")
"""


def test_gelu_quant_kernel_in_interpreter():
    """GELU within one bf16 ulp of torch's (or far below an int8 step), codes exactly the reference quantizer's
    of that output, a zero row giving scale 0, and the variant that stores only the quantized copy."""
    run_in_triton_interpreter(_GELU_SCRIPT)


def test_gelu_quantized_without_the_kernel_is_torch_gelu():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 64, generator=gen).to(torch.bfloat16)
    act = gelu_quantized(h, torch.int8)
    assert torch.equal(act.x, F.gelu(h, approximate="tanh"))
    q, s = act.quantized(torch.int8)
    rq, rs = quantize_activation_torch(act.x2d, torch.int8)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.gpu
def test_fused_gelu_quant_passes_its_self_check_on_gpu():
    """At Wan's FFN widths (14B 13824, 1.3B 8960) and a tiny one: otherwise every run silently takes torch's GELU."""
    from wanpack.runtime.ops.activations import fused_gelu_quant

    assert all(fused_gelu_quant("cuda", width) for width in (13824, 8960, 96))
