"""How a video is made: one typed RunConfig, its defaults in one place, presets, user JSON and LightX2V-style keys.

Layers merge in order, later wins: RunConfig defaults < ``--preset`` (manifests/presets/NAME.json) < ``--config``
(a user's JSON) < command-line overrides. Every layer goes through the same key check: a key wanpack does not know
is an error naming the key and the closest known one, never silently ignored (LightX2V ignores stale keys; users
lose hours to that). LightX2V's names for settings that mean something here are accepted and mapped (``ALIASES``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wanpack.errors import UsageError
from wanpack.manifests.arch import DIT_ARCHS
from wanpack.manifests.format import QUANT_SCHEMES

PRESET_DIR = Path(__file__).parent / "presets"
SAMPLERS = ("unipc", "dpm++", "euler", "distill")
DISTILL_STEP_LIST = (1000, 750, 500, 250)
OFFLOAD_GRANULARITIES = ("block", "phase", "model")
READ_MODES = ("cached", "direct")
# Settings that say how to use the machine rather than what to make: the planner fills the ones left unset.
OFFLOAD_FIELDS = ("cpu_offload", "offload_granularity", "lazy_load", "num_disk_workers", "t5_cpu_offload",
                  "clip_cpu_offload", "read_mode", "chunk_tokens", "vae_tiling")  # fmt: skip
TASKS = ("t2v", "i2v")
# The reference's shared negative prompt (Wan2.1 shared_config.sample_neg_prompt), used for the CFG branch.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run; the field defaults here are THE defaults (the reference's T2V values)."""

    # what to make
    task: str | None = None  # "t2v" | "i2v"; None: whatever the pack holds
    arch: str | None = None  # expected DiT architecture (manifests.arch); None: any
    height: int = 480
    width: int = 832  # I2V: height * width is the pixel area; the aspect ratio follows the input image
    frames: int = 81  # 4n + 1
    fps: int = 16
    seed: int | None = None  # None: a random seed, recorded in the sidecar
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # sampling
    sampler: str = "unipc"
    steps: int = 50
    shift: float = 5.0
    guidance: float = 5.0
    enable_cfg: bool = True
    denoising_step_list: tuple[int, ...] | None = None  # distill sampler only; None: [1000, 750, 500, 250]
    # memory: where weights live and how they move. None everywhere means "the planner decides" from the budgets and
    # what the machine has free (runtime/run_plan.py); a value set by the user or a --config is honored and recorded.
    cpu_offload: bool | None = None  # stream the DiT (True) or keep it whole on the GPU (False)
    offload_granularity: str | None = None  # unit streamed: "block", "phase" (self-attn / cross-attn / ffn) or "model"
    lazy_load: bool | None = None  # True: no host cache, every step reads the pack again
    num_disk_workers: int | None = None
    t5_cpu_offload: bool | None = None  # True: stream the T5 block by block; False: load it whole onto the GPU
    clip_cpu_offload: bool | None = None  # likewise for CLIP
    vae_cpu_offload: bool = False
    read_mode: str | None = None  # "cached" (page cache kept for the next run) or "direct" (O_DIRECT)
    chunk_tokens: int | None = None  # DiT activation chunk (tokens); None: the planner's
    vram_budget_gib: float | None = None  # None: what the device has free
    ram_budget_gib: float | None = None  # None: what the host has available
    clean_cuda_cache: bool = False  # empty the CUDA caching allocator between stages
    rope_chunk: bool = False  # apply RoPE in token chunks to cap the temporary memory
    rope_chunk_size: int = 100
    # what the pack must hold (None: accept any); checked before heavy work starts
    dit_quant: tuple[str, ...] | None = None
    t5_quant: tuple[str, ...] | None = None
    clip_quant: tuple[str, ...] | None = None
    # VAE and output
    vae_tiling: bool | None = None  # None: tile only when the free memory needs it
    vae_dtype: str | None = None  # "fp32" | "bf16" VAE activations; None: fp32 when it fits untiled, else bf16 (GPU)
    tiny_vae: bool = False  # decode with the tiny VAE (previews)
    tiny_vae_path: str | None = None
    save_latents: bool = False
    preset: str | None = None  # set by resolve_run_config; recorded in the sidecar

    @property
    def cfg_active(self) -> bool:
        """Whether the unconditional branch runs at all (guidance 1 is the conditional output alone)."""
        return self.enable_cfg and self.guidance != 1.0

    @property
    def step_list(self) -> tuple[int, ...]:
        """The distilled schedule's timesteps (the default list unless the config gives one)."""
        return self.denoising_step_list or DISTILL_STEP_LIST

    def explicit_offload(self) -> dict[str, Any]:
        """The offload settings someone set (preset, --config or flag); the planner honors these and fills the rest."""
        return {k: getattr(self, k) for k in OFFLOAD_FIELDS if getattr(self, k) is not None}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples as lists), e.g. for the run sidecar."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
