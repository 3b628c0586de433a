"""`wanpack serve`: keep a pack loaded and make videos for HTTP clients (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from wanpack.commands._common import (
    DeviceOption,
    RamBudget,
    VramBudget,
    budget_gib,
    guarded,
    say_graph_mode_is_bench_only,
)
from wanpack.output import err

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@guarded
def serve(
    pack: Path = typer.Option(..., "--pack", "-p", help="Pack folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    out_dir: Path = typer.Option(Path("wanpack-serve-out"), "--out-dir", help="Where videos and sidecars go."),
    preset: str | None = typer.Option(None, "--preset", help="Settings every job starts from (jobs may override)."),
    config: Path | None = typer.Option(None, "--config", help="JSON settings every job starts from."),
    vram_budget: VramBudget = None,
    ram_budget: RamBudget = None,
    device: DeviceOption = None,
) -> None:
    """Serve a job API over one loaded pack: POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/video.

    Examples:
      wanpack serve --pack ./distilled --preset distill-4step
      curl -s localhost:8000/v1/jobs -d '{"prompt": "waves at dusk", "seed": 3}'
      curl -s localhost:8000/v1/jobs/00001-3fa2c1d0
      curl -so waves.mp4 localhost:8000/v1/jobs/00001-3fa2c1d0/video
    """
    from wanpack.runtime.ops.triton_preload import start as start_triton_preload

    start_triton_preload(device)  # beside torch's import below (runtime/ops/triton_preload.py says why)
    from wanpack.errors import UsageError
    from wanpack.runtime.serve import JobServer, create_app

    try:
        import uvicorn
    except ImportError:
        raise UsageError("wanpack serve needs FastAPI and uvicorn - pip install 'wanpack[serve]'") from None
    say_graph_mode_is_bench_only()
    from wanpack.runtime.ops.attention import set_attn_backend

    set_attn_backend(None)  # checks WANPACK_SAGE_AUTO before the server starts
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port - use 1-65535")
    if host not in LOCAL_HOSTS:
        err.print(f"[yellow]binding {escape(host)}: anyone who can reach this address can queue jobs and read the videos[/]")
    overrides = {"vram_budget_gib": budget_gib("--vram-budget", vram_budget),
                 "ram_budget_gib": budget_gib("--ram-budget", ram_budget)}
    server = JobServer(pack, out_dir, preset=preset, config=config, overrides=overrides, device=device,
                       log=lambda m: err.print(m, markup=False, highlight=False))  # fmt: skip
    app = create_app(server)
    if server.session.manifest.source.synthetic:
        err.print(f"[yellow]{escape(str(pack))} holds RANDOM weights (made by `wanpack synth`): every video shows noise "
                  "patterns, not its prompt[/]", soft_wrap=True)  # fmt: skip
    err.print(f"wanpack serve: {pack} on {server.session.device}, http://{host}:{port}/v1/jobs, outputs in {out_dir}",
              markup=False, soft_wrap=True)  # fmt: skip
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        server.close()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
