"""`wanpack run`: prompt (+ image) -> mp4, every network read from a pack and streamed as the budgets require.

Stages, each releasing its memory before the next starts: check everything cheap first (pack, task, image, sizes,
output path), then text (T5 streamed block by block), image (CLIP streamed, VAE encode of the first frame), denoise
(the DiT streamed by the planner's plan, CFG as one batch of 2 so each block crosses the bus once per step), decode
(VAE, tiled to a budget) and write (mp4 + JSON sidecar, atomically).
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack.errors import UsageError
from wanpack.manifests.arch import CLIPConfig, DiTConfig, T5Config, VAEConfig, config_from_dict
from wanpack.manifests.format import Manifest, read_manifest
from wanpack.manifests.run_config import RunConfig
from wanpack.runtime.models import dit
from wanpack.runtime.models.clip import CLIPVision, preprocess
from wanpack.runtime.models.t5 import T5Encoder
from wanpack.runtime.models.tokenizer import T5Tokenizer
from wanpack.runtime.models.vae import encode as vae_encode
from wanpack.runtime.models.vae_tiling import decode_within, encode_within
from wanpack.runtime.ops.report import backend_info
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.run_record import RunRecord, StageTimer, file_sha256, sidecar_path, write_sidecar
from wanpack.runtime.sampling import make_scheduler
from wanpack.runtime.sampling.loop import denoise, i2v_latent_hw, initial_noise, latent_shape
from wanpack.runtime.stream.dit_stream import streamed_forward
from wanpack.runtime.stream.engine import StreamEngine, StreamOptions
from wanpack.runtime.stream.planner import detect_budgets, plan
from wanpack.runtime.video import check_output_path, require_av, save_latents, write_video

GiB = 1 << 30
Progress = Callable[[str, dict], None]  # (event, details): "stage", "step"


@dataclass
class RunRequest:
    pack: Path
    prompt: str
    out: Path
    config: RunConfig
    image: Path | None = None
    device: str | None = None
    synthetic: bool = False
    command: list[str] = field(default_factory=list)


@dataclass
class Checked:
    """What the cheap checks established, so heavy stages need not look again."""

    manifest: Manifest
    dit_cfg: DiTConfig
    task: str
    image: torch.Tensor | None  # [3, H, W] in [-1, 1]
    height: int
    width: int
    latent: tuple[int, int, int, int]  # [C, F, h, w]


def _load_image(path: Path) -> torch.Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UsageError("reading --image needs Pillow - pip install Pillow") from None
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"--image {path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"--image {path}: not a readable image ({exc.__class__.__name__}) - pass a JPEG or PNG") from None
    import numpy as np

    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div_(127.5).sub_(1.0)


def check_request(req: RunRequest) -> Checked:
    """Every check that needs no weights: fails in well under a second with one line, before any heavy work."""
    cfg = req.config
    require_av()
    check_output_path(req.out)
    manifest = read_manifest(req.pack)
    dit_entry = manifest.component("dit")
    dit_cfg = config_from_dict(dit_entry.config)
    if not isinstance(dit_cfg, DiTConfig):
        raise UsageError(f"{req.pack}: the dit component is not a DiT - convert the model again")
    task = dit_cfg.model_type
    if cfg.task is not None and cfg.task != task:
        raise UsageError(f"{req.pack} holds a {task} model but the run asks for {cfg.task} - use a {cfg.task} pack "
                         f"or drop the {cfg.task} preset/task")  # fmt: skip
    if cfg.arch is not None and cfg.arch != dit_entry.arch:
        raise UsageError(f"{req.pack} holds {dit_entry.arch} but the preset is for {cfg.arch} - pick the matching preset")
    needed = ["t5", "vae"] + (["clip"] if task == "i2v" else [])
    missing = [c for c in needed if c not in manifest.components]
    if missing:
        raise UsageError(f"{req.pack} has no {', '.join(missing)} - convert with `wanpack convert SOURCE -c all`")
    for comp, allowed in (("dit", cfg.dit_quant), ("t5", cfg.t5_quant), ("clip", cfg.clip_quant)):
        if allowed and comp in manifest.components and manifest.components[comp].quant.scheme not in allowed:
            have = manifest.components[comp].quant.scheme
            raise UsageError(f"the preset expects the {comp} quantized as {'/'.join(allowed)}, the pack has {have} - "
                             "convert accordingly or use --config to relax it")  # fmt: skip
    image = None
    height, width = cfg.height, cfg.width
    if task == "i2v":
        if req.image is None:
            raise UsageError(f"{req.pack} holds an image-to-video model - pass --image IMAGE")
        image = _load_image(req.image)
        lat_h, lat_w = i2v_latent_hw(cfg.height * cfg.width, image.shape[1], image.shape[2])
        height, width = lat_h * 8, lat_w * 8
    elif req.image is not None:
        raise UsageError(f"{req.pack} holds a text-to-video model, which takes no --image - drop it or use an i2v pack")
    latent = latent_shape(cfg.frames, height, width, dit_cfg.out_dim)
    return Checked(manifest, dit_cfg, task, image, height, width, latent)


def _device(requested: str | None) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA device is available - drop --device")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _release(device: torch.device, clean: bool) -> None:
    gc.collect()
    if device.type == "cuda" and clean:
        torch.cuda.empty_cache()


def _encoder_options(device: torch.device, offload: bool) -> StreamOptions:
    """T5/CLIP run once per prompt: stream block by block when offloaded, else load everything in one go."""
    if not offload:
        return StreamOptions(granularity="model", device_slots=1, prefetch=0, direct_io=device.type == "cuda")
    return StreamOptions(granularity="block", device_slots=2, prefetch=1, direct_io=device.type == "cuda")


def encode_text(pack: Path, prompts: list[str], cfg: RunConfig, device: torch.device,
                dtype: torch.dtype) -> list[torch.Tensor]:  # fmt: skip
    """T5 output per prompt ([Li, 4096] each), on ``device``; the encoder's memory is gone when this returns."""
    comp = PackComponent(pack, "t5")
    t5_cfg = config_from_dict(comp.entry.config)
    assert isinstance(t5_cfg, T5Config)
    tokens = T5Tokenizer(Path(pack) / "t5" / "tokenizer")(prompts)
    enc = T5Encoder(t5_cfg, dtype=dtype)
    with StreamEngine(comp, _encoder_options(device, cfg.t5_cpu_offload), device) as eng:
        x, ctx = enc.embed(eng.resident, tokens.ids.to(device), tokens.mask.to(device))
        for unit, w in eng.forward():
            for phase in unit.phases:
                x = enc.phase(phase)(w, x, ctx)
        out = [t.clone() for t in enc.finish(eng.resident, x, ctx)]
    return out


