"""`wanpack run`: text (or image) to video from a pack, streamed to fit the GPU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.markup import escape

from wanpack.commands._common import BUDGET_HELP, GIB, guarded, parse_budget
from wanpack.output import err, human_bytes, out, print_json


@guarded
def run(
    pack: Path | None = typer.Option(None, "--pack", "-p", help="Pack folder (default: the embedded demo model)."),
    prompt: str | None = typer.Option(None, "--prompt", help="What the video shows."),
    image: Path | None = typer.Option(None, "--image", "-i", help="First frame, for image-to-video packs."),
    out_path: Path = typer.Option(Path("video.mp4"), "--out", "-o", help="Output .mp4 (a .json sidecar goes beside it)."),
    preset: str | None = typer.Option(None, "--preset", help="i2v-14b-480p, i2v-14b-720p, t2v-1.3b, t2v-14b-480p, "
                                                             "t2v-14b-720p or distill-4step."),  # fmt: skip
    config: Path | None = typer.Option(None, "--config", help="JSON settings (wanpack or LightX2V key names)."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps."),
    frames: int | None = typer.Option(None, "--frames", "-f", help="Frames, 4n+1 (81 = 5 s at 16 fps)."),
    height: int | None = typer.Option(None, "--height", help="Height in pixels (multiple of 16)."),
    width: int | None = typer.Option(None, "--width", help="Width in pixels (multiple of 16)."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default: random, recorded in the sidecar)."),
    guidance: float | None = typer.Option(None, "--guidance", help="CFG scale (1 turns CFG off)."),
    shift: float | None = typer.Option(None, "--shift", help="Flow-matching sigma shift."),
    sampler: str | None = typer.Option(None, "--sampler", help="unipc, dpm++, euler or distill."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", help="What to steer away from."),
    vram_budget: str | None = typer.Option(None, "--vram-budget", help=f"GPU memory to use, {BUDGET_HELP} "
                                                                     "(default: free)."),  # fmt: skip
    ram_budget: str | None = typer.Option(None, "--ram-budget", help=f"Host RAM to use, {BUDGET_HELP} "
                                                                   "(default: available)."),  # fmt: skip
    granularity: str | None = typer.Option(None, "--granularity", help="Offload unit: model, block or phase."),
    lazy_load: bool | None = typer.Option(None, "--lazy-load/--no-lazy-load", help="Read blocks from disk each step."),
    disk_workers: int | None = typer.Option(None, "--disk-workers", help="Disk reader threads."),
    vae_tiling: bool | None = typer.Option(None, "--vae-tiling/--no-vae-tiling", help="Decode in spatial tiles."),
    tiny_vae: Path | None = typer.Option(None, "--tiny-vae", help="taew2_1 weights: fast preview decode."),
    save_latents: bool | None = typer.Option(None, "--save-latents", help="Also save the final latent."),
    gemm: str | None = typer.Option(None, "--gemm", help="Force the quantized GEMM backend (default: auto)."),
    attn: str | None = typer.Option(None, "--attn", help="Force the attention backend (default: auto)."),
    device: str | None = typer.Option(None, "--device", help="cuda or cpu (default: cuda when present)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out video (and its sidecar)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run record as JSON."),
) -> None:
    """Generate a video. With no --pack, runs the embedded demo model (tiny, random weights) end to end.

    Examples:
      wanpack run
      wanpack run --pack ./t2v-14b-int8 --preset t2v-14b-480p --prompt "a fox in the snow" --out fox.mp4
      wanpack run --pack ./i2v-480p --preset i2v-14b-480p --image cat.jpg --prompt "the cat yawns" --out cat.mp4
      wanpack run --pack ./distilled --preset distill-4step --vram-budget 8GiB --prompt "waves at dusk"
    """
    from wanpack.manifests.run_config import resolve_run_config
    from wanpack.runtime.ops.attention import set_attn_backend
    from wanpack.runtime.ops.linear import set_gemm_backend
    from wanpack.runtime.pipeline import RunRequest
    from wanpack.runtime.pipeline import run as run_pipeline

    set_gemm_backend(gemm)
    set_attn_backend(attn)
    overrides = {"steps": steps, "frames": frames, "height": height, "width": width, "seed": seed,
                 "guidance": guidance, "shift": shift, "sampler": sampler, "negative_prompt": negative_prompt,
                 "vram_budget_gib": _gib(parse_budget("--vram-budget", vram_budget)),
                 "ram_budget_gib": _gib(parse_budget("--ram-budget", ram_budget)), "lazy_load": lazy_load,
                 "num_disk_workers": disk_workers, "vae_tiling": vae_tiling, "save_latents": save_latents,
                 "tiny_vae": True if tiny_vae else None, "tiny_vae_path": str(tiny_vae) if tiny_vae else None}  # fmt: skip
    if granularity is not None:
        overrides.update({"offload_granularity": granularity, "cpu_offload": granularity != "model"})
    demo = pack is None
    if demo:
        from wanpack.demo import DEMO_PROMPT, DEMO_SETTINGS, demo_pack

        err.print("[yellow]no --pack given: running the embedded demo model - tiny, RANDOM weights; the video shows "
                  "noise patterns, not your prompt[/]")  # fmt: skip
        pack = demo_pack(log=err.print)
        prompt = prompt or DEMO_PROMPT
        overrides = {**DEMO_SETTINGS, **{k: v for k, v in overrides.items() if v is not None}}
    elif _random_weights(pack):
        err.print(f"[yellow]{escape(str(pack))} holds RANDOM weights (made by `wanpack synth`): the video shows noise "
                  "patterns, not your prompt[/]")  # fmt: skip
    if not prompt:
        from wanpack.errors import UsageError

        raise UsageError("--prompt is required - say what the video should show")
    cfg = resolve_run_config(preset, config, overrides, flags=FLAGS)
    request = RunRequest(pack=pack, prompt=prompt, out=out_path, config=cfg, image=image, device=device,
                         synthetic=demo, command=["wanpack", *sys.argv[1:]], overwrite=overwrite,
                         config_file=config)  # fmt: skip
    record = run_pipeline(request, _Reporter(json_out))
    if json_out:
        print_json(record.to_dict())
        return
    times = ", ".join(f"{k} {v:.1f}s" for k, v in record.timings_s.items())
    vram = record.peak_vram_bytes or {}
    peak = f", peak VRAM {human_bytes(vram['reserved'])}" if vram.get("reserved") else ""
    size = f"{record.width}x{record.height}"
    if (record.width, record.height) != (cfg.width, cfg.height):
        size += f" (asked {cfg.width}x{cfg.height}: same area, the image's aspect)"
    out.print(f"wrote {escape(str(out_path))} ({size}, {cfg.frames} frames, seed {record.seed}"
              f"{', RANDOM weights' if record.synthetic_weights else ''}): {times}{peak}, "
              f"peak RSS {human_bytes(record.peak_rss_bytes or 0)}", soft_wrap=True)  # fmt: skip


# RunConfig field -> the flag that sets it, so a bad value is reported under the name the user typed
FLAGS = {"steps": "--steps", "frames": "--frames", "height": "--height", "width": "--width", "seed": "--seed",
         "guidance": "--guidance", "shift": "--shift", "sampler": "--sampler", "negative_prompt": "--negative-prompt",
         "vram_budget_gib": "--vram-budget", "ram_budget_gib": "--ram-budget", "lazy_load": "--lazy-load",
         "num_disk_workers": "--disk-workers", "vae_tiling": "--vae-tiling", "save_latents": "--save-latents",
         "tiny_vae": "--tiny-vae", "tiny_vae_path": "--tiny-vae", "offload_granularity": "--granularity",
         "cpu_offload": "--granularity"}  # fmt: skip


def _gib(size: int | None) -> float | None:
    return None if size is None else size / GIB


def _random_weights(pack: Path) -> bool:
    """Whether the pack's manifest marks its weights as random (a missing or bad pack is reported by the run's checks)."""
    from wanpack.errors import WanpackError
    from wanpack.manifests.format import read_manifest

    try:
        return read_manifest(pack).source.synthetic
    except WanpackError:
        return False


class _Reporter:
    """Progress lines on stderr: one per stage, one per denoising step with s/step, streamed GB/s and VRAM."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.last = time.perf_counter()
        self.last_bytes = 0

    def __call__(self, event: str, info: dict) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if event == "stage":
            extra = ", ".join(f"{k} {v}" for k, v in info.items() if k != "name")
            err.print(f"[bold]{info['name']}[/]" + (f" ({extra})" if extra else ""))
            self.last = now
        elif event == "note":
            err.print(f"  {info['text']}")
        elif event == "step":
            stats = info["stats"]
            moved = stats.get("h2d_bytes", 0) or stats.get("disk_bytes", 0)
            dt = max(now - self.last, 1e-9)
            rate = (moved - self.last_bytes) / dt / 1e9
            err.print(f"  step {info['step']}/{info['steps']}: {dt:.2f} s/step, streamed {rate:.2f} GB/s"
                      f"{_vram()}")  # fmt: skip
            self.last, self.last_bytes = now, moved


def _vram() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return f", VRAM {torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved"


def register(app: typer.Typer) -> None:
    app.command("run")(run)
