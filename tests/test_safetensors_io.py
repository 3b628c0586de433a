"""Our safetensors reader and writer: byte-exact layouts the official library reads, and hostile headers refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wanpack.convert.safetensors_io import PAD_PREFIX, PlannedTensor, ShardWriter, StHeader, plan_shard, read_tensor
from wanpack.errors import SourceError


def raw_file(path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def test_planned_shard_is_aligned_and_readable_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randint(-128, 127, (33, 17), generator=g, dtype=torch.int8),
        "a.weight_scale": torch.rand(33, 1, generator=g),
        "a.bias": torch.randn(33, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(5, 3, generator=g).to(torch.float8_e4m3fn),
        "c": torch.randn(7, generator=g, dtype=torch.float64),
    }
    groups = ["p1", "p1", "p1", "p2", "p3"]
    entries = [PlannedTensor(k, d, tuple(v.shape), group=gr) for (k, v), gr, d in
               zip(tensors.items(), groups, ["I8", "F32", "BF16", "F8_E4M3", "F64"], strict=True)]  # fmt: skip
    layout = plan_shard(entries, {"block": "3"})
    path = tmp_path / "s.safetensors"
    with ShardWriter(path, layout) as w:
        for k, v in tensors.items():
            w.write(k, v)
        w.close()
    raw = path.read_bytes()
    assert len(raw) == layout.file_size and len(raw) % 4096 == 0
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 4096 == 0
    assert [layout.groups[g][0] % 4096 for g in ("p1", "p2", "p3")] == [0, 0, 0]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["block"] == "3"
        keys = [k for k in f.keys() if not k.startswith(PAD_PREFIX)]
        assert sorted(keys) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), v.view(torch.uint8))
    for t in layout.real_tensors():
        assert t.offset % 64 == 0
        assert raw[t.offset : t.offset + t.length] == tensors[t.name].contiguous().view(torch.uint8).numpy().tobytes()


def test_reader_agrees_with_official_writer(tmp_path):
    tensors = {"x": torch.arange(12, dtype=torch.float32).reshape(3, 4), "y": torch.ones(5, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "o.safetensors")
    header = StHeader.read(tmp_path / "o.safetensors")
    import os

    fd = os.open(tmp_path / "o.safetensors", os.O_RDONLY)
    try:
        for k, v in tensors.items():
            assert torch.equal(read_tensor(fd, header.tensors[k]), v)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
         bytes(16), "does not follow"),  # a hole
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
         bytes(12), "does not follow"),  # overlap
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "does not match its shape"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "bad shape"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "truncated"),
        ({"a": "nonsense"}, b"", "malformed"),
    ],
    ids=["hole", "overlap", "length", "dtype", "negative", "truncated", "malformed"],
)  # fmt: skip
def test_hostile_headers_are_refused(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    raw_file(path, header, data)
    with pytest.raises(SourceError, match=message):
        StHeader.read(path)


def test_header_that_is_a_list_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    body = b"[1, 2]"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(SourceError, match="not a JSON object"):
        StHeader.read(path)
