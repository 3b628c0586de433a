"""wanpack: Wan2.1 checkpoints as quantized, block-streamable packs, and a small runtime that streams them."""

__version__ = "0.1.0"
