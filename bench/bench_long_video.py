"""Peak memory and time of the whole video -> visual tokens path, 64 to 10,000 frames (tiny model, 128 px).

Ours: ``encode_video_streaming`` (decode -> preprocess -> encode -> merge, ``clips_per_chunk`` clips at a time;
only the 16 tokens per frame are kept). Original way: every sampled frame decoded first (source resolution, as the
original's decord ``get_batch``), preprocessed into one float32 (N, 3, 128, 128) tensor, then encoded
(``get_video_features``). Both sample N frames with ``num_frames=N`` from one generated long video (>= 10,000
frames, 160x120, H.264, cached in the temp dir).

Every case runs in a fresh Python process; its peak RSS is the kernel's high-water mark of that process (VmHWM in
/proc/self/status; ``ru_maxrss`` where /proc is missing) and "above setup" is that peak minus the RSS after imports
and model construction. The two paths' tokens are compared (max abs difference). Ratios are printed last.

    python bench/bench_long_video.py [--frames 64 1024 10000] [--clips-per-chunk 8] [--video-frames 10240]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

from bench_common import peak_rss_kb, status_kb  # (bench/ is on sys.path when a bench runs as a script)

REPO = Path(__file__).resolve().parent.parent

WIDTH, HEIGHT, FPS = 160, 120, 25


def pattern(i: int, w: int, h: int):
    import numpy as np

    x, y = np.arange(w, dtype=np.int32)[None, :], np.arange(h, dtype=np.int32)[:, None]
    out = np.empty((h, w, 3), np.uint8)
    out[..., 0] = (x * 3 + i * 7) % 256
    out[..., 1] = (y * 5 + i * 11) % 256
    out[..., 2] = ((x + y) // 2 + (i // 25) * 13) % 256
    return out


def long_video(frames: int) -> str:
    """A cached `frames`-frame 160x120 25 fps H.264 video (x264 ultrafast, GOP 250) in the temp dir."""
    import av

    folder = Path(tempfile.gettempdir()) / "videochat_flash_bench"
    folder.mkdir(exist_ok=True)
    path = folder / f"long_{frames}f_{WIDTH}x{HEIGHT}.mp4"
    if path.exists():
        try:
            with av.open(str(path)) as c:
                if c.streams.video[0].frames == frames:
                    return str(path)
        except Exception:
            pass
    start = time.perf_counter()
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        s.options = {"preset": "ultrafast", "g": "250"}
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(pattern(i, WIDTH, HEIGHT), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)
    print(f"generated {path} ({frames} frames) in {time.perf_counter() - start:.1f} s", flush=True)
    return str(path)


# ----------------------------------------------------------------------------------------------------- child
def child(args) -> None:
    import torch

    from videochat_flash.processing_videochat_flash import VideoChatFlashVideoProcessor
    from videochat_flash.streaming_videochat_flash import encode_video_streaming
    from videochat_flash.tiny_model import build_tiny_model
    from videochat_flash.video_loading import load_video

    model = build_tiny_model(0)
    size = model.config.image_size
    processor = VideoChatFlashVideoProcessor(size=size)
    setup_kb = status_kb("VmRSS") or peak_rss_kb()
    start = time.perf_counter()
    with torch.no_grad():
        if args.child == "ours":
            features, meta = encode_video_streaming(
                model, args.video, video_processor=processor, num_frames=args.n, clips_per_chunk=args.clips_per_chunk
            )
        else:  # the original's way: all frames, then all pixels, then encode
            frames, meta = load_video(args.video, num_frames=args.n)
            # decoded frames are capped at max_num_frames (512 by default): take them all
            pixels = processor(videos=frames, max_num_frames=len(frames), return_tensors="pt")["pixel_values_videos"]
            del frames
            features = model.get_video_features(pixels)[0]
            del pixels
    wall = time.perf_counter() - start
    peak_kb = peak_rss_kb()
    torch.save(features, args.save)
    print("RESULT " + json.dumps({
        "peak_kb": peak_kb, "setup_kb": setup_kb, "wall_s": wall, "tokens": list(features.shape),
        "frames": len(meta.frame_indices),
    }), flush=True)


# ----------------------------------------------------------------------------------------------------- parent
def run_case(path: str, n: int, video: str, clips_per_chunk: int, save: str) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--n", str(n), "--video", video,
           "--clips-per-chunk", str(clips_per_chunk), "--save", save]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{path} n={n} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["process_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 1024, 10000])
    parser.add_argument("--clips-per-chunk", type=int, default=8)
    parser.add_argument("--video-frames", type=int, default=10240)
    parser.add_argument("--skip-original", action="store_true", help="measure only the streaming path")
    parser.add_argument("--child", choices=["ours", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    if args.video_frames < max(args.frames):
        parser.error("--video-frames must be at least the largest --frames")
    video = long_video(args.video_frames)
    print(f"video: {video}: {args.video_frames} frames, {WIDTH}x{HEIGHT}, {FPS} fps, H.264 GOP 250")
    print(f"model: tiny VideoChat-Flash (128 px frames, 16 tokens/frame), float32, CPU, "
          f"{torch.get_num_threads()} torch threads; ours: clips_per_chunk={args.clips_per_chunk}")
    print("each case in a fresh process; peak = VmHWM of that process, 'above setup' = peak - RSS after imports+model")
    print()
    header = f"{'frames':>7}  {'path':<9}  {'peak RSS MB':>11}  {'above setup MB':>14}  {'wall s':>7}  {'frames/s':>8}  tokens"
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, int], dict] = {}
    paths = ["ours"] if args.skip_original else ["ours", "original"]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.frames:
            saved = {}
            for path in paths:
                saved[path] = os.path.join(tmp, f"{path}_{n}.pt")
                r = run_case(path, n, video, args.clips_per_chunk, saved[path])
                results[(path, n)] = r
                print(f"{n:>7}  {path:<9}  {r['peak_kb'] / 1024:>11.0f}  {(r['peak_kb'] - r['setup_kb']) / 1024:>14.0f}  "
                      f"{r['wall_s']:>7.2f}  {r['frames'] / r['wall_s']:>8.0f}  {tuple(r['tokens'])}", flush=True)
            if len(saved) == 2:
                a, b = (torch.load(saved[p]) for p in paths)
                diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
                print(f"{'':>7}  ours vs original tokens: max |diff| = {diff:.3g}", flush=True)

    print()
    lo, hi = 1024, 10000
    if ("ours", lo) in results and ("ours", hi) in results:
        ours_lo, ours_hi = results[("ours", lo)]["peak_kb"], results[("ours", hi)]["peak_kb"]
        print(f"ours peak RSS at {hi:,} / at {lo:,} frames: {ours_hi / 1024:.0f} MB / {ours_lo / 1024:.0f} MB = "
              f"{ours_hi / ours_lo:.3f} (target <= 1.5)")
        print(f"ours peak RSS at {hi:,} frames: {ours_hi / 1024**2:.3f} GB (target < 4)")
        if ("original", hi) in results:
            orig_hi = results[("original", hi)]["peak_kb"]
            print(f"original-way peak RSS at {hi:,} frames: {orig_hi / 1024**2:.3f} GB = {orig_hi / ours_hi:.2f}x ours "
                  f"(above setup: {(orig_hi - results[('original', hi)]['setup_kb']) / 1024:.0f} MB vs "
                  f"{(ours_hi - results[('ours', hi)]['setup_kb']) / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
