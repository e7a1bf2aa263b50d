"""Which frames VideoChat-Flash sees, and the prompt sentence that says so. Stdlib + numpy: ships flat on the Hub.

Every rule gives ``n`` indices, ``n`` a multiple of ``CLIP_FRAMES`` (4: the model encodes 4-frame clips), picked
from ``L`` frames by the middle rule: with ``k = min(n, L)``, index ``i < k`` is ``(e[i] + e[i+1] - 1) // 2``,
``e = int(linspace(0, L, k + 1))``; when ``n > L`` the last index is repeated up to ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CLIP_FRAMES", "FrameSampling", "round_down_to_clips", "round_up_to_clips", "time_message"]

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


def round_up_to_clips(n: int) -> int:
    """`n` frames rounded up to whole 4-frame clips (what the processor pads to)."""
    return -(-n // CLIP_FRAMES) * CLIP_FRAMES


def round_down_to_clips(n: int) -> int:
    """`n` frames rounded down to whole 4-frame clips, at least one clip."""
    return max(CLIP_FRAMES, n - n % CLIP_FRAMES)


def _middle_indices(total: int, n: int) -> list[int]:
    k = min(n, total)
    edges = np.linspace(0, total, k + 1).astype(int)
    idx = [int((edges[i] + edges[i + 1] - 1) // 2) for i in range(k)]
    return idx + [idx[-1]] * (n - k)


def _segment(start, end, longest: float) -> tuple[float, float]:
    """``[start, end]`` seconds clamped to ``[0, longest]`` (a missing end: ``longest``); ValueError when empty."""
    begin = max(0.0, float(start if start is not None else 0.0))
    stop = min(longest, float(end if end is not None else longest))
    if not stop > begin:
        raise ValueError(f"the segment start={start}, end={end} is empty (the video lasts {longest:.2f} s)")
    return begin, stop


def _count(total_frames: Any) -> int:
    total = as_int("total_frames", total_frames)
    if total <= 0:
        raise ValueError(f"total_frames must be > 0, got {total}")
    return total


@dataclass(frozen=True)
class FrameSampling:
    """Sampling options, checked (``ValueError``) and stored as plain ints / floats. At most one of ``num_frames``
    (exactly that many frames, rounded up to a multiple of 4) and ``fps`` (frames per second of video instead of 1)."""

    max_num_frames: int = 512  # the original default; a long video file still gets min_num_frames
    num_frames: int | None = None
    fps: float | None = None
    min_num_frames: int = 64  # fewest frames for a video file with at least that many frames
    frames_multiple: int = 8  # file frame counts come in groups of this many (a multiple of 4; 8 in chat())

    def __post_init__(self):
        if self.num_frames is not None and self.fps is not None:
            raise ValueError(f"give at most one of num_frames, fps (got num_frames={self.num_frames}, fps={self.fps})")
        for name, low in (("max_num_frames", 1), ("min_num_frames", 0), ("num_frames", 1)):
            value = getattr(self, name)
            if value is not None or name != "num_frames":  # only num_frames may be None
                value = as_int(name, value)
                if value < low:
                    raise ValueError(f"{name} must be >= {low}, got {name}={value}")
            object.__setattr__(self, name, value)  # frozen: store the checked, plain-Python values
        multiple = as_int("frames_multiple", self.frames_multiple)
        if multiple <= 0 or multiple % CLIP_FRAMES:
            raise ValueError(f"frames_multiple must be a positive multiple of {CLIP_FRAMES}, got {multiple}")
        fps = None if self.fps is None else positive_rate(self.fps)
        if fps is None and self.fps is not None:
            raise ValueError(f"fps (frames to sample per second of video) must be > 0, got fps={self.fps!r}")
        object.__setattr__(self, "frames_multiple", multiple)
        object.__setattr__(self, "fps", fps)

    @classmethod
    def training(cls, frames_upbound: int = 512, frames_lowbound: int = 64, local_num_frames: int = 4,
                 sample_type: str = "dynamic_fps1") -> FrameSampling:
        """The original fine-tuning path (``LazySupervisedDataset.process_video``): ``dynamic_fps1`` is the file rule
        with ``G = local_num_frames`` within ``[frames_lowbound, frames_upbound]``; ``middle`` is exactly
        ``frames_upbound`` frames."""
        if sample_type not in ("dynamic_fps1", "middle"):
            raise ValueError(f"sample_type must be 'dynamic_fps1' or 'middle', got {sample_type!r}")
        return cls(max_num_frames=frames_upbound, num_frames=frames_upbound if sample_type == "middle" else None,
                   min_num_frames=frames_lowbound, frames_multiple=local_num_frames)

    def file_indices(self, total_frames: int, video_fps: float) -> list[int]:
        """Indices to decode from a video file of ``L = total_frames`` frames at ``video_fps`` frames/s (the original
        chat() / lmms-eval rule), ``file_frame_count`` of them by the middle rule. A long video never gets fewer than
        64 frames; a 5-frame video gives ``[0, 1, 2, 3, 4, 4, 4, 4]``."""
        return _middle_indices(_count(total_frames), self.file_frame_count(total_frames, video_fps))

    def file_frame_count(self, total_frames: int, video_fps: float) -> int:
        """``n = G * max(1, floor(D * r / G))`` (``D = L / video_fps`` seconds, ``G = frames_multiple``, ``r = fps``
        or 1), then at most ``max_num_frames``, then at least ``min_num_frames`` if ``L >= min_num_frames``, else at
        least ``G * (L // G)``; then rounded down to a multiple of 4 (at least 4). ``num_frames``: that, rounded up."""
        total = _count(total_frames)
        rate = positive_rate(video_fps)
        if rate is None:
            raise ValueError(f"video_fps must be > 0, got {video_fps!r}")
        if self.num_frames is not None:
            return round_up_to_clips(self.num_frames)
        seconds = float(total) / rate * (self.fps if self.fps is not None else 1.0)
        g = self.frames_multiple
        n = min(g * max(int(seconds // g), 1), self.max_num_frames)
        floor = self.min_num_frames if total >= self.min_num_frames else g * (total // g)
        return round_down_to_clips(max(n, floor))

    def segment_indices(self, total_frames: int, video_fps: float, start: float | None = None,
                        end: float | None = None) -> tuple[list[int], float]:
        """``(indices, seconds)`` of the segment ``[start, end]`` seconds of a video file (the original readers' clip
        rule): start clamped at 0, end at the video's duration - 0.1 s; the file rule over the segment's
        ``int(seconds * fps)`` frames, offset by ``int(start * fps)``. Raises ValueError for an empty segment."""
        rate = positive_rate(video_fps)
        if rate is None:
            raise ValueError(f"video_fps must be > 0, got {video_fps!r}")
        begin, stop = _segment(start, end, _count(total_frames) / rate - 0.1)
        offset, length = int(begin * rate), int((stop - begin) * rate)
        if length < 1:
            raise ValueError(f"the segment start={start}, end={end} holds no frame of a {total_frames / rate:.2f} s video")
        return [offset + i for i in self.file_indices(length, rate)], stop - begin

    def folder_indices(self, num_images: int, start: float | None = None,
                       end: float | None = None) -> tuple[list[int], float]:
        """``(indices, seconds)`` for a folder of ``num_images`` frames, taken as 1 frame per second (the original's
        frame-folder reader). Whole: the file rule. A segment (clamped to ``[0, num_images]`` seconds): the file
        rule's count over its length, spread evenly over ``[max(1, round(start)), min(round(end), num_images - 1)]``
        (that reader's own rule, which skips image 0)."""
        total = _count(num_images)
        if start is None and end is None:
            return self.file_indices(total, 1.0), float(total)
        begin, stop = _segment(start, end, float(total))
        count = self.file_frame_count(max(1, int(stop - begin)), 1.0)
        first, last = max(1, round(begin)), min(round(stop), total - 1)
        step = (last - first) / max(count - 1, 1)
        return [first + int(np.round(step * i)) for i in range(count)], stop - begin

    def decoded_indices(self, total_frames: int, video_fps: float | None = None) -> list[int]:
        """Indices to take from ``T = total_frames`` frames in memory (a still image is ``T = 1``). By default every
        frame, ``n = T`` rounded up to a multiple of 4 (``T = 6``: ``[0, ..., 5, 5, 5]``); when that is more than
        ``max_num_frames``, max_num_frames rounded down to a multiple of 4 (at least 4). ``fps=r`` needs the frames'
        own rate ``video_fps = V``: ``n = floor(T / V * r)``, at most ``max_num_frames``, rounded down the same way.
        ``min_num_frames`` and ``frames_multiple`` do not apply."""
        total = _count(total_frames)
        if self.num_frames is not None:
            return _middle_indices(total, round_up_to_clips(self.num_frames))
        if self.fps is None:
            n = round_up_to_clips(total)
            return _middle_indices(total, n if n <= self.max_num_frames else round_down_to_clips(self.max_num_frames))
        rate = positive_rate(video_fps)
        if rate is None:
            raise ValueError(f"fps={self.fps} needs the frames' own rate: pass video_fps= (the metadata fps) "
                             f"for decoded frames, got video_fps={video_fps!r}")
        return _middle_indices(total, round_down_to_clips(min(int(total / rate * self.fps), self.max_num_frames)))


def time_message(duration: float, num_frames: int, frame_seconds: list[float] | None = None) -> str:
    """The original prompt sentence; with ``frame_seconds`` (each frame's time) the training "long" variant."""
    sampled = "from it" if frame_seconds is None else f"at {', '.join(str(round(t, 1)) for t in frame_seconds)} seconds"
    return f"\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled {sampled}. "
