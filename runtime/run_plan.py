"""How one run uses the machine: the DiT's stream plan, each encoder's, and how the pack is read.

Presets and configs say what to make; this module decides how, from the VRAM and RAM budgets (default: what the
machine has free) and the settings someone set explicitly (which are honored, and recorded as such):

* DiT: the planner's fastest plan that fits (runtime/stream/planner.py): whole on the GPU when it fits, else streamed
  by block or phase with a host cache sized to what RAM is left after the encoders' rings.
* Encoders (T5, CLIP): on the GPU, streamed block by block beside the DiT's slots, unless the VRAM left cannot hold
  two of their blocks (then on the CPU) or someone asked otherwise. Their blocks stay in a pinned host cache when a
  session will run several jobs and RAM allows, so the second prompt's text costs a DMA, not a read.
* Reads: through the page cache (``cached``) when the budget holds our own memory plus every byte this run reads, so
  the next run reads RAM instead of the drive; O_DIRECT (``direct``) when it does not, so streaming a pack larger
  than RAM does not evict everything else and thrash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from wanpack.errors import UsageError
from wanpack.manifests.format import Manifest
from wanpack.manifests.run_config import RunConfig
from wanpack.runtime.ops.attention import may_quantize
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream.engine import StreamOptions
from wanpack.runtime.stream.planner import FRAGMENTATION, BudgetError, Plan, detect_budgets, plan

GiB = 1 << 30
MiB = 1 << 20
CONTEXT_RESERVE = 768 * MiB  # CUDA context, cuBLAS/cuDNN handles, kernel images: outside PyTorch's allocator
LATE_KERNELS_RESERVE = 256 * MiB  # without a budget the context already exists; kernels loaded later still take some
ENCODER_WORKSPACE = 1 * GiB  # encoder activations and kernel workspaces beside its slots (512 tokens: far less)
ENCODER_SLOTS = 3
DISK_WORKERS = 8  # 16 MiB chunks in flight per worker: enough to keep an NVMe drive or the page cache copy busy
ENCODER_PRIORITY = 0  # reads the encoders need now go before...
DIT_PRIORITY = 2  # ...the DiT's, whose cache prefetch (priority + 1) fills while the encoders run


@dataclass
class EncoderPlan:
    """Where one encoder runs and how its blocks move."""

    component: str
    device: str
    granularity: str  # block | model
    device_slots: int
    host_slots: int
    cache: str  # all | none: keep every block in pinned RAM for the next job
    unit_bytes: int
    block_bytes: int
    reason: str

    def options(self, direct_io: bool) -> StreamOptions:
        """Stream options; through the page cache the blocks are mapped (and stay mapped while the engine lives) and
        page-locked where they lie, so the copies to the GPU are asynchronous DMA at the link's rate.

        Blocks read once are page-locked too: on the H200 host (2026-12-01, benchmarks/page_probe.py) locking a fresh
        mapping of cached pages ran at 30-40 GB/s on a disk worker, while copies from pageable memory ran at 7-8 GB/s
        and held the main thread for their whole length (0.6 s of the T5's 4.6 GB per run).
        """
        n_blocks = max(1, self.block_bytes // max(self.unit_bytes, 1))
        streamed = self.granularity != "model"
        cached = self.cache == "all" and direct_io
        return StreamOptions(granularity=self.granularity, device_slots=self.device_slots if streamed else 1,
                             prefetch=self.device_slots - 1 if streamed else 0, host_slots=self.host_slots,
                             cache_units=list(range(n_blocks)) if cached else [], disk_workers=DISK_WORKERS,
                             direct_io=direct_io, mapped=not direct_io,
                             priority=ENCODER_PRIORITY)  # fmt: skip


@dataclass
class RunPlan:
    """Everything the session needs to place weights and move bytes, plus why (recorded in the sidecar)."""

    device: str
    read_mode: str  # cached | direct
    read_reason: str
    dit: Plan | None  # None on the CPU path
    dit_options: StreamOptions
    ffn_chunk: int
    encoders: dict[str, EncoderPlan]
    explicit: dict
    vram_budget: int | None
    ram_budget: int | None
    bytes_per_run: int
    notes: list[str] = field(default_factory=list)

    @property
    def direct_io(self) -> bool:
        return self.read_mode == "direct"

    def encoder_options(self, component: str) -> StreamOptions:
        return self.encoders[component].options(self.direct_io)

    def summary(self) -> str:
        """One line for the progress log."""
        d = self.dit_options
        dit = f"DiT {d.granularity}" + (f", {d.device_slots} slots" if d.granularity != "model" else "")
        if self.dit is not None:
            dit += f", host cache {self.dit.cache_policy}, {self.ffn_chunk}-token chunks"
        enc = ", ".join(f"{e.component} {e.device}/{e.granularity}" for e in self.encoders.values())
        return f"plan: {dit}; {enc}; reads {self.read_mode}"

    def to_dict(self) -> dict:
        dit = None
        if self.dit is not None:
            dit = {k: v for k, v in self.dit.to_dict().items() if k != "cache_units"}
            dit["cached_units"] = len(self.dit.cache_units)
        return {"device": self.device, "read_mode": self.read_mode, "read_reason": self.read_reason,
                "dit": dit or {"granularity": self.dit_options.granularity, "device_slots": self.dit_options.device_slots},
                "ffn_chunk": self.ffn_chunk, "encoders": {k: asdict(v) for k, v in self.encoders.items()},
                "explicit": self.explicit, "vram_budget": self.vram_budget, "ram_budget": self.ram_budget,
                "bytes_per_run": self.bytes_per_run, "notes": list(self.notes)}  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _encoder_components(manifest: Manifest, task: str) -> list[str]:
    return ["t5"] + (["clip"] if task == "i2v" and "clip" in manifest.components else [])


def plan_run(pack_root, manifest: Manifest, cfg: RunConfig, *, device: torch.device, width: int, height: int,
             task: str, batch: int, jobs: int = 1) -> RunPlan:  # fmt: skip
    """The whole run's plan; raises BudgetError (exit 2) when the budgets cannot hold it, before any weight is read."""
    explicit = cfg.explicit_offload()
    comps = {c: PackComponent(pack_root, c, manifest) for c in ["dit", *_encoder_components(manifest, task)]}
    read_bytes = sum(c.block_bytes() + c.non_block_bytes() for c in comps.values())
    if "vae" in manifest.components:
        read_bytes += sum(s.size for s in manifest.components["vae"].shards)
    if device.type != "cuda":
        return _cpu_plan(comps, cfg, explicit, read_bytes)
    free_vram, free_ram = detect_budgets()
    vram = usable_vram(cfg.vram_budget_gib, free_vram)
    ram = int(cfg.ram_budget_gib * GiB) if cfg.ram_budget_gib else (free_ram or 64 * GiB)
    encoder_ring = sum((ENCODER_SLOTS + 1) * c.max_unit_bytes("block") for n, c in comps.items() if n != "dit")
    granularity = explicit.get("offload_granularity")
    if explicit.get("cpu_offload") is False:
        granularity = "model"
    elif granularity == "model" and explicit.get("cpu_offload"):
        raise UsageError("cpu_offload is on but offload_granularity is 'model' (nothing streamed) - drop one of them")
    dit_plan = plan(comps["dit"], vram_budget=vram, ram_budget=ram - encoder_ring, width=width, height=height,
                    frames=cfg.frames, granularity=granularity, disk_workers=cfg.num_disk_workers or DISK_WORKERS,
                    cache="none" if explicit.get("lazy_load") else "auto",
                    allow_model=explicit.get("cpu_offload") is not True, chunk=cfg.chunk_tokens,
                    quantized_attention=may_quantize(device))  # fmt: skip
    notes = list(dit_plan.notes)
    dit_static = dit_plan.peak_vram - int(dit_plan.activation_bytes * (1 + FRAGMENTATION))  # weights and slots
    ram_left = ram - dit_plan.peak_rss - encoder_ring
    encoders = {n: _encoder_plan(n, comps[n], cfg, vram - dit_static, ram_left, jobs) for n in comps if n != "dit"}
    ram_left -= sum(e.block_bytes for e in encoders.values() if e.cache == "all")
    read_mode, reason = _read_mode(explicit, ram_left, read_bytes)
    direct = read_mode == "direct"
    options = dit_plan.options(direct_io=direct, mapped=not direct, priority=DIT_PRIORITY,
                               cache_units=dit_plan.cache_units if direct else [])  # fmt: skip
    return RunPlan("cuda", read_mode, reason, dit_plan, options, max(256, dit_plan.ffn_chunk // batch), encoders,
                   explicit, vram, ram, read_bytes, notes)  # fmt: skip


def usable_vram(budget_gib: float | None, free: int | None) -> int:
    """What PyTorch may allocate: a --vram-budget covers the whole process as nvidia-smi shows it, so the CUDA context
    and kernel images (CONTEXT_RESERVE) come off it; without one, the free memory less what kernels loaded later take.
    """
    if budget_gib:
        budget = int(budget_gib * GiB)
        if budget <= CONTEXT_RESERVE:
            raise BudgetError(f"--vram-budget {budget_gib:g} GiB does not even hold the CUDA context and kernels "
                              f"({_gib(CONTEXT_RESERVE)}) - give the GPU memory the whole process may use, e.g. 8")  # fmt: skip
        if free is not None and budget - CONTEXT_RESERVE > free:
            raise BudgetError(f"--vram-budget {budget_gib:g} GiB is more than this GPU has free ({_gib(free)} beside "
                              "our CUDA context) - lower it or free GPU memory")  # fmt: skip
        return budget - CONTEXT_RESERVE
    return max(0, (free or 0) - LATE_KERNELS_RESERVE)


def _read_mode(explicit: dict, ram_left: int, read_bytes: int) -> tuple[str, str]:
    if "read_mode" in explicit:
        return explicit["read_mode"], "set explicitly"
    if ram_left >= read_bytes:
        return "cached", (f"the RAM budget holds this run's {_gib(read_bytes)} of pack reads beside the process "
                          f"({_gib(ram_left)} to spare): the next run reads RAM")  # fmt: skip
    return "direct", (f"the RAM budget cannot also keep this run's {_gib(read_bytes)} of pack reads cached "
                      f"({_gib(max(ram_left, 0))} to spare): O_DIRECT, nothing else is evicted")  # fmt: skip


def _encoder_plan(name: str, comp: PackComponent, cfg: RunConfig, vram_left: int, ram_left: int,
                  jobs: int) -> EncoderPlan:  # fmt: skip
    unit = comp.max_unit_bytes("block")
    total = comp.block_bytes()
    offload = getattr(cfg, f"{name}_cpu_offload")
    cache = "all" if jobs > 1 and ram_left >= total else "none"
    if offload is False:  # asked to hold the whole encoder on the GPU
        if total + ENCODER_WORKSPACE > vram_left:
            raise BudgetError(f"{name}_cpu_offload false needs {_gib(total + ENCODER_WORKSPACE)} of VRAM beside the "
                              f"DiT, the budget leaves {_gib(vram_left)} - drop the setting or raise the budget")  # fmt: skip
        return EncoderPlan(name, "cuda", "model", comp.num_blocks, 2, "none", unit, total, "set explicitly")
    slots = next((k for k in (ENCODER_SLOTS, 2) if k * unit + ENCODER_WORKSPACE <= vram_left), 0)
    if slots == 0:
        return EncoderPlan(name, "cpu", "block", 2, 3, "none", unit, total,
                           f"{_gib(vram_left)} of VRAM left beside the DiT cannot hold two {name} blocks")  # fmt: skip
    why = "set explicitly" if offload else f"{slots} blocks of {unit / MiB:.0f} MiB beside the DiT's slots"
    return EncoderPlan(name, "cuda", "block", slots, slots + 1, cache, unit, total, why)


def _cpu_plan(comps: dict[str, PackComponent], cfg: RunConfig, explicit: dict, read_bytes: int) -> RunPlan:
    """No GPU: stream block by block through unpinned buffers (what CI runs; also `--device cpu`)."""
    gran = explicit.get("offload_granularity") or ("model" if explicit.get("cpu_offload") is False else "block")
    direct = explicit.get("read_mode") == "direct"
    options = StreamOptions(granularity=gran, device_slots=2, prefetch=1, direct_io=direct, mapped=not direct,
                            disk_workers=cfg.num_disk_workers or 4, priority=DIT_PRIORITY)  # fmt: skip
    encoders = {n: EncoderPlan(n, "cpu", "block", 2, 3, "none", c.max_unit_bytes("block"), c.block_bytes(), "no GPU")
                for n, c in comps.items() if n != "dit"}  # fmt: skip
    mode = explicit.get("read_mode", "cached")
    return RunPlan("cpu", mode, "set explicitly" if "read_mode" in explicit else "CPU run", None, options,
                   cfg.chunk_tokens or 4096, encoders, explicit, None, None, read_bytes)  # fmt: skip
