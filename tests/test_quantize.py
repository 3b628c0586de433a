"""Per-channel weight quantization: the exact math of docs/FORMAT.md, error bounds, degenerate rows."""

from __future__ import annotations

import pytest
import torch

from wanpack.convert.quantize import dequantize_weight, max_quant_error, quantize_weight


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 40.0  # an outlier dominating its row
    w[9] = 1e-30  # a denormal-ish row
    return w


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_round_trip_within_bound_and_no_nan(scheme):
    w = _weights()
    before = w.clone()
    q, scale = quantize_weight(w, scheme)
    assert torch.equal(w, before), "quantization must not modify its input"
    assert q.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[scheme]
    assert scale.dtype == torch.float32 and scale.shape == (64, 1)
    back = dequantize_weight(q, scale)
    assert torch.isfinite(back).all()
    assert torch.equal(back[3], torch.zeros(96)) and scale[3].item() == 0.0
    assert ((back - w).abs() <= max_quant_error(w, scheme) + 1e-12).all()


def test_int8_matches_the_written_formula_exactly():
    w = _weights()
    q, scale = quantize_weight(w, "int8")
    absmax = w.abs().amax(dim=1, keepdim=True)
    expected_scale = absmax / 127
    assert torch.equal(scale, expected_scale)
    safe = torch.where(expected_scale > 0, expected_scale, torch.ones_like(expected_scale))
    expected_q = torch.clamp(torch.round(w / safe), -128, 127).to(torch.int8)
    assert torch.equal(q, expected_q)
    assert q.abs().max().item() == 127  # the row maximum maps to exactly +-127


def test_int8_rounds_half_to_even():
    # row absmax 127 -> scale 1, so values are quantized to themselves and .5 ties are visible
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])
    q, scale = quantize_weight(w, "int8")
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_fp8_uses_full_range_and_matches_cast():
    w = _weights()
    q, scale = quantize_weight(w, "fp8")
    assert torch.equal(scale, w.abs().amax(dim=1, keepdim=True) / 448)
    assert q.float().abs().amax().item() == 448.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    assert torch.equal(q.float(), (w / safe).clamp(-448, 448).to(torch.float8_e4m3fn).float())


def test_rejects_non_matrix():
    with pytest.raises(ValueError):
        quantize_weight(torch.ones(3), "int8")
