"""Test media made on the fly with PyAV (libx264 is bundled): nothing is downloaded or stored in the repo."""

from __future__ import annotations

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


def encode(path, n, w=64, h=48, fps=25, codec="libx264", pix_fmt="yuv420p", fmt=None, options=None,
           container_options=None, timestamps=None):
    """Write `n` pattern frames to `path`; `timestamps` (ms) overrides the regular frame times."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.options = {"preset": "ultrafast", **(options or {})} if codec == "libx264" else (options or {})
        if timestamps is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(pattern(i, w, h), format="rgb24")
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
