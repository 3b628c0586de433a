"""RunConfig: presets, user JSON, LightX2V keys, merge order, and one-line errors for every bad value."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wanpack.errors import UsageError
from wanpack.manifests.run_config import (
    ALIASES,
    FIELDS,
    RunConfig,
    known_keys,
    load_preset,
    preset_description,
    preset_names,
    resolve_run_config,
)
from wanpack.runtime.sampling import make_scheduler

EXPECTED_PRESETS = {"i2v-14b-480p", "i2v-14b-720p", "t2v-1.3b", "t2v-14b-480p", "t2v-14b-720p", "distill-4step"}


def test_defaults_are_the_reference_t2v_values():
    cfg = resolve_run_config()
    assert cfg == RunConfig()
    assert (cfg.sampler, cfg.steps, cfg.shift, cfg.guidance) == ("unipc", 50, 5.0, 5.0)
    assert (cfg.frames, cfg.height, cfg.width, cfg.fps) == (81, 480, 832, 16)
    assert cfg.negative_prompt.startswith("色调艳丽") and cfg.cfg_active


def test_every_preset_loads_validates_and_builds_its_scheduler():
    assert set(preset_names()) == EXPECTED_PRESETS
    for name in preset_names():
        cfg = resolve_run_config(name)
        assert cfg.preset == name and preset_description(name)
        sched = make_scheduler(cfg.sampler, cfg.steps, cfg.shift, cfg.denoising_step_list)
        assert sched.num_steps == cfg.steps


@pytest.mark.parametrize(
    "name,expect",
    [
        ("i2v-14b-480p", {"task": "i2v", "steps": 40, "shift": 3.0, "height": 480, "width": 832,
                          "clip_quant": ("int8", "fp8")}),
        ("i2v-14b-720p", {"task": "i2v", "steps": 40, "shift": 5.0, "height": 720, "width": 1280}),
        ("t2v-1.3b", {"arch": "wan2.1-t2v-1.3b", "steps": 50}),
        ("t2v-14b-720p", {"height": 720, "width": 1280, "steps": 50, "shift": 5.0}),
        ("distill-4step", {"sampler": "distill", "steps": 4, "enable_cfg": False,
                           "denoising_step_list": (1000, 750, 500, 250), "shift": 5.0}),
    ],
)  # fmt: skip
def test_preset_values(name, expect):
    cfg = resolve_run_config(name)
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert cfg.explicit_offload() == {}  # presets describe the model and sampling; the planner decides the offload
    if name == "distill-4step":
        assert not cfg.cfg_active


def test_lightx2v_config_is_mapped(tmp_path):
    lightx2v = {
        "infer_steps": 4, "target_video_length": 33, "target_height": 720, "target_width": 1280,
        "sample_guide_scale": 1.0, "sample_shift": 5.0, "enable_cfg": False, "cpu_offload": True,
        "offload_granularity": "phase", "lazy_load": True, "num_disk_workers": 4, "t5_cpu_offload": True,
        "use_tiling_vae": True, "use_tae": True, "tae_path": "/m/taew2_1.pth", "clean_cuda_cache": True,
        "rope_chunk": True, "rope_chunk_size": 64, "denoising_step_list": [1000, 750, 500, 250],
    }  # fmt: skip
    path = tmp_path / "wan_i2v_distill.json"
    path.write_text(json.dumps(lightx2v))
    cfg = resolve_run_config(config=path)
    assert (cfg.steps, cfg.frames, cfg.height, cfg.width) == (4, 33, 720, 1280)
    assert (cfg.guidance, cfg.shift, cfg.enable_cfg) == (1.0, 5.0, False)
    assert cfg.sampler == "distill"  # a LightX2V step list means the distilled schedule
    assert (cfg.cpu_offload, cfg.offload_granularity, cfg.lazy_load, cfg.num_disk_workers) == (True, "phase", True, 4)
    assert (cfg.vae_tiling, cfg.tiny_vae, cfg.tiny_vae_path) == (True, True, "/m/taew2_1.pth")
    assert (cfg.clean_cuda_cache, cfg.rope_chunk, cfg.rope_chunk_size) == (True, True, 64)


def test_old_lightx2v_names_and_every_alias_targets_a_field():
    cfg = resolve_run_config(config={"rotary_chunk": True, "rotary_chunk_size": 8, "use_tiny_vae": False})
    assert (cfg.rope_chunk, cfg.rope_chunk_size, cfg.tiny_vae) == (True, 8, False)
    assert all(field in FIELDS for field in ALIASES.values())
    assert "preset" not in known_keys()


def test_merge_order_defaults_preset_config_overrides():
    cfg = resolve_run_config("i2v-14b-480p", {"steps": 30, "seed": 7}, {"steps": 20, "shift": None, "fps": 24})
    assert (cfg.steps, cfg.seed, cfg.fps, cfg.shift) == (20, 7, 24, 3.0)  # None overrides are "not given"
    assert cfg.task == "i2v" and cfg.lazy_load is None  # not set by anyone: the planner's call


def test_offload_settings_set_anywhere_are_explicit():
    cfg = resolve_run_config("distill-4step", {"lazy_load": True}, {"offload_granularity": "phase", "read_mode": "direct"})
    assert cfg.explicit_offload() == {"lazy_load": True, "offload_granularity": "phase", "read_mode": "direct"}
    with pytest.raises(UsageError, match="read_mode 'mmap' is not one of cached, direct"):
        resolve_run_config(config={"read_mode": "mmap"})


def test_distill_implies_its_step_count_over_a_base_preset():
    cfg = resolve_run_config("t2v-14b-480p", {"sampler": "distill"})
    assert (cfg.sampler, cfg.steps) == ("distill", 4)
    cfg = resolve_run_config("distill-4step", {"denoising_step_list": [1000, 500]})
    assert (cfg.steps, cfg.step_list) == (2, (1000, 500))
    with pytest.raises(UsageError, match=r"steps \(5\) must equal"):
        resolve_run_config("distill-4step", {"steps": 5})


@pytest.mark.parametrize(
    "data,match",
    [
        ({"infer_stepz": 4}, r"unknown config key 'infer_stepz' in config - did you mean 'infer_steps'\?"),
        ({"attention_type": "flash_attn3"}, r"unknown config key 'attention_type' .* remove it"),
        ({"feature_caching": "NoCaching"}, "unknown config key 'feature_caching'"),
        ({"preset": "t2v-1.3b"}, "unknown config key 'preset'"),
        ({"steps": 4, "infer_steps": 4}, "sets steps twice"),
        ({"use_tae": True, "use_tiny_vae": True, "tiny_vae_path": "x"}, "sets tiny_vae twice"),
        ({"frames": 80}, r"frames must be 4n\+1 .* use 81"),
        ({"target_video_length": 0}, r"target_video_length must be 4n\+1"),
        ({"height": 479}, "height must be a positive multiple of 16, got 479 - use 480"),
        ({"target_width": 1000}, "width must be a positive multiple of 16, got 1000 - use 1008"),
        ({"steps": 0}, "steps must be at least 1"),
        ({"infer_steps": 2.5}, "infer_steps must be a whole number"),
        ({"enable_cfg": 1}, "enable_cfg must be true or false"),
        ({"sample_shift": "5"}, "sample_shift must be a number"),
        ({"shift": 0}, "shift must be positive"),
        ({"guidance": -1}, "guidance must be positive"),
        ({"sampler": "ddim"}, "sampler 'ddim' is not one of"),
        ({"offload_granularity": "layer"}, "offload_granularity 'layer' is not one of"),
        ({"arch": "wan2.2"}, "arch 'wan2.2' is not one of"),
        ({"dit_quant": ["int4"]}, "dit_quant entries must be among"),
        ({"denoising_step_list": [250, 500]}, "must decrease inside 1..1000"),
        ({"denoising_step_list": []}, "must be a non-empty list"),
        ({"sampler": "unipc", "denoising_step_list": [1000, 500]}, "only applies to sampler 'distill'"),
        ({"use_tae": True}, "tiny_vae_path"),
        ({"task": "t2v", "arch": "wan2.1-i2v-14b"}, "does not match arch"),
        ({"num_disk_workers": 0}, "num_disk_workers must be between 1 and 64"),
        ({"seed": -1}, "seed must be between"),
        ({"fps": 0}, "fps must be between 1 and 240"),
        ({"steps": None}, r"steps must be set \(null"),
    ],
)  # fmt: skip
def test_bad_config_is_one_line_usage_error(data, match):
    with pytest.raises(UsageError, match=match) as info:
        resolve_run_config(config=data)
    assert "\n" not in str(info.value) and " - " in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(UsageError, match="cannot read config"):
        resolve_run_config(config=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 4,}')
    with pytest.raises(UsageError, match="not valid JSON"):
        resolve_run_config(config=bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(UsageError, match="JSON object"):
        resolve_run_config(config=arr)
    typo = tmp_path / "typo.json"
    typo.write_text('{"sample_guide_scal": 5}')
    with pytest.raises(UsageError, match="in config typo.json - did you mean 'sample_guide_scale'"):
        resolve_run_config(config=typo)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(UsageError, match="did you mean 'i2v-14b-480p'"):
        load_preset("i2v-14b-480")
    with pytest.raises(UsageError, match="unknown preset"):
        load_preset("../pyproject")


def test_to_dict_is_json_ready_and_round_trips():
    cfg = resolve_run_config("distill-4step", {"seed": 3})
    data = json.loads(json.dumps(cfg.to_dict(), ensure_ascii=False))
    data.pop("preset")
    again = resolve_run_config(config=data)
    assert dataclasses.replace(again, preset="distill-4step") == cfg


def test_docs_list_every_key_and_preset():
    """docs/SAMPLING.md and the code cannot drift: every accepted key and every preset is documented."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "SAMPLING.md").read_text(encoding="utf-8")
    missing = [k for k in known_keys() + preset_names() if f"`{k}`" not in text]
    assert not missing, f"docs/SAMPLING.md does not mention {missing}"
