"""Shared fixtures: small synthetic checkpoints made once per session (tests never touch the network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wanpack.convert.synth import synth_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_t2v(tmp_path_factory) -> Path:
    """Tiny T2V-14B-layout checkpoint, 2 blocks, DiT in 2 shards + index, with T5 and VAE."""
    out = tmp_path_factory.mktemp("tiny_t2v")
    synth_checkpoint(out, "wan2.1-t2v-14b", layers=2, dim_scale="tiny", shards=2, components=("dit", "t5", "vae"))
    return out


@pytest.fixture(scope="session")
def tiny_i2v(tmp_path_factory) -> Path:
    """Tiny I2V-14B-layout checkpoint, 2 blocks, single DiT file, with every encoder."""
    out = tmp_path_factory.mktemp("tiny_i2v")
    synth_checkpoint(out, "wan2.1-i2v-14b", layers=2, dim_scale="tiny", components=("dit", "t5", "clip", "vae"))
    return out


@pytest.fixture(scope="session")
def demo_pack_dir(tmp_path_factory) -> Path:
    """The embedded demo pack (tiny random-weight T2V, int8, with T5 and VAE), built once into a private cache."""
    import os

    from wanpack.demo import demo_pack

    old = os.environ.get("WANPACK_CACHE")
    os.environ["WANPACK_CACHE"] = str(tmp_path_factory.mktemp("demo") / "cache")
    try:
        return demo_pack(log=lambda message: None)
    finally:
        if old is None:
            del os.environ["WANPACK_CACHE"]
        else:
            os.environ["WANPACK_CACHE"] = old
