"""Video decoding for VideoChat-Flash: the frames :mod:`frame_sampling` picks, resized as soon as they are decoded.
Stdlib, numpy and Pillow, shipped flat beside the Hub remote code; PyAV (the default) and decord 0.6.0 (the original's
reader, used only on files the PyAV probe passes) are optional. ``backend=None`` continues with decord where PyAV
fails (``UserWarning``); a forced backend never falls back. Both give the same frames for 8-bit video. Frame rate:
the stream's average rate, else PyAV's guessed rate, frames / duration, 1.0. Rotation is not applied. URLs, data
URLs, bytes and file objects are read from a local copy (:func:`fetch_media`).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import os
import re
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .frame_sampling import FrameSampling, as_int, positive_rate

try:  # PyAV: optional (remote-code loading refuses unguarded optional imports)
    import av
except ImportError:  # pragma: no cover - exercised only without PyAV
    av = None

try:  # decord 0.6.0: optional. Never decord2, which returns wrong frames after seeks.
    import decord
except ImportError:  # pragma: no cover - exercised only without decord
    decord = None

__all__ = ["IMAGE_EXTENSIONS", "MAX_FETCH_BYTES", "FetchedMedia", "VideoLoadMetadata", "VideoReadError", "VideoSegment",
           "available_backends", "fetch_media", "folder_frames", "is_remote", "is_still_image", "iter_video_chunks",
           "load_video", "local_media", "parse_size", "resize_frame", "rgb_frame"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_TIMEOUTS_S = (20.0, 20.0)  # PyAV interrupts opening, and each blocking read, after this: broken input must not hang
_DECORD_CHUNK = 16  # frames per decord get_batch call ...
_DECORD_CHUNK_BYTES = 16 << 20  # ... and at most this many bytes of full-resolution frames (decord pools batch buffers)
_SEEK_MIN_GAP = 16  # in seek mode, gaps of at most this many packets are read through instead
# where decord 0.6.0 was verified frame-exact against PyAV (see _Probe.decord_problem)
_DECORD_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
_DECORD_CODECS = ("h264", "vp8", "vp9", "mjpeg", "ffv1", "png", "rawvideo")
_NONE_TS = np.iinfo(np.int64).min
MAX_FETCH_BYTES = 2 << 30  # URLs, data URLs, bytes and file objects larger than this are refused (fetch_media)
_FETCH_TIMEOUT_S = 30.0
_FETCHED_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # a local copy of one takes its suffix


@dataclass
class VideoLoadMetadata:
    """What was sampled; ``meta.field``, ``meta["field"]``, ``meta.get()``, ``"field" in meta``, :meth:`to_dict`."""

    frame_indices: list[int]
    fps: float | None  # frame rate of the source; None for decoded frames given without video_fps
    duration: float | None  # seconds: total_frames / fps (None when fps is)
    total_frames: int  # frames in the source (decodable frames of a file)
    backend: str  # "pyav", "decord" or "frames" (decoded frames and still images)
    width: int  # source frame size
    height: int
    path: str | None = None
    extra: dict = field(default_factory=dict)  # diagnostics: decode mode, spans, retry, fallback, fps source

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def timestamps(self) -> list[float] | None:
        """Seconds of each sampled frame (index / fps); None when fps is."""
        return None if self.fps is None else [i / self.fps for i in self.frame_indices]

    def __contains__(self, key: str) -> bool:
        return key in ("num_frames", "timestamps") or key in self.__dataclass_fields__

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def to_dict(self) -> dict:
        return asdict(self)


def _metadata(indices, fps, total, backend, width, height, path, extra, duration=None) -> VideoLoadMetadata:
    duration = duration if duration is not None else None if fps is None else total / fps  # (a segment's: its own)
    return VideoLoadMetadata([int(i) for i in indices], fps, duration, int(total), backend, int(width), int(height),
                             path, extra)


class VideoSegment(str):
    """A video file (or frame folder) path that carries the segment ``[start, end]`` seconds to sample from: what a
    ``{"type": "video", "path": ..., "start": ..., "end": ...}`` block becomes; a ``str``, so it passes wherever a path
    does. Either end may be None (the video's start / end)."""

    def __new__(cls, path, start: float | None = None, end: float | None = None):
        path = local_media(path, urls=False)  # bytes have no path
        segment = super().__new__(cls, os.fspath(path))
        segment.start, segment.end, segment.source = start, end, path  # (a local copy lives as long as its segment)
        return segment

    def __repr__(self) -> str:
        name = getattr(self.source, "source_name", repr(str(self)))  # a local copy: by its source
        return f"VideoSegment({name}, start={self.start}, end={self.end})"


FOLDER_FRAME = re.compile(r"_(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def folder_frames(path: str) -> list[str]:
    """The frame images of a folder in the original reader's order: ``*_<N>.jpg|jpeg|png`` by N (other images
    first, by name); other files are ignored. ValueError when it holds none."""
    names = [name for name in os.listdir(path) if name.lower().endswith((".jpg", ".jpeg", ".png"))]
    if not names:
        raise ValueError(f"cannot read video {path!r}: a folder of frames needs *_<N>.jpg / .jpeg / .png images")
    number = {name: int(m.group(1)) if (m := FOLDER_FRAME.search(name)) else -1 for name in names}
    return [os.path.join(path, name) for name in sorted(names, key=lambda name: (number[name], name))]


def is_still_image(media) -> bool:
    """A still image rather than a video: a PIL image, an image file (by its extension), a 3-D array / tensor (one
    (H, W, 3) or (3, H, W) frame); a URL by its path's extension, a ``data:image/`` URL, bytes or a seekable file
    object by its content. A GIF is a video."""
    if isinstance(media, str) and media[:5].lower() == "data:":
        return media[5:11].lower() == "image/" and media[11:14].lower() != "gif"
    if isinstance(media, (str, os.PathLike)):
        path = urllib.parse.urlsplit(media).path if is_remote(media) else os.fspath(media)
        return path.lower().endswith(IMAGE_EXTENSIONS)
    if isinstance(media, (bytes, bytearray, memoryview)):
        return _image_suffix(io.BytesIO(media)) not in ("", ".gif")
    if hasattr(media, "read") and getattr(media, "seekable", lambda: False)():
        position, suffix = media.tell(), _image_suffix(media)  # PIL reads from the start: put the file back
        media.seek(position)
        return suffix not in ("", ".gif")
    return isinstance(media, Image.Image) or getattr(media, "ndim", None) == 3


def is_remote(source) -> bool:
    """An http(s) or ``data:`` URL, bytes, or a binary file object: media read from a local copy (fetch_media)."""
    if isinstance(source, str):
        return source[:8].lower().startswith(("http://", "https://", "data:"))
    return isinstance(source, (bytes, bytearray, memoryview)) or callable(getattr(source, "read", None))


class FetchedMedia(str):
    """A local copy of a remote source: a path (a ``str``) named in messages (``repr``) by its source. Its file is
    removed once nothing refers to the copy: a lazy reader (a chunk iterator, metadata) keeps it while it needs it."""

    def __new__(cls, path, source_name: str | None = None):
        copy = super().__new__(cls, path)
        copy.source_name = source_name or repr(str(path))
        return copy

    def __repr__(self) -> str:
        return self.source_name


def fetch_media(source) -> FetchedMedia:
    """A local copy of a remote source (:func:`is_remote`): URLs read by urllib (30 s timeout), bytes and file objects
    copied; at most :data:`MAX_FETCH_BYTES`. A PNG, JPEG, GIF, BMP, WebP or TIFF image gets its suffix, so that it
    reads as that image (a GIF: as a video); videos need none. Failures: a one-line ``ValueError`` naming the source."""
    name = _source_name(source)
    handle, path = tempfile.mkstemp(prefix="videochat_flash_")
    try:
        with open(handle, "wb") as file, _open_source(source) as reader:
            while block := reader.read(1 << 20):
                if file.tell() + len(block) > MAX_FETCH_BYTES:
                    raise ValueError(f"it is larger than video_loading.MAX_FETCH_BYTES ({MAX_FETCH_BYTES:,} bytes)")
                file.write(block)
        suffix = _image_suffix(path)
        os.replace(path, path + suffix)  # (videos keep the bare name: PyAV reads their content)
        path += suffix
    except (OSError, ValueError, TypeError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, a
        _remove(path)  # truncated download; bad base64; a text-mode file
        reason = e.reason if type(e) is urllib.error.URLError else _last_line(e)  # (an HTTPError says its status)
        raise ValueError(f"cannot fetch {name}: {reason}") from None
    except BaseException:  # (KeyboardInterrupt, ...): no partial copy left behind
        _remove(path)
        raise
    copy = FetchedMedia(path, name)
    weakref.finalize(copy, _remove, path)
    return copy


def local_media(source, urls: bool = True):
    """`source` itself, or its local copy (:func:`fetch_media`) when it is remote; with ``urls=False`` only bytes and
    file objects are copied (a URL, a string, stays for where it is read: it travels, and keeps a segment, as one)."""
    return fetch_media(source) if is_remote(source) and (urls or not isinstance(source, str)) else source


def _open_source(source):
    if isinstance(source, str) and not is_remote(source):  # (urllib would read file:// URLs, for one)
        raise ValueError("only http(s) and data: URLs are fetched")
    if isinstance(source, str):
        return urllib.request.urlopen(source, timeout=_FETCH_TIMEOUT_S)  # http(s); data: URLs are decoded by urllib
    return contextlib.nullcontext(source) if hasattr(source, "read") else io.BytesIO(source)  # (the caller's to close)


def _source_name(source) -> str:
    """How messages name a remote source, never by its bytes: a URL, a data URL by its type and length, bytes by their
    size, a file object by its name."""
    if isinstance(source, str):
        is_data = source[:5].lower() == "data:"
        return f"<{source[:60].split(',')[0]} URL of {len(source):,} characters>" if is_data else repr(source[:300])
    return f"<file object {getattr(source, 'name', type(source).__name__)!r}>" if hasattr(source, "read") else (
        f"<{memoryview(source).nbytes:,} bytes>")


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _image_suffix(file) -> str:
    """``".png"``, ``".jpeg"``, ``".gif"``, ... for an image (a path or binary file) of those formats, else ``""``."""
    try:
        with Image.open(file, formats=_FETCHED_IMAGE_FORMATS) as image:
            return "." + image.format.lower()
    except Exception:  # noqa: BLE001 - not an image of those formats (PIL raises several kinds)
        return ""


def available_backends() -> list[str]:
    """Installed decoding backends, in the order ``backend=None`` tries them."""
    return [b for b, mod in (("pyav", av), ("decord", decord)) if mod is not None]


def parse_size(size) -> tuple[int, int] | None:
    """``(height, width)`` of an int S (S x S), a (height, width) pair or a ``{"height", "width"}`` dict; None for
    None. Anything else, and sizes <= 0, raise ``ValueError``."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = (as_int("size", s) for s in size)
    elif isinstance(size, dict) and "height" in size and "width" in size:
        h, w = as_int("size", size["height"]), as_int("size", size["width"])
    else:
        raise ValueError(f"size must be an int, (height, width), a {{'height', 'width'}} dict or None, got {size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def resize_frame(frame: np.ndarray, size) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 frame resized to :func:`parse_size` ``(size)`` exactly as the original image processor
    does: PIL bicubic on the uint8 image, aspect ratio not kept, no crop. ``size=None`` returns it as it is."""
    hw = parse_size(size)
    frame = np.asarray(frame)
    return frame if hw is None else np.asarray(Image.fromarray(frame).resize((hw[1], hw[0]), Image.BICUBIC))


def _uint8_array(x, what: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)  # a torch tensor
    if arr.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB frames, got dtype {arr.dtype}")
    return arr


def rgb_frame(frame, what: str = "frame") -> np.ndarray:
    """One image as a contiguous ``(H, W, 3)`` uint8 RGB array: a PIL image (any mode), or an ``(H, W, 3)`` /
    ``(3, H, W)`` uint8 numpy array or torch tensor. Anything else raises ``ValueError`` naming ``what``."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    arr = _uint8_array(frame, what)
    if arr.ndim == 3 and arr.shape[-1] != 3 and arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{what} must be an (H, W, 3) image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


class _ChunkAssembler:
    """The sampled indices in chunks of ``chunk_frames`` (None: one). :meth:`put` (thread-safe) resizes a frame once and
    writes it into its slots in the buffers of the chunks not handed out yet, which are the output: no copies."""

    def __init__(self, indices: list[int], chunk_frames: int | None, hw, src_hw, label: str):
        step = chunk_frames or len(indices)
        self.indices, self.hw, self.label = indices, hw, label
        self.chunks = [indices[i : i + step] for i in range(0, len(indices), step)]
        self.unique = [sorted(set(chunk)) for chunk in self.chunks]
        self.slots: dict[int, list[tuple[int, int]]] = {}  # index -> its (chunk, position)s, in chunk order
        for k, chunk in enumerate(self.chunks):
            for j, idx in enumerate(chunk):
                self.slots.setdefault(idx, []).append((k, j))
        self.shape = None if hw is None and src_hw is None else (*(hw or src_hw), 3)
        self.buffers: dict[int, np.ndarray] = {}
        self.held: set[int] = set()
        self.next = 0  # the next chunk to hand out
        self._lock = threading.Lock()

    def targets(self) -> list[int]:
        """Indices still needed by the chunks not handed out yet, increasing."""
        return sorted({i for chunk in self.unique[self.next :] for i in chunk if i not in self.held})

    def missing(self, k: int) -> list[int]:
        return [i for i in self.unique[k] if i not in self.held]

    def put(self, idx: int, rgb: np.ndarray) -> None:
        if idx in self.held or self.slots.get(idx, [(-1, 0)])[-1][0] < self.next:
            return  # not sampled, written already, or only in chunks handed out
        img = resize_frame(rgb, self.hw)  # outside the lock: resizing is the costly part
        with self._lock:
            if idx in self.held:
                return
            self.shape = self.shape or img.shape
            if img.shape != self.shape:
                raise ValueError(f"{self.label}: frame {idx} is {rgb.shape[1]}x{rgb.shape[0]} but earlier frames are "
                                 f"{self.shape[1]}x{self.shape[0]}; pass size= to resize frames of varying size")
            for k, j in self.slots[idx]:
                if k >= self.next:
                    if k not in self.buffers:
                        self.buffers[k] = np.empty((len(self.chunks[k]), *self.shape), dtype=np.uint8)
                    self.buffers[k][j] = img
            self.held.add(idx)

    def take(self, k: int) -> np.ndarray:
        """Chunk ``k``, the next one, all its frames written: a (n, H, W, 3) uint8 array."""
        assert k == self.next and not self.missing(k)
        self.next = k + 1
        return self.buffers.pop(k)


def _drain(source, asm: _ChunkAssembler) -> Iterator[np.ndarray]:
    """The chunks of ``asm`` from ``source``, ``(index, rgb)`` in increasing index order, each once a frame at or past
    its last index came out; stops at an incomplete one (``asm.next``) for the caller to decide, or when source ends."""
    n = len(asm.chunks)
    try:
        for idx, rgb in source:
            asm.put(idx, rgb)
            while asm.next < n and idx >= asm.unique[asm.next][-1]:
                if asm.missing(asm.next):
                    return
                yield asm.take(asm.next)
    finally:
        source.close()
    while asm.next < n and not asm.missing(asm.next):
        yield asm.take(asm.next)


class VideoReadError(ValueError):
    """A file no backend can decode (not a media file, no video stream, no frames): raised at once."""


class _BackendFailed(RuntimeError):
    """One backend failed on a file another backend might read."""


@dataclass
class _Probe:
    path: str
    stream_index: int
    codec: str
    container_format: str
    width: int
    height: int
    fps: float | None  # container average rate (None when missing)
    fallback_fps: float  # what to use when fps is None
    declared_frames: int  # stream header count (0 = unknown)
    pts: np.ndarray  # per kept packet, decode order
    key_pos: np.ndarray  # positions of the keyframe packets
    frame_pos: np.ndarray  # frame index (display order) -> packet position
    use_pts: bool  # unique, known timestamps: frames are matched by timestamp
    truncated: bool
    n_corrupt: int
    open_gop: bool  # some frames are shown before the keyframe they follow in decode order

    @property
    def total_frames(self) -> int:
        return int(self.frame_pos.shape[0])

    @property
    def gop(self) -> float:
        return self.total_frames / max(int(self.key_pos.shape[0]), 1)

    def decord_problem(self) -> str | None:
        """Why decord 0.6.0 must not read this file (None: it may): it silently returns wrong frames for repeated
        timestamps, open GOPs, HEVC, MPEG-4 part 2 with B frames, H.264 in AVI / MPEG-TS, and crashes on damage."""
        if not self.use_pts:
            return "its timestamps are missing or not unique (decord returns wrong frames then)"
        if self.truncated:  # corrupt packets count as truncation
            return "it is truncated or has corrupt packets"
        if self.container_format not in _DECORD_FORMATS:
            return f"decord 0.6.0 returns wrong frames after seeking in {self.container_format!r} files"
        if self.codec not in _DECORD_CODECS:
            return f"decord 0.6.0 returns wrong frames for {self.codec!r} video"
        if self.open_gop:
            return "it has open GOPs (frames shown before their keyframe), where decord 0.6.0 returns wrong frames"
        return None


def _pyav_probe(path: str) -> _Probe:
    """Index the packets of the file's video stream, without decoding: display order, truncation, open GOPs, frame
    rate. Unreadable files raise :class:`VideoReadError`."""
    try:
        container = av.open(path, timeout=_TIMEOUTS_S, metadata_errors="ignore")
    except av.error.ExitError as e:  # interrupted by the timeout
        raise VideoReadError(f"cannot read video {path!r}: opening timed out ({e})") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoReadError(f"cannot read video {path!r}: not a readable media file ({e})") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoReadError(f"cannot read video {path!r}: it has no video stream (streams: {', '.join(kinds)})")
        vs = container.streams.best("video") or container.streams.video[0]
        pts, key, is_frame, n_corrupt = [], [], [], 0
        try:
            for pkt in container.demux(vs):
                if pkt.size and pkt.is_corrupt:
                    n_corrupt += 1
                elif pkt.size:
                    pts.append(_NONE_TS if pkt.pts is None else int(pkt.pts))
                    key.append(bool(pkt.is_keyframe))
                    is_frame.append(not pkt.is_discard)  # edit-list discards are decoded, never shown
        except av.error.ExitError as e:
            raise VideoReadError(f"cannot read video {path!r}: reading timed out ({e})") from None
        except av.error.FFmpegError as e:
            n_corrupt += 1  # read error part way: keep what was read
            warnings.warn(f"{path}: read error after {len(pts)} packets ({e})", stacklevel=4)
        pts, key, is_frame = np.asarray(pts, np.int64), np.asarray(key, bool), np.asarray(is_frame, bool)
        cc = vs.codec_context
        width, height, n_frames = int(cc.width or 0), int(cc.height or 0), int(is_frame.sum())
        if n_frames == 0:
            raise VideoReadError(f"cannot read video {path!r}: its video stream has no readable frames")
        if width <= 0 or height <= 0:
            raise VideoReadError(f"cannot read video {path!r}: the video stream has no frame size (codec {cc.name})")
        frame_ts = pts[is_frame]
        use_pts = bool((frame_ts != _NONE_TS).all()) and np.unique(pts).shape[0] == pts.shape[0]
        positions = np.flatnonzero(is_frame)
        if use_pts:
            positions = positions[np.argsort(frame_ts, kind="stable")]
        declared = int(vs.frames or 0)
        truncated = (declared > 0 and n_frames < declared) or n_corrupt > 0
        if truncated and use_pts and positions.shape[0] > 2:
            # a cut file can hold a frame whose display-order neighbours were lost with the cut (e.g. a P frame
            # without the B frames before it): keep frames up to the first timestamp gap among the last 16
            steps = np.diff(pts[positions])
            step, start = float(np.median(steps)), max(0, steps.shape[0] - 16)
            gaps = np.flatnonzero(steps[start:] > 1.5 * step)
            if step > 0 and gaps.shape[0]:
                positions = positions[: start + int(gaps[0]) + 1]
        last_key = np.maximum.accumulate(np.where(key, np.arange(key.shape[0]), -1))  # -1: before any keyframe
        open_gop = use_pts and bool((pts[last_key >= 0] < pts[last_key[last_key >= 0]]).any())
        fallback = positive_rate(vs.guessed_rate)
        if fallback is None and vs.duration and vs.time_base:
            fallback = positive_rate(n_frames / float(vs.duration * vs.time_base))
        return _Probe(path, vs.index, cc.name, str(container.format.name), width, height,
                      positive_rate(vs.average_rate), fallback or 1.0, declared, pts, np.flatnonzero(key), positions,
                      use_pts, truncated, n_corrupt, open_gop)


def _h264_nonref_test(cc):
    """Return f(packet) -> True when an AVCC H.264 packet holds only non-reference slices (nal_ref_idc 0):
    no other frame depends on it, so it need not be decoded unless it is wanted. None for other codecs."""
    ext = bytes(cc.extradata or b"")
    if cc.name != "h264" or len(ext) < 7 or ext[0] != 1:
        return None  # not H.264, or an Annex B stream: not handled (always decoded)
    nls = (ext[4] & 3) + 1

    def nonref(pkt) -> bool:
        b = bytes(pkt)
        i, n, vcl = 0, len(b), False
        while i + nls <= n:
            size = int.from_bytes(b[i : i + nls], "big")
            i += nls
            if size <= 0 or i + size > n or b[i] & 0x80:
                return False
            nal_type = b[i] & 0x1F
            if nal_type not in (1, 5, 6, 9, 12) or (nal_type in (1, 5) and b[i] & 0x60):
                return False  # a reference slice, or not a slice / SEI / delimiter / filler (e.g. a new PPS): keep
            vcl = vcl or nal_type in (1, 5)
            i += size
        return vcl and i == n

    return nonref


def _use_seek(n_targets: int, gop: float, total_frames: int) -> bool:
    return n_targets * gop / 2 < total_frames  # a random access costs ~half a GOP: seek when that beats reading through


def _plan_ranges(probe: _Probe, targets: list[int]) -> list[list[int]]:
    """Packet spans [start, end] (decode order, merged) that must be decoded to output the target frames."""
    spans = []
    for t in targets:
        pos = int(probe.frame_pos[t])
        j = int(np.searchsorted(probe.key_pos, pos, side="right")) - 1
        while j >= 0 and probe.pts[probe.key_pos[j]] > probe.pts[pos]:  # open GOP: shown before its keyframe
            j -= 1
        spans.append((int(probe.key_pos[j]) if j >= 0 else 0, pos))
    merged: list[list[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


class _Decoder:
    """An open container (``with dec.container``) and codec context of the probed stream, with ``threads`` threads."""

    def __init__(self, probe: _Probe, threads: int):
        self.container = av.open(probe.path, timeout=_TIMEOUTS_S, metadata_errors="ignore")
        self.stream = self.container.streams[probe.stream_index]
        self.cc = self.stream.codec_context
        if threads > 1:
            self.cc.thread_type = "AUTO"
        self.cc.thread_count = threads

    def packets(self, pos_of_pts: dict[int, int] | None = None) -> Iterator:
        """Packets from the demuxer's position; with ``pos_of_pts``, ``(position, packet)`` of the indexed ones."""
        for pkt in self.container.demux(self.stream):
            if not pkt.size or pkt.is_corrupt:
                continue
            if pos_of_pts is None:
                yield pkt
            elif pkt.pts is not None and int(pkt.pts) in pos_of_pts:
                yield pos_of_pts[int(pkt.pts)], pkt

    def decode(self, pkt) -> list:
        """Frames out after ``pkt`` (None: flush). A damaged packet gives none (a wanted frame is then missing)."""
        try:
            return self.cc.decode(pkt)
        except av.error.FFmpegError as e:
            if pkt is not None and not isinstance(e, av.error.InvalidDataError):
                raise
            return []

    def seek(self, probe: _Probe, pos_of_pts: dict[int, int], start: int) -> Iterator[tuple[int, Any]]:
        """Indexed packets from one at or before position ``start``. A demuxer may land past the target: then
        earlier keyframes are tried, then the beginning."""
        ts = int(probe.pts[start])
        for attempt in range(4 if start > 0 else 0):
            try:
                self.container.seek(ts, stream=self.stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                break
            it = self.packets(pos_of_pts)
            first = next(it, None)
            if first is None:
                break
            if first[0] <= start:
                return itertools.chain([first], it)
            j = int(np.searchsorted(probe.key_pos, first[0], side="left")) - 1 - attempt
            if j < 0:
                break
            ts = int(probe.pts[probe.key_pos[j]])
        if start > 0:
            with contextlib.suppress(av.error.FFmpegError):
                self.container.seek(0, backward=True, any_frame=False)
        return self.packets(pos_of_pts)


def _pyav_worker_frames(probe: _Probe, ranges, target_of_pos: dict[int, int], pos_of_pts: dict[int, int],
                        seek_mode: bool, threads: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode the packet spans ``ranges`` in order; yield ``(frame index, rgb)`` for every wanted frame as soon as it
    is decoded (in display order: frames leave the decoder sorted by timestamp, and spans are decoded in order)."""
    dec = _Decoder(probe, threads)
    with dec.container:
        nonref = _h264_nonref_test(dec.cc)

        def wanted(frames):
            for f in frames:
                pos = None if f.pts is None else pos_of_pts.get(int(f.pts))
                if pos in target_of_pos:
                    yield target_of_pos[pos], f.to_ndarray(format="rgb24")

        it, item, cur = None, None, 0  # packet iterator, (position, packet) read but not used yet, next position
        for start, end in ranges:
            if it is None or (seek_mode and start - cur > _SEEK_MIN_GAP):
                it, item = dec.seek(probe, pos_of_pts, start), None
            fed = False
            while True:
                item = next(it, None) if item is None else item
                if item is None or item[0] > end:
                    break
                pos, pkt = item
                item, cur = None, pos + 1
                if pos >= start and (pos in target_of_pos or nonref is None or not nonref(pkt)):
                    yield from wanted(dec.decode(pkt))
                    fed = True
            if item is not None:
                cur = item[0]
            if fed:  # the span's last frames, then a clean decoder for the next span
                yield from wanted(dec.decode(None))
                dec.cc.flush_buffers()


def _pyav_counting_frames(probe: _Probe, targets: list[int], threads: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode from the start, numbering frames in output order; yield ``(n, rgb)`` for the wanted ``n``, increasing."""
    want, last, n = set(targets), max(targets), 0
    dec = _Decoder(probe, threads)
    with dec.container:
        for pkt in itertools.chain(dec.packets(), [None]):
            for f in dec.decode(pkt):
                if n in want:
                    yield n, f.to_ndarray(format="rgb24")
                n += 1
            if n > last:
                return


def _span_chunks(probe: _Probe, asm: _ChunkAssembler, num_threads: int, seek_mode: bool, info: dict):
    """Chunks from timestamp-matched spans, up to the first with frames missing. One decoder through every span, paused
    between chunks, with one thread or when reading through several chunks (their spans share GOPs: decoders of
    their own would decode each chunk again from its keyframe). Otherwise each chunk's spans are shared among up to
    ``num_threads`` decoders (converting and resizing in parallel too, they beat one frame-threaded decoder)."""
    pos_of_pts = {int(p): i for i, p in enumerate(probe.pts.tolist())}
    info.update(workers=0, spans=0, packets_in_spans=0)

    def workers(targets: list[int], most: int) -> list[Iterator[tuple[int, np.ndarray]]]:
        """Frame iterators of at most ``most`` decoders sharing the targets' spans, about equal packets each."""
        ranges = _plan_ranges(probe, targets)
        total, acc, most = sum(e - s + 1 for s, e in ranges), 0, min(most, len(ranges))
        info["spans"] += len(ranges)
        info["packets_in_spans"] += int(total)
        target_of_pos = {int(probe.frame_pos[t]): t for t in targets}
        groups: list[list[list[int]]] = [[]]
        for s, e in ranges:
            if groups[-1] and acc >= total * len(groups) / most and len(groups) < most:
                groups.append([])
            groups[-1].append([s, e])
            acc += e - s + 1
        info["workers"] = max(info["workers"], len(groups))
        threads = max(1, num_threads // len(groups))
        return [_pyav_worker_frames(probe, g, target_of_pos, pos_of_pts, seek_mode, threads) for g in groups]

    def run(frames):
        for idx, rgb in frames:
            asm.put(idx, rgb)

    if num_threads == 1 or (not seek_mode and len(asm.chunks) > 1):
        yield from _drain(workers(asm.targets(), 1)[0], asm)
        return
    for k in range(asm.next, len(asm.chunks)):
        if asm.missing(k):
            with ThreadPoolExecutor(num_threads) as pool:
                for future in [pool.submit(run, frames) for frames in workers(asm.missing(k), num_threads)]:
                    future.result()
        if asm.missing(k):
            return
        yield asm.take(k)


def _pyav_chunks(probe: _Probe, asm: _ChunkAssembler, num_threads: int, meta: VideoLoadMetadata, fallback: bool,
                 pick) -> Iterator[np.ndarray]:
    """Chunks decoded by PyAV; from the first chunk whose frames do not match by timestamp, decoded again straight
    through and matched by counting. Failures raise ``ValueError``; with ``fallback``, decord reads the chunks left
    instead if it may read the file and `pick` (the sampling rule) gives it the same indices."""
    info = meta.extra
    try:
        if probe.use_pts:
            seek_mode = _use_seek(len(asm.targets()), probe.gop, probe.total_frames)
            info["mode"] = "seek" if seek_mode else "sequential"
            yield from _span_chunks(probe, asm, num_threads, seek_mode, info)
            if asm.next < len(asm.chunks):
                info["retry"] = (f"frames {asm.missing(asm.next)[:8]} not matched by timestamp; chunks {asm.next}.. "
                                 "decoded straight through")
        else:
            info["mode"] = "sequential (frames matched by count)"
        if asm.next < len(asm.chunks):
            yield from _drain(_pyav_counting_frames(probe, asm.targets(), num_threads), asm)
        if asm.next == len(asm.chunks):
            return
        missing = asm.missing(asm.next)
        raise _BackendFailed(f"PyAV could not decode frames {missing[:8]}{'...' if len(missing) > 8 else ''} of "
                             f"{probe.path!r} ({probe.total_frames} frames indexed); the file is probably damaged")
    except Exception as e:  # noqa: BLE001 - anything unexpected: the other backend may do better
        if isinstance(e, ValueError) and not isinstance(e, av.error.FFmpegError):
            raise  # our own checks (e.g. frames of varying size): no backend does better
        error = e if isinstance(e, _BackendFailed) else f"PyAV failed on {probe.path!r}: {type(e).__name__}: {e}"
    if not fallback:
        raise ValueError(str(error)) from None
    warnings.warn(f"{error}; trying the next backend for chunks {asm.next}..", stacklevel=2)
    try:
        vr, total, fps, _, _ = _decord_reader(probe.path, probe)
        if pick(total, fps)[0] != asm.indices:
            raise _BackendFailed(f"decord samples other frames of {probe.path!r} (frame rate {fps} vs {meta.fps})")
    except _BackendFailed as e:
        raise ValueError(f"{error}; {e}") from None
    info["fallback"] = f"decord from chunk {asm.next}"
    yield from _decord_chunks(vr, probe.path, asm, (probe.height, probe.width), str(error))


def _last_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[-1][:300]


def _decord_reader(path, probe):
    """An open decord reader of a file decord may read: ``(reader, total frames, fps, fps source, (h, w))``."""
    problem = probe.decord_problem() if probe is not None else None
    if problem:
        raise _BackendFailed(f"decord is not used on {path!r}: {problem}")
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total, hw = len(vr), None if probe is None else (probe.height, probe.width)
        if hw is None and total > 0:  # no probe: the first frame tells the size
            hw = tuple(int(d) for d in vr[0].shape[:2])
            vr.seek(0)
    except Exception as e:  # DECORDError / RuntimeError
        raise _BackendFailed(f"decord cannot read {path!r}: {_last_line(e)}") from None
    if probe is not None and total != probe.total_frames:
        raise _BackendFailed(f"decord is not used on {path!r}: it counts {total} frames where the packet index has "
                             f"{probe.total_frames}")
    if total <= 0:
        raise _BackendFailed(f"decord finds no frames in {path!r}")
    fps = positive_rate(vr.get_avg_fps())
    fallback = 1.0 if probe is None else probe.fps or probe.fallback_fps
    return vr, total, fps or fallback, "fallback" if fps is None else "stream", hw


def _decord_chunks(vr, path: str, asm: _ChunkAssembler, src_hw, earlier: str | None = None) -> Iterator[np.ndarray]:
    """Chunks read by decord in batches of at most 16 frames / 16 MB of full-resolution frames."""
    step = max(1, min(_DECORD_CHUNK, _DECORD_CHUNK_BYTES // (3 * src_hw[0] * src_hw[1])))
    try:
        for k in range(asm.next, len(asm.chunks)):
            wanted = asm.missing(k)
            for i in range(0, len(wanted), step):
                try:
                    batch = vr.get_batch(wanted[i : i + step]).asnumpy()
                except Exception as e:
                    msg = f"decord failed on {path!r}: {_last_line(e)}"
                    raise ValueError(f"{earlier}; {msg}" if earlier else msg) from None
                for idx, rgb in zip(wanted[i : i + step], batch):
                    asm.put(idx, rgb)
                del batch
            yield asm.take(k)
    finally:
        with contextlib.suppress(Exception):
            vr.seek(0)  # decord's reader thread decodes ahead of its position: park it at the start


def _classify_input(video) -> tuple[str, Any, str | None]:
    """``("file" | "gif", None, path)``, ``("folder", its frame paths, path)``, or ``("image" | "frames", a list or
    (T, H, W, 3) array of frames, path or None)``. Remote sources are fetched: the path is their local copy."""
    video = local_media(video)
    if isinstance(video, (str, os.PathLike)):
        path = os.fsdecode(os.fspath(video))
        if not os.path.exists(path):
            if path.lower().startswith(("ftp://", "rtsp://", "s3://")):
                raise ValueError(f"only http(s) and data: URLs are fetched: download {path!r} first and pass the "
                                 "local file")
            raise FileNotFoundError(f"video file not found: {path!r}" if path else "video path is empty")
        if os.path.isdir(path):
            return "folder", folder_frames(path), path  # a video as a folder of frames (1 frame per second)
        problem = ("not a regular file" if not os.path.isfile(path) else "permission denied"
                   if not os.access(path, os.R_OK) else "the file is empty" if os.path.getsize(path) == 0 else None)
        if problem:
            raise ValueError(f"cannot read video {path!r}: {problem}")
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            return "gif" if path.lower().endswith(".gif") else "file", None, path
        try:
            with Image.open(path) as img:
                return "image", [img.convert("RGB")], path  # convert() loads (and checks) the whole image
        except Exception as e:  # UnidentifiedImageError, truncated image, decompression bomb, ...
            raise ValueError(f"cannot read image {path!r}: {e}") from None
    if isinstance(video, Image.Image):
        return "image", [video], None
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("the list of frames is empty")
        return "frames", list(video), None
    if not isinstance(video, np.ndarray) and not hasattr(video, "detach"):
        raise TypeError(
            f"video must be a path, URL, bytes, a file object, a PIL image, a list of frames or a uint8 array/tensor, "
            f"got {type(video).__name__}")
    arr = _uint8_array(video, "frames")
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return "image", [arr], None
    if arr.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, 3) or (T, 3, H, W) uint8, got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"frames must be non-empty RGB (3 channels), got shape {tuple(arr.shape)}")
    return "frames", arr, None


def iter_video_chunks(video, chunk_frames: int | None = 32, *, size=None, backend: str | None = None,
                      video_fps: float | None = None, num_threads: int | None = None,
                      sampling: FrameSampling | None = None, start: float | None = None, end: float | None = None,
                      **sampling_options) -> tuple[VideoLoadMetadata, Iterator[np.ndarray]]:
    """``(metadata, chunks)``: the sampled frames of ``video`` as (n, H, W, 3) uint8 arrays of ``chunk_frames`` frames
    (None: one chunk), in time order, each decoded when asked for, so memory holds about one chunk of frames.

    ``video``: a video path (a GIF: every frame, taken as 1 frame per second, as the original's gif reader; a folder
    of ``*_<N>.jpg|png`` frames: 1 frame per second, see :func:`folder_frames`), or a video or image as an http(s)
    URL, a ``data:`` URL, bytes or a binary file object (:func:`fetch_media`); a still image (a path, a
    ``PIL.Image``, an (H, W, 3) uint8 array); decoded frames (a list of PIL images / (H, W, 3) arrays, a
    (T, H, W, 3) / (T, 3, H, W) uint8 numpy array or torch tensor). ``start`` / ``end`` (seconds, or a
    :class:`VideoSegment` path) sample a segment of a file or folder by the original's rules (the metadata's
    ``duration`` is the segment's); GIFs have none, as in the original. ``size``
    (:func:`parse_size`) resizes each frame as it is decoded. ``backend``: None, "pyav" or "decord" (see the module).
    ``video_fps``: the rate of decoded frames (``fps=`` sampling needs it). ``num_threads``: default the usable CPUs, at
    most 8. ``sampling``: a :class:`FrameSampling`, or its fields as keywords. Bad arguments and inputs raise here
    (``FileNotFoundError``, or ``ValueError`` naming the file and why), decoding failures from the iterator
    (``ValueError``). A truncated file gives its readable frames with a warning; ``metadata.extra`` fills in later.
    """
    if chunk_frames is not None and as_int("chunk_frames", chunk_frames) <= 0:
        raise ValueError(f"chunk_frames must be > 0, got chunk_frames={chunk_frames}")
    if sampling is None:
        sampling = FrameSampling(**sampling_options)
    elif sampling_options:
        raise ValueError(f"give sampling= or sampling options ({', '.join(sampling_options)}), not both")
    hw = parse_size(size)
    if backend not in (None, "pyav", "decord"):
        raise ValueError(f"backend must be None, 'pyav' or 'decord', got {backend!r}")
    if num_threads is None:  # the usable CPUs, at most 8
        num_threads = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    num_threads = max(1, as_int("num_threads", num_threads))
    start, end = (getattr(video, "start", None), getattr(video, "end", None)) if start is None and end is None else (
        start, end)
    kind, frames, path = _classify_input(video)
    if (start is not None or end is not None) and kind not in ("file", "folder"):
        raise ValueError(f"start / end segments are for video files and frame folders, not {kind}s"
                         + (" (the original's gif reader has none)" if kind == "gif" else ""))
    if kind in ("file", "gif"):
        return _open_file(path, chunk_frames, hw, backend, sampling, num_threads, (start, end), kind == "gif")
    if kind == "folder":
        indices, seconds = sampling.folder_indices(len(frames), start, end)
        first = _read_image(frames[indices[0]])  # its size for the metadata (closed again at once)
        asm = _ChunkAssembler(indices, chunk_frames, hw, None, path)
        meta = _metadata(indices, 1.0, len(frames), "frames", first.shape[1], first.shape[0], path,
                         {"input": "folder"}, seconds)
        return meta, _drain(((i, _read_image(frames[i])) for i in asm.targets()), asm)
    rate = 1.0 if kind == "image" else None if video_fps is None else positive_rate(video_fps)
    if kind == "frames" and video_fps is not None and rate is None:
        raise ValueError(f"video_fps must be > 0, got {video_fps!r}")
    first = rgb_frame(frames[0], "frame 0")
    if 0 in first.shape:
        raise ValueError(f"image has shape {first.shape}; expected (H, W, 3)")
    indices = sampling.decoded_indices(len(frames), rate)
    if sampling.num_frames is None and sampling.fps is None and len(indices) < len(frames):
        warnings.warn(f"{len(frames)} decoded frames are more than max_num_frames={sampling.max_num_frames}: "
                      f"{len(indices)} of them are sampled (pass max_num_frames to keep more)", stacklevel=2)
    asm = _ChunkAssembler(indices, chunk_frames, hw, None, path or kind)
    meta = _metadata(indices, rate, len(frames), "frames", first.shape[1], first.shape[0], path, {"input": kind})
    in_order = ((i, rgb_frame(frames[i], f"frame {i}")) for i in asm.targets())  # converted as chunks are taken
    return meta, _drain(in_order, asm)


def _read_image(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return rgb_frame(image, path)


def _open_file(path, chunk_frames, hw, backend, sampling: FrameSampling, num_threads, segment=(None, None),
               gif: bool = False):
    """Metadata and chunks of a video file (of its `segment` seconds; a GIF at 1 frame per second). The PyAV probe
    comes first: it also vets the file for decord."""

    def pick(total: int, fps: float) -> tuple[list[int], float]:  # (indices, seconds) by the original's rules
        if segment != (None, None):
            return sampling.segment_indices(total, fps, *segment)
        return sampling.file_indices(total, fps), total / fps

    if gif and backend == "decord":
        raise ValueError("GIFs are read with PyAV (decord does not read them)")
    order = ["pyav"] if gif else available_backends() if backend is None else [backend]
    if not order:
        raise ImportError("load_video needs PyAV (pip install av) or decord (pip install decord==0.6.0)")
    if {"pyav": av, "decord": decord}[order[0]] is None:
        raise ImportError(f"backend={backend!r} is not installed (pip install {dict(pyav='av').get(backend, backend)})")
    probe = None
    if av is not None:
        probe = _pyav_probe(path)  # VideoReadError (a ValueError) for unreadable files: no backend would do better
        if probe.truncated:
            warnings.warn(f"{path!r}: the video looks truncated or damaged ({probe.total_frames} readable frames"
                          + (f" of {probe.declared_frames} declared" if probe.declared_frames else "")
                          + (f", {probe.n_corrupt} corrupt packets" if probe.n_corrupt else "")
                          + "); sampling from the readable frames", stacklevel=3)
    if order[0] == "pyav":
        fps = 1.0 if gif else probe.fps or probe.fallback_fps  # the original's gif reader: 1 frame per second
        indices, seconds = pick(probe.total_frames, fps)
        asm = _ChunkAssembler(indices, chunk_frames, hw, (probe.height, probe.width), path)
        info = {"codec": probe.codec, "gop": round(probe.gop, 2),
                "fps_source": "gif: 1 per second" if gif else "stream" if probe.fps else "fallback"}
        meta = _metadata(indices, fps, probe.total_frames, "pyav", probe.width, probe.height, path, info, seconds)
        return meta, _pyav_chunks(probe, asm, num_threads, meta, "decord" in order, pick)
    try:
        vr, total, fps, fps_source, src_hw = _decord_reader(path, probe)
    except _BackendFailed as e:
        raise ValueError(str(e)) from None
    indices, seconds = pick(total, fps)
    asm = _ChunkAssembler(indices, chunk_frames, hw, src_hw, path)
    meta = _metadata(indices, fps, total, "decord", src_hw[1], src_hw[0], path, {"fps_source": fps_source}, seconds)
    return meta, _decord_chunks(vr, path, asm, src_hw)


def load_video(video, *, size=None, backend: str | None = None, video_fps: float | None = None,
               num_threads: int | None = None, sampling: FrameSampling | None = None, start: float | None = None,
               end: float | None = None, **sampling_options) -> tuple[np.ndarray, VideoLoadMetadata]:
    """``(frames, metadata)``: :func:`iter_video_chunks` (same arguments) in one (T, H, W, 3) uint8 chunk, T a multiple
    of 4. With the default sampling and a file, the frames of the original chat() path."""
    meta, chunks = iter_video_chunks(video, None, size=size, backend=backend, video_fps=video_fps,
                                     num_threads=num_threads, sampling=sampling, start=start, end=end,
                                     **sampling_options)
    (frames,) = chunks  # the one chunk is the preallocated output: no copy
    return frames, meta
