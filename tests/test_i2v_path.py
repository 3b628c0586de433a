"""The pipeline's own image-to-video conditioning against the original Wan2.1 recipe, computed here independently.

Wan2.1's image2video.py: the image as a tensor in [-1, 1]; CLIP gets it bicubic-resized to 224x224, mapped to [0, 1]
and normalized ONCE with the OpenAI mean/std, and Wan takes the hidden state after the penultimate ViT block; the VAE
gets [bicubic resize to the area-rule size (NOT clamped), zeros for the other frames], and the mask marks frame 0
four times. These tests run ``encode_image_clip`` / ``image_condition`` from runtime/pipeline.py on a tiny pack, the
way runtime/session.py calls them (CLIP on an engine with the run plan's options, the VAE's resident weights).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_clip import hf_model
from test_convert import pack_tensors

from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.convert.synth import synth_checkpoint
from wanpack.manifests.arch import config_from_dict
from wanpack.manifests.format import read_manifest
from wanpack.manifests.run_config import resolve_run_config
from wanpack.runtime.models.vae import encode as vae_encode
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.pipeline import RunRequest, check_request, encode_image_clip, image_condition
from wanpack.runtime.run_plan import plan_run
from wanpack.runtime.stream.engine import StreamEngine

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
FRAMES = 5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny i2v pack (weights unquantized, so the reference can use the same values) and a 40x64 noise image."""
    root = tmp_path_factory.mktemp("i2v_path")
    synth_checkpoint(root / "src", "wan2.1-i2v-14b", layers=1, dim_scale="tiny", components=("dit", "t5", "clip", "vae"))
    convert_checkpoint(root / "src", root / "pack", ConvertOptions(quant="none", components=("all",)))
    from PIL import Image

    pixels = (np.random.default_rng(7).random((40, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "in.png")
    # 48 x 80 asks for an area of 3840 px: the 5:8 image becomes 48 x 64, a 1.2x bicubic upscale of sharp noise
    cfg = resolve_run_config(overrides={"height": 48, "width": 80, "frames": FRAMES})
    checked = check_request(RunRequest(pack=root / "pack", prompt="x", out=root / "v.mp4", config=cfg,
                                       image=root / "in.png"))  # fmt: skip
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 * 2 - 1  # TF.to_tensor(img).sub(.5).div(.5)
    return root / "pack", cfg, checked, image


def pipeline_clip(pack, checked) -> torch.Tensor:
    """The CLIP features of the run's image, as the session makes them."""
    plan = plan_run(pack, checked.manifest, checked.config, device=CPU, width=checked.width, height=checked.height,
                    task=checked.task, batch=2)  # fmt: skip
    with StreamEngine(PackComponent(pack, "clip", checked.manifest), plan.encoder_options("clip"), CPU) as eng:
        return encode_image_clip(eng, checked.image)


def pipeline_condition(pack, checked) -> torch.Tensor:
    """The conditioning input y of the run's image, as the session makes it."""
    comp = PackComponent(pack, "vae", checked.manifest)
    vae_cfg = config_from_dict(comp.entry.config)
    return image_condition(comp.load_resident(CPU), vae_cfg, checked.image, checked, checked.config, CPU, float("inf"))


def test_clip_features_match_resize_normalize_once_penultimate_block(setup):
    pack, cfg, checked, image = setup
    ours = pipeline_clip(pack, checked)
    clip_cfg = config_from_dict(read_manifest(pack).component("clip").config)
    weights = {k: v.float() for k, v in pack_tensors(pack, "clip").items()}
    pixels = F.interpolate(image[None], size=(224, 224), mode="bicubic", align_corners=False)
    pixels = (pixels * 0.5 + 0.5 - OPENAI_MEAN) / OPENAI_STD
    with torch.no_grad():
        hidden = hf_model(weights, clip_cfg)(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert clip_cfg.use_layers == clip_cfg.num_layers - 1
    ref = hidden[clip_cfg.num_layers - 1]  # after the penultimate block, as Wan's use_31_block
    rel = ((ours.float() - ref).norm() / ref.norm()).item()
    assert ours.shape == ref.shape and rel < 1e-5, rel  # normalized twice, this was ~0.2


def test_image_condition_matches_unclamped_bicubic_and_reference_mask(setup):
    pack, cfg, checked, image = setup
    ours = pipeline_condition(pack, checked)
    # the area rule of image2video.py, written out
    area, aspect = 48 * 80, image.shape[1] / image.shape[2]
    lat_h = round(math.sqrt(area * aspect) // 8 // 2 * 2)
    lat_w = round(math.sqrt(area / aspect) // 8 // 2 * 2)
    h, w = lat_h * 8, lat_w * 8
    assert (checked.height, checked.width) == (h, w) == (48, 64)
    first = F.interpolate(image[None], size=(h, w), mode="bicubic", align_corners=False)
    assert first.abs().max() > 1.05  # the overshoot a clamp would remove is really there in this input
    video = torch.cat([first.transpose(0, 1), torch.zeros(3, FRAMES - 1, h, w)], dim=1)
    comp = PackComponent(pack, "vae")
    latent = vae_encode(comp.load_resident("cpu"), video[None], config_from_dict(comp.entry.config))[0]
    msk = torch.ones(1, FRAMES, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]
    ref = torch.cat([msk, latent.float()])
    assert ours.shape == ref.shape == (20, (FRAMES - 1) // 4 + 1, lat_h, lat_w)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)  # clamped first, the latent moved by ~1%


def test_pipeline_image_is_the_reference_tensor(setup):
    """The pipeline reads the file as the original does: RGB, [-1, 1], channels first, no resize yet."""
    _, _, checked, image = setup
    assert torch.equal(checked.image, image)

