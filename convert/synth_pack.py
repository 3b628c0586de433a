"""Random weights straight into a pack, through the real converter, with no source files on disk.

Full-size benchmarks need a 14B pack, but its hub-layout source is 57 GB of fp32 (plus 11 GB of T5) - more than a
64 GB benchmark disk holds next to the pack. This source generates each tensor when the converter asks for it (the
same seeded values ``wanpack synth`` would write), so planning, quantization, alignment and the manifest are exactly
those of a conversion; only the reading is replaced.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wanpack.convert.converter import ConvertOptions, ConvertStats, plan_job, write_pack
from wanpack.convert.sources import SourceTensor
from wanpack.convert.synth import SOURCE_DTYPES, random_tensor
from wanpack.convert.synth_tokenizer import synth_tokenizer
from wanpack.manifests.arch import ArchConfig, component_tensors, dit_config, encoder_config
from wanpack.manifests.format import Manifest


@dataclass
class RandomSource:
    """A source whose tensors are generated on demand (seeded per name), in the architecture's key order."""

    cfg: ArchConfig
    seed: int
    dtype: torch.dtype
    kind: str = "synthetic"
    root: Path = Path("random")

    @property
    def files(self) -> list[Path]:
        return []

    @property
    def tensors(self) -> dict[str, SourceTensor]:
        size = torch.empty((), dtype=self.dtype).element_size()
        return {s.name: SourceTensor(s.name, self.dtype, s.shape, size * _numel(s.shape))
                for s in component_tensors(self.cfg)}  # fmt: skip

    def read_in_file_order(self, wanted: set[str], hashes: dict[str, str] | None,
                           on_bytes: Callable[[int], None] = lambda n: None,
                           pool: object = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        for spec in component_tensors(self.cfg):
            if spec.name in wanted:
                tensor = random_tensor(spec, self.seed, self.dtype)
                on_bytes(tensor.numel() * tensor.element_size())
                yield spec.name, tensor


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def synth_pack(out: str | os.PathLike, arch: str, *, layers: int | None = None, dim_scale: str = "full",
               components: tuple[str, ...] = ("dit",), options: ConvertOptions | None = None, seed: int = 0,
               progress: Callable[[int, int], None] | None = None) -> tuple[Manifest, ConvertStats]:  # fmt: skip
    """Convert random weights of ``arch`` (and the named encoders) into a pack at ``out``."""
    opts = options or ConvertOptions()
    dit_cfg = dit_config(arch, layers=layers, dim_scale=dim_scale)
    jobs = []
    with tempfile.TemporaryDirectory(prefix="wanpack-synth-tok-") as tok_dir:
        for kind in ("dit", "t5", "clip", "vae"):
            if kind not in components or (kind == "clip" and dit_cfg.model_type != "i2v"):
                continue
            cfg = dit_cfg if kind == "dit" else encoder_config(kind, dim_scale=dim_scale)
            dtype = torch.bfloat16 if kind == "dit" else SOURCE_DTYPES[kind]
            tokenizer = None
            if kind == "t5":
                synth_tokenizer(tok_dir, vocab_size=min(cfg.vocab, 984), max_length=cfg.text_len)
                tokenizer = Path(tok_dir)
            name = arch if kind == "dit" else cfg.name
            jobs.append(plan_job(kind, RandomSource(cfg, seed, dtype), cfg, name, (), opts, tokenizer_dir=tokenizer))
        return write_pack(jobs, out, ConvertOptions(**{**opts.__dict__, "hash_source": False}), Path("random"),
                          progress)  # fmt: skip
