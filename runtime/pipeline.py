"""`wanpack run`: prompt (+ image) -> mp4, every network read from a pack and streamed as the budgets require.

This module holds the cheap up-front checks (pack, task, image, sizes, output path: bad input fails in well under a
second) and the stage functions: text (T5 streamed block by block), image (CLIP streamed, VAE encode of the first
frame), denoise (the DiT streamed by the plan, CFG as one batch of 2 so each block crosses the bus once per step) and
decode (VAE chunks, tiled to a budget). runtime/session.py strings them together and keeps what can be kept between
videos; ``run`` is one video in a fresh session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack.errors import UsageError
from wanpack.manifests.arch import CLIPConfig, DiTConfig, T5Config, VAEConfig, config_from_dict
from wanpack.manifests.format import Manifest, read_manifest
from wanpack.manifests.run_config import RunConfig
from wanpack.runtime.image_limits import open_bounded
from wanpack.runtime.models import dit
from wanpack.runtime.models.clip import CLIPVision
from wanpack.runtime.models.t5 import T5Encoder
from wanpack.runtime.models.tokenizer import T5Tokenizer
from wanpack.runtime.models.vae import decode_frames
from wanpack.runtime.models.vae_tiling import Tiling, decode_tiled, encode_within, tiling_for_budget
from wanpack.runtime.run_limits import check_video_size
from wanpack.runtime.run_plan import plan_run
from wanpack.runtime.run_record import RunRecord, latents_path, sidecar_path
from wanpack.runtime.sampling import make_scheduler
from wanpack.runtime.sampling.loop import denoise, i2v_latent_hw, initial_noise, latent_shape
from wanpack.runtime.session import Job, Session, prepare_device, select_device
from wanpack.runtime.stream.dit_stream import streamed_forward
from wanpack.runtime.stream.engine import StreamEngine
from wanpack.runtime.video import check_outputs, require_av

Progress = Callable[[str, dict], None]  # (event, details): "plan", "stage", "step", "frames", "done", "note", "warning"


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
    overwrite: bool = False  # replace existing outputs (video, sidecar, latents)
    config_file: Path | None = None  # --config: an input no output may overwrite


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
    config: RunConfig


def _load_image(path: Path) -> torch.Tensor:
    try:
        from PIL import UnidentifiedImageError
    except ImportError:
        raise UsageError("reading --image needs Pillow - pip install Pillow") from None
    try:
        with open_bounded(path) as im:  # refuses images over a pixel cap before decoding them
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"--image {path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"--image {path}: not a readable image ({exc.__class__.__name__}) - pass a JPEG or PNG") from None
    import numpy as np

    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div_(127.5).sub_(1.0)


def check_request(req: RunRequest, manifest: Manifest | None = None) -> Checked:
    """Every check that needs no weights: fails in well under a second with one line, before any heavy work."""
    cfg = req.config
    require_av()
    outputs = [req.out, sidecar_path(req.out), latents_path(req.out)]  # the latent is always saved before decoding
    check_outputs(outputs, {"--image": req.image, "--config": req.config_file, "--tiny-vae": cfg.tiny_vae_path},
                  req.overwrite)  # fmt: skip
    check_run_inputs(cfg)
    device = select_device(req.device)
    manifest = manifest or read_manifest(req.pack)
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
    check_video_size(cfg.frames, height, width, tuple(dit_cfg.patch_size), cfg.ram_budget_gib,
                     on_gpu=device.type == "cuda")  # fmt: skip
    latent = latent_shape(cfg.frames, height, width, dit_cfg.out_dim)
    return Checked(manifest, dit_cfg, task, image, height, width, latent, cfg)


def check_run_inputs(cfg: RunConfig) -> None:
    """The settings read only late in a run, checked now: DTYPE (even on the CPU, which computes in fp32) and the
    --tiny-vae file (it must exist and load as weights, never as code)."""
    from wanpack.runtime.stream.env import compute_dtype

    compute_dtype()
    if cfg.tiny_vae:
        from wanpack.runtime.models.tiny_vae import load_tiny_vae

        load_tiny_vae(cfg.tiny_vae_path or "")


def check_budgets(req: RunRequest, checked: Checked) -> None:
    """The planner's memory verdict (BudgetError, exit 2) before a session opens or any weight is read: it needs only
    the manifest and the budgets. The session plans the same run again (runtime/run_plan.py is the one planner)."""
    device, _ = prepare_device(req.device)  # CUDA's settings are fixed before the budget probe starts it
    plan_run(req.pack, checked.manifest, checked.config, device=device, width=checked.width, height=checked.height,
             task=checked.task, batch=2 if checked.config.cfg_active else 1)  # fmt: skip


def encode_text(engine: StreamEngine, tokenizer: T5Tokenizer, prompts: list[str],
                dtype: torch.dtype) -> list[torch.Tensor]:  # fmt: skip
    """T5 output per prompt ([Li, 4096] each) on the engine's device, its blocks streamed by ``engine``.

    Only the rows of the token table that the prompts use are read (the engine leaves the 2 GiB table on disk).
    """
    t5_cfg = config_from_dict(engine.pack.entry.config)
    assert isinstance(t5_cfg, T5Config)
    tokens = tokenizer(prompts)
    enc = T5Encoder(t5_cfg, dtype=dtype)
    weights = dict(engine.resident)
    ids = tokens.ids
    if "token_embedding.weight" not in weights:
        rows, ids = torch.unique(tokens.ids, return_inverse=True)
        if int(rows.min()) < 0 or int(rows.max()) >= t5_cfg.vocab:
            raise UsageError(f"a token id is outside the T5 vocabulary of {t5_cfg.vocab} - use the pack's tokenizer")
        weights["token_embedding.weight"] = engine.pack.read_rows("token_embedding.weight", rows.tolist())
    x, ctx = enc.embed(weights, ids, tokens.mask, device=engine.device)
    engine.limit_forwards(1)
    for unit, w in engine.forward():
        for phase in unit.phases:
            x = enc.phase(phase)(w, x, ctx)
    return [t.clone() for t in enc.finish(weights, x, ctx)]


def encode_image_clip(engine: StreamEngine, image: torch.Tensor) -> torch.Tensor:
    """CLIP features [1, 257, 1280] of the conditioning image (first use_layers blocks only)."""
    clip_cfg = config_from_dict(engine.pack.entry.config)
    assert isinstance(clip_cfg, CLIPConfig)
    enc = CLIPVision(clip_cfg, dtype=torch.float16 if engine.device.type == "cuda" else torch.float32)
    x, ctx = enc.embed(engine.resident, image[None].to(engine.device))  # embed resizes and normalizes (once)
    engine.limit_forwards(1)
    for unit, w in engine.forward():
        if unit.block >= enc.num_blocks:
            break  # Wan uses the first 31 of 32 blocks: the last is never computed
        for phase in unit.phases:
            x = enc.phase(phase)(w, x, ctx)
    return enc.finish(engine.resident, x, ctx).clone()


def image_condition(weights: dict[str, torch.Tensor], vae_cfg: VAEConfig, image: torch.Tensor, checked: Checked,
                    cfg: RunConfig, device: torch.device, budget: float) -> torch.Tensor:  # fmt: skip
    """y = [mask (4 channels), VAE latent of (first frame, zeros)] -> [20, F_lat, h, w] (the reference's rule)."""
    _, f_lat, h, w = checked.latent
    # not clamped: bicubic overshoot past [-1, 1] reaches the VAE, as in the original (image2video.py)
    first = torch.nn.functional.interpolate(image[None].to(device), size=(checked.height, checked.width),
                                            mode="bicubic", align_corners=False)  # fmt: skip
    video = torch.zeros((1, 3, cfg.frames, checked.height, checked.width), device=device)
    video[:, :, 0] = first[0]
    latent = encode_within(weights, video, vae_cfg, budget)[0]
    mask = torch.zeros((1, cfg.frames, h, w), device=device)
    mask[:, 0] = 1
    mask = torch.cat([mask[:, :1].repeat(1, 4, 1, 1), mask[:, 1:]], dim=1)  # frame 0 counted 4 times: 4 * F_lat
    mask = mask.view(1, f_lat, 4, h, w).transpose(1, 2)[0]
    return torch.cat([mask, latent.to(mask.dtype)], dim=0)


def sample(engine: StreamEngine, checked: Checked, cfg: RunConfig, texts: list[torch.Tensor], clip: torch.Tensor | None,
           y: torch.Tensor | None, seed: int, device: torch.device, dtype: torch.dtype, chunk: int,
           progress: Progress) -> torch.Tensor:  # fmt: skip
    """The denoising loop on the streamed DiT; returns the clean latent [1, 16, F, h, w] (float32)."""
    guidance = cfg.guidance if cfg.cfg_active else None
    batch = 2 if guidance is not None else 1
    opts = dit.DiTOptions(dtype=dtype, chunk_tokens=chunk)
    scheduler = make_scheduler(cfg.sampler, cfg.steps, cfg.shift, cfg.step_list if cfg.sampler == "distill" else None)
    noise = initial_noise((1, *checked.latent), seed, device)
    clip_b = None if clip is None else clip.expand(batch, *clip.shape[1:])
    y_b = None if y is None else y[None].expand(batch, *y.shape)
    kv_cache: dict = {}

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return streamed_forward(engine, checked.dit_cfg, x, t, texts[:batch], clip=clip_b, y=y_b,
                                kv_cache=kv_cache, opts=opts).float()  # fmt: skip

    def on_step(i: int, n: int) -> None:
        progress("step", {"step": i + 1, "steps": n, "stats": engine.stats()})

    engine.limit_forwards(len(scheduler.timesteps))  # one DiT forward per step (CFG is one batch of 2)
    return denoise(velocity, noise, scheduler, guidance, on_step)


VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def vae_decode_plan(vae_cfg: VAEConfig, lat_h: int, lat_w: int, budget: float, asked: str | None,
                    on_cuda: bool) -> tuple[str, Tiling | None]:  # fmt: skip
    """(activation dtype name, tiles or None) for a decode with ``budget`` bytes of working memory.

    Asked for (--vae-dtype): that dtype, tiled if it must be. Otherwise float32 when it fits untiled, and on a GPU
    bfloat16 when only that fits untiled (or needs fewer tiles): at 480p on an H200 the bf16 decode differed from
    the fp32 one by 0.72 levels of 255 on average, slightly less than fp32 in two tiles did (0.76, seams), and took
    1.8 s against 2.7 s untiled (docs/VAE.md)."""
    if asked is not None:
        return asked, tiling_for_budget(vae_cfg, lat_h, lat_w, budget, dtype=VAE_DTYPES[asked])
    fp32 = tiling_for_budget(vae_cfg, lat_h, lat_w, budget, dtype=torch.float32)
    if fp32 is None or not on_cuda:
        return "fp32", fp32
    return "bf16", tiling_for_budget(vae_cfg, lat_h, lat_w, budget, dtype=torch.bfloat16)


def decoded_chunks(vae: tuple[dict[str, torch.Tensor], VAEConfig] | None, latent: torch.Tensor, cfg: RunConfig,
                   device: torch.device, budget: float) -> tuple[Iterator[torch.Tensor], dict]:  # fmt: skip
    """The decoded video as chunks [1, 3, n, H, W] in [-1, 1] (on ``device``) in frame order, and how it was decoded
    ({"vae_tiles": [h, w] or None, "vae_dtype": "fp32" | "bf16" | "tiny"}).

    Untiled (and tiny-VAE) decodes yield one latent frame's chunk at a time, so frames can be written while the next
    decode; a tiled decode runs tile by tile over the whole clip and yields at the end.
    """
    latent = latent.to(device)
    if cfg.tiny_vae:
        from wanpack.runtime.models.tiny_vae import load_tiny_vae, tiny_decode_frames

        if not cfg.tiny_vae_path:
            raise UsageError("--tiny-vae needs the taew2_1 weights file - pass --tiny-vae PATH")
        weights = {k: v.to(device) for k, v in load_tiny_vae(cfg.tiny_vae_path).items()}
        return tiny_decode_frames(weights, latent), {"vae_tiles": None, "vae_dtype": "tiny"}
    weights, vae_cfg = vae
    if cfg.vae_tiling is False:
        budget = float("inf")
    name, tiling = vae_decode_plan(vae_cfg, latent.shape[-2], latent.shape[-1], budget, cfg.vae_dtype,
                                   device.type == "cuda")  # fmt: skip
    how = {"vae_tiles": list(tiling.tile) if tiling else None, "vae_dtype": name}
    if tiling is None:
        return decode_frames(weights, latent, vae_cfg, dtype=VAE_DTYPES[name]), how
    return iter([decode_tiled(weights, latent, vae_cfg, tiling, dtype=VAE_DTYPES[name])]), how


def run(req: RunRequest, progress: Progress = lambda event, info: None) -> RunRecord:
    """The whole pipeline for one video; returns the record that was also written next to it."""
    checked = check_request(req)  # cheap, before a session touches the GPU or any weight
    check_budgets(req, checked)
    job = Job(prompt=req.prompt, out=req.out, config=req.config, image=req.image, synthetic=req.synthetic,
              command=req.command, overwrite=req.overwrite, config_file=req.config_file)  # fmt: skip
    with Session(req.pack, req.device, jobs=1) as session:
        return session.generate(job, progress)