HINTS = typing.get_type_hints(RunConfig)
NOT_IN_FILES = ("preset",)  # set by --preset, not from a JSON file

# LightX2V (and Wan CLI) names for settings wanpack has, mapped onto RunConfig fields.
ALIASES = {
    "infer_steps": "steps",
    "sample_steps": "steps",
    "sample_shift": "shift",
    "sample_guide_scale": "guidance",
    "target_video_length": "frames",
    "frame_num": "frames",
    "target_height": "height",
    "target_width": "width",
    "sample_solver": "sampler",
    "use_tiling_vae": "vae_tiling",
    "use_tiny_vae": "tiny_vae",
    "use_tae": "tiny_vae",
    "tae_path": "tiny_vae_path",
    "rotary_chunk": "rope_chunk",
    "rotary_chunk_size": "rope_chunk_size",
    "sample_neg_prompt": "negative_prompt",
}
CHOICES: dict[str, tuple] = {
    "task": TASKS,
    "arch": tuple(DIT_ARCHS),
    "sampler": SAMPLERS,
    "offload_granularity": OFFLOAD_GRANULARITIES,
    "read_mode": READ_MODES,
    "vae_dtype": ("fp32", "bf16"),
}
QUANT_FIELDS = ("dit_quant", "t5_quant", "clip_quant")


def known_keys() -> list[str]:
    """Every key a config file may use: RunConfig fields and their accepted aliases."""
    return sorted([k for k in FIELDS if k not in NOT_IN_FILES] + list(ALIASES))


# ------------------------------------------------------------------------------------------------ value checks


def _type_error(where: str, key: str, want: str, value: Any) -> UsageError:
    return UsageError(f"{where}: {key} must be {want}, got {json.dumps(value, ensure_ascii=False)} - fix the value")


def _coerce(where: str, key: str, field: str, value: Any) -> Any:
    """Check a JSON value against the field's type; returns it in the field's Python form (lists become tuples)."""
    hint = HINTS[field]
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise _type_error(where, key, "set (null is not allowed)", value)
    base = next((a for a in args if a is not type(None)), hint) if args and type(None) in args else hint
    if base is bool:
        if not isinstance(value, bool):
            raise _type_error(where, key, "true or false", value)
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(where, key, "a whole number", value)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(where, key, "a number", value)
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise _type_error(where, key, "a string", value)
    elif typing.get_origin(base) is tuple:
        return _coerce_tuple(where, key, field, typing.get_args(base)[0], value)
    if field in CHOICES and value not in CHOICES[field]:
        raise UsageError(f"{where}: {key} {value!r} is not one of {', '.join(CHOICES[field])} - pick one of those")
    return value


def _coerce_tuple(where: str, key: str, field: str, item: type, value: Any) -> tuple:
    if item is str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise _type_error(where, key, "a non-empty list", value)
    ok = all(isinstance(v, str) for v in value) if item is str else all(type(v) is int for v in value)
    if not ok:
        raise _type_error(where, key, f"a list of {'strings' if item is str else 'whole numbers'}", value)
    if field in QUANT_FIELDS and any(v not in QUANT_SCHEMES for v in value):
        raise UsageError(f"{where}: {key} entries must be among {', '.join(QUANT_SCHEMES)}, got {list(value)} - fix it")
    return tuple(value)


