"""The manifest reader refuses every kind of tampering with a message naming the rule (docs/FORMAT.md, threat model)."""

from __future__ import annotations

import json

import pytest

from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.errors import PackFormatError
from wanpack.manifests.format import read_manifest


@pytest.fixture(scope="module")
def pack(tiny_t2v, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "pack"
    convert_checkpoint(tiny_t2v, out, ConvertOptions())
    return out


def tamper(pack, tmp_path, edit):
    data = json.loads((pack / "manifest.json").read_text())
    edit(data)
    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "manifest.json").write_text(json.dumps(data))
    return bad


def dit(data):
    return data["components"]["dit"]


CASES = [
    ("format", lambda d: d.update(format="gguf"), "not 'wanpack'"),
    ("version", lambda d: d.update(format_version=99), "version 99 is not supported"),
    ("traversal", lambda d: dit(d)["shards"][0].update(path="../../etc/passwd"), "leaves the pack directory"),
    ("absolute", lambda d: dit(d)["shards"][0].update(path="/etc/passwd"), "leaves the pack directory"),
    ("outside", lambda d: dit(d)["shards"][0]["tensors"][0].update(offset=10**9), "lies outside the file"),
    ("length", lambda d: dit(d)["shards"][0]["tensors"][0].update(length=3), "length != dtype x shape"),
    ("dtype", lambda d: dit(d)["shards"][0]["tensors"][0].update(dtype="Q4_K"), "unknown dtype"),
    ("unaligned", lambda d: dit(d)["blocks"][0]["phases"][1].update(offset=dit(d)["blocks"][0]["phases"][1]["offset"] + 64),
     "not aligned"),
    ("scheme", lambda d: dit(d)["quant"].update(scheme="int4"), "unknown quant scheme"),
    ("blocks", lambda d: dit(d)["blocks"].pop(0), "not numbered"),
    ("missing field", lambda d: dit(d).pop("shards"), "shards is missing"),
    ("duplicate", lambda d: dit(d)["shards"][1]["tensors"].append(dit(d)["shards"][0]["tensors"][0]), "appears twice"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "edit", "message"), CASES, ids=[c[0] for c in CASES])
def test_tampered_manifest_is_refused(pack, tmp_path, label, edit, message):
    with pytest.raises(PackFormatError, match=message):
        read_manifest(tamper(pack, tmp_path, edit))


def test_not_json_and_not_a_pack(tmp_path):
    with pytest.raises(PackFormatError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(PackFormatError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_good_manifest_round_trips(pack):
    m = read_manifest(pack)
    assert m.component("dit").num_blocks == 2
    with pytest.raises(PackFormatError, match="convert it with"):
        m.component("clip")


def test_format_doc_names_every_manifest_field():
    """docs/FORMAT.md and manifests/format.py cannot drift apart: every schema field is documented."""
    import dataclasses
    from pathlib import Path

    from wanpack.manifests import format as fmt

    doc = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    classes = (fmt.Manifest, fmt.SourceInfo, fmt.SourceFile, fmt.ComponentEntry, fmt.QuantInfo, fmt.ShardEntry,
               fmt.TensorEntry, fmt.BlockEntry, fmt.RangeEntry, fmt.PackFile)  # fmt: skip
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if f"`{f.name}`" not in doc and f"`{f.name}[]" not in doc and f"`{f.name}." not in doc]
    assert not missing, f"document these fields in docs/FORMAT.md: {missing}"
    assert f"MUST be `{fmt.FORMAT_VERSION}`" in doc and str(fmt.ALIGNMENT) in doc and str(fmt.TENSOR_ALIGNMENT) in doc
