"""Video loading for VideoChat-Flash: frame sampling, decoding and per-frame resizing.

This module is self-contained (stdlib, numpy, Pillow; PyAV and decord are optional) so that it can ship
flat next to the remote-code files of a Hub repository. Its entry point is :func:`load_video`;
:func:`iter_video_chunks` gives the same frames chunk by chunk (``(metadata, iterator of (n, H, W, 3) uint8
chunks)``), decoding each chunk's frames only when it is asked for, so memory does not grow with the frame count.

Sampling (identical to the original ``chat()`` / lmms-eval path, ``sample='dynamic_fps1'``)
--------------------------------------------------------------------------------------------
With ``L`` decodable frames at an average rate of ``F`` frames/s, the video lasts ``D = L / F`` seconds.

* ``n = G * floor(D * r / G)`` with ``G = frames_multiple`` (8, the original's ``local_num_frames``) and
  ``r = fps`` (sampling rate, default 1 frame per second); ``n = G`` if that is 0.
* ``n = min(n, max_num_frames)``, then ``n = max(n, floor)`` where ``floor = min_num_frames`` (64) if
  ``L >= min_num_frames`` else ``G * (L // G)``. So a long video never gets fewer than 64 frames, even when
  ``max_num_frames`` is smaller, and a video shorter than 64 frames gets ``G * (L // G)`` frames.
* ``n`` is then rounded DOWN to a multiple of 4 (never below 4): the model encodes 4-frame clips. This only
  changes anything when ``max_num_frames`` / ``min_num_frames`` are not multiples of 4.
* Frame ``i`` of ``k = min(n, L)`` is the middle of segment ``i``: ``(e[i] + e[i+1] - 1) // 2`` with
  ``e = int(linspace(0, L, k + 1))``. When ``n > L`` the list is padded with the last index, e.g. a
  5-frame video gives ``[0, 1, 2, 3, 4, 4, 4, 4]`` and a 1-, 2- or 3-frame video gives 8 frames
  (``[0]*8``, ``[0, 1, 1, 1, 1, 1, 1, 1]``, ``[0, 1, 2, 2, 2, 2, 2, 2]``).
* ``num_frames=N`` replaces all of the above by exactly ``N`` frames (rounded UP to a multiple of 4;
  ``min_num_frames`` / ``max_num_frames`` are then ignored), sampled and padded the same way.

The fine-tuning path (``LazySupervisedDataset.process_video`` with ``dynamic_fps1``: 4-frame groups, 64..512
frames) is :func:`sample_frame_indices_training`.

Other inputs
------------
* A still image (a path ending in .png/.jpg/.jpeg/.bmp/.webp/.tif/.tiff, a ``PIL.Image.Image`` or one
  ``(H, W, 3)`` uint8 array) is a 1-frame video at 1 fps sampled in 4-frame groups: 4 copies of the image
  (one clip), ``duration`` 1.0 s.
* Already-decoded frames (a list of PIL images or ``(H, W, 3)`` arrays, a ``(T, H, W, 3)`` or
  ``(T, 3, H, W)`` uint8 numpy array or torch tensor) are sampled like a video at ``video_fps`` frames/s
  (default 1.0: T < 64 frames give ``8 * (T // 8)`` of them, e.g. all of 16, 32 or 64 frames; 100 give 96).
  ``metadata.backend`` is ``"frames"``.

Frame rate
----------
``fps`` in the metadata is the stream's average frame rate (what decord's ``get_avg_fps`` returns). When it is
missing, zero or not finite: PyAV's guessed rate, then frame count / stream duration, then 1.0.

Decoding backends (``backend=None`` picks PyAV, then decord)
-----------------------------------------------------------
* ``"pyav"`` (default when installed). The file is first indexed by demuxing its packets (no decoding; about
  0.1 s for a 10-minute 1 Mbps video): this gives the exact frame count and each frame's timestamp and
  keyframe. For each wanted frame, decoding starts at the last keyframe at or before it; overlapping spans are
  merged and H.264 non-reference frames that are not wanted are not decoded at all. Whether the gaps
  between spans are crossed by seeking or by reading through follows the rule ``seek if N * GOP / 2 <
  total_frames else sequential`` (N distinct wanted frames, GOP the mean keyframe interval). Independent
  spans are shared among up to ``num_threads`` decoder threads (each with its own container), and every frame
  is converted to RGB and resized as soon as it is decoded, straight into the preallocated output, so memory
  never holds more than a few full-resolution frames. Frames are matched to indices by timestamp; files
  without unique timestamps are decoded straight through and matched by counting.
* ``"decord"`` (decord 0.6.0, the original's reader). Used only when PyAV is missing or failed on a file
  that PyAV's probe found readable. decord can crash or hang on broken input, and it silently returns wrong
  frames for repeated timestamps, open GOPs, HEVC, MPEG-4 part 2 with B frames and H.264 in AVI / MPEG-TS
  (checked frame by frame against PyAV). So when PyAV is installed every file is probed with it first and
  decord only reads files that pass: readable, unique timestamps, not truncated, mp4/mov/mkv/webm, H.264
  (closed GOP) / VP8 / VP9 / intra-only codecs, and the same frame count. Without PyAV, decord reads
  everything unchecked, as in the original. Frames are fetched in chunks (16 frames, at most 16 MB) and
  resized chunk by chunk.
* A forced backend (``"pyav"`` / ``"decord"``) never falls back: its failures are ``ValueError`` (``ImportError``
  when it is not installed). With ``backend=None``, a PyAV failure on a file its probe could read is retried with
  decord (with a ``UserWarning``) when decord is allowed on that file.

Both backends return identical frames for 8-bit video (checked on the golden files and the formats above); 10-bit
video converts slightly differently (FFmpeg 4.1 inside decord vs FFmpeg 8 inside PyAV: mean difference ~2 levels,
up to ~40 at sharp chroma edges). Display-matrix rotation is not applied (the original did not either).

Bad input
---------
Missing path: ``FileNotFoundError``. A directory, a non-regular file, an empty file, a file with no
decodable video stream (random bytes, audio only, moov atom missing, ...): ``ValueError`` naming the file and
the reason. A truncated file whose header is intact is loaded from its readable frames (``total_frames`` is
the readable count) with a ``UserWarning``. ``max_num_frames <= 0``: ``ValueError``.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

try:  # PyAV: optional (remote-code loading refuses unguarded optional imports)
    import av
except ImportError:  # pragma: no cover - exercised only without PyAV
    av = None

try:  # decord 0.6.0: optional. Never decord2, which returns wrong frames after seeks.
    import decord
except ImportError:  # pragma: no cover - exercised only without decord
    decord = None

__all__ = [
    "IMAGE_EXTENSIONS",
    "VideoLoadMetadata",
    "VideoReadError",
    "available_backends",
    "iter_video_chunks",
    "load_video",
    "resize_frame",
    "sample_frame_indices",
    "sample_frame_indices_training",
    "time_message",
]

DEFAULT_MAX_NUM_FRAMES = 512
DEFAULT_MIN_NUM_FRAMES = 64
DEFAULT_FRAMES_MULTIPLE = 8  # the original chat() path's local_num_frames
CLIP_FRAMES = 4  # frames per clip the model encodes together; every result is a multiple of this
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
BACKENDS = ("pyav", "decord")

_OPEN_TIMEOUT_S = 20.0  # PyAV interrupt timeouts (opening, and each blocking read)
_READ_TIMEOUT_S = 20.0
_DECORD_CHUNK = 16  # frames per decord get_batch call ...
_DECORD_CHUNK_BYTES = 16 << 20  # ... and at most this many bytes of full-resolution frames (decord pools batch buffers)
_SEEK_MIN_GAP = 16  # in seek mode, gaps of at most this many packets are read through instead
# where decord 0.6.0 was verified frame-exact (see _Probe.decord_problem)
_DECORD_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
_DECORD_CODECS = ("h264", "vp8", "vp9", "mjpeg", "ffv1", "png", "rawvideo")


# ------------------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------------------
@dataclass
class VideoLoadMetadata:
    """What :func:`load_video` sampled. Supports ``meta.field``, ``meta["field"]`` and :meth:`to_dict`."""

    frame_indices: list[int]
    fps: float  # average frame rate of the source (frames / s) used for the duration
    duration: float  # seconds: total_frames / fps
    total_frames: int  # decodable frames in the source
    backend: str  # "pyav", "decord" or "frames" (decoded frames and still images)
    width: int  # source frame size
    height: int
    time_message: str  # the original prompt text, e.g. "\nThe video lasts for 12.00 seconds, and 64 ..."
    path: str | None = None
    extra: dict = field(default_factory=dict)  # diagnostics (decode mode, threads, warnings)

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def timestamps(self) -> list[float]:
        """Time in seconds of each sampled frame (index / fps)."""
        return [i / self.fps for i in self.frame_indices]

    def __getitem__(self, key: str) -> Any:
        if key in ("num_frames", "timestamps"):
            return getattr(self, key)
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)

    def __contains__(self, key: str) -> bool:
        return key in self.__dataclass_fields__

    def to_dict(self) -> dict:
        return asdict(self)


def time_message(duration: float, num_frames: int) -> str:
    """The original prompt text for a video ("short" time message)."""
    return f"\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled from it. "


def available_backends() -> list[str]:
    """Installed decoding backends, in the order ``backend=None`` tries them."""
    return [b for b, mod in (("pyav", av), ("decord", decord)) if mod is not None]


# ------------------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------------------
def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _valid_rate(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _check_sampling_args(max_num_frames, num_frames, fps, min_num_frames, frames_multiple):
    max_num_frames = _as_int("max_num_frames", max_num_frames)
    if max_num_frames <= 0:
        raise ValueError(f"max_num_frames must be > 0, got max_num_frames={max_num_frames}")
    min_num_frames = _as_int("min_num_frames", min_num_frames)
    if min_num_frames < 0:
        raise ValueError(f"min_num_frames must be >= 0, got min_num_frames={min_num_frames}")
    frames_multiple = _as_int("frames_multiple", frames_multiple)
    if frames_multiple <= 0 or frames_multiple % CLIP_FRAMES:
        raise ValueError(f"frames_multiple must be a positive multiple of {CLIP_FRAMES}, got {frames_multiple}")
    if num_frames is not None and fps is not None:
        raise ValueError(f"give at most one of num_frames and fps (got num_frames={num_frames}, fps={fps})")
    if num_frames is not None:
        num_frames = _as_int("num_frames", num_frames)
        if num_frames <= 0:
            raise ValueError(f"num_frames must be > 0, got num_frames={num_frames}")
    if fps is not None and _valid_rate(fps) is None:
        raise ValueError(f"fps (frames to sample per second of video) must be > 0, got fps={fps!r}")
    return max_num_frames, num_frames, fps, min_num_frames, frames_multiple


def _middle_indices(total: int, n: int) -> list[int]:
    k = min(n, total)
    edges = np.linspace(0, total, k + 1).astype(int)
    idx = [int((edges[i] + edges[i + 1] - 1) // 2) for i in range(k)]
    return idx + [idx[-1]] * (n - k)


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
    num_frames: int | None = None,
    fps: float | None = None,
    min_num_frames: int = DEFAULT_MIN_NUM_FRAMES,
    frames_multiple: int = DEFAULT_FRAMES_MULTIPLE,
) -> list[int]:
    """Frame indices :func:`load_video` decodes from a ``total_frames``-frame video at ``video_fps``.

    See the module docstring for the rule; with the defaults it is the original chat() sampling.
    """
    max_num_frames, num_frames, fps, min_num_frames, frames_multiple = _check_sampling_args(
        max_num_frames, num_frames, fps, min_num_frames, frames_multiple
    )
    total = _as_int("total_frames", total_frames)
    if total <= 0:
        raise ValueError(f"total_frames must be > 0, got {total}")
    rate = _valid_rate(video_fps)
    if rate is None:
        raise ValueError(f"video_fps must be > 0, got {video_fps!r}")
    if num_frames is not None:
        n = -(-num_frames // CLIP_FRAMES) * CLIP_FRAMES
    else:
        duration = float(total) / rate
        if fps is not None:
            duration = duration * float(fps)
        groups = int(duration // frames_multiple)
        n = frames_multiple * max(groups, 1)
        n = min(n, max_num_frames)
        floor = min_num_frames if total >= min_num_frames else (total // frames_multiple) * frames_multiple
        n = max(n, floor)
        n = max(CLIP_FRAMES, n - n % CLIP_FRAMES)
    return _middle_indices(total, n)


def sample_frame_indices_training(
    total_frames: int,
    video_fps: float,
    max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
    min_num_frames: int = DEFAULT_MIN_NUM_FRAMES,
    local_num_frames: int = CLIP_FRAMES,
) -> list[int]:
    """Frame indices of the original fine-tuning data path (``process_video`` with ``dynamic_fps1``,
    ``frames_upbound=512``, ``frames_lowbound=64``, ``local_num_frames=4``): 1 frame per second in groups of 4,
    clipped to [64, 512]; a video shorter than 64 frames gives ``4 * (L // 4)`` frames (at least 4)."""
    return sample_frame_indices(
        total_frames,
        video_fps,
        max_num_frames=max_num_frames,
        min_num_frames=min_num_frames,
        frames_multiple=local_num_frames,
    )


# ------------------------------------------------------------------------------------------------------------
# resizing
# ------------------------------------------------------------------------------------------------------------
def _parse_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = (_as_int("size", s) for s in size)
    elif isinstance(size, dict) and "height" in size and "width" in size:
        h, w = _as_int("size", size["height"]), _as_int("size", size["width"])
    else:
        raise ValueError(f"size must be an int, (height, width) or None, got {size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def resize_frame(frame: np.ndarray, size) -> np.ndarray:
    """Resize one ``(H, W, 3)`` uint8 frame to ``size`` (int S -> S x S, or (height, width)) exactly as the
    original image processor does: PIL bicubic on the uint8 image, aspect ratio not kept, no crop."""
    hw = _parse_size(size)
    return _resize(np.asarray(frame), hw)


def _resize(frame: np.ndarray, hw: tuple[int, int] | None) -> np.ndarray:
    if hw is None:
        return frame
    img = Image.fromarray(frame)
    return np.asarray(img.resize((hw[1], hw[0]), Image.BICUBIC))


class _Sink:
    """Preallocated output; each unique index is resized once and written to every slot that uses it."""

    def __init__(self, indices: list[int], hw: tuple[int, int] | None, src_hw: tuple[int, int] | None, label: str):
        self.indices = indices
        self.hw = hw
        self.label = label
        self.slots: dict[int, list[int]] = {}
        for pos, idx in enumerate(indices):
            self.slots.setdefault(idx, []).append(pos)
        self.out: np.ndarray | None = None
        if hw is not None:
            self.out = np.empty((len(indices), hw[0], hw[1], 3), dtype=np.uint8)
        elif src_hw is not None:
            self.out = np.empty((len(indices), src_hw[0], src_hw[1], 3), dtype=np.uint8)
        self.done: set[int] = set()
        self._lock = threading.Lock()

    def wanted(self) -> list[int]:
        return sorted(self.slots)

    def put(self, idx: int, rgb: np.ndarray) -> None:
        if idx not in self.slots or idx in self.done:
            return
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{self.label}: frame {idx} is not an (H, W, 3) uint8 image (shape {rgb.shape})")
        img = _resize(rgb, self.hw)
        with self._lock:
            if self.out is None:
                self.out = np.empty((len(self.indices),) + img.shape, dtype=np.uint8)
            if img.shape != self.out.shape[1:]:
                raise ValueError(
                    f"{self.label}: frame {idx} is {rgb.shape[1]}x{rgb.shape[0]} but earlier frames are "
                    f"{self.out.shape[2]}x{self.out.shape[1]}; pass size= to resize frames of varying size"
                )
        slots = self.slots[idx]
        self.out[slots[0]] = img
        for s in slots[1:]:
            self.out[s] = self.out[slots[0]]
        with self._lock:
            self.done.add(idx)

    def missing(self) -> list[int]:
        return [i for i in self.slots if i not in self.done]


# ------------------------------------------------------------------------------------------------------------
# PyAV: probe (packet index) and decoding
# ------------------------------------------------------------------------------------------------------------
class VideoReadError(ValueError):
    """A file no backend can decode (not a media file, no video stream, no frames): raised at once."""


class _BackendFailed(RuntimeError):
    """One backend failed on a file another backend might read."""


@dataclass
class _Probe:
    path: str
    stream_index: int
    codec: str
    width: int
    height: int
    fps: float | None  # container average rate (None when missing)
    fallback_fps: float  # what to use when fps is None
    declared_frames: int  # stream header count (0 = unknown)
    pts: np.ndarray  # per kept packet, decode order
    dts: np.ndarray
    key: np.ndarray  # bool
    is_frame: np.ndarray  # bool: not an edit-list discard packet
    frame_pos: np.ndarray  # frame index (display order) -> packet position
    use_pts: bool  # unique, known timestamps: frames are matched by timestamp
    truncated: bool
    n_corrupt: int
    container_format: str = ""
    open_gop: bool = False  # some frames are shown before the keyframe they follow in decode order

    @property
    def total_frames(self) -> int:
        return int(self.frame_pos.shape[0])

    @property
    def gop(self) -> float:
        nk = int(self.key.sum())
        return self.total_frames / max(nk, 1)

    def decord_problem(self) -> str | None:
        """Why decord 0.6.0 must not read this file (None: it may). decord was checked frame by frame against a
        straight PyAV decode: it returns wrong frames (silently) for repeated or missing timestamps, open GOPs,
        HEVC, MPEG-4 part 2 with B frames, and H.264 in AVI or MPEG-TS, and can crash or hang on damaged files."""
        if not self.use_pts:
            return "its timestamps are missing or not unique (decord returns wrong frames then)"
        if self.truncated or self.n_corrupt:
            return "it is truncated or has corrupt packets"
        if self.container_format not in _DECORD_FORMATS:
            return f"decord 0.6.0 returns wrong frames after seeking in {self.container_format!r} files"
        if self.codec not in _DECORD_CODECS:
            return f"decord 0.6.0 returns wrong frames for {self.codec!r} video"
        if self.open_gop:
            return "it has open GOPs (frames shown before their keyframe), where decord 0.6.0 returns wrong frames"
        return None


def _contiguous_prefix(pts: np.ndarray, positions: np.ndarray, window: int = 16) -> np.ndarray:
    """A cut file can hold a frame whose display-order neighbours were lost with the cut (e.g. a P frame
    without the B frames before it). Keep frames up to the first timestamp gap among the last ``window``."""
    ts = pts[positions]
    steps = np.diff(ts)
    step = float(np.median(steps))
    start = max(0, steps.shape[0] - window)
    gaps = np.flatnonzero(steps[start:] > 1.5 * step)
    if step <= 0 or gaps.shape[0] == 0:
        return positions
    return positions[: start + int(gaps[0]) + 1]


def _open_av(path: str):
    return av.open(path, mode="r", timeout=(_OPEN_TIMEOUT_S, _READ_TIMEOUT_S), metadata_errors="ignore")


_NONE_TS = np.iinfo(np.int64).min


def _pyav_probe(path: str) -> _Probe:
    try:
        container = _open_av(path)
    except av.error.ExitError as e:  # interrupted by the timeout
        raise VideoReadError(f"cannot read video {path!r}: opening timed out ({e})") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoReadError(f"cannot read video {path!r}: not a readable media file ({e})") from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoReadError(f"cannot read video {path!r}: it has no video stream (streams: {', '.join(kinds)})")
        try:
            vs = container.streams.best("video") or container.streams.video[0]
        except Exception:
            vs = container.streams.video[0]
        cc = vs.codec_context
        width, height = int(cc.width or 0), int(cc.height or 0)
        pts, dts, key, frame = [], [], [], []
        n_corrupt = 0
        try:
            for pkt in container.demux(vs):
                if pkt.size == 0:
                    continue
                if pkt.is_corrupt:
                    n_corrupt += 1
                    continue
                pts.append(_NONE_TS if pkt.pts is None else int(pkt.pts))
                dts.append(_NONE_TS if pkt.dts is None else int(pkt.dts))
                key.append(bool(pkt.is_keyframe))
                frame.append(not pkt.is_discard)
        except av.error.ExitError as e:
            raise VideoReadError(f"cannot read video {path!r}: reading timed out ({e})") from None
        except av.error.FFmpegError as e:
            n_corrupt += 1  # read error part way: keep what was read
            warnings.warn(f"{path}: read error after {len(pts)} packets ({e})", stacklevel=3)
        pts_a = np.asarray(pts, dtype=np.int64)
        is_frame = np.asarray(frame, dtype=bool)
        n_frames = int(is_frame.sum())
        if n_frames == 0:
            raise VideoReadError(f"cannot read video {path!r}: its video stream has no readable frames")
        if width <= 0 or height <= 0:
            raise VideoReadError(f"cannot read video {path!r}: the video stream has no frame size (codec {cc.name})")
        frame_ts = pts_a[is_frame]
        use_pts = bool((frame_ts != _NONE_TS).all()) and np.unique(pts_a).shape[0] == pts_a.shape[0]
        positions = np.flatnonzero(is_frame)
        if use_pts:
            positions = positions[np.argsort(frame_ts, kind="stable")]
        declared = int(vs.frames or 0)
        truncated = (declared > 0 and n_frames < declared) or n_corrupt > 0
        if truncated and use_pts and positions.shape[0] > 2:
            positions = _contiguous_prefix(pts_a, positions)
        open_gop = False
        key_a = np.asarray(key, dtype=bool)
        if use_pts and key_a.any():
            last_key = np.maximum.accumulate(np.where(key_a, np.arange(key_a.shape[0]), -1))
            has_key = last_key >= 0
            open_gop = bool((pts_a[has_key] < pts_a[last_key[has_key]]).any())
        fps = _valid_rate(vs.average_rate)
        fallback = _valid_rate(vs.guessed_rate)
        if fallback is None and vs.duration and vs.time_base:
            fallback = _valid_rate(n_frames / float(vs.duration * vs.time_base))
        return _Probe(
            path=path,
            stream_index=vs.index,
            codec=cc.name,
            width=width,
            height=height,
            fps=fps,
            fallback_fps=fallback or 1.0,
            declared_frames=declared,
            pts=pts_a,
            dts=np.asarray(dts, dtype=np.int64),
            key=key_a,
            is_frame=is_frame,
            frame_pos=positions,
            use_pts=use_pts,
            truncated=truncated,
            n_corrupt=n_corrupt,
            container_format=str(container.format.name),
            open_gop=open_gop,
        )
    finally:
        container.close()


def _h264_nonref_test(cc):
    """Return f(packet) -> True when an AVCC H.264 packet holds only non-reference slices (nal_ref_idc 0):
    no other frame depends on it, so it need not be decoded unless it is wanted. None for other codecs."""
    if cc.name != "h264":
        return None
    ext = bytes(cc.extradata or b"")
    if len(ext) < 7 or ext[0] != 1:
        return None  # Annex B stream: not handled (always decoded)
    nls = (ext[4] & 3) + 1

    def nonref(pkt) -> bool:
        b = bytes(pkt)
        i, n, vcl = 0, len(b), False
        while i + nls <= n:
            size = int.from_bytes(b[i : i + nls], "big")
            i += nls
            if size <= 0 or i + size > n:
                return False
            h = b[i]
            nal_type = h & 0x1F
            if h & 0x80:
                return False
            if nal_type in (1, 5):
                vcl = True
                if h & 0x60:
                    return False
            elif nal_type not in (6, 9, 12):  # anything but SEI / delimiter / filler (e.g. a new PPS): keep
                return False
            i += size
        return vcl and i == n

    return nonref


def _plan_ranges(probe: _Probe, targets: list[int]) -> list[tuple[int, int]]:
    """Packet spans [start, end] (decode order) that must be decoded to output the target frames."""
    key_pos = np.flatnonzero(probe.key)
    spans = []
    for t in targets:
        pos = int(probe.frame_pos[t])
        j = int(np.searchsorted(key_pos, pos, side="right")) - 1
        # open GOPs: frames shown before their keyframe need the previous keyframe
        while j >= 0 and probe.pts[key_pos[j]] > probe.pts[pos]:
            j -= 1
        spans.append((int(key_pos[j]) if j >= 0 else 0, pos))
    spans.sort()
    merged: list[list[int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _split(ranges: list[tuple[int, int]], workers: int) -> list[list[tuple[int, int]]]:
    work = [e - s + 1 for s, e in ranges]
    total = sum(work)
    groups: list[list[tuple[int, int]]] = [[]]
    acc = 0
    for r, w in zip(ranges, work):
        if groups[-1] and acc >= total * len(groups) / workers and len(groups) < workers:
            groups.append([])
        groups[-1].append(r)
        acc += w
    return groups


def _frame_rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def _pyav_worker(probe: _Probe, ranges, target_of_pos: dict[int, int], pos_of_pts: dict[int, int], sink: _Sink,
                 seek_mode: bool, threads: int):
    for target, rgb in _pyav_worker_frames(probe, ranges, target_of_pos, pos_of_pts, seek_mode, threads):
        sink.put(target, rgb)


def _pyav_worker_frames(probe: _Probe, ranges, target_of_pos: dict[int, int], pos_of_pts: dict[int, int],
                        seek_mode: bool, threads: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the packet spans `ranges` in order; yield ``(frame index, rgb)`` for every wanted frame as soon as it
    is decoded (in display order: frames leave the decoder sorted by timestamp, and spans are decoded in order)."""
    path = probe.path
    wanted_pos = set(target_of_pos)
    key_pos = np.flatnonzero(probe.key)
    with _open_av(path) as container:
        vs = container.streams[probe.stream_index]
        cc = vs.codec_context
        if threads > 1:
            cc.thread_type = "AUTO"
        cc.thread_count = threads
        nonref = _h264_nonref_test(cc)

        def emit(frames):
            out = []
            for f in frames:
                if f.pts is None:
                    continue
                pos = pos_of_pts.get(int(f.pts))
                if pos is not None and pos in wanted_pos:
                    out.append((target_of_pos[pos], _frame_rgb(f)))
            return out

        def send(pkt):
            try:
                return emit(cc.decode(pkt))
            except av.error.InvalidDataError:
                return ()  # a damaged packet: its frame (if wanted) is reported missing later

        def packets() -> Iterator[tuple[int, Any]]:
            for pkt in container.demux(vs):
                if pkt.size == 0 or pkt.is_corrupt or pkt.pts is None:
                    continue
                pos = pos_of_pts.get(int(pkt.pts))
                if pos is not None:
                    yield pos, pkt

        def seek_to(start: int):
            """Return an iterator whose next packet is at a position <= start."""
            ts = int(probe.pts[start])
            for attempt in range(4):
                try:
                    container.seek(ts, stream=vs, backward=True, any_frame=False)
                except av.error.FFmpegError:
                    break
                it = packets()
                first = next(it, None)
                if first is None:
                    break
                if first[0] <= start:
                    return _chain_first(first, it)
                j = int(np.searchsorted(key_pos, first[0], side="left")) - 1 - attempt
                if j < 0:
                    break
                ts = int(probe.pts[key_pos[max(j, 0)]])
            try:  # from the beginning
                container.seek(0, backward=True, any_frame=False)
            except av.error.FFmpegError:
                pass
            return packets()

        it = None
        pending = None  # (pos, pkt) read but not used yet
        cur = 0  # position the iterator is at (next packet)
        for start, end in ranges:
            if it is None:
                it = seek_to(start) if start > 0 else packets()
                pending = None
            elif seek_mode and start - cur > _SEEK_MIN_GAP:
                it = seek_to(start)
                pending = None
            fed = False
            while True:
                item = pending if pending is not None else next(it, None)
                pending = None
                if item is None:
                    break
                pos, pkt = item
                cur = pos + 1
                if pos < start:
                    continue
                if pos > end:
                    pending = item
                    cur = pos
                    break
                if pos not in wanted_pos and nonref is not None and nonref(pkt):
                    continue
                yield from send(pkt)
                fed = True
            if fed:
                try:
                    flushed = emit(cc.decode(None))
                except av.error.FFmpegError:
                    flushed = ()
                yield from flushed
                cc.flush_buffers()


def _chain_first(first, it):
    yield first
    yield from it


def _pyav_decode_counting(probe: _Probe, targets: list[int], sink: _Sink, threads: int) -> None:
    """Decode straight through, numbering frames in output order."""
    for n, rgb in _pyav_counting_frames(probe, targets, threads):
        sink.put(n, rgb)


def _pyav_counting_frames(probe: _Probe, targets: list[int], threads: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode straight through from the start, numbering frames in output order; yield ``(n, rgb)`` for the
    wanted ``n`` (increasing)."""
    last = max(targets)
    want = set(targets)
    n = 0
    with _open_av(probe.path) as container:
        vs = container.streams[probe.stream_index]
        cc = vs.codec_context
        if threads > 1:
            cc.thread_type = "AUTO"
        cc.thread_count = threads

        def packets():
            for pkt in container.demux(vs):
                if pkt.size == 0 or pkt.is_corrupt:
                    continue
                yield pkt
            yield None

        for pkt in packets():
            try:
                frames = cc.decode(pkt)
            except av.error.InvalidDataError:
                continue
            for f in frames:
                if n in want:
                    yield n, _frame_rgb(f)
                n += 1
            if n > last:
                break


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _pyav_decode(probe: _Probe, sink: _Sink, num_threads: int) -> dict:
    targets = sink.wanted()
    info: dict = {}
    if not probe.use_pts:
        info["mode"] = "sequential (frames matched by count)"
        _pyav_decode_counting(probe, targets, sink, num_threads)
        return info
    seek_mode = _use_seek(len(targets), probe.gop, probe.total_frames)
    ranges = _plan_ranges(probe, targets)
    workers = max(1, min(num_threads, len(ranges)))
    groups = _split(ranges, workers) if workers > 1 else [ranges]
    per_worker = max(1, num_threads // len(groups))
    target_of_pos = {int(probe.frame_pos[t]): t for t in targets}
    pos_of_pts = {int(p): i for i, p in enumerate(probe.pts.tolist())}
    info.update(mode="seek" if seek_mode else "sequential", workers=len(groups), spans=len(ranges),
                packets_in_spans=int(sum(e - s + 1 for s, e in ranges)))
    if len(groups) == 1:
        _pyav_worker(probe, groups[0], target_of_pos, pos_of_pts, sink, seek_mode, num_threads)
    else:
        errors: list[BaseException] = []

        def run(g):
            try:
                _pyav_worker(probe, g, target_of_pos, pos_of_pts, sink, seek_mode, per_worker)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)

        ts = [threading.Thread(target=run, args=(g,), daemon=True) for g in groups]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise errors[0]
    if sink.missing():
        # timestamps did not line up with the decoder's output: decode straight through instead
        info["retry"] = f"{len(sink.missing())} frames not matched by timestamp; decoded straight through"
        _pyav_decode_counting(probe, sink.missing(), sink, num_threads)
    return info


# ------------------------------------------------------------------------------------------------------------
# decord
# ------------------------------------------------------------------------------------------------------------
def _decord_open(path: str):
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # DECORDError / RuntimeError
        raise _BackendFailed(f"decord cannot read {path!r}: {str(e).splitlines()[-1][:300]}") from None


def _decord_decode(vr, path: str, sink: _Sink, frame_bytes: int) -> None:
    wanted = sink.wanted()
    step = max(1, min(_DECORD_CHUNK, _DECORD_CHUNK_BYTES // max(frame_bytes, 1)))
    for i in range(0, len(wanted), step):
        chunk = wanted[i : i + step]
        try:
            batch = vr.get_batch(chunk).asnumpy()
        except Exception as e:
            raise _BackendFailed(f"decord failed on {path!r}: {str(e).splitlines()[-1][:300]}") from None
        for j, idx in enumerate(chunk):
            sink.put(idx, batch[j])
        del batch
    try:
        vr.seek(0)
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------
def _is_torch_tensor(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "numpy")


def _frames_array(x, what: str) -> np.ndarray:
    if _is_torch_tensor(x):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB frames, got dtype {arr.dtype}")
    return arr


class _FrameSource:
    """Random access to already-decoded frames."""

    def __init__(self, video):
        if isinstance(video, (list, tuple)):
            if not video:
                raise ValueError("the list of frames is empty")
            self.items = list(video)
            self.kind = "list"
            first = self._get(0)
        else:
            arr = _frames_array(video, "frames")
            if arr.ndim != 4:
                raise ValueError(f"frames must be (T, H, W, 3) or (T, 3, H, W), got shape {arr.shape}")
            if arr.shape[-1] != 3 and arr.shape[1] == 3:
                arr = arr.transpose(0, 2, 3, 1)
            if arr.shape[-1] != 3:
                raise ValueError(f"frames must have 3 (RGB) channels, got shape {tuple(arr.shape)}")
            if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
                raise ValueError(f"frames are empty, got shape {tuple(arr.shape)}")
            self.items = arr
            self.kind = "array"
            first = arr[0]
        self.height, self.width = int(first.shape[0]), int(first.shape[1])

    def __len__(self) -> int:
        return len(self.items)

    def _get(self, i: int) -> np.ndarray:
        item = self.items[i]
        if self.kind == "array":
            return item
        if isinstance(item, Image.Image):
            return np.asarray(item.convert("RGB"))
        arr = _frames_array(item, f"frame {i}")
        if arr.ndim != 3 or arr.shape[-1] != 3:
            if arr.ndim == 3 and arr.shape[0] == 3:
                arr = arr.transpose(1, 2, 0)
            else:
                raise ValueError(f"frame {i} must be an (H, W, 3) image, got shape {arr.shape}")
        return arr

    def __getitem__(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self._get(i))


def _check_path(video) -> str:
    path = os.fspath(video)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise FileNotFoundError("video path is empty")
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"cannot read video {path!r}: it is a directory, not a video file")
    if not os.path.isfile(path):
        raise ValueError(f"cannot read video {path!r}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read video {path!r}: permission denied")
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read video {path!r}: the file is empty")
    return path


def _read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # UnidentifiedImageError, truncated image, decompression bomb, ...
        raise ValueError(f"cannot read image {path!r}: {e}") from None


# ------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------
def load_video(
    video,
    max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
    num_frames: int | None = None,
    fps: float | None = None,
    size=None,
    backend: str | None = None,
    min_num_frames: int = DEFAULT_MIN_NUM_FRAMES,
    frames_multiple: int = DEFAULT_FRAMES_MULTIPLE,
    *,
    video_fps: float | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, VideoLoadMetadata]:
    """Sample and decode frames of a video the way the original VideoChat-Flash chat() path does.

    Args:
        video: a video path (str / os.PathLike); a still image path or ``PIL.Image``; or decoded frames (a list
            of PIL images or (H, W, 3) arrays, a (T, H, W, 3) uint8 array, a (T, H, W, 3) / (T, 3, H, W) uint8
            torch tensor).
        max_num_frames: most frames to sample (the original default of 512); must be > 0. A long video still
            gets ``min_num_frames``.
        num_frames: sample exactly this many frames instead (rounded up to a multiple of 4).
        fps: sample this many frames per second of video instead of 1 (still clamped and rounded).
        size: resize every frame to ``size x size`` (or ``(height, width)``) with PIL bicubic, aspect ratio not
            kept, right after it is decoded. None keeps the source size.
        backend: None (PyAV, else decord), ``"pyav"`` or ``"decord"``.
        min_num_frames: fewest frames for a video with at least that many frames (64).
        frames_multiple: frame counts come in groups of this many (8 in the original chat(); a multiple of 4).
        video_fps: frame rate of already-decoded frames (default 1.0); ignored for files.
        num_threads: decoder threads (default: usable CPUs, at most 8).

    Returns:
        ``(frames, metadata)``: frames a (T, H, W, 3) uint8 numpy array with T a multiple of 4, metadata a
        :class:`VideoLoadMetadata`.
    """
    max_num_frames, num_frames, fps, min_num_frames, frames_multiple = _check_sampling_args(
        max_num_frames, num_frames, fps, min_num_frames, frames_multiple
    )
    hw, num_threads, sampling = _common_args(size, backend, num_threads, max_num_frames, num_frames, fps, min_num_frames)
    kind, image, path = _classify_input(video)

    # ---- still images and decoded frames
    if kind == "image":
        indices = sample_frame_indices(1, 1.0, frames_multiple=CLIP_FRAMES, **sampling)
        sink = _Sink(indices, hw, image.shape[:2], path or "image")
        sink.put(0, np.ascontiguousarray(image))
        return sink.out, _metadata(indices, 1.0, 1, "frames", image.shape[1], image.shape[0], path, {"input": "image"})
    if kind == "frames":
        src, rate = _frame_source(video, video_fps)
        indices = sample_frame_indices(len(src), rate, frames_multiple=frames_multiple, **sampling)
        sink = _Sink(indices, hw, None, "frames")
        for idx in sink.wanted():
            sink.put(idx, src[idx])
        return sink.out, _metadata(indices, rate, len(src), "frames", src.width, src.height, None, {"input": "frames"})

    # ---- video files
    return _load_video_file(path, hw, backend, frames_multiple, sampling, num_threads)


def _common_args(size, backend, num_threads, max_num_frames, num_frames, fps, min_num_frames):
    hw = _parse_size(size)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'pyav' or 'decord', got {backend!r}")
    if num_threads is None:
        num_threads = _default_threads()
    num_threads = max(1, _as_int("num_threads", num_threads))
    sampling = dict(max_num_frames=max_num_frames, num_frames=num_frames, fps=fps, min_num_frames=min_num_frames)
    return hw, num_threads, sampling


def _classify_input(video) -> tuple[str, np.ndarray | None, str | None]:
    """``("image", rgb, path or None)``, ``("frames", None, None)`` or ``("file", None, path)``."""
    image = None
    path = None
    if isinstance(video, Image.Image):
        image = np.asarray(video.convert("RGB"))
    elif isinstance(video, (str, os.PathLike)):
        path = _check_path(video)
        if path.lower().endswith(IMAGE_EXTENSIONS):
            image = _read_image(path)
    elif isinstance(video, np.ndarray) or _is_torch_tensor(video):
        arr = _frames_array(video, "frames")
        if arr.ndim == 3 and arr.shape[-1] == 3:
            image = arr
        elif arr.ndim != 4:
            raise ValueError(f"frames must be (T, H, W, 3) or (T, 3, H, W) uint8, got shape {arr.shape}")
    elif not isinstance(video, (list, tuple)):
        raise TypeError(
            f"video must be a path, a PIL image, a list of frames or a uint8 array/tensor, got {type(video).__name__}"
        )
    if image is not None:
        if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image has shape {image.shape}; expected (H, W, 3)")
        return "image", image, path
    if path is None:
        return "frames", None, None
    return "file", None, path


def _frame_source(video, video_fps):
    src = _FrameSource(video)
    rate = _valid_rate(video_fps) if video_fps is not None else 1.0
    if rate is None:
        raise ValueError(f"video_fps must be > 0, got {video_fps!r}")
    return src, rate


def _metadata(indices, fps, total, backend, width, height, path, extra) -> VideoLoadMetadata:
    duration = total / fps
    return VideoLoadMetadata(
        frame_indices=[int(i) for i in indices],
        fps=float(fps),
        duration=float(duration),
        total_frames=int(total),
        backend=backend,
        width=int(width),
        height=int(height),
        time_message=time_message(duration, len(indices)),
        path=path,
        extra=extra,
    )


def _backends_and_probe(path, backend, stacklevel=4):
    """Backends to try, in order, and the PyAV packet index of the file (None without PyAV)."""
    if backend is None:
        order = available_backends()
        if not order:
            raise ImportError("load_video needs PyAV (pip install av) or decord (pip install decord==0.6.0)")
    else:
        if {"pyav": av, "decord": decord}[backend] is None:
            raise ImportError(f"backend={backend!r} is not installed (pip install {'av' if backend == 'pyav' else 'decord'})")
        order = [backend]

    probe = None
    if av is not None:
        probe = _pyav_probe(path)  # VideoReadError (a ValueError) for unreadable files: no backend would do better
        if probe.truncated:
            msg = (f"{path}: the video looks truncated or damaged ({probe.total_frames} readable frames"
                   + (f" of {probe.declared_frames} declared" if probe.declared_frames else "")
                   + (f", {probe.n_corrupt} corrupt packets" if probe.n_corrupt else "") + "); sampling from the readable frames")
            warnings.warn(msg, stacklevel=stacklevel)
    return order, probe


def _load_video_file(path, hw, backend, frames_multiple, sampling, num_threads):
    order, probe = _backends_and_probe(path, backend)

    errors = []
    for name in order:
        try:
            if name == "pyav":
                return _load_with_pyav(path, probe, hw, frames_multiple, sampling, num_threads)
            return _load_with_decord(path, probe, hw, frames_multiple, sampling)
        except _BackendFailed as e:
            errors.append(str(e))
            if backend is None and name != order[-1]:
                warnings.warn(f"{e}; trying the next backend", stacklevel=3)
    raise ValueError("; ".join(errors))


def _load_with_pyav(path, probe, hw, frames_multiple, sampling, num_threads):
    fps = probe.fps or probe.fallback_fps
    indices = sample_frame_indices(probe.total_frames, fps, frames_multiple=frames_multiple, **sampling)
    sink = _Sink(indices, hw, (probe.height, probe.width), path)
    try:
        info = _pyav_decode(probe, sink, num_threads)
    except av.error.FFmpegError as e:
        raise _BackendFailed(f"PyAV failed on {path!r}: {type(e).__name__}: {e}") from None
    except ValueError:
        raise
    except Exception as e:  # anything else unexpected: let the other backend try
        raise _BackendFailed(f"PyAV failed on {path!r}: {type(e).__name__}: {e}") from None
    missing = sink.missing()
    if missing:
        raise _BackendFailed(
            f"PyAV could not decode frames {missing[:8]}{'...' if len(missing) > 8 else ''} of {path!r} "
            f"({probe.total_frames} frames indexed); the file is probably damaged"
        )
    info.update(codec=probe.codec, gop=round(probe.gop, 2), fps_source="stream" if probe.fps else "fallback")
    return sink.out, _metadata(indices, fps, probe.total_frames, "pyav", probe.width, probe.height, path, info)


def _decord_reader(path, probe):
    """An open decord reader of a file decord may read: ``(reader, total frames, fps, fps source)``."""
    if probe is not None:
        problem = probe.decord_problem()
        if problem:
            raise _BackendFailed(f"decord is not used on {path!r}: {problem}")
    vr = _decord_open(path)
    total = len(vr)
    if probe is not None and total != probe.total_frames:
        raise _BackendFailed(
            f"decord is not used on {path!r}: it counts {total} frames where the packet index has {probe.total_frames}"
        )
    if total <= 0:
        raise _BackendFailed(f"decord finds no frames in {path!r}")
    fps = _valid_rate(vr.get_avg_fps())
    fps_source = "stream"
    if fps is None:
        fps = (probe.fps or probe.fallback_fps) if probe is not None else 1.0
        fps_source = "fallback"
    return vr, total, fps, fps_source


def _load_with_decord(path, probe, hw, frames_multiple, sampling):
    vr, total, fps, fps_source = _decord_reader(path, probe)
    indices = sample_frame_indices(total, fps, frames_multiple=frames_multiple, **sampling)
    width, height = (probe.width, probe.height) if probe is not None else (0, 0)
    sink = _Sink(indices, hw, (height, width) if probe is not None else None, path)
    _decord_decode(vr, path, sink, 3 * width * height if probe is not None else 3 * 3840 * 2160)
    del vr
    if probe is None:
        height, width = _decord_size(path, sink)
    return sink.out, _metadata(indices, fps, total, "decord", width, height, path, {"fps_source": fps_source})


def _decord_size(path, sink):
    if sink.hw is None and sink.out is not None:
        return sink.out.shape[1], sink.out.shape[2]
    vr = _decord_open(path)
    shape = vr[0].shape
    return int(shape[0]), int(shape[1])


def _use_seek(n_targets: int, gop: float, total_frames: int) -> bool:
    """env_probe section 4: a random access costs about half a GOP of decoding, so seek between spans when
    that is cheaper than reading straight through."""
    return n_targets * gop / 2 < total_frames


# ------------------------------------------------------------------------------------------------------------
# streaming: the same frames, chunk by chunk
# ------------------------------------------------------------------------------------------------------------
DEFAULT_CHUNK_FRAMES = 32


class _ChunkAssembler:
    """The sampled index list cut into chunks of ``chunk_frames``; builds each chunk from frames as they arrive.

    Every unique index is resized once (right away, as :class:`_Sink` does) and kept only until the last chunk that
    uses it has been handed out, so memory holds about one chunk of resized frames whatever the frame count (the
    padding copies of the last frame of a short video are one stored frame).
    """

    def __init__(self, indices: list[int], chunk_frames: int, hw, src_hw, label: str):
        self.indices = indices
        self.chunks = [indices[i : i + chunk_frames] for i in range(0, len(indices), chunk_frames)]
        self.unique = [sorted(set(chunk)) for chunk in self.chunks]
        self.last_chunk: dict[int, int] = {}
        for k, chunk in enumerate(self.unique):
            for idx in chunk:
                self.last_chunk[idx] = k
        self.last_target = [chunk[-1] for chunk in self.unique]
        self.hw = hw
        self.shape = None if hw is None and src_hw is None else (*(hw or src_hw), 3)
        self.label = label
        self.frames: dict[int, np.ndarray] = {}
        self.next = 0  # the next chunk to hand out
        self._lock = threading.Lock()  # put() may be called by several decoder threads

    def __len__(self) -> int:
        return len(self.chunks)

    def targets(self) -> list[int]:
        """Indices still needed by the chunks not handed out yet and not held, increasing."""
        return sorted(i for i, k in self.last_chunk.items() if k >= self.next and i not in self.frames)

    def wanted(self, k: int) -> list[int]:
        return [i for i in self.unique[k] if i not in self.frames]

    def missing(self, k: int) -> list[int]:
        return self.wanted(k)

    def put(self, idx: int, rgb: np.ndarray) -> None:
        if self.last_chunk.get(idx, -1) < self.next or idx in self.frames:
            return
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"{self.label}: frame {idx} is not an (H, W, 3) uint8 image (shape {rgb.shape})")
        img = np.ascontiguousarray(_resize(rgb, self.hw))
        with self._lock:
            if self.shape is None:
                self.shape = img.shape
            if img.shape != self.shape:
                raise ValueError(
                    f"{self.label}: frame {idx} is {rgb.shape[1]}x{rgb.shape[0]} but earlier frames are "
                    f"{self.shape[1]}x{self.shape[0]}; pass size= to resize frames of varying size"
                )
            self.frames[idx] = img

    def take(self, k: int) -> np.ndarray:
        """Chunk ``k`` (all its frames must be held) as a (n, H, W, 3) uint8 array."""
        assert k == self.next
        chunk = self.chunks[k]
        out = np.empty((len(chunk), *self.shape), dtype=np.uint8)
        for j, idx in enumerate(chunk):
            out[j] = self.frames[idx]
        for idx in self.unique[k]:
            if self.last_chunk[idx] == k:
                del self.frames[idx]
        self.next = k + 1
        return out


def iter_video_chunks(
    video,
    chunk_frames: int = DEFAULT_CHUNK_FRAMES,
    max_num_frames: int = DEFAULT_MAX_NUM_FRAMES,
    num_frames: int | None = None,
    fps: float | None = None,
    size=None,
    backend: str | None = None,
    min_num_frames: int = DEFAULT_MIN_NUM_FRAMES,
    frames_multiple: int = DEFAULT_FRAMES_MULTIPLE,
    *,
    video_fps: float | None = None,
    num_threads: int | None = None,
) -> tuple[VideoLoadMetadata, Iterator[np.ndarray]]:
    """:func:`load_video`, streamed: the same sampled frames, handed out ``chunk_frames`` at a time.

    The index list is sampled once, up front (same rule, same inputs, same metadata as :func:`load_video`); the
    iterator then decodes only what each chunk needs, in time order, so memory holds about one chunk of resized
    frames whatever the frame count. ``np.concatenate(list(chunks))`` equals ``load_video(...)[0]`` exactly.

    * Files (PyAV): one decoding pass over the packet spans that the whole index list needs (seek or read through
      by the same rule as ``load_video``), with one decoder, paused between chunks; files without usable
      timestamps are decoded straight through and matched by counting. A chunk whose frames did not come out of
      the timestamp-matched pass is retried by counting; with ``backend=None`` a PyAV failure part way continues
      with decord (where decord is allowed on the file and samples the same indices), with a ``UserWarning``.
    * decord: the frames of each chunk are fetched in batches (16 frames, at most 16 MB), as in ``load_video``.
    * Still images and already-decoded frames are cut into chunks (frames are resized chunk by chunk).

    Args:
        video, max_num_frames, num_frames, fps, size, backend, min_num_frames, frames_multiple, video_fps,
            num_threads: as in :func:`load_video`.
        chunk_frames: frames per chunk (the last one may be shorter); a multiple of 4 keeps chunks whole clips.

    Returns:
        ``(metadata, chunks)``: the :class:`VideoLoadMetadata` (``extra`` is filled in while decoding: mode,
        ``chunk_frames``, ``streaming=True``) and an iterator of (n, H, W, 3) uint8 arrays in time order. Bad
        paths, unreadable files and bad arguments raise here, at once; decoding failures raise ``ValueError``
        from the iterator.
    """
    chunk_frames = _as_int("chunk_frames", chunk_frames)
    if chunk_frames <= 0:
        raise ValueError(f"chunk_frames must be > 0, got chunk_frames={chunk_frames}")
    max_num_frames, num_frames, fps, min_num_frames, frames_multiple = _check_sampling_args(
        max_num_frames, num_frames, fps, min_num_frames, frames_multiple
    )
    hw, num_threads, sampling = _common_args(size, backend, num_threads, max_num_frames, num_frames, fps, min_num_frames)
    kind, image, path = _classify_input(video)
    stream = {"streaming": True, "chunk_frames": chunk_frames}

    if kind == "image":
        indices = sample_frame_indices(1, 1.0, frames_multiple=CLIP_FRAMES, **sampling)
        asm = _ChunkAssembler(indices, chunk_frames, hw, image.shape[:2], path or "image")
        meta = _metadata(indices, 1.0, 1, "frames", image.shape[1], image.shape[0], path, {"input": "image", **stream})
        return meta, _stream_image(asm, np.ascontiguousarray(image))
    if kind == "frames":
        src, rate = _frame_source(video, video_fps)
        indices = sample_frame_indices(len(src), rate, frames_multiple=frames_multiple, **sampling)
        asm = _ChunkAssembler(indices, chunk_frames, hw, None, "frames")
        meta = _metadata(indices, rate, len(src), "frames", src.width, src.height, None, {"input": "frames", **stream})
        return meta, _stream_frames(asm, src)
    return _iter_video_file(path, chunk_frames, hw, backend, frames_multiple, sampling, num_threads, stream)


def _stream_image(asm: _ChunkAssembler, image: np.ndarray) -> Iterator[np.ndarray]:
    asm.put(0, image)
    for k in range(len(asm)):
        yield asm.take(k)


def _stream_frames(asm: _ChunkAssembler, src: _FrameSource) -> Iterator[np.ndarray]:
    for k in range(len(asm)):
        for idx in asm.wanted(k):
            asm.put(idx, src[idx])
        yield asm.take(k)


def _iter_video_file(path, chunk_frames, hw, backend, frames_multiple, sampling, num_threads, stream):
    order, probe = _backends_and_probe(path, backend, stacklevel=4)
    errors = []
    for name in order:
        try:
            if name == "pyav":
                fps = probe.fps or probe.fallback_fps
                indices = sample_frame_indices(probe.total_frames, fps, frames_multiple=frames_multiple, **sampling)
                asm = _ChunkAssembler(indices, chunk_frames, hw, (probe.height, probe.width), path)
                info = dict(stream, codec=probe.codec, gop=round(probe.gop, 2),
                            fps_source="stream" if probe.fps else "fallback")
                meta = _metadata(indices, fps, probe.total_frames, "pyav", probe.width, probe.height, path, info)
                fallback = backend is None and "decord" in order
                return meta, _stream_pyav_guarded(probe, asm, num_threads, meta, fallback, frames_multiple, sampling)
            vr, total, fps, fps_source = _decord_reader(path, probe)
            indices = sample_frame_indices(total, fps, frames_multiple=frames_multiple, **sampling)
            if probe is not None:
                height, width = probe.height, probe.width
            else:  # the size of the first frame
                height, width = (int(d) for d in vr[0].shape[:2])
                vr.seek(0)
            asm = _ChunkAssembler(indices, chunk_frames, hw, (height, width), path)
            meta = _metadata(indices, fps, total, "decord", width, height, path, dict(stream, fps_source=fps_source))
            return meta, _stream_decord_guarded(vr, path, asm, 3 * width * height)
        except _BackendFailed as e:
            errors.append(str(e))
            if backend is None and name != order[-1]:
                warnings.warn(f"{e}; trying the next backend", stacklevel=3)
    raise ValueError("; ".join(errors))


def _drain(source, asm: _ChunkAssembler) -> Iterator[np.ndarray]:
    """Hand out the chunks of ``asm`` from ``source``, an iterator of ``(index, rgb)`` in increasing index order.

    Chunk ``k`` is settled as soon as a frame at or past its last index has come out: complete, it is handed out;
    incomplete, draining stops there (``asm.next`` is that chunk) and the caller decides. Also stops when the source
    ends before every chunk is complete."""
    n = len(asm)
    stuck = False
    try:
        for idx, rgb in source:
            asm.put(idx, rgb)
            while asm.next < n and idx >= asm.last_target[asm.next]:
                if asm.missing(asm.next):
                    stuck = True
                    break
                yield asm.take(asm.next)
            if stuck:
                return
    finally:
        source.close()
    while asm.next < n and not asm.missing(asm.next):
        yield asm.take(asm.next)


def _stream_spans_parallel(probe: _Probe, asm: _ChunkAssembler, num_threads: int, info: dict):
    """Seek mode with several threads: the spans of each chunk are shared among up to ``num_threads`` decoders,
    exactly as ``load_video`` shares the spans of the whole video. Stops at a chunk with frames missing."""
    pos_of_pts = {int(p): i for i, p in enumerate(probe.pts.tolist())}
    info.update(workers=0, spans=0, packets_in_spans=0)
    for k in range(asm.next, len(asm)):
        targets = asm.wanted(k)
        if targets:
            ranges = _plan_ranges(probe, targets)
            workers = max(1, min(num_threads, len(ranges)))
            groups = _split(ranges, workers) if workers > 1 else [ranges]
            per_worker = max(1, num_threads // len(groups))
            target_of_pos = {int(probe.frame_pos[t]): t for t in targets}
            info.update(workers=max(info["workers"], len(groups)), spans=info["spans"] + len(ranges),
                        packets_in_spans=info["packets_in_spans"] + int(sum(e - s + 1 for s, e in ranges)))
            errors: list[BaseException] = []

            def run(group, threads):
                try:
                    for idx, rgb in _pyav_worker_frames(probe, group, target_of_pos, pos_of_pts, True, threads):
                        asm.put(idx, rgb)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    errors.append(e)

            if len(groups) == 1:
                run(groups[0], num_threads)
            else:
                threads = [threading.Thread(target=run, args=(g, per_worker), daemon=True) for g in groups]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            if errors:
                raise errors[0]
        if asm.missing(k):
            return
        yield asm.take(k)


def _stream_pyav(probe: _Probe, asm: _ChunkAssembler, num_threads: int, info: dict) -> Iterator[np.ndarray]:
    """Chunks of ``asm`` decoded by PyAV, with the plan of ``load_video`` for the whole index list: read straight
    through (one decoder, ``num_threads`` codec threads, paused between chunks), or seek to each span (the spans
    of a chunk shared among ``num_threads`` decoders). A chunk whose frames did not all come out of the
    timestamp-matched pass is decoded again, with everything after it, straight through and matched by counting."""
    n = len(asm)
    if probe.use_pts:
        targets = asm.targets()
        seek_mode = _use_seek(len(targets), probe.gop, probe.total_frames)
        info["mode"] = "seek" if seek_mode else "sequential"
        if seek_mode and num_threads > 1:
            yield from _stream_spans_parallel(probe, asm, num_threads, info)
        else:
            ranges = _plan_ranges(probe, targets)
            target_of_pos = {int(probe.frame_pos[t]): t for t in targets}
            pos_of_pts = {int(p): i for i, p in enumerate(probe.pts.tolist())}
            info.update(workers=1, spans=len(ranges), packets_in_spans=int(sum(e - s + 1 for s, e in ranges)))
            yield from _drain(
                _pyav_worker_frames(probe, ranges, target_of_pos, pos_of_pts, seek_mode, num_threads), asm
            )
        if asm.next == n:
            return
        # timestamps did not line up with the decoder's output: decode the rest straight through instead
        missing = asm.missing(asm.next)
        info["retry"] = (f"frames {missing[:8]} not matched by timestamp; chunks {asm.next}.. decoded straight "
                         "through")
    else:
        info["mode"] = "sequential (frames matched by count)"
    yield from _drain(_pyav_counting_frames(probe, asm.targets(), num_threads), asm)
    if asm.next < n:
        missing = asm.missing(asm.next)
        raise _BackendFailed(
            f"PyAV could not decode frames {missing[:8]}{'...' if len(missing) > 8 else ''} of {probe.path!r} "
            f"({probe.total_frames} frames indexed); the file is probably damaged"
        )


def _stream_pyav_guarded(probe, asm, num_threads, meta, fallback: bool, frames_multiple, sampling):
    """:func:`_stream_pyav` with load_video's error handling: PyAV failures are ``ValueError``; with
    ``backend=None`` the chunks not handed out yet come from decord where it may read the file and samples the
    same frame indices."""
    info = meta.extra
    try:
        try:
            yield from _stream_pyav(probe, asm, num_threads, info)
            return
        except av.error.FFmpegError as e:
            raise _BackendFailed(f"PyAV failed on {probe.path!r}: {type(e).__name__}: {e}") from None
        except (ValueError, _BackendFailed):
            raise
        except Exception as e:  # anything else unexpected: let the other backend try
            raise _BackendFailed(f"PyAV failed on {probe.path!r}: {type(e).__name__}: {e}") from None
    except _BackendFailed as e:
        error = e
    if not fallback:
        raise ValueError(str(error))
    warnings.warn(f"{error}; trying the next backend for chunks {asm.next}..", stacklevel=2)
    try:
        vr, total, fps, _ = _decord_reader(probe.path, probe)
        if sample_frame_indices(total, fps, frames_multiple=frames_multiple, **sampling) != asm.indices:
            raise _BackendFailed(f"decord samples other frames of {probe.path!r} (frame rate {fps} vs {meta.fps})")
    except _BackendFailed as e:
        raise ValueError(f"{error}; {e}") from None
    info["fallback"] = f"decord from chunk {asm.next}"
    yield from _stream_decord_guarded(vr, probe.path, asm, 3 * probe.width * probe.height, str(error))


def _stream_decord_guarded(vr, path, asm: _ChunkAssembler, frame_bytes: int, earlier: str | None = None):
    step = max(1, min(_DECORD_CHUNK, _DECORD_CHUNK_BYTES // max(frame_bytes, 1)))
    try:
        for k in range(asm.next, len(asm)):
            wanted = asm.wanted(k)
            for i in range(0, len(wanted), step):
                part = wanted[i : i + step]
                try:
                    batch = vr.get_batch(part).asnumpy()
                except Exception as e:
                    msg = f"decord failed on {path!r}: {str(e).splitlines()[-1][:300]}"
                    raise ValueError(f"{earlier}; {msg}" if earlier else msg) from None
                for j, idx in enumerate(part):
                    asm.put(idx, batch[j])
                del batch
            yield asm.take(k)
    finally:
        try:
            vr.seek(0)
        except Exception:
            pass
