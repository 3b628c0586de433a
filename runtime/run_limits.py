"""What a run may ask for, checked before any compute: the video size against the model's position range and against
the host memory the finished video needs.

Wan2.1 builds its rotary tables for 1024 positions per axis of the patch grid (latent frames, rows, columns), so the
original cannot make a larger video; we refuse it the same way instead of running out of memory half-way. The
decoded video may be held on the host whole before it is encoded (runtime/session.py decodes chunk by chunk, but a
tiled decode yields every frame at once and the encoder thread may fall behind): as float32 [3, F, H, W] on the CPU
path, as uint8 [F, H, W, 3] frames on a GPU. That must fit the RAM budget.
"""

from __future__ import annotations

from wanpack.errors import UsageError
from wanpack.runtime.stream.planner import BudgetError, GiB, MiB, available_ram

MAX_POSITIONS = 1024  # per axis of the patch grid, as Wan2.1's rope_params(1024, ...)
MIN_SIDE = 16  # pixels: one patch of one latent


def decoded_video_bytes(frames: int, height: int, width: int, on_gpu: bool = False) -> int:
    """Host bytes of the whole decoded clip: float32 on the CPU path, uint8 frames handed over from a GPU."""
    return 3 * frames * height * width * (1 if on_gpu else 4)


def check_video_size(frames: int, height: int, width: int, patch: tuple[int, int, int] = (1, 2, 2),
                     ram_budget_gib: float | None = None, on_gpu: bool = False) -> None:  # fmt: skip
    """Refuse a size the model cannot make or the host cannot hold; ``height``/``width`` are what will be made.

    Reads no GPU state (it runs before CUDA's settings are applied): the RAM default is what the machine has available.
    """
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
    ram = int(ram_budget_gib * GiB) if ram_budget_gib else available_ram()
    need = decoded_video_bytes(frames, height, width, on_gpu)
    if ram is not None and need > ram:
        raise BudgetError(f"{width}x{height}, {frames} frames needs {need / MiB:.0f} MiB of RAM for the decoded "
                          f"video but only {ram / MiB:.0f} MiB is available - lower the size or frames, or raise "
                          "--ram-budget")  # fmt: skip
