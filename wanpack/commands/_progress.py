"""Progress of `wanpack run` (and serve's log): one plain line per event on stderr, with an ETA for the whole video.

Lines, never a live display: on a terminal they are coloured, piped they are plain text that a log keeps intact.
Every phase says when it starts and how long the last one took; denoising steps and decoded frames say how fast they go
and how long the rest of the video should take (denoise ETA + the decode time measured for the last video, once
known).
"""

from __future__ import annotations

import time

from wanpack.output import err


class RunReporter:
    """Callable ``(event, info)`` the session reports to: plan, stage, step, frames, done, note, warning (printed even
    when quiet: --json output still says the weights are random)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.stage: str | None = None
        self.stage_started = time.perf_counter()
        self.last_step = self.stage_started
        self.last_bytes = 0
        self.step_times: list[float] = []
        self.decode_estimate: float | None = None  # the last video's decode + write time

    def _say(self, text: str) -> None:
        if not self.quiet:
            err.print(text, soft_wrap=True, highlight=False, markup=False)

    def job(self, index: int, total: int, label: str) -> None:
        self._say(f"job {index}/{total}: {label}")

    def __call__(self, event: str, info: dict) -> None:
        now = time.perf_counter()
        if event == "warning":
            err.print(info["text"], style="yellow", soft_wrap=True, highlight=False, markup=False)
        elif event == "plan":
            self._say(info["text"])
            for note in info.get("notes", []):
                self._say(f"  {note}")
        elif event == "note":
            self._say(f"  {info['text']}")
        elif event == "stage":
            self._end_stage(now)
            self.stage, self.stage_started, self.last_step = info["name"], now, now
            extra = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("name", "eta_after_s") and v is not None)
            self._say(info["name"] + (f" ({extra})" if extra else ""))
            if info["name"] == "denoise":
                self.step_times, self.last_bytes = [], 0
                if info.get("eta_after_s"):
                    self.decode_estimate = info["eta_after_s"]
        elif event == "step":
            self._step(info, now)
        elif event == "frames":
            done, total, elapsed = info["done"], info["total"], info["elapsed_s"]
            eta = elapsed / done * (total - done) if done else 0.0
            self._say(f"  decoded {done}/{total} frames, {elapsed:.1f} s, ETA {eta:.1f} s")
        elif event == "done":
            self._end_stage(now)
            self.stage = None

    def _step(self, info: dict, now: float) -> None:
        stats = info["stats"]
        moved = stats.get("h2d_bytes", 0) or stats.get("disk_bytes", 0)
        dt = max(now - self.last_step, 1e-9)
        self.step_times.append(dt)
        rate = (moved - self.last_bytes) / dt / 1e9
        left = info["steps"] - info["step"]
        eta = sum(self.step_times) / len(self.step_times) * left
        tail = f" + decode ~{self.decode_estimate:.1f} s" if self.decode_estimate else " + decode"
        self._say(f"  step {info['step']}/{info['steps']}: {dt:.2f} s, streamed {rate:.2f} GB/s{_vram()}; "
                  f"ETA {eta:.1f} s{tail}")  # fmt: skip
        self.last_step, self.last_bytes = now, moved

    def _end_stage(self, now: float) -> None:
        if self.stage is not None:
            took = now - self.stage_started
            self._say(f"  {self.stage} took {took:.2f} s")
            if self.stage == "decode":
                self.decode_estimate = took


def _vram() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return f", VRAM {torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved"
