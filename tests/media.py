"""Test media made on the fly with PyAV (libx264 is bundled): nothing is downloaded or stored in the repo."""

from __future__ import annotations

import json
from fractions import Fraction

import av
import numpy as np


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


def naive_decode(path) -> np.ndarray:
    """Reference: every frame, decoded straight through by PyAV."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
COLOR_QUESTION = "What color is the video?"


def colour_dataset(root) -> dict:
    """Fine-tuning media in `root`: four 8-frame 128 px clips of one colour each (1 s at 8 fps) with LLaVA-style
    records asking their colour (train.json / train.jsonl), a 12-frame clip and four still images."""
    from PIL import Image

    records = []
    for index, (name, color) in enumerate(COLORS.items()):
        encode(root / f"clip{index}.mp4", 8, 128, 128, fps=8, frames=band(color))
        Image.fromarray(np.full((40, 60, 3), color, np.uint8)).save(root / f"image{index}.png")
        records.append({"video": f"clip{index}.mp4", "conversations": [
            {"from": "human", "value": f"<image>\n{COLOR_QUESTION}"}, {"from": "gpt", "value": f"It is {name}."}]})
    encode(root / "twelve.mp4", 12, 128, 128, fps=8, frames=band((90, 90, 90)))  # 1.5 s -> 12 frames
    (root / "train.json").write_text(json.dumps(records))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return {"root": root, "records": records, "answers": [f"It is {name}." for name in COLORS]}
