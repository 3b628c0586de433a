"""The umt5 tokenizer: the hub's tokenizer.json read with the `tokenizers` library, with Wan's prompt cleaning.

Wan cleans every prompt (ftfy's mojibake repair, HTML entities unescaped twice, runs of whitespace collapsed), then
tokenizes to at most 512 tokens with the end-of-text token last, padded to 512. The padding and the end token are
applied here rather than left to the file's post-processor, so a tokenizer.json without one still gives T5's layout.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from wanpack.errors import PackFormatError, UsageError

TOKENIZER_FILE = "tokenizer.json"
HUB_SUBDIR = Path("google") / "umt5-xxl"  # where the Wan2.1 hub repos keep it
PAD_TOKEN, EOS_TOKEN = "<pad>", "</s>"
PADDING_MODES = ("max_length", "longest")
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's cleaning: ftfy.fix_text, html.unescape twice, strip, then every whitespace run becomes one space."""
    try:
        import ftfy
    except ImportError:
        raise UsageError("prompt cleaning needs the ftfy package - pip install 'wanpack[text]'") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class TokenBatch:
    """Token ids and attention mask of a batch of prompts, right-padded."""

    ids: torch.Tensor  # [B, L] int64
    mask: torch.Tensor  # [B, L] int64, 1 for real tokens (end token included), 0 for padding

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(1).tolist()


def find_tokenizer_file(root: str | os.PathLike) -> Path:
    """tokenizer.json in ``root`` itself or in the hub's ``root/google/umt5-xxl/``."""
    root = Path(root)
    for candidate in (root / TOKENIZER_FILE, root / HUB_SUBDIR / TOKENIZER_FILE):
        if candidate.is_file():
            return candidate
    raise PackFormatError(f"no {TOKENIZER_FILE} in {root} or {root / HUB_SUBDIR} - "
                          "copy the hub's google/umt5-xxl folder there (wanpack download fetches it)")  # fmt: skip


class T5Tokenizer:
    """Tokenize prompts for the umt5 encoder: clean, encode, truncate to max_length - 1, append </s>, pad."""

    def __init__(self, folder: str | os.PathLike, max_length: int = 512, padding: str = "max_length",
                 clean: bool = True):  # fmt: skip
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UsageError("the T5 tokenizer needs the tokenizers package - pip install 'wanpack[text]'") from None
        if max_length < 2:
            raise UsageError(f"max_length must be at least 2 (one token plus </s>), got {max_length}")
        if padding not in PADDING_MODES:
            raise UsageError(f"unknown padding {padding!r} - choose one of {', '.join(PADDING_MODES)}")
        path = find_tokenizer_file(folder)
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception for a malformed file
            raise PackFormatError(f"cannot read {path}: {err} - re-download the tokenizer files") from None
        self.pad_id = self._special_id(PAD_TOKEN, path)
        self.eos_id = self._special_id(EOS_TOKEN, path)
        self.max_length, self.padding, self.clean = max_length, padding, clean

    def _special_id(self, token: str, path: Path) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise PackFormatError(f"{path} has no {token} token - this is not a T5 tokenizer; use google/umt5-xxl's")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: str | Sequence[str]) -> TokenBatch:
        """One prompt or a list -> TokenBatch with ids/mask [B, max_length] (or [B, longest] with padding='longest')."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UsageError("prompts must be a non-empty list of strings - pass --prompt TEXT")
        texts = [clean_prompt(p) for p in prompts] if self.clean else list(prompts)
        encoded = self._tok.encode_batch(texts, add_special_tokens=False)
        rows = [enc.ids[: self.max_length - 1] + [self.eos_id] for enc in encoded]
        width = self.max_length if self.padding == "max_length" else max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return TokenBatch(ids=ids, mask=mask)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids back to text (special tokens dropped by default)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
