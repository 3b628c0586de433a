"""`wanpack run` as a user runs it, cold and warm, each phase next to its floor measured in the same run (GPU).

Not a test: prints a table last and writes --json for docs/PERFORMANCE.md. On a full-size random-weight pack
(`synth --as-pack -c all`, int8; built once under --work):

  floors    in a separate process, nothing streamed: the DiT forward with all blocks resident (x steps), the T5 forward
            with the T5 resident, the VAE decode untiled (fp32 and bf16: a run's floor is the one in the dtype its
            sidecar says it decoded in), a bare `import torch` + CUDA start; the raw O_DIRECT read rate
            of the pack's shards with the page cache dropped
  runs      the CLI command exactly as documented (`wanpack run --pack P --preset distill-4step --vram-budget 8 ...`),
            each a fresh process: cold (the whole page cache dropped first, libraries included; Triton's kernel
            cache already warm from an untimed warm-up run), cold_pack (only the pack's pages dropped), warm, warm
            with --ram-budget 16, 720p, and `--prompts` with two jobs (the second job is the one that counts). Wall
            time and CPU time of the process, its sidecar's phases, peak VRAM from NVML (the whole process, CUDA
            context included) and peak RSS.

    python benchmarks/e2e_bench.py --work /tmp/e2e --json e2e.json [--skip-720p] [--runs warm,prompts] [--layers 40]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

PROMPT = "a red fox running through fresh snow at dawn, cinematic"
PROMPT2 = "waves breaking on black volcanic rocks at dusk, slow motion"
GiB = 1 << 30


# ------------------------------------------------------------------------------------------------ the pack


def build_pack(work: Path, layers: int | None) -> tuple[Path, float]:
    from wanpack.convert.converter import ConvertOptions
    from wanpack.convert.synth_pack import synth_pack

    pack = work / "pack"
    if (pack / "manifest.json").is_file():
        return pack, 0.0
    t = time.perf_counter()
    synth_pack(pack, "wan2.1-t2v-14b", layers=layers, components=("dit", "t5", "vae"),
               options=ConvertOptions(quant="int8", force=True))  # fmt: skip
    return pack, time.perf_counter() - t


def drop_caches(pack: Path, everything: bool = True) -> bool:
    """The pack's pages out of the page cache; with ``everything`` the whole cache (torch's libraries too)."""
    from wanpack.runtime.stream.bench import drop_page_cache

    return drop_page_cache([str(p) for p in pack.rglob("*.safetensors")], everything)


def raw_read_rate(pack: Path) -> dict:
    """O_DIRECT read of every DiT shard (8 threads, 16 MiB chunks), page cache dropped first."""
    from wanpack.runtime.stream.bench import raw_direct_read

    shards = sorted((pack / "dit").glob("*.safetensors"))
    ranges = [(str(p), 0, p.stat().st_size) for p in shards]
    drop_caches(pack)
    rate, direct = raw_direct_read(ranges, workers=8)
    return {"gbps": round(rate, 3), "direct": direct, "bytes": sum(r[2] for r in ranges)}


# ------------------------------------------------------------------------------------------------ floors


def floors(pack: Path, height: int, width: int, frames: int, steps: int) -> dict:
    """Resident DiT forward, T5 forward and VAE decode (run in a process of its own: `--floors`)."""
    import torch

    from wanpack.manifests.arch import config_from_dict
    from wanpack.runtime.models import dit as dit_model
    from wanpack.runtime.models.t5 import T5Encoder
    from wanpack.runtime.models.tokenizer import T5Tokenizer
    from wanpack.runtime.models.vae import decode_frames
    from wanpack.runtime.pack import PackComponent
    from wanpack.runtime.stream.dit_stream import streamed_forward
    from wanpack.runtime.stream.engine import StreamEngine, StreamOptions

    dev = torch.device("cuda")
    out: dict = {}

    def timed(fn, repeats: int = 3) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    t5c = PackComponent(pack, "t5")
    t5_cfg = config_from_dict(t5c.entry.config)
    tokens = T5Tokenizer(pack / "t5" / "tokenizer")([PROMPT])
    with StreamEngine(t5c, StreamOptions(granularity="model", device_slots=1, prefetch=0, host_slots=2,
                                         disk_workers=8, direct_io=False), dev) as eng:  # fmt: skip
        enc = T5Encoder(t5_cfg, dtype=torch.bfloat16)

        def t5_forward():
            x, ctx = enc.embed(eng.resident, tokens.ids.to(dev), tokens.mask.to(dev), device=dev)
            for unit, w in eng.forward():
                for phase in unit.phases:
                    x = enc.phase(phase)(w, x, ctx)
            return enc.finish(eng.resident, x, ctx)

        out["t5_forward_s"] = timed(t5_forward)
        text = [t.clone() for t in t5_forward()]
    torch.cuda.empty_cache()

    ditc = PackComponent(pack, "dit")
    dit_cfg = config_from_dict(ditc.entry.config)
    lat = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    x = torch.randn((1, *lat), device=dev)
    with StreamEngine(ditc, StreamOptions(granularity="model", device_slots=1, prefetch=0, host_slots=2,
                                          disk_workers=8, direct_io=False), dev) as eng:  # fmt: skip
        opts = dit_model.DiTOptions(dtype=torch.bfloat16, chunk_tokens=8192)
        t = torch.tensor([900.0], device=dev)
        out["dit_forward_s"] = timed(lambda: streamed_forward(eng, dit_cfg, x, t, text, kv_cache={}, opts=opts), 2)
    out["dit_steps_s"] = out["dit_forward_s"] * steps
    torch.cuda.empty_cache()

    vaec = PackComponent(pack, "vae")
    vae_cfg = config_from_dict(vaec.entry.config)
    weights = vaec.load_resident(dev)
    z = torch.randn((1, *lat), device=dev)

    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):  # the run decodes in either (--vae-dtype)

        def decode(dtype=dtype):
            for chunk in decode_frames(weights, z, vae_cfg, dtype=dtype):
                chunk.cpu()

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[f"vae_decode{suffix}_s"] = timed(decode, 1)
        out[f"vae_decode{suffix}_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / GiB, 3)
    out["device"] = torch.cuda.get_device_name()
    return out


def encoder_probe() -> dict:
    """Seconds to encode 81 noise frames (the worst case for x264) per setting and size, all cores."""
    import io
    from fractions import Fraction

    import av
    import numpy as np

    out = {}
    for w, h in ((832, 480), (1280, 720)):
        frames = (np.random.default_rng(0).random((81, h, w, 3)) * 255).astype(np.uint8)
        for preset, tune in (("veryfast", "zerolatency"), ("superfast", "zerolatency"), ("ultrafast", "zerolatency"),
                             ("veryfast", None), ("ultrafast", None)):  # fmt: skip
            buf = io.BytesIO()
            c = av.open(buf, mode="w", format="mp4")
            st = c.add_stream("libx264", rate=Fraction(16))
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.options = {"crf": "18", "preset": preset, **({"tune": tune} if tune else {})}
            t = time.perf_counter()
            for f in frames:
                for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(pkt)
            fed = time.perf_counter()
            for pkt in st.encode():
                c.mux(pkt)
            c.close()
            out[f"{w}x{h} {preset} {tune}"] = {"total_s": round(time.perf_counter() - t, 3),
                                               "flush_s": round(time.perf_counter() - fed, 3), "mb": len(buf.getvalue()) / 1e6}  # fmt: skip
    return out


def page_probe(pack: Path, shards: int = 10) -> dict:
    """benchmarks/page_probe.py on the first DiT shards: ways of bringing page-cached bytes to the GPU, side by side."""
    paths = sorted((pack / "dit").glob("block_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))[:shards]
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("page_probe.py")), *map(str, paths)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def startup_floor() -> float:
    """A bare interpreter that imports torch and starts CUDA: what every CLI run pays before it does anything."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"],
                   check=True)  # fmt: skip
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------ CLI runs


