"""What several benches share: a process's memory figures and the long test videos they generate."""

from __future__ import annotations

import contextlib
import os
import sys
import time


def status_kb(field: str) -> int | None:
    """A kB field of /proc/self/status (``VmHWM`` peak RSS, ``VmRSS``, ``RssAnon``); None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith(field + ":")), None)
    except OSError:
        return None


def peak_rss_kb() -> int:
    """This process's peak RSS in kB: the kernel's high-water mark (VmHWM), or ``ru_maxrss`` where /proc is missing."""
    peak = status_kb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there, kB on Linux
            peak //= 1024
    return peak


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is no /proc."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class TokenClock:
    """A generate() streamer that notes when each new token arrives (``times``; its first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def write_test_video(path: str, size: tuple[int, int], fps: int, seconds: int, x264_options: dict,
                     bit_rate: int | None = None) -> None:
    """An H.264 mp4 of lavfi's ``testsrc2`` pattern (`size` = (width, height)), written under a temporary name first
    (never half a file) and timed."""
    import av

    start, partial = time.time(), path + ".part"
    width, height = size
    source = av.open(f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}", format="lavfi")
    with av.open(partial, "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        stream.options = x264_options
        for frame in source.decode(video=0):
            frame.pict_type = av.video.frame.PictureType.NONE  # lavfi flags every frame I: let x264 decide
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    source.close()
    os.replace(partial, path)
    print(f"generated {path} ({os.path.getsize(path) / 1e6:.1f} MB) in {time.time() - start:.0f} s", flush=True)
