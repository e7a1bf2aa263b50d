"""Video I/O benchmark: our loader against decode-everything and the original's decord path.

A 10-minute 640x360 30 fps H.264 video (libx264 veryfast, 1 Mbit/s, GOP 250; 18,000 frames) is generated once
with PyAV from lavfi ``testsrc2`` and cached. For 64 and 512 sampled frames (the chat() sampling with
``max_num_frames`` = 64 / 512), each method runs in a fresh subprocess and returns 448x448 uint8 frames:

* ``ours``      ``video_loading.load_video(path, max_num_frames=N, size=448)`` (auto backend: PyAV).
* ``decode_all`` (a) decode every frame with PyAV and convert it to RGB (like the original's ``read_frames_av``),
  then index the sampled ones and resize them. Storing all 18,000 RGB frames would need 12.4 GB, so only the
  sampled frames are kept; the decode and conversion work is the same.
* ``original``  (b) the original's way: ``decord.VideoReader(num_threads=1).get_batch(all sampled indices)``
  at full resolution, then a per-frame PIL bicubic resize.

Wall time is measured in the child around the load (imports excluded); peak RSS is the child's ``ru_maxrss``
from ``os.wait4``. The parent imports nothing heavy, so the child's peak is not inflated at fork time.

Usage: python bench/bench_video_io.py [--cache DIR] [--repeat K] [--frames 64 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_common import write_test_video  # (bench/ is on sys.path when a bench runs as a script)

SIZE = 448
VIDEO_NAME = "bench_10min_640x360_30fps_gop250.mp4"


# ------------------------------------------------------------------------------------------------------------
# video generation (cached)
# ------------------------------------------------------------------------------------------------------------
def make_video(path: str) -> None:
    write_test_video(path, (640, 360), 30, 600, {"preset": "veryfast", "g": "250"}, bit_rate=1_000_000)


# ------------------------------------------------------------------------------------------------------------
# the original's way (also used by bench_e2e.py)
# ------------------------------------------------------------------------------------------------------------
def original_reader(path: str):
    """The original's reader: decord with one thread."""
    import decord

    return decord.VideoReader(path, num_threads=1)


def original_frames(reader, n: int):
    """The chat() sample of `n` frames, all at full resolution in one ``get_batch``: (n, H, W, 3) uint8."""
    from videochat_flash.frame_sampling import FrameSampling

    return reader.get_batch(FrameSampling(max_num_frames=n).file_indices(len(reader), reader.get_avg_fps())).asnumpy()


def pil_resize(frame, size: int = SIZE):
    """One frame squashed to size x size with PIL bicubic, as the original's image processor does."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))


# ------------------------------------------------------------------------------------------------------------
# child: one measurement
# ------------------------------------------------------------------------------------------------------------
def child(method: str, n: int, path: str) -> None:
    import hashlib

    import numpy as np

    import videochat_flash.video_loading as vl
    from videochat_flash.frame_sampling import FrameSampling

    resize = pil_resize

    extra = {}
    if method == "ours":
        t0 = time.perf_counter()
        frames, md = vl.load_video(path, max_num_frames=n, size=SIZE)
        dt = time.perf_counter() - t0
        extra = {"backend": md.backend, **md.extra}
    elif method == "decode_all":
        import av

        t0 = time.perf_counter()
        with av.open(path) as c:
            vs = c.streams.video[0]
            vs.thread_type = "AUTO"
            total = vs.frames
            fps = float(vs.average_rate)
            idx = FrameSampling(max_num_frames=n).file_indices(total, fps)
            want = set(idx)
            kept = {}
            for i, f in enumerate(c.decode(vs)):
                rgb = f.to_ndarray(format="rgb24")  # every frame decoded and converted, as read_frames_av does
                if i in want:
                    kept[i] = rgb
        frames = np.stack([resize(kept[i]) for i in idx])
        dt = time.perf_counter() - t0
    elif method == "original":
        import decord  # noqa: F401 - imported before the clock starts, as the other methods' modules

        t0 = time.perf_counter()
        full = original_frames(original_reader(path), n)
        frames = np.stack([resize(f) for f in full])
        dt = time.perf_counter() - t0
    else:
        raise SystemExit(f"unknown method {method}")
    assert frames.shape == (n, SIZE, SIZE, 3), frames.shape
    digest = hashlib.sha1(np.ascontiguousarray(frames).data).hexdigest()[:16]  # no copy: keeps the peak honest
    print("RESULT " + json.dumps({"seconds": dt, "frames": int(frames.shape[0]), "sha1": digest, "extra": extra}))


# ------------------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------------------
def measure(method: str, n: int, path: str) -> dict:
    """Run one measurement in a fresh interpreter; its peak RSS comes from os.wait4 on that very child."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", method, str(n), path],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        out.seek(0)
        text = out.read()
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} N={n} failed (exit {proc.returncode}):\n{text[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024
    res["fps"] = res["frames"] / res["seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("VCF_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "vcf_bench_cache")))
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is reported")
    ap.add_argument("--frames", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "N", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return

    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, VIDEO_NAME)
    if not os.path.exists(path):
        make_video(path)
    print(f"video: {path} ({os.path.getsize(path) / 1e6:.1f} MB), 448x448 output, {os.cpu_count()} CPUs", flush=True)
    methods = ["ours", "decode_all", "original"]
    results: dict[tuple[str, int], dict] = {}
    print(f"{'N':>4} {'method':<11} {'seconds':>8} {'frames/s':>9} {'peak RSS MB':>12}  notes", flush=True)
    for n in args.frames:
        for m in methods:
            runs = [measure(m, n, path) for _ in range(max(1, args.repeat))]
            best = min(runs, key=lambda r: r["seconds"])
            best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            results[(m, n)] = best
            note = ""
            if m == "ours":
                e = best["extra"]
                note = f"{e.get('backend')} {e.get('mode')}, {e.get('workers')} workers, {e.get('packets_in_spans')} packets decoded at most"
            print(f"{n:>4} {m:<11} {best['seconds']:>8.2f} {best['fps']:>9.1f} {best['peak_rss_mb']:>12.0f}  {note}", flush=True)
        same = len({results[(m, n)]["sha1"] for m in methods}) == 1
        print(f"{n:>4} identical frames across methods: {'yes' if same else 'NO'}", flush=True)
    n = 512 if 512 in args.frames else args.frames[-1]
    ours, orig = results[("ours", n)], results[("original", n)]
    print(f"throughput ours/(b) at {n} frames: {ours['fps'] / orig['fps']:.2f}x (target >= 2)")
    print(f"peak RSS ours/(b) at {n} frames: {ours['peak_rss_mb'] / orig['peak_rss_mb']:.2f}x (target <= 0.5)")


if __name__ == "__main__":
    main()