class VramPeak:
    """Peak GPU memory of a process tree while it runs: NVML per-process figures, else the device's used memory."""

    def __init__(self):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("WANPACK_BENCH_GPU", "0")))
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.peak_process = 0
        self.peak_device = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                used = sum(p.usedGpuMemory or 0 for p in procs)
                self.peak_process = max(self.peak_process, used)
                self.peak_device = max(self.peak_device, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline)
            except self.nvml.NVMLError:
                pass
            time.sleep(0.02)

    def __enter__(self) -> VramPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cli(args: list[str], work: Path, name: str) -> dict:
    """One `wanpack ...` process: wall, CPU time, NVML peak VRAM, its JSON output."""
    cmd = [sys.executable, "-m", "wanpack", *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with VramPeak() as vram:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (work / f"{name}.stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    records = json.loads(proc.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"name": name, "cmd": " ".join(["wanpack", *args]), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "cpu_fraction": round(cpu / wall, 3), "vram_peak_process_gib": round(vram.peak_process / GiB, 3),
            "vram_peak_device_gib": round(vram.peak_device / GiB, 3), "records": records}  # fmt: skip


def run_args(pack: Path, out: str, *extra: str) -> list[str]:
    return ["run", "--pack", str(pack), "--preset", "distill-4step", "--vram-budget", "8", "--prompt", PROMPT,
            "--seed", "1", "--out", out, "--json", *extra]  # fmt: skip


def summarize(run: dict, job: int = -1) -> dict:
    rec = run["records"][job] if isinstance(run["records"], list) else run["records"]
    t = rec["timings_s"]
    return {"wall_s": run["wall_s"], "in_process_s": t.get("total"), "text": t.get("text"), "denoise": t.get("denoise"),
            "decode": t.get("decode"), "write": t.get("write"), "setup": t.get("setup"),
            "save_latent": t.get("save_latent"), "cpu_fraction": run["cpu_fraction"],
            "vram_process_gib": run["vram_peak_process_gib"], "vram_device_gib": run["vram_peak_device_gib"],
            "torch_reserved_gib": round((rec.get("peak_vram_bytes") or {}).get("reserved", 0) / GiB, 3),
            "rss_gib": round((rec.get("peak_rss_bytes") or 0) / GiB, 2), "storage_read_gb":
            round((rec.get("io", {}).get("storage_bytes_read") or 0) / 1e9, 2), "plan": rec.get("plan", {}).get("dit"),
            "read_mode": rec.get("plan", {}).get("read_mode"), "bytes_per_run": rec.get("plan", {}).get("bytes_per_run"),
            "vae_dtype": (rec.get("encoder") or {}).get("vae_dtype", "fp32"),
            "vae_tiles": (rec.get("encoder") or {}).get("vae_tiles"), **_where_time_goes(rec)}  # fmt: skip


def _where_time_goes(rec: dict) -> dict:
    """The sidecar's finer figures: step 1 (vs the others), the T5 forward alone, and the CPU seconds each stage cost
    on the thread that ran it (the main thread) and in the whole process."""
    details = rec.get("details") or {}
    steps = details.get("steps_s") or []
    cpu = rec.get("stage_cpu_s") or {}
    return {"step1_s": steps[0] if steps else None, "later_steps_s": steps[1:], "t5_forward_s": details.get("t5_forward_s"),
            "main_cpu_s": {k: v.get("thread") for k, v in cpu.items()},
            "process_cpu_s": {k: v.get("process") for k, v in cpu.items()}}  # fmt: skip


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/wanpack-e2e"))
    ap.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all 40)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-720p", action="store_true")
    ap.add_argument("--runs", default="cold,warm,ram16,prompts,720p",
                    help="which CLI runs, comma-separated (a call too short for all of them can take a part); also "
                         "sage (--attn sage) and cold_pack (only the pack's pages dropped, the libraries kept)")
    ap.add_argument("--skip-probes", action="store_true", help="skip the video encoder and page-cache probes")
    ap.add_argument("--floors", nargs=4, type=int, metavar=("H", "W", "FRAMES", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pack = args.work / "pack"
    if args.floors:
        print(json.dumps(floors(pack, *args.floors)))
        return
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}, "errors": {}}
    pack, built = build_pack(args.work, args.layers)
    result["pack_build_s"] = round(built, 1)
    result["pack_bytes"] = sum(p.stat().st_size for p in pack.rglob("*.safetensors"))
    print(f"pack {pack}: {result['pack_bytes'] / 1e9:.1f} GB, built in {built:.0f} s", file=sys.stderr, flush=True)

    def step(name: str, fn):
        try:
            print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
            return fn()
        except Exception as exc:  # noqa: BLE001 - report every case, keep going
            traceback.print_exc()
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            return None
        finally:
            if args.json:  # after every step: a run cut short by a time limit still leaves what it measured
                args.json.write_text(json.dumps(result, indent=1, default=str))

    result["raw_read"] = step("raw read", lambda: raw_read_rate(pack))
    result["startup_floor_s"] = step("startup floor", startup_floor)
    if not args.skip_probes:
        result["encoder_probe"] = step("video encoder probe", encoder_probe)
        result["page_probe"] = step("page probe", lambda: page_probe(pack))
    wanted = set(args.runs.split(",")) - ({"720p"} if args.skip_720p else set())
    sizes = [("480p", 480, 832)] + ([("720p", 720, 1280)] if "720p" in wanted else [])
    result["floors"] = {}
    for label, h, w in sizes:
        proc = step(f"floors {label}", lambda h=h, w=w: subprocess.run(
            [sys.executable, __file__, "--work", str(args.work), "--floors", str(h), str(w), "81", "4"],
            capture_output=True, text=True, check=True))  # fmt: skip
        if proc is not None:
            result["floors"][label] = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = result["runs"]
    one_step = ["--steps", "1", "--config", str(_write_json(args.work / "one.json", {"denoising_step_list": [1000]}))]
    step("warm-up 480p (untimed: Triton kernel cache, autotune)", lambda: cli(run_args(pack, "warmup.mp4", *one_step), args.work, "warmup"))
    if "cold" in wanted:
        step("drop page cache", lambda: drop_caches(pack))
        runs["cold"] = step("cold 480p", lambda: cli(run_args(pack, "cold.mp4"), args.work, "cold"))
    if "cold_pack" in wanted:  # what the cold goal's formula counts: the pack's bytes, the libraries still cached
        step("drop the pack's pages", lambda: drop_caches(pack, everything=False))
        runs["cold_pack"] = step("cold pack 480p", lambda: cli(run_args(pack, "cold_pack.mp4"), args.work, "cold_pack"))
    if "warm" in wanted:
        runs["warm"] = step("warm 480p", lambda: cli(run_args(pack, "warm.mp4"), args.work, "warm"))
    if "ram16" in wanted:
        runs["warm_ram16"] = step("warm 480p --ram-budget 16", lambda: cli(run_args(pack, "ram16.mp4", "--ram-budget",
                                                                                    "16"), args.work, "warm_ram16"))  # fmt: skip
    if "sage" in wanted:
        step("warm-up 480p --attn sage (untimed: its kernels and tuning)",
             lambda: cli(run_args(pack, "warmup_sage.mp4", "--attn", "sage", *one_step), args.work, "warmup_sage"))
        runs["warm_sage"] = step("warm 480p --attn sage", lambda: cli(run_args(pack, "sage.mp4", "--attn", "sage"),
                                                                      args.work, "warm_sage"))  # fmt: skip
    jobs = args.work / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": PROMPT, "seed": 1}) + "\n" + json.dumps({"prompt": PROMPT2, "seed": 2}) + "\n")
    batch = ["run", "--pack", str(pack), "--preset", "distill-4step", "--vram-budget", "8", "--prompts", str(jobs),
             "--out-dir", "batch", "--json"]  # fmt: skip
    if "prompts" in wanted:
        runs["prompts"] = step("--prompts, 2 jobs", lambda: cli(batch, args.work, "prompts"))
    if "720p" in wanted:
        size = ["--height", "720", "--width", "1280"]
        step("warm-up 720p", lambda: cli(run_args(pack, "warmup720.mp4", *size, *one_step), args.work, "warmup720"))
        runs["warm_720p"] = step("warm 720p", lambda: cli(run_args(pack, "warm720.mp4", *size), args.work, "warm_720p"))
    result["summary"] = {k: summarize(v) for k, v in runs.items() if v}
    if runs.get("prompts"):
        result["summary"]["prompts_job1"] = summarize(runs["prompts"], 0)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def print_table(result: dict) -> None:
    fl = result.get("floors", {})
    start = result.get("startup_floor_s") or 0.0
    raw = (result.get("raw_read") or {}).get("gbps") or 0.0
    print(f"\n{fl.get('480p', {}).get('device', '?')}, 14B T2V int8 random weights, distill 4 steps, 81 frames, "
          f"--vram-budget 8; pack {result.get('pack_bytes', 0) / 1e9:.1f} GB; raw O_DIRECT read {raw:.2f} GB/s; "
          f"bare python+torch+CUDA start {start:.2f} s")  # fmt: skip
    for row in (result.get("page_probe") or {}).get("rows", []):
        print(f"page probe: {row}")
    for label, f in fl.items():
        print(f"floors {label}: T5 fwd {f['t5_forward_s']:.3f} s, DiT fwd {f['dit_forward_s']:.3f} s (x4 "
              f"{f['dit_steps_s']:.2f}), VAE decode fp32 {f['vae_decode_s']:.2f} s "
              f"(bf16 {f.get('vae_decode_bf16_s', 0):.2f} s)")  # fmt: skip
    head = f"{'run':12} {'wall':>6} {'text':>5} {'denoise':>7} {'decode':>6} {'write':>5} {'cpu%':>5} {'VRAM':>5} {'RSS':>5} {'disk GB':>7}  vs floors"
    print(head)
    for name, s in result.get("summary", {}).items():
        f = fl.get("720p" if "720" in name else "480p")
        ratio = ""
        if f:
            vae_floor = f.get("vae_decode_bf16_s" if s.get("vae_dtype") == "bf16" else "vae_decode_s") or f["vae_decode_s"]
            floor = f["t5_forward_s"] + f["dit_steps_s"] + vae_floor
            ratio = f"in-process {s['in_process_s'] / floor:.2f}x of {floor:.2f} s (VAE {s.get('vae_dtype')})"
            if not name.startswith("prompts"):
                ratio += f"; whole process {s['wall_s'] / (floor + start):.2f}x of floors + bare start"
        print(f"{name:12} {s['wall_s']:6.1f} {s['text'] or 0:5.2f} {s['denoise'] or 0:7.2f} {s['decode'] or 0:6.2f} "
              f"{s['write'] or 0:5.2f} {100 * s['cpu_fraction']:5.0f} {s['vram_process_gib'] or s['vram_device_gib']:5.2f} "
              f"{s['rss_gib']:5.1f} {s['storage_read_gb']:7.1f}  {ratio}")  # fmt: skip
        if s.get("step1_s") is not None or s.get("main_cpu_s"):
            later = s.get("later_steps_s") or []
            cpu = ", ".join(f"{k} {v:.2f}/{s['process_cpu_s'].get(k) or 0:.2f}" for k, v in s["main_cpu_s"].items()
                            if v is not None)  # fmt: skip
            print(f"{'':12} step 1 {s.get('step1_s') or 0:.2f} s (others {min(later, default=0):.2f}-"
                  f"{max(later, default=0):.2f}), T5 forward {s.get('t5_forward_s') or 0:.2f} s; CPU s main/process: {cpu}")
    for k, v in result.get("errors", {}).items():
        print(f"ERROR {k}: {v[:300]}")


if __name__ == "__main__":
    main()
