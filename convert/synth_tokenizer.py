"""A tiny but real umt5-style tokenizer.json for synthetic checkpoints (tests and the demo never download one).

It is built with the `tokenizers` library the way the hub's google/umt5-xxl file is laid out: a Unigram model over
"▁"-prefixed pieces, NFKC normalization with space runs collapsed, a Metaspace pre-tokenizer and decoder, and a post
processor that appends </s>. Special ids match T5: <pad> 0, </s> 1, <unk> 2. The vocabulary has exactly
``vocab_size`` pieces for the tiny T5 (512, its embedding rows) and is capped at the ~900 pieces it knows for the real
width (256384), so every id it emits is valid for the encoder. Any printable ASCII text round-trips through it; other
characters become <unk>.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from wanpack.errors import UsageError

SPECIALS = ("<pad>", "</s>", "<unk>")
SPACE = "\u2581"  # sentencepiece's word-start marker
# Words common in video prompts: whole-word pieces make tokenization of test prompts realistic (few pieces per word).
_WORD_TEXT = (
    "a an the of in on at to and with from by is are for over under through into near its his her their this that "
    "cat dog bird horse fish man woman child people car boat train city street forest river sea ocean beach mountain "
    "sky cloud clouds sun moon night day light water fire snow rain wind tree trees flower flowers grass field road "
    "walking running flying jumping swimming dancing sitting standing looking playing eating smiling "
    "red blue green yellow white black orange purple golden bright dark small big large old young slow fast "
    "camera shot close view scene video style cinematic realistic detailed high quality motion background "
    "wearing holding riding walks runs flies looks"
)
_WORDS = tuple(_WORD_TEXT.split())


def _pieces(vocab_size: int) -> list[tuple[str, float]]:
    """The first ``vocab_size`` (piece, log-prob score) pairs of: specials, characters, words, letter pairs."""
    chars = [c for c in string.printable if c not in string.whitespace]
    candidates = [(s, 0.0) for s in SPECIALS] + [(SPACE, -6.0)]
    candidates += [(c, -9.0) for c in chars]  # any ASCII text can be spelled out
    candidates += [(SPACE + c, -8.0) for c in chars]
    candidates += [(SPACE + w, -4.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    candidates += [(a + b, -7.0) for a in string.ascii_lowercase for b in string.ascii_lowercase]
    pieces: list[tuple[str, float]] = []
    seen: set[str] = set()
    for piece, score in candidates:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))
    return pieces[:vocab_size]


def build_tokenizer(vocab_size: int):
    """A `tokenizers.Tokenizer` laid out like umt5's, over a ``vocab_size``-piece Unigram vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    min_size = len(SPECIALS) + 1 + 2 * sum(c not in string.whitespace for c in string.printable)
    if vocab_size < min_size:
        raise UsageError(f"a synthetic tokenizer needs vocab_size >= {min_size}, got {vocab_size}")
    tok = Tokenizer(models.Unigram(_pieces(vocab_size), unk_id=SPECIALS.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", SPECIALS.index("</s>"))]
    )
    tok.add_special_tokens(list(SPECIALS))
    return tok


def synth_tokenizer(folder: str | os.PathLike, vocab_size: int = 512, max_length: int = 512) -> list[Path]:
    """Write tokenizer.json (+ the small configs the hub folder carries) into ``folder``; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_path = folder / "tokenizer.json"
    build_tokenizer(vocab_size).save(str(tok_path))
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": max_length, **specials}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [tok_path, folder / "special_tokens_map.json", folder / "tokenizer_config.json"]
