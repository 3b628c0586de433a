"""What a run may ask for, checked before any compute: the video size against the model's position range and against
the host memory the finished video needs.

Wan2.1 builds its rotary tables for 1024 positions per axis of the patch grid (latent frames, rows, columns), so the
original cannot make a larger video; we refuse it the same way instead of running out of memory half-way. The
decoded video is held on the host as float32 [3, F, H, W] before it is encoded, so it must fit the RAM budget.
"""

from __future__ import annotations

from wanpack.errors import UsageError
from wanpack.runtime.stream.planner import BudgetError, GiB, MiB, detect_budgets

MAX_POSITIONS = 1024  # per axis of the patch grid, as Wan2.1's rope_params(1024, ...)
MIN_SIDE = 16  # pixels: one patch of one latent


def decoded_video_bytes(frames: int, height: int, width: int) -> int:
    """Host bytes of the decoded clip: float32 [3, F, H, W] (the VAE's output, kept until the mp4 is written)."""
    return 3 * frames * height * width * 4


def check_video_size(frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2),
                     ram_budget_gib: float | None = None) -> None:  # fmt: skip
    """Refuse a size the model cannot make or the host cannot hold; ``height``/``width`` are what will be made."""
    if height < MIN_SIDE or width < MIN_SIDE:
        raise UsageError(f"the video would be {width}x{height} px, smaller than one {MIN_SIDE}x{MIN_SIDE} patch - "
                         "use a larger --height/--width, or an image closer to that aspect")  # fmt: skip
    pt, ph, pw = patch
    grid = {"latent frames": ((frames - 1) // 4 + 1) // pt, "patch rows": height // 8 // ph,
            "patch columns": width // 8 // pw}  # fmt: skip
    for axis, n in grid.items():
        if n > MAX_POSITIONS:
            raise UsageError(f"{width}x{height}, {frames} frames needs {n} {axis}, but Wan2.1 has positions for "
                             f"{MAX_POSITIONS} - at most {MAX_POSITIONS * 16} px a side and {4 * MAX_POSITIONS - 3} "
                             "frames")  # fmt: skip
    ram = int(ram_budget_gib * GiB) if ram_budget_gib else detect_budgets()[1]
    need = decoded_video_bytes(frames, height, width)
    if ram is not None and need > ram:
        raise BudgetError(f"{width}x{height}, {frames} frames needs {need / MiB:.0f} MiB of RAM for the decoded "
                          f"video but only {ram / MiB:.0f} MiB is available - lower the size or frames, or raise "
                          "--ram-budget")  # fmt: skip
