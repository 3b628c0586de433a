"""A pack opened on a device for one or many videos: the planned engines and caches live here between jobs.

`wanpack run` makes a session for one job; `wanpack run --prompts` and `wanpack serve` keep one for many, so the DiT's
host cache, the encoders' pinned blocks, the tokenizer, the VAE weights, the tuned kernels and the prompt embeddings
are paid for once. One job goes:

    plan          budgets + explicit settings -> RunPlan (runtime/run_plan.py); refuses before any weight is read
    DiT engine    built (or kept from the last job when its plan is the same); its cache reads are queued at once, at
                  low priority, so the first step's blocks stream in while the encoders run
    text          T5 on the GPU, streamed block by block from the shared reader (its reads go first); only the
                  prompt's rows of the 2 GiB token table are read
    image         (i2v) CLIP the same way, then the VAE encodes the first frame
    denoise       the DiT streamed by the plan; CFG as one batch
    decode+write  the latent is saved first (a failed write loses nothing), then each decoded chunk is converted to
                  uint8 on the GPU and handed to the encoder thread while the next chunk decodes
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wanpack.errors import UsageError, WanpackError
from wanpack.manifests.arch import VAEConfig, config_from_dict
from wanpack.manifests.pack_lock import pinned_pack
from wanpack.manifests.run_config import RunConfig
from wanpack.runtime.kernel_warmup import KernelWarmup, attention_shapes, prime_attention, priming_bytes
from wanpack.runtime.ops.attention import attn_backend
from wanpack.runtime.ops.devices import wait_for_gpu
from wanpack.runtime.ops.triton_preload import report as triton_preload_report
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.run_plan import DISK_WORKERS, ENCODER_WORKSPACE, RunPlan, plan_run
from wanpack.runtime.run_record import (
    RunRecord,
    StageTimer,
    latents_path,
    process_age_s,
    sidecar_path,
    thread_cpu_seconds,
    write_sidecar,
)
from wanpack.runtime.stream.engine import StreamEngine
from wanpack.runtime.stream.reader import DiskReader
from wanpack.runtime.video import (
    BURST_ENCODER_SETTINGS,
    ENCODER_SETTINGS,
    VideoWriter,
    save_latents,
    to_uint8_frames,
)

Progress = Callable[[str, dict], None]  # (event, details): "stage", "note", "warning", "step", "frames", "done"
TEXT_CACHE = 16  # prompt embeddings kept per session (the negative prompt of every CFG job is one of them)
GiB = 1 << 30


@dataclass
class Job:
    """One video: what to make and where to put it. ``config`` is fully resolved (preset < config < overrides)."""

    prompt: str
    out: Path
    config: RunConfig
    image: Path | None = None
    synthetic: bool = False
    command: list[str] = field(default_factory=list)
    label: str = ""  # how progress names it ("line 3", "job 7f3a")
    overwrite: bool = False  # replace existing outputs (--overwrite)
    config_file: Path | None = None  # --config: an input no output may overwrite

    def as_request(self, pack: Path):
        from wanpack.runtime.pipeline import RunRequest

        return RunRequest(pack=pack, prompt=self.prompt, out=self.out, config=self.config, image=self.image,
                          synthetic=self.synthetic, command=self.command, overwrite=self.overwrite,
                          config_file=self.config_file)  # fmt: skip


def _quiet(event: str, info: dict) -> None:
    return None


def select_device(requested: str | None) -> torch.device:
    """--device, else CUDA when present, else the CPU; one line for anything unusable. Starts no CUDA context."""
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            raise UsageError(f"--device {requested!r} is not a device - use cuda, cuda:N or cpu") from None
        if dev.type not in ("cuda", "cpu"):
            raise UsageError(f"--device {requested!r}: wanpack runs on cuda, cuda:N or cpu - pick one of those")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA device is available - drop --device")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA devices - "
                             "pick one of them")  # fmt: skip
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_device(requested: str | None) -> tuple[torch.device, bool]:
    """The device, with what must be set before CUDA starts already set: the allocator's configuration and sleeping
    waits. Returns (device, whether blocking sync took effect). Safe to call more than once per process."""
    from wanpack.runtime.stream.env import apply_alloc_conf, blocking_sync

    apply_alloc_conf()
    device = select_device(requested)
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        # the GPU does the work; torch's CPU thread pool only spun between the few small host ops (measured on an
        # H200 host: 4.4 s of CPU and 0.8 s of wall in one 480p run). OMP_NUM_THREADS set by the user wins.
        torch.set_num_threads(1)
    return device, (blocking_sync() if device.type == "cuda" else False)


WARMUP_JOIN_S = 60.0  # a kernel warm-up still running when a session closes (a first run's autotuning) is waited for


class Session:
    """One pack on one device; ``generate(job)`` makes a video. Close it (or use ``with``) to free every buffer."""

    def __init__(self, pack: str | os.PathLike, device: str | None = None, *, jobs: int = 1):
        from wanpack.runtime.stream.env import compute_dtype

        self.pack = Path(pack)
        self.started_at_age_s = process_age_s()  # how long the interpreter, imports took before the session
        self.device, self.blocking_sync = prepare_device(device)
        self.dtype = compute_dtype() if self.device.type == "cuda" else torch.float32
        self._pin = contextlib.ExitStack()  # a `convert --force` to this pack waits until the session ends
        pin = self._pin.enter_context(pinned_pack(self.pack))
        self.manifest, self.manifest_sha256 = pin.manifest, pin.manifest_sha256
        if "t5" in self.manifest.components:  # the tokenizer: inside the pack, regular, of its recorded size
            PackComponent(self.pack, "t5", self.manifest).check_files()
        self.jobs = jobs
        self.reader = DiskReader(DISK_WORKERS)
        self._dit: StreamEngine | None = None
        self._dit_key: str | None = None
        self._dit_build: Future | None = None  # the DiT engine being built beside the encoders
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="wanpack-build")
        self._encoders: dict[str, StreamEngine] = {}
        self._encoder_keys: dict[str, tuple] = {}
        self._texts: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()  # prompt -> T5 output
        self._tokenizer = None
        self._vae: tuple[dict[str, torch.Tensor], VAEConfig] | None = None
        self._last_decode_s: float | None = None
        self._plan: RunPlan | None = None
        self._warmup: KernelWarmup | None = None  # started with the first job's plan (CUDA only)
        self._primed: set[tuple[int, tuple[int, int]]] = set()  # (batch, attention shape) planned on this thread
        self._tokenizer_thread = threading.Thread(target=self._load_tokenizer, daemon=True)
        self._tokenizer_thread.start()  # ~0.3 s for umt5's 256k vocabulary, off the critical path
        self.jobs_done = 0
        self._told_random = False  # a pack of random weights is announced once per session
        self.details: dict = {}  # sub-phase timings of the current job (recorded in its sidecar)

    # ------------------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a build that failed has nothing to close; its error was raised
            self._take_dit()
        self._builder.shutdown(wait=True)
        if self._warmup is not None:  # its kernels may still be running: nothing of ours outlives the session
            self._warmup.join(WARMUP_JOIN_S)
        for eng in [self._dit, *self._encoders.values()]:
            if eng is not None:
                eng.close()
        self._dit, self._encoders = None, {}
        self.reader.close()
        self._pin.close()
        self._vae = None
        self._texts.clear()
        self._free_cuda_memory()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ one job

    def generate(self, job: Job, progress: Progress = _quiet) -> RunRecord:
        """Make one video (mp4 + JSON sidecar); returns the record written beside it."""
        from wanpack.runtime.pipeline import check_request

        cfg = job.config
        checked = check_request(job.as_request(self.pack), manifest=self.manifest)
        seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
        batch = 2 if cfg.cfg_active else 1
        plan = plan_run(self.pack, self.manifest, cfg, device=self.device, width=checked.width,
                        height=checked.height, task=checked.task, batch=batch, jobs=self.jobs)  # fmt: skip
        self._plan = plan
        if self.device.type == "cuda":
            if self._warmup is None:
                self._warmup = KernelWarmup(self.manifest, self.device, plan.dit.tokens, self.dtype, batch)
            torch.cuda.reset_peak_memory_stats(self.device)
        io_before = _process_read_bytes()
        self.details = {"process_age_at_session_s": self.started_at_age_s}
        read_before = self.reader.bytes_read
        timer = StageTimer(sync=self.device.type == "cuda")
        random_weights = job.synthetic or self.manifest.source.synthetic
        record = RunRecord(command=job.command, seed=seed, config=cfg.to_dict(), pack=None if job.synthetic else str(self.pack),
                           manifest_sha256=self.manifest_sha256, synthetic_weights=random_weights, prompt=job.prompt,
                           image=str(job.image) if job.image else None, video=str(job.out))  # fmt: skip
        record.size = {"height": checked.height, "width": checked.width, "frames": cfg.frames}
        if random_weights and not job.synthetic and not self._told_random:  # (the demo says so itself)
            progress("warning", {"text": f"{self.pack} holds RANDOM weights (made by `wanpack synth`): the video "
                                         "shows noise patterns, not your prompt"})  # fmt: skip
            self._told_random = True
        progress("plan", {"text": plan.summary(), "notes": plan.notes, "job": job.label})
        with timer.stage("setup"):
            self._start_dit_engine(plan)
        progress("stage", {"name": "text", "device": plan.encoders["t5"].device})
        with timer.stage("text"):
            texts = self._encode_text(job, plan, lambda: self._prime_attention(plan, checked.task, batch))
        self._clean(cfg)
        clip = y = None
        if checked.task == "i2v":
            progress("stage", {"name": "image"})
            with timer.stage("image"):
                clip, y = self._encode_image(checked, plan)
            self._clean(cfg)
        self._release_encoders()
        progress("stage", {"name": "denoise", "steps": cfg.steps, "eta_after_s": self._last_decode_s})
        with timer.stage("denoise"):
            t = time.perf_counter()
            dit = self._take_dit()
            self.details["dit_engine_wait_s"] = round(time.perf_counter() - t, 3)
            latent = self._denoise(dit, plan, checked, cfg, texts, clip, y, seed, progress)
        del texts, clip, y
        if self.jobs == 1:
            self._close_dit()  # a single run gives the DiT's slots back to the VAE
        else:
            self._lend_slots_to_vae()
        rescue = latents_path(job.out)
        with timer.stage("save_latent"):
            save_latents(rescue, latent.cpu(), {"seed": str(seed), "prompt": job.prompt[:200]})
        progress("stage", {"name": "decode", "frames": cfg.frames})
        try:
            video = self._decode_and_write(latent, checked, cfg, job.out, timer, progress)
        except WanpackError as exc:
            raise type(exc)(f"{exc} (the final latent is saved in {rescue})") from None
        if cfg.save_latents:
            record.latents = str(rescue)
        else:
            with contextlib.suppress(OSError):
                rescue.unlink()
        self._last_decode_s = timer.seconds.get("decode", 0.0) + timer.seconds.get("write", 0.0)
        record.plan = plan.to_dict()
        record.encoder = video
        record.io = {"pack_bytes_read": self.reader.bytes_read - read_before,
                     "storage_bytes_read": _process_read_bytes() - io_before if io_before is not None else None,
                     "blocking_sync": self.blocking_sync}  # fmt: skip
        record.backends = self._backends()
        if self._warmup is not None:
            self.details["kernel_warmup"] = {"seconds": self._warmup.seconds, "steps": self._warmup.steps,
                                             "error": self._warmup.error}  # fmt: skip
            self.details["triton_preload"] = triton_preload_report()
        record.details = {**self.details, "process_age_at_end_s": process_age_s(), "thread_cpu_s": thread_cpu_seconds()}
        record.finish(timer)
        write_sidecar(sidecar_path(job.out), record)
        self.jobs_done += 1
        progress("done", {"record": record})
        return record

    # ------------------------------------------------------------------------------------------------ stages

    def _start_dit_engine(self, plan: RunPlan) -> None:
        """The DiT engine for this plan: kept from the last job when the plan is the same, else built on a thread
        while the encoders run (its resident weights load, its device slots are taken, and its cache reads are
        queued behind the encoders' at a lower priority, so step 1 mostly finds its blocks in RAM)."""
        key = repr(asdict(plan.dit_options))
        if self._dit_key == key and (self._dit is not None or self._dit_build is not None):
            if self._dit is not None:  # kept from the last job, whose final step read nothing ahead (limit_forwards)
                self._dit.prefetch_cache()
            return  # built (or being built) for this plan already
        self._close_dit()

        def build() -> StreamEngine:
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                engine = StreamEngine(PackComponent(self.pack, "dit", self.manifest), plan.dit_options, self.device,
                                      reader=self.reader)  # fmt: skip
                try:
                    engine.prefetch_cache()
                except BaseException:
                    engine.close()
                    raise
                return engine

        self._dit_key = key
        self._dit_build = self._builder.submit(build)

    def _take_dit(self) -> StreamEngine | None:
        """The DiT engine, once its build (if one is running) has finished; a failed build raises here."""
        if self._dit_build is not None:
            build, self._dit_build = self._dit_build, None
            try:
                self._dit = build.result()
            except BaseException:
                self._dit_key = None
                raise
        return self._dit

    def _close_dit(self) -> None:
        with contextlib.suppress(Exception):
            self._take_dit()
        if self._dit is not None:
            self._dit.close()
            self._dit = None
            self._dit_key = None
            self._free_cuda_memory()

    def _lend_slots_to_vae(self) -> None:
        """Engines kept for the next job give their GPU slots back during the decode (each takes them again at its
        next forward), so the VAE decodes in fewer, larger tiles than it could around them."""
        freed = sum(eng.release_device() for eng in [self._dit, *self._encoders.values()] if eng is not None)
        self.details["slots_lent_to_vae_bytes"] = freed
        if freed:
            self._free_cuda_memory()

    def _free_cuda_memory(self) -> None:
        """Hand memory the caching allocator holds but nothing uses back to the device."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _encoder_engine(self, name: str, plan: RunPlan) -> StreamEngine:
        ep = plan.encoders[name]
        options = plan.encoder_options(name)
        key = (ep.device, repr(asdict(options)))
        eng = self._encoders.get(name)
        if eng is not None and self._encoder_keys.get(name) == key:
            return eng
        if eng is not None:
            eng.close()
        skip = ("token_embedding.weight",) if name == "t5" else ()
        eng = StreamEngine(PackComponent(self.pack, name, self.manifest), options, torch.device(ep.device),
                           reader=self.reader, resident_skip=skip)  # fmt: skip
        self._encoders[name], self._encoder_keys[name] = eng, key
        return eng

    def _clean(self, cfg: RunConfig) -> None:
        """clean_cuda_cache (a LightX2V key): hand cached-but-free CUDA memory back between stages."""
        if cfg.clean_cuda_cache:
            self._free_cuda_memory()

    def _release_encoders(self) -> None:
        """Encoders whose blocks are not cached for the next job give their memory back before the DiT runs."""
        for name in list(self._encoders):
            eng = self._encoders[name]
            if self.jobs == 1 or not (eng.host.cache_plan or eng.maps is not None):
                self._encoders.pop(name).close()
                self._encoder_keys.pop(name, None)
        gc.collect()

    def _load_tokenizer(self) -> None:
        from wanpack.manifests.pack_files import open_pack_file
        from wanpack.runtime.models.tokenizer import T5Tokenizer, find_tokenizer_file
        from wanpack.runtime.stream.reader import name_thread

        name_thread("wanpack-tokens")
        try:
            folder = self.pack / "t5" / "tokenizer"
            # listed in the manifest or not, the file read must be a regular file inside the pack (no symlink out)
            os.close(open_pack_file(self.pack, find_tokenizer_file(folder).relative_to(self.pack))[0])
            self._tokenizer = T5Tokenizer(folder)
        except BaseException as exc:  # noqa: BLE001 - raised where the tokenizer is used
            self._tokenizer = exc

    def _tokens(self):
        self._tokenizer_thread.join()
        if isinstance(self._tokenizer, BaseException):
            raise self._tokenizer
        return self._tokenizer

    def _wait_warmup(self, stage: str) -> None:
        """The kernels of ``stage`` ready (see runtime/kernel_warmup.py); the wait is recorded."""
        if self._warmup is not None:
            self.details[f"kernel_warmup_wait_{stage}_s"] = round(self._warmup.wait(stage), 3)

    def _prime_attention(self, plan: RunPlan, task: str, batch: int) -> None:
        """The DiT's attention ready for its shapes (cuDNN's plans, or the sage kernel's tile choice), made on this
        thread while it waits for the text encoder's kernels (see kernel_warmup.prime_attention); once per set of
        shapes in a session, and only where its scratch fits the room the plan keeps for the encoder's work beside
        the slots."""
        if self.device.type != "cuda" or plan.dit is None:
            return
        cfg = config_from_dict(self.manifest.component("dit").config)
        context = (cfg.text_len, cfg.image_tokens) if task == "i2v" else (cfg.text_len,)
        shapes = [s for s in attention_shapes(plan.dit.tokens, plan.ffn_chunk, context) if (batch, s) not in self._primed]
        quantized = attn_backend(self.device).quantized
        if priming_bytes(shapes, batch, cfg.num_heads, cfg.head_dim, self.dtype, quantized) > ENCODER_WORKSPACE:
            return  # the text phase's room beside the slots would not hold it: step 1 plans these shapes itself
        if shapes:
            seconds = prime_attention(shapes, batch, cfg.num_heads, cfg.head_dim, self.dtype, self.device)
            self.details["attention_prime_s"] = round(sum(seconds.values()), 3)
            self.details["attention_prime_shapes_s"] = seconds
            self._primed.update((batch, s) for s in shapes)

    def _encode_text(self, job: Job, plan: RunPlan, while_waiting: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
        """T5 output for [prompt] (+ negative prompt with CFG), [L_i, 4096] each, on the session's device.

        Embeddings of prompts seen before in this session are reused (a CFG job's negative prompt always is)."""
        cfg = job.config
        prompts = [job.prompt] + ([cfg.negative_prompt] if cfg.cfg_active else [])
        todo = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if todo:
            from wanpack.runtime.pipeline import encode_text

            t0 = time.perf_counter()
            eng = self._encoder_engine("t5", plan)
            eng.prefetch_cache()  # its first reads start now, beside the work below
            t1 = time.perf_counter()
            tokenizer = self._tokens()
            t2 = time.perf_counter()
            while_waiting()
            self._wait_warmup("encoders")
            enc_dtype = self.dtype if plan.encoders["t5"].device == "cuda" else torch.float32
            t3 = time.perf_counter()
            for p, emb in zip(todo, encode_text(eng, tokenizer, todo, enc_dtype), strict=True):
                self._texts[p] = emb.to(self.device)
            self.details.update({"t5_engine_s": round(t1 - t0, 3), "tokenizer_wait_s": round(t2 - t1, 3),
                                 "t5_encode_s": round(time.perf_counter() - t2, 3), "prompts_encoded": len(todo),
                                 "t5_forward_s": round(time.perf_counter() - t3, 3),
                                 "t5_reads": {"wait_s": eng.read_wait_s[-1] if eng.read_wait_s else None,
                                              "span_s": eng.read_span_s(), "bytes": eng.bytes_requested}})  # fmt: skip
        out = []
        for p in prompts:
            self._texts.move_to_end(p)
            out.append(self._texts[p])
        while len(self._texts) > TEXT_CACHE:
            self._texts.popitem(last=False)
        return out

    def _encode_image(self, checked, plan: RunPlan) -> tuple[torch.Tensor, torch.Tensor]:
        from wanpack.runtime.pipeline import encode_image_clip, image_condition

        eng = self._encoder_engine("clip", plan)
        clip = encode_image_clip(eng, checked.image).to(self.device)
        weights, vae_cfg = self._vae_weights()
        y = image_condition(weights, vae_cfg, checked.image, checked, checked.config, self.device, self._vae_budget())
        return clip, y

    def _vae_weights(self) -> tuple[dict[str, torch.Tensor], VAEConfig]:
        if self._vae is None:
            comp = PackComponent(self.pack, "vae", self.manifest)
            cfg = config_from_dict(comp.entry.config)
            assert isinstance(cfg, VAEConfig)
            self._vae = (comp.load_resident(self.device), cfg)
        return self._vae

    def _vae_budget(self) -> float:
        """Working memory the VAE may use now: the free VRAM within the budget, or plenty on the CPU (256 MiB when
        tiling was asked for, so it happens)."""
        plan = self._plan
        if self.device.type != "cuda":
            return 256 * (1 << 20) if plan.explicit.get("vae_tiling") else float("inf")
        free = torch.cuda.mem_get_info(self.device)[0]
        if plan.vram_budget:
            free = min(free, plan.vram_budget - torch.cuda.memory_reserved(self.device))
        return max(free * 0.8, 64 * (1 << 20))

    def _denoise(self, dit: StreamEngine, plan: RunPlan, checked, cfg: RunConfig, texts, clip, y, seed: int,
                 progress: Progress) -> torch.Tensor:  # fmt: skip
        from wanpack.runtime.pipeline import sample

        self._wait_warmup("dit")
        marks = [time.perf_counter()]

        def report(event: str, info: dict) -> None:
            if event == "step":  # per-step wall time (one blocking wait per step: the GPU is idle a few us)
                wait_for_gpu(self.device)
                marks.append(time.perf_counter())
            progress(event, info)

        latent = sample(dit, checked, cfg, texts, clip, y, seed, self.device, self.dtype, plan.ffn_chunk, report)
        self.details["steps_s"] = [round(b - a, 3) for a, b in zip(marks, marks[1:], strict=False)]
        self.details["dit_stats"] = {k: v for k, v in dit.stats().items() if k not in ("direct_io", "cached_units")}
        return latent

    def _decode_and_write(self, latent: torch.Tensor, checked, cfg: RunConfig, out: Path, timer: StageTimer,
                          progress: Progress) -> dict:  # fmt: skip
        """Decode chunk by chunk; each chunk goes to the encoder thread as uint8 while the next one decodes.

        Timed as two stages: ``decode`` until the last frame is handed over, ``write`` for what finishing the file
        takes after that (the encoder has kept up meanwhile, so this is the container's index and a rename).
        """
        from wanpack.runtime.pipeline import decoded_chunks

        writer = None
        try:
            with timer.stage("decode"):
                t0 = time.perf_counter()
                vae = None if cfg.tiny_vae else self._vae_weights()
                self.details["vae_weights_s"] = round(time.perf_counter() - t0, 3)
                chunks, how = decoded_chunks(vae, latent, cfg, self.device, self._vae_budget())
                settings = BURST_ENCODER_SETTINGS if how["vae_tiles"] else ENCODER_SETTINGS  # all frames at once
                writer = VideoWriter(out, checked.width, checked.height, cfg.fps, settings)
                done = 0
                for chunk in chunks:
                    frames = to_uint8_frames(chunk).cpu()
                    writer.put(frames)
                    if not done:
                        self.details["vae_first_frames_s"] = round(time.perf_counter() - t0, 3)
                    done += frames.shape[0]
                    progress("frames", {"done": done, "total": cfg.frames, "elapsed_s": time.perf_counter() - t0})
            with timer.stage("write"):
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return {**writer.settings, "fps": cfg.fps, **how, "encode_s": round(writer.encode_s, 3),
                "after_last_frame_s": round(writer.tail_s, 3)}  # fmt: skip

    def _backends(self) -> dict:
        try:
            from wanpack.runtime.ops.report import backend_info

            return backend_info(self.device)
        except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
            return {"error": str(exc)}


def _process_read_bytes() -> int | None:
    """Bytes this process made the kernel fetch from storage (/proc/self/io read_bytes): page-cache hits excluded."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
