"""Test media made on the fly with PyAV (libx264 is bundled) and PIL: nothing is downloaded or stored in the repo."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import socket
import struct
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


# x264 options for B-frames in open GOPs (frames shown before their keyframe), a keyframe every 20 frames
OPEN_GOP = {"bf": "3", "x264-params": "open-gop=1:keyint=20:min-keyint=20:scenecut=0"}


def pattern(i: int, w: int, h: int) -> np.ndarray:
    """A moving colour pattern, different in every frame (cheap enough for UHD frames)."""
    x, y = np.arange(w, dtype=np.int32)[None, :], np.arange(h, dtype=np.int32)[:, None]
    out = np.empty((h, w, 3), np.uint8)
    out[..., 0] = (x * 3 + i * 7) % 256
    out[..., 1] = (y * 5 + i * 11) % 256
    out[..., 2] = ((x + y) // 2 + i * 13) % 256
    return out


def band(color):
    """Frames of one colour with a band of the complementary colour moving down: `frames(i, w, h)` for `encode`."""

    def frame(i, w, h):
        out = np.empty((h, w, 3), np.uint8)
        out[:] = color
        out[(i * 8) % h : (i * 8) % h + 16] = 255 - np.array(color, np.uint8)
        return out

    return frame


def encode(path, n, w=64, h=48, fps=25, codec="libx264", pix_fmt="yuv420p", fmt=None, options=None,
           container_options=None, timestamps=None, frames=pattern):
    """Write `n` frames (`frames(i, w, h)`, the moving pattern by default) to `path`; `timestamps` (ms) overrides the
    regular frame times."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.options = {"preset": "ultrafast", **(options or {})} if codec == "libx264" else (options or {})
        if timestamps is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frames(i, w, h), format="rgb24")
            if timestamps is not None:
                f.pts, f.time_base = timestamps[i], Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def image(path, frame: np.ndarray, **options):
    """Write one (H, W, 3) uint8 frame as an image file (PIL; the format from the suffix, `options` for `save`)."""
    from PIL import Image

    Image.fromarray(frame).save(path, **options)
    return str(path)


def audio_only(path, packets=20):
    """An AAC file without a video stream: `packets` frames of 1,024 silent mono samples at 16 kHz."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(packets):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def zero_mp4_durations(src, dst):
    """Copy of the mp4 `src` with every sample duration (stts) and the track/media/movie durations zeroed: no frame
    rate left anywhere."""
    b = bytearray(Path(src).read_bytes())

    def walk(off, end):
        while off + 8 <= end:
            size, typ = struct.unpack(">I4s", b[off : off + 8])
            if size < 8:
                return
            if typ in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
                walk(off + 8, off + size)
            elif typ == b"stts":
                for k in range(struct.unpack(">I", b[off + 12 : off + 16])[0]):
                    struct.pack_into(">I", b, off + 16 + 8 * k + 4, 0)
            elif typ in (b"mvhd", b"mdhd"):
                struct.pack_into(">I", b, off + 24, 0)
            elif typ == b"tkhd":
                struct.pack_into(">I", b, off + 28, 0)
            off += size

    walk(0, len(b))
    Path(dst).write_bytes(bytes(b))
    return str(dst)


def naive_decode(path) -> np.ndarray:
    """Reference: every frame, decoded straight through by PyAV."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
COLOR_QUESTION = "What color is the video?"


def colour_dataset(root) -> dict:
    """Fine-tuning media in `root`: four 8-frame 128 px clips of one colour each (1 s at 8 fps) with LLaVA-style
    records asking their colour (train.json / train.jsonl), a 12-frame clip and four still images."""
    records = []
    for index, (name, color) in enumerate(COLORS.items()):
        encode(root / f"clip{index}.mp4", 8, 128, 128, fps=8, frames=band(color))
        image(root / f"image{index}.png", np.full((40, 60, 3), color, np.uint8))
        records.append({"video": f"clip{index}.mp4", "conversations": [
            {"from": "human", "value": f"<image>\n{COLOR_QUESTION}"}, {"from": "gpt", "value": f"It is {name}."}]})
    encode(root / "twelve.mp4", 12, 128, 128, fps=8, frames=band((90, 90, 90)))  # 1.5 s -> 12 frames
    (root / "train.json").write_text(json.dumps(records))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return {"root": root, "records": records, "answers": [f"It is {name}." for name in COLORS]}


def free_port() -> int:
    """A loopback port nothing listens on (for a server the test starts, or a URL that must fail)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """http.server's file handler without request lines on stderr."""

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_folder(root, handler=QuietHandler):
    """``http://127.0.0.1:PORT`` serving the files of `root` (a thread of this process) while the block runs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
