"""The planner: from VRAM/RAM budgets and the video size, how to stream a pack (or refuse, saying what it needs).

Memory model (bytes; d = dim, f = ffn_dim, L = tokens, c = activation chunk in tokens, B = blocks, T = context tokens);
the activation terms mirror the accounting of runtime/models/dit.py (``activation_memory``):
  VRAM = non-block weights (resident) + K slots x largest unit + activations x (1 + FRAGMENTATION)
  activations = L*d*4 (fp32 residual) + 2*L*d*2 (self-attention K, V) + L*hd*4 (RoPE cos/sin)
              + c * max((6*4 + 4*2)*d, (3*4 + 2*2)*d + 2*2*f)  (one chunk's temporaries, self-attention or FFN)
              + B * 2*T*d*2  (cached cross-attention K/V of every block)
              + 2*L*d  (only where attention is quantized: the sage kernel's int8 K and fp8 V copies)
  RSS  = BASE_RSS + host ring (prefetch + 2 slots) x largest unit + host cache + non-block staging
Granularities are tried from the fastest to the leanest: ``model`` (everything resident, nothing moves), ``block`` with
3 then 2 slots, ``phase`` with 4, 3, 2 slots; for each, chunks from the whole sequence down to PREFERRED_CHUNK. The
first that fits wins; only when none does are chunks down to MIN_CHUNK tried, in the same order.
The host cache takes what RAM is left: every block (later steps never read the disk), an evenly spread fixed subset
(spreading keeps disk reads interleaved with cached blocks, so the disk works while cached blocks compute), or none.
The constants are estimates, checked against measured peaks by benchmarks/stream_bench.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field

from wanpack.errors import UsageError
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream.engine import StreamOptions

GiB = 1 << 30
MiB = 1 << 20
FRAGMENTATION = 0.10
BASE_RSS = int(1.0 * GiB)  # interpreter + torch + CUDA host-side state, measured order of magnitude
MIN_CHUNK = 1024
MAX_CHUNK = 8192  # longer chunks buy no speed, only memory
PREFERRED_CHUNK = 4096  # below this, GEMMs lose efficiency: try every granularity at >= this first
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}


class BudgetError(UsageError):
    """The budgets cannot hold even the leanest plan."""


@dataclass
class Plan:
    """Everything the runtime needs to stream, plus the prediction it was chosen by."""

    granularity: str
    device_slots: int
    prefetch: int
    host_slots: int
    cache_policy: str  # all | subset | none
    cache_units: list[int]
    disk_workers: int
    ffn_chunk: int  # tokens per FFN chunk
    rope_chunk: int  # tokens per RoPE / q-k-norm chunk
    tokens: int
    latent: tuple[int, int, int]  # latent frames, height, width
    unit_bytes: int
    non_block_bytes: int
    cache_bytes: int
    activation_bytes: int
    peak_vram: int
    peak_rss: int
    vram_budget: int
    ram_budget: int
    notes: list[str] = field(default_factory=list)

    def options(self, **overrides) -> StreamOptions:
        opts = StreamOptions(granularity=self.granularity, device_slots=self.device_slots, prefetch=self.prefetch,
                             host_slots=self.host_slots, cache_units=list(self.cache_units),
                             disk_workers=self.disk_workers)  # fmt: skip
        for k, v in overrides.items():
            setattr(opts, k, v)
        return opts

    def to_dict(self) -> dict:
        return asdict(self)


def parse_size(text: str | int) -> int:
    """'8GiB', '8G', '8GB' (all binary), '512MiB', '1.5T' or a plain byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise UsageError(f"cannot read size {text!r} - write it like 8GiB, 512MiB or 16G")
    power = " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * 1024**power)


