"""The embedded default model: a tiny random-weight Wan2.1 made on the fly, so `wanpack run` works out of the box.

It goes through the real path (synth in the hub layout -> convert int8 by block -> stream -> mp4); only the weights
are random, so the video shows noise patterns, and every output says so. The pack is cached between runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from wanpack import __version__

DEMO_ARCH = "wan2.1-t2v-1.3b"
DEMO_LAYERS = 4
DEMO_PROMPT = "a red fox running through fresh snow at dawn, cinematic"
DEMO_SETTINGS = {"height": 256, "width": 256, "frames": 17, "steps": 6, "seed": 42}


def cache_root() -> Path:
    base = os.environ.get("WANPACK_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "wanpack")
    return Path(base).expanduser()


def demo_pack(log=print) -> Path:
    """The cached demo pack, built on first use (a few seconds)."""
    from wanpack.convert.converter import ConvertOptions, convert_checkpoint
    from wanpack.convert.synth import synth_checkpoint

    root = cache_root() / f"demo-{__version__}"
    pack = root / "pack"
    if (pack / "manifest.json").is_file():
        return pack
    log(f"building the embedded demo model (tiny {DEMO_ARCH} layout, RANDOM weights) in {root}")
    source = root / "source"
    shutil.rmtree(source, ignore_errors=True)
    synth_checkpoint(source, DEMO_ARCH, layers=DEMO_LAYERS, dim_scale="tiny", components=("dit", "t5", "vae"))
    convert_checkpoint(source, pack, ConvertOptions(quant="int8", save_by_block=True, components=("all",), force=True))
    shutil.rmtree(source, ignore_errors=True)
    return pack
