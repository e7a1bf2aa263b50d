"""Which frames VideoChat-Flash sees, and the prompt sentence that says so. Stdlib + numpy: ships flat on the Hub.

Every rule gives ``n`` indices, ``n`` a multiple of ``CLIP_FRAMES`` (4: the model encodes 4-frame clips), picked
from ``L`` frames by the middle rule: with ``k = min(n, L)``, index ``i < k`` is ``(e[i] + e[i+1] - 1) // 2``,
``e = int(linspace(0, L, k + 1))``; when ``n > L`` the last index is repeated up to ``n``.

* Video files, :meth:`FrameSampling.file_indices` (the original chat() / lmms-eval rule): ``L`` frames at ``F``
  frames/s last ``D = L / F`` s. ``n = G * max(1, floor(D * r / G))`` (``G = frames_multiple``, ``r = fps`` or 1),
  then ``min(n, max_num_frames)``, then at least ``min_num_frames`` if ``L >= min_num_frames``, else at least
  ``G * (L // G)``; then rounded down to a multiple of 4 (at least 4). A long video never gets fewer than 64 frames;
  a 5-frame video gives ``[0, 1, 2, 3, 4, 4, 4, 4]``. ``num_frames=N``: ``n`` = N rounded up to a multiple of 4.
* Training, :meth:`FrameSampling.training`: ``dynamic_fps1`` is the file rule with ``G = local_num_frames`` (4)
  within ``[frames_lowbound, frames_upbound]``; ``middle`` is exactly ``frames_upbound`` frames.
* Decoded frames, :meth:`FrameSampling.decoded_indices` (``T`` frames in memory; a still image is ``T = 1``):
  by default every frame as given, ``n = T`` rounded up to a multiple of 4 (``T = 6`` gives ``[0, ..., 5, 5, 5]``,
  a still image ``[0, 0, 0, 0]``); when that is more than ``max_num_frames``, ``n`` = max_num_frames rounded down
  to a multiple of 4 (at least 4). ``num_frames=N``: as for files. ``fps=r`` needs the frames' own rate ``V``:
  ``n = floor(T / V * r)``, at most ``max_num_frames``, rounded down to a multiple of 4 (at least 4).
  ``min_num_frames`` and ``frames_multiple`` do not apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CLIP_FRAMES", "FrameSampling", "time_message"]

CLIP_FRAMES = 4  # frames per clip the model encodes together


def as_int(name: str, value: Any) -> int:
    """``value`` as an int (numpy integers too; bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def positive_rate(value: Any) -> float | None:
    """``value`` as a finite rate > 0, or None (missing, zero, negative, NaN, not a number)."""
    try:
        value = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _round_up(n: int) -> int:
    return -(-n // CLIP_FRAMES) * CLIP_FRAMES


def _round_down(n: int) -> int:
    return max(CLIP_FRAMES, n - n % CLIP_FRAMES)


def _middle_indices(total: int, n: int) -> list[int]:
    k = min(n, total)
    edges = np.linspace(0, total, k + 1).astype(int)
    idx = [int((edges[i] + edges[i + 1] - 1) // 2) for i in range(k)]
    return idx + [idx[-1]] * (n - k)


def _count(total_frames: Any) -> int:
    total = as_int("total_frames", total_frames)
    if total <= 0:
        raise ValueError(f"total_frames must be > 0, got {total}")
    return total


@dataclass(frozen=True)
class FrameSampling:
    """Sampling options; the rules are in the module docstring.

    Args:
        max_num_frames: most frames (the original default 512); a long video still gets ``min_num_frames``.
        num_frames: exactly this many frames instead (rounded up to a multiple of 4).
        fps: frames per second of video instead of 1 (clamped and rounded the same way). At most one of
            ``num_frames`` / ``fps``.
        min_num_frames: fewest frames for a video file with at least that many frames (64).
        frames_multiple: file frame counts come in groups of this many (8 in the original chat(); a multiple of 4).
    """

    max_num_frames: int = 512
    num_frames: int | None = None
    fps: float | None = None
    min_num_frames: int = 64
    frames_multiple: int = 8

    def __post_init__(self):
        max_num_frames = as_int("max_num_frames", self.max_num_frames)
        if max_num_frames <= 0:
            raise ValueError(f"max_num_frames must be > 0, got max_num_frames={max_num_frames}")
        min_num_frames = as_int("min_num_frames", self.min_num_frames)
        if min_num_frames < 0:
            raise ValueError(f"min_num_frames must be >= 0, got min_num_frames={min_num_frames}")
        multiple = as_int("frames_multiple", self.frames_multiple)
        if multiple <= 0 or multiple % CLIP_FRAMES:
            raise ValueError(f"frames_multiple must be a positive multiple of {CLIP_FRAMES}, got {multiple}")
        num_frames, fps = self.num_frames, self.fps
        if num_frames is not None and fps is not None:
            raise ValueError(f"give at most one of num_frames and fps (got num_frames={num_frames}, fps={fps})")
        if num_frames is not None:
            num_frames = as_int("num_frames", num_frames)
            if num_frames <= 0:
                raise ValueError(f"num_frames must be > 0, got num_frames={num_frames}")
        if fps is not None:
            fps = positive_rate(fps)
            if fps is None:
                raise ValueError(f"fps (frames to sample per second of video) must be > 0, got fps={self.fps!r}")
        for name, value in (("max_num_frames", max_num_frames), ("min_num_frames", min_num_frames),
                            ("frames_multiple", multiple), ("num_frames", num_frames), ("fps", fps)):
            object.__setattr__(self, name, value)  # frozen: store the checked, plain-Python values

    @classmethod
    def training(cls, frames_upbound: int = 512, frames_lowbound: int = 64, local_num_frames: int = 4,
                 sample_type: str = "dynamic_fps1") -> FrameSampling:
        """The original fine-tuning path (``LazySupervisedDataset.process_video``)."""
        if sample_type not in ("dynamic_fps1", "middle"):
            raise ValueError(f"sample_type must be 'dynamic_fps1' or 'middle', got {sample_type!r}")
        return cls(max_num_frames=frames_upbound, num_frames=frames_upbound if sample_type == "middle" else None,
                   min_num_frames=frames_lowbound, frames_multiple=local_num_frames)

    def file_indices(self, total_frames: int, video_fps: float) -> list[int]:
        """Indices to decode from a ``total_frames``-frame video file at ``video_fps`` frames/s."""
        total = _count(total_frames)
        rate = positive_rate(video_fps)
        if rate is None:
            raise ValueError(f"video_fps must be > 0, got {video_fps!r}")
        if self.num_frames is not None:
            return _middle_indices(total, _round_up(self.num_frames))
        seconds = float(total) / rate * (self.fps if self.fps is not None else 1.0)
        g = self.frames_multiple
        n = min(g * max(int(seconds // g), 1), self.max_num_frames)
        floor = self.min_num_frames if total >= self.min_num_frames else g * (total // g)
        return _middle_indices(total, _round_down(max(n, floor)))

    def decoded_indices(self, total_frames: int, video_fps: float | None = None) -> list[int]:
        """Indices to take from ``total_frames`` frames already in memory (their rate ``video_fps``, if known)."""
        total = _count(total_frames)
        if self.num_frames is not None:
            return _middle_indices(total, _round_up(self.num_frames))
        if self.fps is None:
            n = _round_up(total)
            return _middle_indices(total, n if n <= self.max_num_frames else _round_down(self.max_num_frames))
        rate = positive_rate(video_fps)
        if rate is None:
            raise ValueError(f"fps={self.fps} needs the frames' own rate: pass video_fps= (the metadata fps) "
                             f"for decoded frames, got video_fps={video_fps!r}")
        return _middle_indices(total, _round_down(min(int(total / rate * self.fps), self.max_num_frames)))


def time_message(duration: float, num_frames: int, frame_seconds: list[float] | None = None) -> str:
    """The original prompt sentence about the video; with ``frame_seconds`` (each frame's time) the training "long"
    variant that lists them."""
    if frame_seconds is None:
        return f"\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled from it. "
    at = ", ".join(str(round(t, 1)) for t in frame_seconds)
    return (f"\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled "
            f"at {at} seconds. ")
