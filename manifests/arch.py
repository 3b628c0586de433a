"""Architecture configs for every network wanpack handles, and the exact tensor layout of their checkpoints.

One typed config per network, named explicitly (house rule 1: nothing is guessed from file names). The
``*_tensors`` functions list every key of the ORIGINAL checkpoint layout with its shape, the DiT/T5/CLIP block it
belongs to, the streaming phase inside that block, and whether the converter quantizes it. The converter validates
sources against these lists, ``wanpack synth`` writes random checkpoints from them, and the runtime reads phase
membership from the manifest the converter wrote. Facts come from ../shared/reference/wan21.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from wanpack.errors import UsageError

# --------------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: where it lives in the streaming structure and how the converter treats it."""

    name: str
    shape: tuple[int, ...]
    block: int | None = None  # index of the streamed block, None for resident (non-block) tensors
    phase: str | None = None  # phase inside the block (e.g. "self_attn"), None outside blocks
    quantize: bool = False  # a 2-D Linear weight the converter stores as int8/fp8 + per-row scale
    sensitive: bool = False  # norms, modulation, embeddings, head: may be kept fp32 (--keep-fp32)


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1 diffusion transformer; the fields of the hub's config.json plus the fixed ones the code assumes."""

    name: str
    model_type: str  # "t2v" | "i2v"
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int = 16
    freq_dim: int = 256
    text_len: int = 512
    text_dim: int = 4096  # T5 width; not in the hub config.json
    image_dim: int = 1280  # CLIP width feeding img_emb (i2v); not in the hub config.json
    image_tokens: int = 257  # CLIP tokens in front of the text in i2v cross-attention
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    kind: str = "dit"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def phases(self) -> tuple[str, ...]:
        return ("self_attn", "cross_attn", "ffn")

    def hub_config(self) -> dict:
        """config.json exactly as the hub stores it (plus our extra widths when they differ from the real model)."""
        cfg = {
            "_class_name": "WanModel",
            "_diffusers_version": "0.30.0",
            "dim": self.dim,
            "eps": self.eps,
            "ffn_dim": self.ffn_dim,
            "freq_dim": self.freq_dim,
            "in_dim": self.in_dim,
            "model_type": self.model_type,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "out_dim": self.out_dim,
            "text_len": self.text_len,
        }
        if self.text_dim != 4096:
            cfg["text_dim"] = self.text_dim
        if self.image_dim != 1280:
            cfg["image_dim"] = self.image_dim
        return cfg


@dataclass(frozen=True)
class T5Config:
    """umt5-xxl encoder (encoder only), as in models_t5_umt5-xxl-enc-bf16.pth."""

    name: str
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    text_len: int = 512
    eps: float = 1e-6
    kind: str = "t5"

    @property
    def phases(self) -> tuple[str, ...]:
        return ("attn", "ffn")


