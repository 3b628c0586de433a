"""The tiny preview decoder vs a module-based TAEHV-style decoder run in parallel over time.

The reference below is written from the published architecture as nn.Sequential, so its state_dict keys come from
module positions, not from our key list, and it runs every frame at once (memory = input shifted by one frame) while
the runtime streams one latent frame at a time. Tolerance: 1e-5 absolute, float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from wanpack.errors import SourceError, UsageError
from wanpack.runtime.models.tiny_vae import WIDTHS, load_tiny_vae, tiny_decode, tiny_decode_frames, tiny_vae_tensors

SMALL = (16, 8, 8, 8)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Memory(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(n, n, 3, padding=1))  # fmt: skip

    def forward(self, x, past):
        return torch.relu(self.conv(torch.cat([x, past], 1)) + x)


class _Grow(nn.Module):
    def __init__(self, n, stride):
        super().__init__()
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x):
        return self.conv(x).reshape(-1, x.shape[1], *x.shape[2:])


class _Reference(nn.Module):
    def __init__(self, widths):
        super().__init__()
        w0, w1, w2, w3 = widths
        layers = [_Clamp(), nn.Conv2d(16, w0, 3, padding=1), nn.ReLU()]
        for n, nxt, stride in ((w0, w1, 1), (w1, w2, 2), (w2, w3, 2)):
            layers += [_Memory(n), _Memory(n), _Memory(n), nn.Upsample(scale_factor=2), _Grow(n, stride),
                       nn.Conv2d(n, nxt, 3, padding=1, bias=False)]  # fmt: skip
        layers += [nn.ReLU(), nn.Conv2d(w3, 3, 3, padding=1)]
        self.decoder = nn.Sequential(*layers)

    def forward(self, latents):  # [B, 16, T, h, w] -> [B, 3, 4T-3, 8h, 8w] in [-1, 1]
        n = latents.shape[0]
        x = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)
        for layer in self.decoder:
            if isinstance(layer, _Memory):
                frames = x.view(n, -1, *x.shape[1:])
                past = F.pad(frames, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]
                x = layer(x, past.flatten(0, 1))
            else:
                x = layer(x)
        x = x.view(n, -1, *x.shape[1:]).clamp(0, 1)[:, 3:]
        return x.mul(2).sub(1).permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return _Reference(SMALL).eval()


def test_key_layout_matches_module_positions():
    with torch.device("meta"):
        ref = _Reference(WIDTHS)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == tiny_vae_tensors()


def test_decode_matches_parallel_reference(reference):
    weights = dict(reference.state_dict())
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 3, 4, 5, generator=g)
    with torch.no_grad():
        want = reference(latents)
    got = tiny_decode(weights, latents)
    assert got.shape == (2, 3, 9, 32, 40)
    assert (got.abs() < 0.999).float().mean() > 0.3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [f.shape[2] for f in tiny_decode_frames(weights, latents)] == [1, 4, 4]


def test_load_safetensors_and_pth(tmp_path, reference):
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # the real files carry the encoder too
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    torch.save(state, tmp_path / "taew2_1.pth")
    for name in ("taew2_1.safetensors", "taew2_1.pth"):
        loaded = load_tiny_vae(tmp_path / name)
        assert set(loaded) == set(tiny_vae_tensors(widths=SMALL))


def test_load_keeps_last_rows_of_a_wide_first_time_grow(tmp_path, reference):
    state = dict(reference.state_dict())
    extra = torch.randn(16, 16, 1, 1)
    state["decoder.7.conv.weight"] = torch.cat([extra, state["decoder.7.conv.weight"]])
    torch.save(state, tmp_path / "wide.pth")
    loaded = load_tiny_vae(tmp_path / "wide.pth")
    torch.testing.assert_close(loaded["decoder.7.conv.weight"], reference.state_dict()["decoder.7.conv.weight"])


def test_bad_files_raise(tmp_path, reference):
    with pytest.raises(UsageError, match="does not exist"):
        load_tiny_vae(tmp_path / "missing.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SourceError, match="cannot read tiny VAE"):
        load_tiny_vae(tmp_path / "junk.safetensors")
    state = dict(reference.state_dict())
    state["decoder.1.weight"] = torch.zeros(16, 48, 3, 3)
    torch.save(state, tmp_path / "taew2_2.pth")
    with pytest.raises(SourceError, match="48-channel"):
        load_tiny_vae(tmp_path / "taew2_2.pth")
    del state["decoder.1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(SourceError, match="no TAEHV decoder"):
        load_tiny_vae(tmp_path / "broken.pth")
    with pytest.raises(UsageError, match="latents"):
        tiny_decode(dict(reference.state_dict()), torch.zeros(1, 8, 2, 2, 2))