# ------------------------------------------------------------------------------------------------ layers


def _unknown_key(where: str, key: str) -> UsageError:
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.7)  # 0.6 offered vae_dtype for attention_type
    hint = f"did you mean {close[0]!r}?" if close else "remove it"
    return UsageError(f"unknown config key {key!r} in {where} - {hint} (docs/SAMPLING.md lists every key)")


def normalize_layer(data: Mapping[str, Any], where: str, *, allow_internal: bool = False,
                    labels: Mapping[str, str] | None = None, names: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Map aliases to RunConfig fields, reject unknown/duplicate keys, type-check values. Returns {field: value}.

    Messages name each setting as the user wrote it: its key, or ``labels[key]`` (the command-line flag it came
    from). ``names``, when given, receives {field: that name} for the later cross-field checks.
    """
    labels = labels or {}
    if not isinstance(data, Mapping):
        raise UsageError(f"{where} must hold a JSON object of settings - e.g. {{\"steps\": 40}}")
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in data.items():
        field = ALIASES.get(key, key)
        if field not in FIELDS or (field in NOT_IN_FILES and not allow_internal):
            raise _unknown_key(where, key)
        if field in given:
            raise UsageError(f"{where} sets {field} twice ({given[field]!r} and {key!r}) - keep one of them")
        given[field] = key
        out[field] = _coerce(where, labels.get(key, key), field, value)
    if names is not None:
        names.update({field: labels.get(key, key) for field, key in given.items()})
    return out


def _apply(current: dict[str, Any], layer: dict[str, Any]) -> None:
    """Merge one layer; a layer that chooses the distilled schedule also implies its step count."""
    if "denoising_step_list" in layer and "sampler" not in layer:
        layer = {**layer, "sampler": "distill"}
    current.update(layer)
    if current["sampler"] == "distill" and "steps" not in layer and ({"sampler", "denoising_step_list"} & set(layer)):
        current["steps"] = len(current["denoising_step_list"] or DISTILL_STEP_LIST)


# ------------------------------------------------------------------------------------------------ presets and files


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset's settings (normalized); presets are data files under manifests/presets/."""
    path = PRESET_DIR / f"{name}.json"
    if "/" in name or "\\" in name or not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(preset_names())}"
        raise UsageError(f"unknown preset {name!r} - {hint}")
    data = json.loads(path.read_text(encoding="utf-8"))
    return normalize_layer(data["settings"], f"preset {name}")


def preset_description(name: str) -> str:
    load_preset(name)
    return json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8")).get("description", "")


