"""A hostile pack gets a clean refusal, never a hang, a crash or a read outside the pack (docs/FORMAT.md, threat model).

In the spirit of safetensors' own adversarial tests: a table of manifest mutations, each refused by the reader with a
PackFormatError naming the rule; a table of file mutations (FIFOs, symlinks out of the pack, /dev/zero, wrong sizes),
each refused by the runtime or `wanpack run` with one line and exit 1; and a property-based fuzz over manifest fields
asserting that the reader only ever returns a manifest or raises PackFormatError.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.errors import PackFormatError
from wanpack.manifests.format import manifest_from_dict, read_manifest
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream.engine import StreamEngine, StreamOptions

pytestmark = pytest.mark.timeout(120)  # a FIFO that blocks a read would hang: fail instead


@pytest.fixture(scope="module")
def pack(tiny_t2v, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adversarial") / "pack"
    convert_checkpoint(tiny_t2v, out, ConvertOptions(components=("all",)))
    return out


@pytest.fixture(scope="module")
def good(pack) -> dict:
    return json.loads((pack / "manifest.json").read_text())


@pytest.fixture
def copy_of(pack, tmp_path):
    """A private copy of the pack to mutate."""
    dest = tmp_path / "pack"
    shutil.copytree(pack, dest)
    return dest


# --------------------------------------------------------------------------------------------- manifest mutations


def dit(d):
    return d["components"]["dit"]


def tensor(d, shard=0, i=0):
    return dit(d)["shards"][shard]["tensors"][i]


def config(d):
    return dit(d)["config"]


def _overlap(d):
    a, b = tensor(d, 0, 0), tensor(d, 0, 1)
    b["offset"] = a["offset"]


def _same_range_for_two_blocks(d):
    b0, b1 = dit(d)["blocks"][0], dit(d)["blocks"][1]
    b1.update(shard=b0["shard"], offset=b0["offset"], length=b0["length"], phases=copy.deepcopy(b0["phases"]))


def _retype_quantized(d):
    t = next(t for t in dit(d)["shards"][0]["tensors"] if t["quantized"])
    t["dtype"] = "U8"  # same size as I8, so only the architecture check can see it


MUTATIONS = [
    ("num_heads 0 (ZeroDivision)", lambda d: config(d).update(num_heads=0), "num_heads"),
    ("num_heads does not divide dim", lambda d: config(d).update(num_heads=3), "num_heads must divide dim"),
    ("text_len 1e10 (2.5 TB)", lambda d: config(d).update(text_len=1e10), "text_len"),
    ("text_len 10**10 as an int", lambda d: config(d).update(text_len=10**10), "text_len"),
    ("negative dim", lambda d: config(d).update(dim=-64), "dim"),
    ("eps NaN", lambda d: config(d).update(eps=math.nan), "eps"),
    ("patch_size of two", lambda d: config(d).update(patch_size=[1, 2]), "patch_size"),
    ("config not an object", lambda d: dit(d).update(config=[1, 2]), "config is not an object"),
    ("config unknown field", lambda d: config(d).update(exec="rm -rf /"), "unknown fields"),
    ("config of another kind", lambda d: config(d).update(kind="vae"), "bad config"),
    ("config widths disagree with tensors", lambda d: config(d).update(ffn_dim=256), "shape/block/phase"),
    ("num_layers disagrees with blocks", lambda d: config(d).update(num_layers=3), "is missing"),
    ("shard sha256 climbs out", lambda d: dit(d)["shards"][0].update(sha256="../../../VICTIM"), "64 lowercase hex"),
    ("shard sha256 upper case", lambda d: dit(d)["shards"][0].update(sha256="A" * 64), "64 lowercase hex"),
    ("shard size negative", lambda d: dit(d)["shards"][0].update(size=-1), "size is not an integer"),
    ("shard listed twice", lambda d: dit(d)["shards"].append(copy.deepcopy(dit(d)["shards"][0])), "twice"),
    ("offset negative", lambda d: tensor(d).update(offset=-4096), "offset is not an integer"),
    ("offset a float", lambda d: tensor(d).update(offset=float(tensor(d)["offset"])), "offset is not an integer"),
    ("offset a bool", lambda d: tensor(d).update(offset=True), "offset is not an integer"),
    ("offset inside the header", lambda d: tensor(d).update(offset=0), "outside the file"),
    ("length 2**60", lambda d: tensor(d).update(length=2**60), "length is not an integer"),
    ("length 2**40", lambda d: tensor(d).update(length=2**40), "length != dtype x shape"),
    ("shape with a negative dim", lambda d: tensor(d).update(shape=[-1, 64]), "a dimension is not an integer"),
    ("shape of 9 dims", lambda d: tensor(d).update(shape=[1] * 9), "more than 8 dimensions"),
    ("tensors overlap", _overlap, "overlaps"),
    ("blocks overlap", _same_range_for_two_blocks, "overlaps"),
    ("tensor in another block's shard", lambda d: tensor(d).update(block=1), "shard of block 1"),
    ("tensor in the wrong phase", lambda d: tensor(d).update(phase="ffn"), "outside its phase"),
    ("tensor renamed", lambda d: tensor(d).update(name="blocks.0.evil.weight"), "not part of"),
    ("name forging a second line", lambda d: tensor(d).update(name="blocks.0.x\nerror: forged"), "not part of"),
    ("config name forging a second line", lambda d: config(d).update(name="x\n" + "y" * 300), "config field name"),
    ("quantized weight retyped", _retype_quantized, "weight with its scale"),
    ("weight dtype does not fit the scheme", lambda d: dit(d)["quant"].update(weight_dtype="BF16"), "does not fit"),
    ("qmax infinite", lambda d: dit(d)["quant"].update(qmax=math.inf), "qmax"),
    ("unknown component", lambda d: d["components"].update(unet=copy.deepcopy(dit(d)) | {"name": "unet"}), "unknown component"),
    ("components a list", lambda d: d.update(components=[]), "components is not an object"),
    ("version true", lambda d: d.update(format_version=True), "not supported"),
    ("created_by a number", lambda d: d.update(created_by=7), "created_by"),
    ("source file size a string", lambda d: d["source"]["files"][0].update(size="big"), "source file size"),
    ("extra file climbs out", lambda d: d["components"]["t5"]["files"][0].update(path="../../etc/passwd"), "leaves the pack"),
    ("extra file without hash", lambda d: d["components"]["t5"]["files"][0].pop("sha256"), "sha256 is missing"),
    ("extra file as a bare path in version 2", lambda d: d["components"]["t5"]["files"].append("t5/x"), "not an object"),
    ("block numbered from 1", lambda d: dit(d)["blocks"][0].update(index=5), "not numbered"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "edit", "message"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_manifest_mutation_is_refused(good, label, edit, message):
    data = copy.deepcopy(good)
    edit(data)
    with pytest.raises(PackFormatError, match=message) as info:
        manifest_from_dict(json.loads(json.dumps(data)))  # through JSON, as read from disk
    assert "\n" not in str(info.value)


def test_good_manifest_passes_and_version_1_still_reads(good):
    manifest_from_dict(copy.deepcopy(good))
    old = copy.deepcopy(good)
    old["format_version"] = 1
    old["components"]["t5"]["files"] = [f["path"] for f in good["components"]["t5"]["files"]]
    t5 = manifest_from_dict(old).components["t5"]
    assert [(f.size, f.sha256) for f in t5.files] == [(None, None)] * len(t5.files)


@pytest.mark.parametrize(("label", "content", "message"), [
    ("nested 100000 deep", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ("not UTF-8", b'{"format": "\xff"}', "not valid JSON"),
    ("a JSON string", b'"wanpack"', "not a JSON object"),
])  # fmt: skip
def test_unparseable_manifest_is_one_line(tmp_path, label, content, message):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(PackFormatError, match=message) as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_manifest_that_is_a_fifo_or_points_outside_is_refused(tmp_path, pack):
    os.mkfifo(tmp_path / "manifest.json")
    with pytest.raises(PackFormatError, match="not a regular file"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").symlink_to(pack / "manifest.json")  # a valid manifest, but not this pack's
    with pytest.raises(PackFormatError, match="outside the pack"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------------------------- file mutations


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _link_to(target: str | Path):
    def edit(path: Path) -> None:
        path.unlink()
        path.symlink_to(target)

    return edit


def _outside_copy(path: Path) -> None:
    """The right bytes, but from outside the pack."""
    outside = path.parents[3] / f"outside-{path.name}"
    shutil.copyfile(path, outside)
    _link_to(outside)(path)


def _grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)


FILE_MUTATIONS = [
    ("non-block shard is a FIFO", "dit/non_block.safetensors", _fifo, "not a regular file"),
    ("block shard is a FIFO", "dit/block_1.safetensors", _fifo, "not a regular file"),
    ("non-block shard links to /dev/zero", "dit/non_block.safetensors", _link_to("/dev/zero"), "outside the pack"),
    ("non-block shard links to a library", "dit/non_block.safetensors", _link_to(shutil.__file__), "outside the pack"),
    ("block shard is a copy outside the pack", "dit/block_0.safetensors", _outside_copy, "outside the pack"),
    ("non-block shard grew", "dit/non_block.safetensors", _grow, "manifest says"),
    ("non-block shard truncated", "dit/non_block.safetensors", lambda p: os.truncate(p, 4096), "manifest says"),
    ("block shard is a folder", "dit/block_0.safetensors", lambda p: (p.unlink(), p.mkdir()), "not a regular file"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "rel", "edit", "message"), FILE_MUTATIONS, ids=[m[0] for m in FILE_MUTATIONS])
def test_hostile_shard_is_refused_by_the_runtime(copy_of, label, rel, edit, message):
    edit(copy_of / rel)
    with pytest.raises(PackFormatError, match=message), StreamEngine(PackComponent(copy_of), StreamOptions()) as eng:
        for _ in eng.forward():
            pass


@pytest.mark.parametrize(("label", "rel", "edit", "message"), [
    ("FIFO shard (hung `run` before)", "t5/block_0.safetensors", _fifo, "not a regular file"),
    ("VAE shard linked to /dev/zero", "vae/non_block.safetensors", _link_to("/dev/zero"), "outside the pack"),
    ("edited tokenizer", "t5/tokenizer/tokenizer.json", _grow, "manifest says"),
    ("tokenizer is a FIFO", "t5/tokenizer/tokenizer.json", _fifo, "not a regular file"),
])  # fmt: skip
def test_wanpack_run_refuses_hostile_files_with_one_line(copy_of, tmp_path, label, rel, edit, message):
    edit(copy_of / rel)
    result = CliRunner().invoke(app, ["run", "--pack", str(copy_of), "--prompt", "x", "--frames", "5", "--height", "32",
                                      "--width", "32", "--steps", "1", "--out", str(tmp_path / "v.mp4")])  # fmt: skip
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error:") and message in lines[-1], result.output
    assert not (tmp_path / "v.mp4").exists()


# --------------------------------------------------------------------------------------------- property-based fuzz


def _paths(node, prefix=()) -> list[tuple]:
    """Every key/index path into a JSON document (containers and leaves)."""
    out = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out += _paths(v, (*prefix, k))
    return out


_EDGE_INTS = [-1, 0, 1, 7, 63, 64, 4095, 4096, 2**31, 2**53, 2**63, 2**64, 10**30, -(2**63)]
_LEAVES = (st.none() | st.booleans() | st.sampled_from(_EDGE_INTS) | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["../../etc/passwd", "/etc/passwd", "a" * 64, "A" * 64, "I8", "BF16", "self_attn", "a\nb"]))
_VALUES = st.recursive(_LEAVES, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                       max_size=3), max_leaves=6)  # fmt: skip


def _apply(data, path: tuple, value, delete: bool) -> None:
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value


@pytest.fixture(scope="module")
def fuzz_paths(good) -> tuple[list[tuple], ...]:
    """All paths; the paths outside the (many) tensor entries; the config fields, so each kind gets its share."""
    everything = _paths(good)
    focused = [p for p in everything if "tensors" not in p or p[-2:-1] == ("tensors",) or len(p) <= 6]
    configs = [p for p in everything if "config" in p]
    return everything, focused, configs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_fuzzed_manifest_gives_a_manifest_or_pack_format_error(good, fuzz_paths, data):
    everything, focused, configs = fuzz_paths
    manifest = copy.deepcopy(good)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(configs) | st.sampled_from(focused) | st.sampled_from(everything), label="path")
        value, delete = data.draw(_VALUES, label="value"), data.draw(st.booleans(), label="delete")
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier mutation replaced a container here
            _apply(manifest, path, value, delete)
    try:
        manifest_from_dict(manifest)
    except PackFormatError as exc:
        assert "\n" not in str(exc)