def parse_resolution(text: str) -> tuple[int, int]:
    """'480p' -> (832, 480), '720p' -> (1280, 720), '832x480' -> (832, 480); sides must be multiples of 16."""
    key = text.strip().lower()
    if key in RESOLUTIONS:
        return RESOLUTIONS[key]
    m = re.fullmatch(r"(\d+)x(\d+)", key)
    if not m:
        raise UsageError(f"cannot read resolution {text!r} - use 480p, 720p or WxH like 832x480")
    w, h = int(m.group(1)), int(m.group(2))
    if w % 16 or h % 16 or w <= 0 or h <= 0:
        raise UsageError(f"resolution {w}x{h} is not a multiple of 16 on both sides - pick e.g. 832x480")
    return w, h


def latent_shape(width: int, height: int, frames: int) -> tuple[int, int, int]:
    if frames < 1 or (frames - 1) % 4:
        raise UsageError(f"--frames {frames} is not 4n+1 - use e.g. 81 or 33")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def activation_bytes(cfg: dict, tokens: int, chunk: int, blocks: int, quantized_attention: bool = False) -> int:
    """Peak activation bytes of a DiT forward (see the module docstring for the terms)."""
    d, f = int(cfg["dim"]), int(cfg["ffn_dim"])
    head_dim = d // int(cfg["num_heads"])
    context = int(cfg.get("text_len", 512)) + (int(cfg.get("image_tokens", 257)) if cfg.get("model_type") == "i2v" else 0)
    per_token = max((6 * 4 + 4 * 2) * d, (3 * 4 + 2 * 2) * d + 2 * 2 * f)
    full = tokens * d * 4 + 2 * tokens * d * 2 + tokens * head_dim * 4
    quantized_kv = 2 * tokens * d if quantized_attention else 0
    return full + min(chunk, tokens) * per_token + blocks * 2 * context * d * 2 + quantized_kv


def detect_budgets() -> tuple[int | None, int | None]:
    """(free VRAM on the current GPU or None, MemAvailable of this machine or None). Starts CUDA when there is a GPU."""
    vram = None
    try:
        import torch

        if torch.cuda.is_available():
            vram = int(torch.cuda.mem_get_info()[0])
    except Exception:  # noqa: BLE001 - no usable GPU means no VRAM default
        vram = None
    return vram, available_ram()