def read_config_file(path: str | Path, names: dict[str, str] | None = None) -> dict[str, Any]:
    """A user's --config JSON, normalized (aliases mapped, unknown keys rejected)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc} - check the path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"config {path} is not valid JSON (line {exc.lineno}: {exc.msg}) - fix the file") from None
    return normalize_layer(data, f"config {path.name}", names=names)


def resolve_run_config(preset: str | None = None, config: str | Path | Mapping[str, Any] | None = None,
                       overrides: Mapping[str, Any] | None = None,
                       flags: Mapping[str, str] | None = None) -> RunConfig:  # fmt: skip
    """Defaults < preset < config (file path or dict) < overrides (None values skipped), validated as a whole.

    ``flags`` maps override fields to the command-line flags that set them, so errors name what the user typed.
    """
    current = {name: f.default for name, f in FIELDS.items()}
    names: dict[str, str] = {}
    if preset is not None:
        _apply(current, load_preset(preset))
        current["preset"] = preset
    if config is not None:
        layer = (normalize_layer(config, "config", names=names) if isinstance(config, Mapping)
                 else read_config_file(config, names))  # fmt: skip
        _apply(current, layer)
    if overrides:
        given = {k: v for k, v in overrides.items() if v is not None}
        _apply(current, normalize_layer(given, "command line", labels=flags, names=names))
    cfg = RunConfig(**current)
    validate(cfg, names)
    return cfg


# ------------------------------------------------------------------------------------------------ validation


def _nearest_4n1(frames: int) -> int:
    return max(1, 4 * int((frames - 1) / 4 + 0.5) + 1)


def validate(cfg: RunConfig, names: Mapping[str, str] | None = None) -> None:
    """Cross-field and range checks; each failure one line saying what to change, naming each setting as the user
    wrote it (``names``: field -> config key or command-line flag; the field name otherwise)."""
    name_of = (names or {}).get
    if cfg.frames < 1 or (cfg.frames - 1) % 4:
        raise UsageError(f"{name_of('frames', 'frames')} must be 4n+1 (e.g. 81), got {cfg.frames} - use "
                         f"{_nearest_4n1(cfg.frames)}")  # fmt: skip
    for name in ("height", "width"):
        value = getattr(cfg, name)
        if value < 16 or value % 16:
            fix = max(16, int(value / 16 + 0.5) * 16)
            raise UsageError(f"{name_of(name, name)} must be a positive multiple of 16, got {value} - use {fix}")
    for ok, name, want in (
        (cfg.steps >= 1, "steps", "at least 1"),
        (cfg.shift > 0, "shift", "positive (5.0; 3.0 for I2V at 480p)"),
        (cfg.guidance > 0, "guidance", "positive (5.0 for the base models)"),
        (1 <= cfg.fps <= 240, "fps", "between 1 and 240"),
        (cfg.num_disk_workers is None or 1 <= cfg.num_disk_workers <= 64, "num_disk_workers", "between 1 and 64"),
        (cfg.chunk_tokens is None or 256 <= cfg.chunk_tokens <= 1 << 20, "chunk_tokens", "between 256 and 1048576"),
        (cfg.rope_chunk_size >= 1, "rope_chunk_size", "at least 1"),
        (cfg.seed is None or 0 <= cfg.seed < 2**63, "seed", "between 0 and 2^63-1"),
        (cfg.vram_budget_gib is None or cfg.vram_budget_gib > 0, "vram_budget_gib", "positive (GiB)"),
        (cfg.ram_budget_gib is None or cfg.ram_budget_gib > 0, "ram_budget_gib", "positive (GiB)"),
    ):
        _check_range(ok, name_of(name, name), getattr(cfg, name), want)
    _validate_sampling(cfg)
    if cfg.tiny_vae and not cfg.tiny_vae_path:
        raise UsageError("tiny_vae (use_tae) is on but tiny_vae_path (tae_path) is not set - point it at taew2_1.pth")
    if cfg.arch and cfg.task and DIT_ARCHS[cfg.arch].model_type != cfg.task:
        raise UsageError(f"task {cfg.task!r} does not match arch {cfg.arch!r} - drop one of them from the config")


def _validate_sampling(cfg: RunConfig) -> None:
    if cfg.denoising_step_list is not None:
        steps = cfg.denoising_step_list
        if cfg.sampler != "distill":
            raise UsageError(f"denoising_step_list only applies to sampler 'distill', not {cfg.sampler!r} - drop it")
        if any(not 0 < t <= 1000 for t in steps) or any(a <= b for a, b in zip(steps, steps[1:], strict=False)):
            example = list(DISTILL_STEP_LIST)
            raise UsageError(f"denoising_step_list {list(steps)} must decrease inside 1..1000 - e.g. {example}")
    if cfg.sampler == "distill" and cfg.steps != len(cfg.step_list):
        raise UsageError(f"steps ({cfg.steps}) must equal the {len(cfg.step_list)} entries of denoising_step_list "
                         f"for the distill sampler - set steps to {len(cfg.step_list)}")  # fmt: skip


def _check_range(ok: bool, name: str, value: Any, want: str) -> None:
    if not ok:
        raise UsageError(f"{name} must be {want}, got {value} - change {name}")