def encode_image_clip(pack: Path, image: torch.Tensor, cfg: RunConfig, device: torch.device) -> torch.Tensor:
    """CLIP features [1, 257, 1280] of the conditioning image (first use_layers blocks only)."""
    comp = PackComponent(pack, "clip")
    clip_cfg = config_from_dict(comp.entry.config)
    assert isinstance(clip_cfg, CLIPConfig)
    enc = CLIPVision(clip_cfg, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    pixels = preprocess(image[None].to(device), clip_cfg.image_size)
    with StreamEngine(comp, _encoder_options(device, cfg.clip_cpu_offload), device) as eng:
        x, ctx = enc.embed(eng.resident, pixels)
        for unit, w in eng.forward():
            if unit.block >= enc.num_blocks:
                break  # Wan uses the first 31 of 32 blocks: the last is never computed
            for phase in unit.phases:
                x = enc.phase(phase)(w, x, ctx)
        out = enc.finish(eng.resident, x, ctx).clone()
    return out


def _vae(pack: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    comp = PackComponent(pack, "vae")
    vae_cfg = config_from_dict(comp.entry.config)
    assert isinstance(vae_cfg, VAEConfig)
    return comp.load_resident(device), vae_cfg


def _vae_budget(device: torch.device, cfg: RunConfig) -> float:
    """Working memory the VAE may use: the free VRAM (within the budget), or plenty on the CPU."""
    if device.type != "cuda":
        return float("inf") if not cfg.vae_tiling else 256 * (1 << 20)
    free = torch.cuda.mem_get_info()[0]
    if cfg.vram_budget_gib is not None:
        free = min(free, int(cfg.vram_budget_gib * GiB) - torch.cuda.memory_allocated())
    return max(free * 0.8, 64 * (1 << 20))


def image_condition(pack: Path, image: torch.Tensor, checked: Checked, cfg: RunConfig,
                    device: torch.device) -> torch.Tensor:  # fmt: skip
    """y = [mask (4 channels), VAE latent of (first frame, zeros)] -> [20, F_lat, h, w] (the reference's rule)."""
    _, f_lat, h, w = checked.latent
    weights, vae_cfg = _vae(pack, device)
    first = torch.nn.functional.interpolate(image[None].to(device), size=(checked.height, checked.width),
                                            mode="bicubic", align_corners=False).clamp_(-1, 1)  # fmt: skip
    video = torch.zeros((1, 3, cfg.frames, checked.height, checked.width), device=device)
    video[:, :, 0] = first[0]
    if cfg.vae_tiling:
        latent = encode_within(weights, video, vae_cfg, _vae_budget(device, cfg))[0]
    else:
        latent = vae_encode(weights, video, vae_cfg)[0]
    mask = torch.zeros((1, cfg.frames, h, w), device=device)
    mask[:, 0] = 1
    mask = torch.cat([mask[:, :1].repeat(1, 4, 1, 1), mask[:, 1:]], dim=1)  # frame 0 counted 4 times: 4 * F_lat
    mask = mask.view(1, f_lat, 4, h, w).transpose(1, 2)[0]
    return torch.cat([mask, latent.to(mask.dtype)], dim=0)


def _dit_engine_options(pack: Path, checked: Checked, cfg: RunConfig, device: torch.device,
                        batch: int) -> tuple[StreamOptions, int, list[str]]:  # fmt: skip
    """Stream options and FFN chunk from the planner (GPU), or a plain block stream on the CPU."""
    comp = PackComponent(pack, "dit")
    if device.type != "cuda":
        return StreamOptions(granularity="block", device_slots=2, prefetch=1, direct_io=False), 4096, []
    vram, ram = detect_budgets()
    vram_budget = int(cfg.vram_budget_gib * GiB) if cfg.vram_budget_gib else vram
    ram_budget = int(cfg.ram_budget_gib * GiB) if cfg.ram_budget_gib else ram
    granularity = None if cfg.cpu_offload else "model"
    if cfg.cpu_offload and cfg.offload_granularity in ("block", "phase"):
        granularity = cfg.offload_granularity
    p = plan(comp, vram_budget=vram_budget, ram_budget=ram_budget, width=checked.width, height=checked.height,
             frames=cfg.frames, granularity=granularity, disk_workers=cfg.num_disk_workers,
             cache="none" if cfg.lazy_load else "auto")  # fmt: skip
    chunk = max(256, p.ffn_chunk // batch)
    return p.options(), chunk, [f"plan: {p.granularity}, {p.device_slots} slots, prefetch {p.prefetch}, "
                                f"cache {p.cache_policy}, FFN chunk {chunk} tokens"] + p.notes  # fmt: skip


def sample(pack: Path, checked: Checked, cfg: RunConfig, texts: list[torch.Tensor], clip: torch.Tensor | None,
           y: torch.Tensor | None, seed: int, device: torch.device, dtype: torch.dtype,
           progress: Progress) -> torch.Tensor:  # fmt: skip
    """The denoising loop on the streamed DiT; returns the clean latent [1, 16, F, h, w] (float32)."""
    guidance = cfg.guidance if cfg.cfg_active else None
    batch = 2 if guidance is not None else 1
    options, chunk, notes = _dit_engine_options(pack, checked, cfg, device, batch)
    for n in notes:
        progress("note", {"text": n})
    opts = dit.DiTOptions(dtype=dtype, chunk_tokens=chunk)
    scheduler = make_scheduler(cfg.sampler, cfg.steps, cfg.shift, cfg.step_list if cfg.sampler == "distill" else None)
    noise = initial_noise((1, *checked.latent), seed, device)
    clip_b = None if clip is None else clip.expand(batch, *clip.shape[1:])
    y_b = None if y is None else y[None].expand(batch, *y.shape)
    kv_cache: dict = {}
    with StreamEngine(PackComponent(pack, "dit"), options, device) as engine:

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return streamed_forward(engine, checked.dit_cfg, x, t, texts[:batch], clip=clip_b, y=y_b,
                                    kv_cache=kv_cache, opts=opts).float()  # fmt: skip

        def on_step(i: int, n: int) -> None:
            progress("step", {"step": i + 1, "steps": n, "stats": engine.stats()})

        latent = denoise(velocity, noise, scheduler, guidance, on_step)
    return latent


def decode_video(pack: Path, latent: torch.Tensor, cfg: RunConfig, device: torch.device) -> torch.Tensor:
    """Latent -> frames [3, F, H, W] in [-1, 1] on the CPU (the Wan VAE, or the tiny preview decoder)."""
    if cfg.tiny_vae:
        from wanpack.runtime.models.tiny_vae import load_tiny_vae, tiny_decode

        if not cfg.tiny_vae_path:
            raise UsageError("--tiny-vae needs the taew2_1 weights file - pass --tiny-vae PATH")
        weights = {k: v.to(device) for k, v in load_tiny_vae(cfg.tiny_vae_path).items()}
        return tiny_decode(weights, latent.to(device), out_device="cpu")[0]
    weights, vae_cfg = _vae(pack, device)
    budget = _vae_budget(device, cfg) if cfg.vae_tiling or device.type == "cuda" else float("inf")
    return decode_within(weights, latent.to(device), vae_cfg, budget, out_device="cpu")[0]


def run(req: RunRequest, progress: Progress = lambda event, info: None) -> RunRecord:
    """The whole pipeline; returns the record that was also written next to the video."""
    checked = check_request(req)
    cfg = req.config
    device = _device(req.device)
    from wanpack.runtime.stream.env import apply_alloc_conf, compute_dtype

    apply_alloc_conf()
    dtype = compute_dtype() if device.type == "cuda" else torch.float32
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = StageTimer(sync=device.type == "cuda")
    record = RunRecord(command=req.command, seed=seed, config=cfg.to_dict(), pack=None if req.synthetic else str(req.pack),
                       manifest_sha256=file_sha256(Path(req.pack) / "manifest.json"), synthetic_weights=req.synthetic,
                       prompt=req.prompt, image=str(req.image) if req.image else None, video=str(req.out))  # fmt: skip
    prompts = [req.prompt] + ([cfg.negative_prompt] if cfg.cfg_active else [])
    progress("stage", {"name": "text", "device": str(device), "dtype": str(dtype).removeprefix("torch.")})
    with timer.stage("text"):
        texts = encode_text(req.pack, prompts, cfg, device, dtype)
    _release(device, cfg.clean_cuda_cache)
    clip = y = None
    if checked.task == "i2v":
        progress("stage", {"name": "image"})
        with timer.stage("image"):
            clip = encode_image_clip(req.pack, checked.image, cfg, device)
            _release(device, cfg.clean_cuda_cache)
            y = image_condition(req.pack, checked.image, checked, cfg, device)
        _release(device, cfg.clean_cuda_cache)
    progress("stage", {"name": "denoise", "steps": cfg.steps})
    with timer.stage("denoise"):
        latent = sample(req.pack, checked, cfg, texts, clip, y, seed, device, dtype, progress)
    record.backends = backend_info(device)  # which GEMM / attention / norm kernels served the DiT
    del texts, clip, y
    _release(device, True)
    progress("stage", {"name": "decode"})
    with timer.stage("decode"):
        frames = decode_video(req.pack, latent, cfg, device)
    _release(device, cfg.clean_cuda_cache)
    progress("stage", {"name": "write"})
    with timer.stage("write"):
        write_video(req.out, frames, fps=cfg.fps)
        if cfg.save_latents:
            record.latents = str(save_latents(req.out.with_suffix(".latents.safetensors"), latent.cpu()))
    record.finish(timer)
    write_sidecar(sidecar_path(req.out), record)
    return record