def available_ram() -> int | None:
    """MemAvailable of this machine in bytes, or None; touches no GPU (safe before CUDA's settings are applied)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def spread(n_total: int, n_pick: int) -> list[int]:
    """``n_pick`` indices of ``range(n_total)`` spread evenly (0, then every n_total/n_pick)."""
    if n_pick <= 0:
        return []
    if n_pick >= n_total:
        return list(range(n_total))
    return sorted({int(i * n_total / n_pick) for i in range(n_pick)})


def plan(pack: PackComponent, *, vram_budget: int, ram_budget: int, width: int, height: int, frames: int,
         granularity: str | None = None, disk_workers: int | None = None, cache: str = "auto",
         allow_model: bool = True, chunk: int | None = None, quantized_attention: bool = False) -> Plan:  # fmt: skip
    """Choose the fastest plan that fits both budgets, or raise BudgetError with the minimum needed.

    ``granularity`` pins the unit (else the fastest that fits; ``allow_model=False`` keeps the DiT streamed),
    ``chunk`` pins the activation chunk in tokens (else the largest that fits), ``quantized_attention`` counts the
    sage kernel's K/V copies.
    """
    cfg = pack.entry.config
    if cfg.get("kind") != "dit":
        raise UsageError(f"the planner models the DiT's activations, not {pack.name}'s - plan the dit component; "
                         "encoders stream with StreamOptions set directly")  # fmt: skip
    pt, ph, pw = cfg.get("patch_size", (1, 2, 2))
    lat = latent_shape(width, height, frames)
    tokens = math.ceil(lat[0] / pt) * (lat[1] // ph) * (lat[2] // pw)
    non_block = pack.non_block_bytes()
    n_blocks = pack.num_blocks
    sizes = {g: pack.max_unit_bytes(g) for g in ("block", "phase")}
    candidates = [("model", n_blocks), ("block", 3), ("block", 2), ("phase", 4), ("phase", 3), ("phase", 2)]
    if granularity is not None:
        candidates = [c for c in candidates if c[0] == granularity]
    elif not allow_model:
        candidates = [c for c in candidates if c[0] != "model"]
    chunks = sorted({min(tokens, MAX_CHUNK)} | {c for c in (4096, 2048, MIN_CHUNK) if c < tokens}, reverse=True)
    if chunk is not None:
        chunks = [min(chunk, tokens)]
    best = None
    first_floor = min(PREFERRED_CHUNK if chunk is None else chunk, tokens)
    for floor in (first_floor, MIN_CHUNK):  # first keep GEMMs efficient, then squeeze
        for gran, k in candidates:
            unit = sizes["block" if gran == "model" else gran]
            for chunk in (c for c in chunks if c >= floor):
                act = activation_bytes(cfg, tokens, chunk, n_blocks, quantized_attention)
                need = non_block + k * unit + int(act * (1 + FRAGMENTATION))
                if need <= vram_budget:
                    best = (gran, k, unit, chunk, act, need)
                    break
            if best:
                break
        if best:
            break
    if best is None:
        gran, k = candidates[-1]
        unit = sizes["block" if gran == "model" else gran]
        act = activation_bytes(cfg, tokens, min(MIN_CHUNK, *chunks), n_blocks, quantized_attention)
        need = non_block + k * unit + int(act * (1 + FRAGMENTATION))
        raise BudgetError(f"{width}x{height}x{frames} needs at least {need / GiB:.2f} GiB of VRAM ({gran} "
                          f"granularity, {k} slots, {min(MIN_CHUNK, tokens)}-token chunks) but the budget is "
                          f"{vram_budget / GiB:.2f} GiB - lower the resolution or frames, or free GPU memory")  # fmt: skip
    gran, k, unit, chunk, act, need = best
    prefetch = k - 1 if gran != "model" else 0
    host_slots = 1 if gran == "model" else prefetch + 2
    ring = host_slots * unit
    min_rss = BASE_RSS + ring + non_block
    if min_rss > ram_budget:
        raise BudgetError(f"streaming needs at least {min_rss / GiB:.2f} GiB of RAM (base {BASE_RSS / GiB:.1f} GiB "
                          f"+ {host_slots} host slots x {unit / MiB:.0f} MiB + non-block weights) but the budget "
                          f"is {ram_budget / GiB:.2f} GiB - raise --ram-budget or close other programs")  # fmt: skip
    units = pack.units(gran)
    policy, picked, notes = _cache(units, ram_budget - min_rss, gran, cache)
    cache_bytes = sum(units[i].length for i in picked)
    workers = disk_workers or (8 if unit >= 64 * MiB else 4)
    if policy == "subset":
        notes.append(f"host cache holds {len(picked)} of {len(units)} units (evenly spread); the rest stream from "
                     "disk every step")  # fmt: skip
    return Plan(gran, k, prefetch, host_slots, policy, picked, workers, chunk, chunk, tokens, lat, unit, non_block,
                cache_bytes, act, need, min_rss + cache_bytes, vram_budget, ram_budget, notes)  # fmt: skip


def _cache(units, room: int, gran: str, mode: str) -> tuple[str, list[int], list[str]]:
    if mode not in ("auto", "all", "none"):
        raise UsageError(f"unknown cache mode {mode!r} - choose auto, all or none")
    if gran == "model" or mode == "none":
        why = "weights live on the GPU" if gran == "model" else "host cache turned off"
        return "none", [], [f"no host cache: {why}"]
    total = sum(u.length for u in units)
    if total <= room:
        return "all", list(range(len(units))), ["every block stays in RAM after the first step; later steps never "
                                                "read the disk"]  # fmt: skip
    if mode == "all":
        raise BudgetError(f"caching every block needs {total / GiB:.2f} GiB more RAM but only {room / GiB:.2f} GiB "
                          "is left - raise --ram-budget or use --cache auto")  # fmt: skip
    unit = max(u.length for u in units)
    fit = room // unit if unit else 0
    if fit <= 0:
        return "none", [], ["no host cache: the RAM budget leaves no room; every step streams from disk"]
    return "subset", spread(len(units), int(fit)), []


def default_disk_workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))
