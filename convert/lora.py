"""Merging LoRAs into DiT weights at conversion time (e.g. the public 4-step distill LoRAs).

W' = W + strength * (alpha / rank) * up @ down, in float32, before quantization. Accepted key styles, with or
without a ``diffusion_model.`` prefix: ``<target>.lora_up.weight`` / ``.lora_down.weight``, ``.lora_B.weight`` /
``.lora_A.weight``, optional ``<target>.alpha``; and full deltas ``<target>.diff`` (weights, norms) and
``<target>.diff_b`` (biases). Only headers are read up front; each LoRA tensor is read when its target comes by.
A LoRA file is not trusted: its dtypes and shapes are checked when it is opened (floating point, 2-D up/down pairs
of rank 1..min(out, in), one-element alphas), and every tensor read, and every merged result, must be finite; any
violation is one SourceError line, and the conversion leaves nothing behind.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack.convert.safetensors_io import StHeader, StTensorInfo, read_tensor
from wanpack.errors import SourceError, UsageError

_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"))
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass
class LoraTerm:
    """Everything one LoRA file contributes to one target tensor."""

    up: StTensorInfo | None = None
    down: StTensorInfo | None = None
    alpha: StTensorInfo | None = None
    diff: StTensorInfo | None = None


@dataclass
class Lora:
    path: Path
    strength: float
    header: StHeader
    terms: dict[str, LoraTerm] = field(default_factory=dict)  # target tensor name -> term

    @classmethod
    def open(cls, path: str | os.PathLike, strength: float) -> Lora:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"--lora {path}: file not found")
        if not math.isfinite(strength):
            raise UsageError(f"--lora-strength {strength} for {path} is not a finite number")
        header = StHeader.read(path)
        lora = cls(path, strength, header)
        for raw, info in header.tensors.items():
            name = raw
            for p in _PREFIXES:
                if name.startswith(p):
                    name = name[len(p) :]
                    break
            lora._add(name, info, raw)
        for target, term in lora.terms.items():
            lora._check_term(target, term)
        return lora

    def _check_term(self, target: str, term: LoraTerm) -> None:
        """Dtypes and shapes that the merge can use; the rest of the shape check needs the model (check_targets)."""
        if (term.up is None) != (term.down is None):
            raise SourceError(f"{self.path}: {target} has only one of its lora up/down pair - the LoRA is incomplete")
        for info in (term.up, term.down, term.alpha, term.diff):
            if info is not None and info.dtype not in _FLOAT_DTYPES:
                raise SourceError(f"{self.path}: {info.name} is {info.dtype}, not a float tensor - not a LoRA")
        if term.up is not None:
            if len(term.up.shape) != 2 or len(term.down.shape) != 2:
                raise SourceError(f"{self.path}: {target} lora up/down have shapes {list(term.up.shape)} and "
                                  f"{list(term.down.shape)}, expected two matrices")  # fmt: skip
            rank = term.down.shape[0]
            if not 1 <= rank <= min(term.up.shape[0], term.down.shape[1]) or term.up.shape[1] != rank:
                raise SourceError(f"{self.path}: {target} lora up/down shapes {list(term.up.shape)} x "
                                  f"{list(term.down.shape)} do not make a rank 1..min(out, in) product")  # fmt: skip
        if term.alpha is not None and math.prod(term.alpha.shape) != 1:
            raise SourceError(f"{self.path}: {term.alpha.name} has shape {list(term.alpha.shape)}, expected one value")

    def _add(self, name: str, info: StTensorInfo, raw: str) -> None:
        for up_sfx, down_sfx in _PAIRS:
            if name.endswith(up_sfx):
                self._term(name[: -len(up_sfx)] + ".weight").up = info
                return
            if name.endswith(down_sfx):
                self._term(name[: -len(down_sfx)] + ".weight").down = info
                return
        if name.endswith(".alpha"):
            self._term(name[: -len(".alpha")] + ".weight").alpha = info
        elif name.endswith(".diff_b"):
            self._term(name[: -len(".diff_b")] + ".bias").diff = info
        elif name.endswith(".diff"):
            self._term(name[: -len(".diff")] + ".weight").diff = info
        else:
            raise SourceError(f"{self.path}: key {raw!r} is not a LoRA key wanpack understands "
                              "(lora_up/lora_down, lora_A/lora_B, alpha, diff, diff_b)")  # fmt: skip

    def _term(self, target: str) -> LoraTerm:
        return self.terms.setdefault(target, LoraTerm())

    def check_targets(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Fail before any work if a LoRA names a tensor the model lacks or has a mismatched shape."""
        for target, term in self.terms.items():
            if target not in shapes:
                raise SourceError(f"{self.path}: LoRA targets {target}, which this model does not have - "
                                  "is it a LoRA for another Wan2.1 variant?")  # fmt: skip
            shape = shapes[target]
            if term.up is not None:
                out_f, in_f = term.up.shape[0], term.down.shape[1]
                if len(shape) != 2 or (out_f, in_f) != tuple(shape):
                    raise SourceError(f"{self.path}: LoRA for {target} has shapes {term.up.shape} x {term.down.shape}"
                                      f", the model weight is {tuple(shape)}")  # fmt: skip
            if term.diff is not None and tuple(term.diff.shape) != tuple(shape):
                raise SourceError(f"{self.path}: diff for {target} has shape {term.diff.shape}, expected {shape}")

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return the merged tensor (float32) if this LoRA touches ``name``, else the input unchanged."""
        term = self.terms.get(name)
        if term is None:
            return tensor
        merged = tensor.to(torch.float32, copy=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if term.up is not None:
                up, down = self._read(fd, term.up), self._read(fd, term.down)
                rank = down.shape[0]
                alpha = float(self._read(fd, term.alpha).reshape(-1)[0]) if term.alpha else rank
                merged.addmm_(up, down, alpha=self.strength * alpha / rank)
            if term.diff is not None:
                merged.add_(self._read(fd, term.diff), alpha=self.strength)
        finally:
            os.close(fd)
        if not torch.isfinite(merged).all():
            raise SourceError(f"{self.path}: merging into {name} gives NaN or infinite values - the LoRA's weights "
                              "are far too large (or --lora-strength is); check the file")  # fmt: skip
        return merged

    def _read(self, fd: int, info: StTensorInfo) -> torch.Tensor:
        """One LoRA tensor as float32, refused if it holds NaN or infinity."""
        tensor = read_tensor(fd, info, self.path).float()
        if not torch.isfinite(tensor).all():
            raise SourceError(f"{self.path}: {info.name} holds NaN or infinite values - the LoRA is corrupt; "
                              "download it again")  # fmt: skip
        return tensor
