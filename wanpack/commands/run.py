"""`wanpack run`: text (or image) to video from a pack, streamed to fit the GPU; one video or a file of them."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape

from wanpack.commands._common import (
    DeviceOption,
    RamBudget,
    VramBudget,
    allow_fast_exit,
    budget_gib,
    guarded,
    say_graph_mode_is_bench_only,
)
from wanpack.commands._progress import RunReporter
from wanpack.output import err, human_bytes, out, print_json


@guarded
def run(
    pack: Path | None = typer.Option(None, "--pack", "-p", help="Pack folder (default: the embedded demo model)."),
    prompt: str | None = typer.Option(None, "--prompt", help="What the video shows."),
    prompts: Path | None = typer.Option(None, "--prompts", help="JSONL file, one job per line (needs --out-dir)."),
    out_dir: Path | None = typer.Option(None, "--out-dir", help="Where --prompts jobs write their videos."),
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
    vram_budget: VramBudget = None,
    ram_budget: RamBudget = None,
    granularity: str | None = typer.Option(None, "--granularity", help="Offload unit: model, block or phase "
                                                                       "(default: the planner's choice)."),  # fmt: skip
    lazy_load: bool | None = typer.Option(None, "--lazy-load/--no-lazy-load", help="Read blocks from disk each step "
                                                                                   "(default: the planner's choice)."),  # fmt: skip
    read_mode: str | None = typer.Option(None, "--read-mode", help="cached (page cache) or direct (O_DIRECT); "
                                                                   "default: cached when RAM holds the pack."),  # fmt: skip
    disk_workers: int | None = typer.Option(None, "--disk-workers", help="Disk reader threads."),
    vae_tiling: bool | None = typer.Option(None, "--vae-tiling/--no-vae-tiling", help="Decode in spatial tiles "
                                                                                      "(default: when memory needs it)."),  # fmt: skip
    vae_dtype: str | None = typer.Option(None, "--vae-dtype", help="fp32 or bf16 VAE decode (default: fp32 when it "
                                                                   "fits untiled, else bf16)."),  # fmt: skip
    tiny_vae: Path | None = typer.Option(None, "--tiny-vae", help="taew2_1 weights: fast preview decode."),
    save_latents: bool | None = typer.Option(None, "--save-latents", help="Also save the final latent."),
    gemm: str | None = typer.Option(None, "--gemm", help="Force the quantized GEMM backend (default: auto)."),
    attn: str | None = typer.Option(None, "--attn", help="Force the attention backend (default: auto)."),
    device: DeviceOption = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing videos (and their sidecars, latents)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run record(s) as JSON."),
) -> None:
    """Generate a video. With no --pack, runs the embedded demo model (tiny, random weights) end to end.

    How the weights move (granularity, host cache, read mode, chunks) is planned from the free VRAM/RAM and the
    budgets unless you set it; the sidecar records the plan used.

    Examples:
      wanpack run
      wanpack run --pack ./t2v-14b-int8 --preset t2v-14b-480p --prompt "a fox in the snow" --out fox.mp4
      wanpack run --pack ./i2v-480p --preset i2v-14b-480p --image cat.jpg --prompt "the cat yawns" --out cat.mp4
      wanpack run --pack ./distilled --preset distill-4step --vram-budget 8GiB --prompt "waves at dusk"
      wanpack run --pack ./distilled --preset distill-4step --prompts jobs.jsonl --out-dir videos/
    """
    from wanpack.runtime.ops.triton_preload import start as start_triton_preload

    start_triton_preload(device)  # beside torch's import below (runtime/ops/triton_preload.py says why)
    from wanpack.errors import UsageError
    from wanpack.manifests.run_config import resolve_run_config
    from wanpack.runtime.ops.attention import set_attn_backend
    from wanpack.runtime.ops.linear import set_gemm_backend

    set_gemm_backend(gemm)
    set_attn_backend(attn)
    say_graph_mode_is_bench_only()
    overrides = {"steps": steps, "frames": frames, "height": height, "width": width, "seed": seed,
                 "guidance": guidance, "shift": shift, "sampler": sampler, "negative_prompt": negative_prompt,
                 "vram_budget_gib": budget_gib("--vram-budget", vram_budget),
                 "ram_budget_gib": budget_gib("--ram-budget", ram_budget), "lazy_load": lazy_load,
                 "num_disk_workers": disk_workers, "vae_tiling": vae_tiling, "vae_dtype": vae_dtype,
                 "save_latents": save_latents,
                 "read_mode": read_mode, "tiny_vae": True if tiny_vae else None,
                 "tiny_vae_path": str(tiny_vae) if tiny_vae else None}  # fmt: skip
    if granularity is not None:
        overrides.update({"offload_granularity": granularity, "cpu_offload": granularity != "model"})
    synthetic = pack is None
    if synthetic:
        from wanpack.demo import DEMO_PROMPT, DEMO_SETTINGS, demo_pack

        err.print("[yellow]no --pack given: running the embedded demo model - tiny, RANDOM weights; the video shows "
                  "noise patterns, not your prompt[/]")  # fmt: skip
        pack = demo_pack(log=lambda message: err.print(message, markup=False, soft_wrap=True))
        prompt = prompt or (None if prompts else DEMO_PROMPT)
        overrides = {**DEMO_SETTINGS, **{k: v for k, v in overrides.items() if v is not None}}
    command = ["wanpack", *sys.argv[1:]]
    if prompts is not None:
        if prompt is not None or image is not None:
            raise UsageError("--prompts runs the jobs in its file - drop --prompt/--image (put them in the file)")
        if out_dir is None:
            raise UsageError("--prompts needs --out-dir DIR for the videos it writes")
        return _run_batch(pack, prompts, out_dir, preset, config, overrides, device, synthetic, command, json_out,
                          overwrite)  # fmt: skip
    if out_dir is not None:
        raise UsageError("--out-dir goes with --prompts; for one video use --out FILE.mp4")
    if not prompt:
        raise UsageError("--prompt is required - say what the video should show")
    from wanpack.runtime.pipeline import RunRequest
    from wanpack.runtime.pipeline import run as run_pipeline

    cfg = resolve_run_config(preset, config, overrides, flags=FLAGS)
    request = RunRequest(pack=pack, prompt=prompt, out=out_path, config=cfg, image=image, device=device,
                         synthetic=synthetic, command=command, overwrite=overwrite, config_file=config)  # fmt: skip
    record = run_pipeline(request, RunReporter(quiet=json_out))
    allow_fast_exit()  # the session is closed: video, sidecar and pack pin are all done
    if json_out:
        print_json(record.to_dict())
        return
    out.print(summary_line(record, synthetic), soft_wrap=True, markup=False)


def _run_batch(pack: Path, prompts: Path, out_dir: Path, preset, config, overrides: dict, device, synthetic: bool,
               command: list[str], json_out: bool, overwrite: bool) -> None:  # fmt: skip
    """Every line checked first (errors name the line), then all jobs through one session: one plan, one load."""
    from wanpack.errors import WanpackError
    from wanpack.runtime.batch import load_jobs
    from wanpack.runtime.session import Session

    jobs = load_jobs(prompts, pack, out_dir, preset, config, overrides, synthetic=synthetic, command=command,
                     overwrite=overwrite)  # fmt: skip
    reporter = RunReporter(quiet=json_out)
    records, failed = [], []
    with Session(pack, device, jobs=len(jobs)) as session:
        for i, job in enumerate(jobs):
            reporter.job(i + 1, len(jobs), job.label)
            try:
                records.append(session.generate(job, reporter))
            except WanpackError as exc:  # one bad job does not cost the others
                failed.append(f"{job.label}: {exc}")
                err.print(f"[bold red]error:[/] {escape(f'{job.label}: {exc}')}", soft_wrap=True)
                continue
            if not json_out:
                out.print(summary_line(records[-1], synthetic), soft_wrap=True, markup=False)
    allow_fast_exit()
    if json_out:
        print_json([r.to_dict() for r in records])
    if failed:
        raise WanpackError(f"{len(failed)} of {len(jobs)} jobs failed ({'; '.join(failed)})")


def summary_line(record, synthetic: bool) -> str:
    """`wrote X.mp4 (WxH, F frames, seed S): stage times, peak VRAM, peak RSS` (plain text, no markup).

    WxH is what was made; an i2v run whose image has another aspect than --height/--width says what was asked too.
    """
    times = ", ".join(f"{k} {v:.1f}s" for k, v in record.timings_s.items())
    vram = record.peak_vram_bytes or {}
    peak = f", peak VRAM {human_bytes(vram['reserved'])}" if vram.get("reserved") else ""
    size, asked = record.size, (record.config.get("width"), record.config.get("height"))
    made = f"{size.get('width')}x{size.get('height')}" if size else ""
    if size and (size.get("width"), size.get("height")) != asked:
        made += f" (asked {asked[0]}x{asked[1]}: same area, the image's aspect)"
    made += f", {size.get('frames')} frames" if size else ""
    random_note = ", RANDOM demo weights" if synthetic else ", RANDOM weights" if record.synthetic_weights else ""
    return (f"wrote {record.video} ({made}, seed {record.seed}{random_note}): {times}{peak}, "
            f"peak RSS {human_bytes(record.peak_rss_bytes or 0)}")  # fmt: skip


# RunConfig field -> the flag that sets it, so a bad value is reported under the name the user typed
FLAGS = {"steps": "--steps", "frames": "--frames", "height": "--height", "width": "--width", "seed": "--seed",
         "guidance": "--guidance", "shift": "--shift", "sampler": "--sampler", "negative_prompt": "--negative-prompt",
         "vram_budget_gib": "--vram-budget", "ram_budget_gib": "--ram-budget", "lazy_load": "--lazy-load",
         "read_mode": "--read-mode", "num_disk_workers": "--disk-workers", "vae_tiling": "--vae-tiling",
         "vae_dtype": "--vae-dtype", "save_latents": "--save-latents", "tiny_vae": "--tiny-vae",
         "tiny_vae_path": "--tiny-vae",
         "offload_granularity": "--granularity", "cpu_offload": "--granularity"}  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("run")(run)