@dataclass(frozen=True)
class CLIPConfig:
    """Vision tower of open-clip xlm-roberta-large-vit-huge-14 (the text tower in the same file is dropped)."""

    name: str
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32
    use_layers: int = 31  # Wan feeds the output of the first 31 blocks to the DiT
    eps: float = 1e-5
    kind: str = "clip"

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def phases(self) -> tuple[str, ...]:
        return ("attn", "mlp")


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3-D VAE (Wan2.1_VAE.pth)."""

    name: str
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip
    kind: str = "vae"

    @property
    def phases(self) -> tuple[str, ...]:
        return ()


ArchConfig = DiTConfig | T5Config | CLIPConfig | VAEConfig

# --------------------------------------------------------------------------------------------------------- registry

DIT_ARCHS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig("wan2.1-t2v-1.3b", "t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16),
    "wan2.1-t2v-14b": DiTConfig("wan2.1-t2v-14b", "t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16),
    "wan2.1-i2v-14b": DiTConfig("wan2.1-i2v-14b", "i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
}
ENCODER_ARCHS: dict[str, ArchConfig] = {
    "umt5-xxl": T5Config("umt5-xxl"),
    "clip-vit-huge-14": CLIPConfig("clip-vit-huge-14"),
    "wan2.1-vae": VAEConfig("wan2.1-vae"),
}
DIM_SCALES = ("full", "tiny")

# Small widths with the same key sets: every test and the embedded demo run on these.
_TINY_DIT = {"dim": 64, "ffn_dim": 128, "num_heads": 2, "freq_dim": 32, "text_dim": 32, "image_dim": 40}
_TINY = {
    "t5": {"vocab": 512, "dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 4, "num_layers": 2},
    "clip": {"dim": 40, "mlp_dim": 80, "num_heads": 2, "num_layers": 3, "use_layers": 2},
    "vae": {"dim": 8},
}


def dit_config(arch: str, *, layers: int | None = None, dim_scale: str = "full") -> DiTConfig:
    """The named DiT config, optionally shrunk (``dim_scale='tiny'``) and/or with fewer blocks (``layers``)."""
    if arch not in DIT_ARCHS:
        raise UsageError(f"unknown architecture {arch!r} - choose one of: {', '.join(DIT_ARCHS)}")
    return _scaled(DIT_ARCHS[arch], _TINY_DIT, layers, dim_scale)


def encoder_config(kind: str, *, layers: int | None = None, dim_scale: str = "full") -> ArchConfig:
    """Config of an encoder component ('t5', 'clip' or 'vae'), optionally tiny."""
    by_kind = {cfg.kind: cfg for cfg in ENCODER_ARCHS.values()}
    if kind not in by_kind:
        raise UsageError(f"unknown component {kind!r} - choose one of: {', '.join(by_kind)}")
    return _scaled(by_kind[kind], _TINY.get(kind, {}), layers, dim_scale)


def _scaled(cfg, tiny: dict, layers: int | None, dim_scale: str):
    if dim_scale not in DIM_SCALES:
        raise UsageError(f"unknown --dim-scale {dim_scale!r} - choose one of: {', '.join(DIM_SCALES)}")
    changes = dict(tiny) if dim_scale == "tiny" else {}
    if layers is not None:
        if layers < 1:
            raise UsageError(f"--layers must be at least 1, got {layers}")
        if not hasattr(cfg, "num_layers"):
            raise UsageError(f"{cfg.name} has no blocks, so --layers does not apply")
        changes["num_layers"] = layers
        if isinstance(cfg, CLIPConfig):
            changes["use_layers"] = max(1, layers - 1)
    if isinstance(cfg, CLIPConfig) and "use_layers" in changes:
        changes["use_layers"] = min(changes["use_layers"], changes.get("num_layers", cfg.num_layers))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def config_to_dict(cfg: ArchConfig) -> dict:
    """JSON-ready form stored in the manifest (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(data: dict) -> ArchConfig:
    """Inverse of :func:`config_to_dict`; the ``kind`` field picks the class. Every field is checked for type and
    range (:func:`check_config`): configs come from manifests and config.json files, which are not trusted."""
    classes = {"dit": DiTConfig, "t5": T5Config, "clip": CLIPConfig, "vae": VAEConfig}
    if not isinstance(data, dict):
        raise UsageError(f"config is a {type(data).__name__}, not an object")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in classes:
        raise UsageError(f"config has unknown kind {str(kind)[:40]!r} - expected one of {', '.join(classes)}")
    cls = classes[kind]
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise UsageError(f"{kind} config has unknown fields {sorted(unknown)[:5]}")
    missing = [n for n, f in names.items() if n not in data and f.default is dataclasses.MISSING]
    if missing:
        raise UsageError(f"{kind} config lacks {', '.join(missing)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    cfg = cls(**values)
    check_config(cfg)
    return cfg


# Inclusive bounds of the integer fields: far above any Wan2.1 network, far below sizes that exhaust memory.
MAX_WIDTH = 1 << 16
_INT_LIMITS: dict[str, tuple[int, int]] = {
    "num_heads": (1, 1024), "num_layers": (1, 1024), "use_layers": (1, 1024), "in_dim": (1, 1024),
    "out_dim": (1, 1024), "z_dim": (1, 1024), "num_res_blocks": (1, 64), "text_len": (1, 8192),
    "image_tokens": (1, 8192), "num_buckets": (1, 4096), "max_dist": (1, 1 << 20), "vocab": (1, 1 << 22),
    "image_size": (1, 4096), "patch_size": (1, 4096), "ffn_dim": (1, 1 << 18), "dim_ffn": (1, 1 << 18),
    "mlp_dim": (1, 1 << 18),
}  # fmt: skip
_MAX_ITEMS = 1024


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _field_problem(name: str, kind: str, v: object) -> str | None:
    """What is wrong with one field's value given its annotation, or None."""
    if kind == "str":
        return None if isinstance(v, str) and 0 < len(v) <= 256 else "must be a short string"
    if kind == "int":
        lo, hi = _INT_LIMITS.get(name, (1, MAX_WIDTH))
        return None if _is_int(v) and lo <= v <= hi else f"must be an integer in [{lo}, {hi}]"
    if kind == "float":
        return None if _is_finite(v) and 0 < v < 1 else "must be a number in (0, 1)"
    if not isinstance(v, tuple) or not 0 < len(v) <= _MAX_ITEMS:
        return f"must be a list of 1 to {_MAX_ITEMS} items"
    if kind.startswith("tuple[int"):
        ok = all(_is_int(x) and 1 <= x <= 64 for x in v) and (kind.endswith("...]") or len(v) == kind.count("int"))
        return None if ok else "must list integers in [1, 64]" + ("" if kind.endswith("...]") else f", {len(v)} wanted")
    if kind == "tuple[bool, ...]":
        return None if all(isinstance(x, bool) for x in v) else "must list true/false values"
    return None if all(_is_finite(x) for x in v) else "must list finite numbers"


def check_config(cfg: ArchConfig) -> None:
    """Types and ranges of every field, and the relations the model code divides by (UsageError naming the field)."""
    for f in dataclasses.fields(cfg):
        problem = _field_problem(f.name, str(f.type), getattr(cfg, f.name))
        if problem:
            raise UsageError(f"{cfg.kind} config field {f.name} = {str(getattr(cfg, f.name))[:60]} {problem}")
    rules: list[tuple[bool, str]] = []
    if isinstance(cfg, DiTConfig):
        rules = [(cfg.model_type in ("t2v", "i2v"), "model_type must be t2v or i2v"),
                 (cfg.dim % cfg.num_heads == 0, "num_heads must divide dim"),
                 (cfg.head_dim % 2 == 0 and cfg.head_dim >= 6, "dim / num_heads must be even and at least 6"),
                 (cfg.freq_dim % 2 == 0, "freq_dim must be even")]  # fmt: skip
    elif isinstance(cfg, T5Config):
        rules = [(cfg.dim_attn % cfg.num_heads == 0, "num_heads must divide dim_attn")]
    elif isinstance(cfg, CLIPConfig):
        rules = [(cfg.dim % cfg.num_heads == 0, "num_heads must divide dim"),
                 (cfg.patch_size <= cfg.image_size, "patch_size must not exceed image_size"),
                 (cfg.use_layers <= cfg.num_layers, "use_layers must not exceed num_layers")]  # fmt: skip
    elif isinstance(cfg, VAEConfig):
        rules = [(len(cfg.temporal_downsample) == len(cfg.dim_mult) - 1, "temporal_downsample needs len(dim_mult)-1"),
                 (len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim, "latents_mean/std need z_dim items"),
                 (all(s > 0 for s in cfg.latents_std), "latents_std must be positive")]  # fmt: skip
    for ok, rule in rules:
        if not ok:
            raise UsageError(f"{cfg.kind} config: {rule}")


def dit_config_from_hub(hub: dict, arch: str) -> DiTConfig:
    """Check a hub config.json against the named architecture's block structure and return the matching config.

    The user names the architecture; the config.json only has to agree with it (layer count and widths may be smaller
    in synthetic checkpoints, but model_type must match).
    """
    base = dit_config(arch)
    fields = {"dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "text_len", "eps",
              "text_dim", "image_dim"}  # fmt: skip
    if hub.get("model_type", base.model_type) != base.model_type:
        raise UsageError(
            f"config.json says model_type {hub.get('model_type')!r} but --arch {arch} is {base.model_type} - "
            "pass the matching --arch"
        )
    cfg = dataclasses.replace(base, **{k: v for k, v in hub.items() if k in fields})
    check_config(cfg)
    return cfg


# The fields that decide a DiT's tensor shapes: what --arch must agree with (layer count aside).
DIT_SHAPE_FIELDS = ("model_type", "dim", "ffn_dim", "num_heads", "in_dim", "out_dim", "freq_dim", "text_dim",
                    "image_dim", "patch_size")  # fmt: skip


def _dit_shape(cfg: DiTConfig) -> tuple:
    return tuple(tuple(v) if isinstance(v, list | tuple) else v for v in (getattr(cfg, f) for f in DIT_SHAPE_FIELDS))


def archs_matching(cfg: DiTConfig) -> list[str]:
    """The DiT architectures whose shapes (at real or tiny widths) are those of ``cfg``."""
    return [a for a in DIT_ARCHS if any(_dit_shape(dit_config(a, dim_scale=s)) == _dit_shape(cfg) for s in DIM_SCALES)]


def check_arch_matches(cfg: DiTConfig, arch: str, declared: str | None = None) -> None:
    """A user's --arch must describe the checkpoint: the architecture a synthetic checkpoint declares, and the shapes
    its config gives (real widths, or the tiny ones of tests) - never a label pasted on other weights."""
    want = dit_config(arch)  # an unknown name fails here, naming the known ones
    if declared and declared != arch:
        raise UsageError(f"--arch {arch} but the checkpoint declares {declared} - pass --arch {declared} or drop --arch")
    if arch in archs_matching(cfg):
        return
    field = next(f for f in DIT_SHAPE_FIELDS if _dit_shape(dataclasses.replace(want, **{f: getattr(cfg, f)}))
                 != _dit_shape(want))  # fmt: skip
    fits = archs_matching(cfg)
    hint = f"pass --arch {fits[0]}" if fits else "it is not a Wan2.1 DiT wanpack knows"
    raise UsageError(f"--arch {arch} does not match the checkpoint: its {field} is {getattr(cfg, field)}, {arch} has "
                     f"{getattr(want, field)} - {hint}")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- layouts


def _linear(prefix: str, out_dim: int, in_dim: int, bias: bool = True, **kw) -> Iterator[TensorSpec]:
    yield TensorSpec(f"{prefix}.weight", (out_dim, in_dim), quantize=kw.pop("quantize", False), **kw)
    if bias:
        yield TensorSpec(f"{prefix}.bias", (out_dim,), **kw)


def dit_tensors(cfg: DiTConfig) -> list[TensorSpec]:
    """Every key of an original-layout Wan2.1 DiT checkpoint, blocks in order, phases in execution order."""
    d, specs = cfg.dim, []
    pt, ph, pw = cfg.patch_size
    for n in range(cfg.num_layers):
        p = f"blocks.{n}"

        def lin(name, o, i, phase, p=p, n=n):
            return _linear(f"{p}.{name}", o, i, block=n, phase=phase, quantize=True)

        def vec(name, shape, phase, sensitive=True, p=p, n=n):
            return TensorSpec(f"{p}.{name}", shape, block=n, phase=phase, sensitive=sensitive)

        for proj in "qkvo":
            specs += lin(f"self_attn.{proj}", d, d, "self_attn")
        specs += [vec("self_attn.norm_q.weight", (d,), "self_attn"), vec("self_attn.norm_k.weight", (d,), "self_attn")]
        specs.append(vec("modulation", (1, 6, d), "self_attn"))
        projs = "qkvo" if cfg.model_type == "t2v" else ["q", "k", "v", "k_img", "v_img", "o"]
        for proj in projs:
            specs += lin(f"cross_attn.{proj}", d, d, "cross_attn")
        specs += [vec("norm3.weight", (d,), "cross_attn"), vec("norm3.bias", (d,), "cross_attn")]
        norms = ["norm_q", "norm_k"] + (["norm_k_img"] if cfg.model_type == "i2v" else [])
        specs += [vec(f"cross_attn.{nm}.weight", (d,), "cross_attn") for nm in norms]
        specs += lin("ffn.0", cfg.ffn_dim, d, "ffn")
        specs += lin("ffn.2", d, cfg.ffn_dim, "ffn")
    sens = {"sensitive": True}
    specs.append(TensorSpec("patch_embedding.weight", (d, cfg.in_dim, pt, ph, pw), **sens))
    specs.append(TensorSpec("patch_embedding.bias", (d,), **sens))
    specs += _linear("text_embedding.0", d, cfg.text_dim, **sens)
    specs += _linear("text_embedding.2", d, d, **sens)
    specs += _linear("time_embedding.0", d, cfg.freq_dim, **sens)
    specs += _linear("time_embedding.2", d, d, **sens)
    specs += _linear("time_projection.1", 6 * d, d, **sens)
    specs += _linear("head.head", cfg.out_dim * pt * ph * pw, d, **sens)
    specs.append(TensorSpec("head.modulation", (1, 2, d), **sens))
    if cfg.model_type == "i2v":
        c = cfg.image_dim
        specs += [TensorSpec("img_emb.proj.0.weight", (c,), **sens), TensorSpec("img_emb.proj.0.bias", (c,), **sens)]
        specs += _linear("img_emb.proj.1", c, c, **sens)
        specs += _linear("img_emb.proj.3", d, c, **sens)
        specs += [TensorSpec("img_emb.proj.4.weight", (d,), **sens), TensorSpec("img_emb.proj.4.bias", (d,), **sens)]
    return specs


def t5_tensors(cfg: T5Config) -> list[TensorSpec]:
    """Keys of models_t5_umt5-xxl-enc-bf16.pth (encoder only, no ``encoder.`` prefix)."""
    specs = [TensorSpec("token_embedding.weight", (cfg.vocab, cfg.dim), sensitive=True)]
    head_dim_total = cfg.dim_attn
    for n in range(cfg.num_layers):
        p = f"blocks.{n}"
        attn = {"block": n, "phase": "attn"}
        ffn = {"block": n, "phase": "ffn"}
        specs.append(TensorSpec(f"{p}.norm1.weight", (cfg.dim,), sensitive=True, **attn))
        for proj in "qkv":
            specs.append(TensorSpec(f"{p}.attn.{proj}.weight", (head_dim_total, cfg.dim), quantize=True, **attn))
        specs.append(TensorSpec(f"{p}.attn.o.weight", (cfg.dim, head_dim_total), quantize=True, **attn))
        specs.append(TensorSpec(f"{p}.pos_embedding.embedding.weight", (cfg.num_buckets, cfg.num_heads),
                                sensitive=True, **attn))  # fmt: skip
        specs.append(TensorSpec(f"{p}.norm2.weight", (cfg.dim,), sensitive=True, **ffn))
        specs.append(TensorSpec(f"{p}.ffn.gate.0.weight", (cfg.dim_ffn, cfg.dim), quantize=True, **ffn))
        specs.append(TensorSpec(f"{p}.ffn.fc1.weight", (cfg.dim_ffn, cfg.dim), quantize=True, **ffn))
        specs.append(TensorSpec(f"{p}.ffn.fc2.weight", (cfg.dim, cfg.dim_ffn), quantize=True, **ffn))
    specs.append(TensorSpec("norm.weight", (cfg.dim,), sensitive=True))
    return specs


CLIP_UNUSED_PREFIXES = ("textual.", "visual.post_norm.", "visual.head", "log_scale")


def clip_tensors(cfg: CLIPConfig) -> list[TensorSpec]:
    """Keys of the vision tower in models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth that Wan uses."""
    d, grid = cfg.dim, cfg.image_size // cfg.patch_size
    specs = [
        TensorSpec("visual.patch_embedding.weight", (d, 3, cfg.patch_size, cfg.patch_size), sensitive=True),
        TensorSpec("visual.cls_embedding", (1, 1, d), sensitive=True),
        TensorSpec("visual.pos_embedding", (1, grid * grid + 1, d), sensitive=True),
        TensorSpec("visual.pre_norm.weight", (d,), sensitive=True),
        TensorSpec("visual.pre_norm.bias", (d,), sensitive=True),
    ]
    for n in range(cfg.num_layers):
        p = f"visual.transformer.{n}"
        attn = {"block": n, "phase": "attn"}
        mlp = {"block": n, "phase": "mlp"}
        specs += [TensorSpec(f"{p}.norm1.weight", (d,), sensitive=True, **attn),
                  TensorSpec(f"{p}.norm1.bias", (d,), sensitive=True, **attn)]  # fmt: skip
        specs += _linear(f"{p}.attn.to_qkv", 3 * d, d, quantize=True, **attn)
        specs += _linear(f"{p}.attn.proj", d, d, quantize=True, **attn)
        specs += [TensorSpec(f"{p}.norm2.weight", (d,), sensitive=True, **mlp),
                  TensorSpec(f"{p}.norm2.bias", (d,), sensitive=True, **mlp)]  # fmt: skip
        specs += _linear(f"{p}.mlp.0", cfg.mlp_dim, d, quantize=True, **mlp)
        specs += _linear(f"{p}.mlp.2", d, cfg.mlp_dim, quantize=True, **mlp)
    return specs


def vae_tensors(cfg: VAEConfig) -> list[TensorSpec]:
    """Keys of Wan2.1_VAE.pth (encoder, decoder, and the 1x1x1 convs between them)."""
    specs: list[TensorSpec] = []

    def conv3d(name, cout, cin, k):
        kt, kh, kw = (k, k, k) if isinstance(k, int) else k
        specs.extend([TensorSpec(f"{name}.weight", (cout, cin, kt, kh, kw)), TensorSpec(f"{name}.bias", (cout,))])

    def conv2d(name, cout, cin, k):
        specs.extend([TensorSpec(f"{name}.weight", (cout, cin, k, k)), TensorSpec(f"{name}.bias", (cout,))])

    def gamma(name, c, images=False):
        specs.append(TensorSpec(f"{name}.gamma", (c, 1, 1) if images else (c, 1, 1, 1)))

    def resblock(p, cin, cout):
        gamma(f"{p}.residual.0", cin)
        conv3d(f"{p}.residual.2", cout, cin, 3)
        gamma(f"{p}.residual.3", cout)
        conv3d(f"{p}.residual.6", cout, cout, 3)
        if cin != cout:
            conv3d(f"{p}.shortcut", cout, cin, 1)

    def attention(p, c):
        gamma(f"{p}.norm", c, images=True)
        conv2d(f"{p}.to_qkv", 3 * c, c, 1)
        conv2d(f"{p}.proj", c, c, 1)

    def middle(p, c):
        resblock(f"{p}.0", c, c)
        attention(f"{p}.1", c)
        resblock(f"{p}.2", c, c)

    mult = list(cfg.dim_mult)
    # encoder
    dims = [cfg.dim * m for m in [1, *mult]]
    conv3d("encoder.conv1", dims[0], 3, 3)
    idx = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for _ in range(cfg.num_res_blocks):
            resblock(f"encoder.downsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if i != len(mult) - 1:
            conv2d(f"encoder.downsamples.{idx}.resample.1", cout, cout, 3)
            if cfg.temporal_downsample[i]:
                conv3d(f"encoder.downsamples.{idx}.time_conv", cout, cout, (3, 1, 1))
            idx += 1
    middle("encoder.middle", dims[-1])
    gamma("encoder.head.0", dims[-1])
    conv3d("encoder.head.2", 2 * cfg.z_dim, dims[-1], 3)
    conv3d("conv1", 2 * cfg.z_dim, 2 * cfg.z_dim, 1)
    conv3d("conv2", cfg.z_dim, cfg.z_dim, 1)
    # decoder
    dims = [cfg.dim * m for m in [mult[-1], *mult[::-1]]]
    temporal_up = list(cfg.temporal_downsample)[::-1]
    conv3d("decoder.conv1", dims[0], cfg.z_dim, 3)
    middle("decoder.middle", dims[0])
    idx = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i in (1, 2, 3):
            cin //= 2
        for _ in range(cfg.num_res_blocks + 1):
            resblock(f"decoder.upsamples.{idx}", cin, cout)
            cin, idx = cout, idx + 1
        if i != len(mult) - 1:
            conv2d(f"decoder.upsamples.{idx}.resample.1", cout // 2, cout, 3)
            if temporal_up[i]:
                conv3d(f"decoder.upsamples.{idx}.time_conv", 2 * cout, cout, (3, 1, 1))
            idx += 1
    gamma("decoder.head.0", dims[-1])
    conv3d("decoder.head.2", 3, dims[-1], 3)
    return specs


def component_tensors(cfg: ArchConfig) -> list[TensorSpec]:
    """The checkpoint layout of any component config."""
    return {"dit": dit_tensors, "t5": t5_tensors, "clip": clip_tensors, "vae": vae_tensors}[cfg.kind](cfg)


@dataclass(frozen=True)
class LayoutSummary:
    """Counts used in messages and tests."""

    keys: int
    blocks: int
    params: int
    per_block_keys: dict[int, int] = field(default_factory=dict)


def summarize(cfg: ArchConfig) -> LayoutSummary:
    specs = component_tensors(cfg)
    per_block: dict[int, int] = {}
    params = 0
    for s in specs:
        n = 1
        for dim in s.shape:
            n *= dim
        params += n
        if s.block is not None:
            per_block[s.block] = per_block.get(s.block, 0) + 1
    return LayoutSummary(keys=len(specs), blocks=len(per_block), params=params, per_block_keys=per_block)
