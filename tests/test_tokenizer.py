"""umt5 tokenizer: the synthetic tokenizer.json, our wrapper against transformers' AutoTokenizer (what Wan calls),
prompt cleaning, round trips and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from wanpack.convert.synth import TOKENIZER_DIR, synth_checkpoint
from wanpack.convert.synth_tokenizer import synth_tokenizer
from wanpack.errors import PackFormatError, UsageError
from wanpack.runtime.models.tokenizer import T5Tokenizer, clean_prompt, find_tokenizer_file

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "A cat walking on the beach at night, cinematic, high quality.",
    "zebra",
    "Two dogs & a horse; running through the snow (slow motion) 4K!",
    " ".join(["a red bird flying over the ocean"] * 120),  # 840 words: truncated to 511 tokens + </s>
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / TOKENIZER_DIR
    synth_tokenizer(folder, vocab_size=512)
    return folder


def test_synth_tokenizer_is_t5_shaped(tok_dir):
    """Exactly the tiny T5 vocabulary, with T5's special ids, and hub-like config files next to it."""
    tok = T5Tokenizer(tok_dir)
    assert tok.vocab_size == 512 and (tok.pad_id, tok.eos_id) == (0, 1)
    assert tok._tok.token_to_id("<unk>") == 2
    assert json.loads((tok_dir / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
    batch = tok(PROMPTS)
    assert int(batch.ids.max()) < 512 and int(batch.ids.min()) >= 0


def test_matches_transformers_autotokenizer(tok_dir):
    """Same ids and mask as AutoTokenizer with Wan's call (padding to 512, truncation, special tokens)."""
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    cleaned = [clean_prompt(p) for p in PROMPTS]
    ref = ref_tok(cleaned, padding="max_length", truncation=True, max_length=512, add_special_tokens=True,
                  return_tensors="pt")  # fmt: skip
    ours = T5Tokenizer(tok_dir)(PROMPTS)
    assert ours.ids.shape == (len(PROMPTS), 512)
    assert torch.equal(ours.ids, ref.input_ids)
    assert torch.equal(ours.mask, ref.attention_mask.long())
    assert ours.lengths[3] == 512 and int(ours.ids[3, -1]) == 1  # truncated, </s> kept last


def test_layout_eos_then_padding(tok_dir):
    batch = T5Tokenizer(tok_dir)(["a cat", "the sky at night"])
    for row, mask, n in zip(batch.ids, batch.mask, batch.lengths, strict=True):
        assert int(row[n - 1]) == 1 and (row[n:] == 0).all() and mask[:n].all() and not mask[n:].any()


def test_round_trip(tok_dir):
    """Printable ASCII text decodes back to its cleaned form; the word pieces make it short."""
    tok = T5Tokenizer(tok_dir)
    for prompt in PROMPTS[:3]:
        batch = tok(prompt)
        assert tok.decode(batch.ids[0, : batch.lengths[0]]) == clean_prompt(prompt)
    assert tok("a cat walking on the beach").lengths == [7]  # six word pieces + </s>


def test_longest_padding_and_max_length(tok_dir):
    long_batch = T5Tokenizer(tok_dir, padding="longest")(["a cat", "a cat walking on the beach"])
    assert long_batch.ids.shape == (2, 7)
    short = T5Tokenizer(tok_dir, max_length=4)(["a cat walking on the beach"])
    assert short.ids.tolist() == [short.ids[0, :3].tolist() + [1]] and short.lengths == [4]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("The Mona Lisa doesn\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2t have eyebrows.",
         "The Mona Lisa doesn't have eyebrows."),  # mojibake repaired by ftfy  # fmt: skip
        ("fish &amp;amp; chips &lt;3", "fish & chips <3"),  # HTML unescaped twice
        ("  a \t cat\n\n walking \u3000 ", "a cat walking"),  # whitespace runs (incl. ideographic space) -> one
        ("caf\u00e9 &#233;", "caf\u00e9 \u00e9"),
    ],
)
def test_cleaning(raw, clean):
    assert clean_prompt(raw) == clean


def test_cleaning_applies_before_tokenizing(tok_dir):
    tok = T5Tokenizer(tok_dir)
    assert torch.equal(tok("a   cat &amp;amp; dog").ids, tok("a cat & dog").ids)
    raw = T5Tokenizer(tok_dir, clean=False)("a cat &amp;amp; dog")
    assert not torch.equal(raw.ids, tok("a cat & dog").ids)


def test_found_from_source_root_and_pack_folder(tmp_path):
    """synth puts the tokenizer where the hub does; the wrapper finds it from the checkpoint root too."""
    written = synth_checkpoint(tmp_path, "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny", components=("t5",))
    assert tmp_path / TOKENIZER_DIR / "tokenizer.json" in written["tokenizer"]
    assert find_tokenizer_file(tmp_path) == tmp_path / TOKENIZER_DIR / "tokenizer.json"
    assert T5Tokenizer(tmp_path)("a cat").lengths == [3]


def test_bad_inputs(tok_dir, tmp_path):
    tok = T5Tokenizer(tok_dir)
    with pytest.raises(UsageError, match="non-empty list of strings"):
        tok([])
    with pytest.raises(UsageError, match="non-empty list of strings"):
        tok(["ok", 3])
    with pytest.raises(UsageError, match="max_length"):
        T5Tokenizer(tok_dir, max_length=1)
    with pytest.raises(UsageError, match="padding"):
        T5Tokenizer(tok_dir, padding="left")
    with pytest.raises(PackFormatError, match="no tokenizer.json"):
        T5Tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(PackFormatError, match="cannot read"):
        T5Tokenizer(tmp_path)


def test_tokenizer_without_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<pad>": 0, "hello": 1, "[UNK]": 2}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))  # fmt: skip
    with pytest.raises(PackFormatError, match="no </s> token"):
        T5Tokenizer(tmp_path)
