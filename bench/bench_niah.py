"""Seconds per NIAH cell and peak memory vs haystack length (tiny model, 1,000 / 5,000 / 10,000 frames).

Each haystack length runs in a fresh Python process: the tiny model, a generated 1 frame/s haystack video (160x120,
H.264, cached in the temp dir) encoded once by ``encode_haystack`` (streaming encoder, a fresh cache), then
``run_niah`` over one needle at ``--depths`` (one teacher-forced forward of 16 tokens per frame + 64 + the prompt per
cell). Peak RSS is the kernel's high-water mark of the process (VmHWM); "cells only" is the high-water mark after
it was reset (``/proc/self/clear_refs``) once the haystack was encoded. Ratios are printed last.

    python bench/bench_niah.py [--frames 1000 5000 10000] [--depths 0.5] [--dtype float32|bfloat16]
                               [--decoder-chunk-tokens 8192] [--clips-per-chunk 8]
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

from bench_common import status_kb  # (bench/ is on sys.path when a bench runs as a script)

REPO = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 160, 120


def haystack_video(frames: int) -> str:
    """A cached `frames`-frame 1 frame/s 160x120 H.264 video (x264 ultrafast) in the temp dir."""
    import av
    import numpy as np

    folder = Path(tempfile.gettempdir()) / "videochat_flash_bench"
    folder.mkdir(exist_ok=True)
    path = folder / f"niah_haystack_{frames}f_1fps_{WIDTH}x{HEIGHT}.mp4"
    if path.exists():
        return str(path)
    x, y = np.arange(WIDTH)[None, :], np.arange(HEIGHT)[:, None]
    partial = path.with_suffix(".part.mp4")
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(1))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": "250"}
        for i in range(frames):
            frame = np.stack([(x * 3 + i * 7) % 256 + 0 * y, (y * 5 + i * 11) % 256 + 0 * x,
                              ((x + y) // 2 + i * 13) % 256], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)
    return str(path)


def child(frames: int, depths: list[float], clips_per_chunk: int, video: str, dtype: str,
          decoder_chunk_tokens: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from videochat_flash import niah_videochat_flash as niah
    from videochat_flash.tiny_model import build_tiny_model, tiny_processor

    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="bench_niah_"))
    Image.fromarray(np.full((90, 120, 3), (220, 30, 30), np.uint8)).save(work / "needle.png")
    (work / "needles.json").write_text(json.dumps([{"question": "Find the red frame. Best option: (", "answer": "A",
                                                    "image": "needle.png"}]))
    model, processor = build_tiny_model().to(getattr(torch, dtype)), tiny_processor()
    model.model.decoder_chunk_tokens = decoder_chunk_tokens or None
    settings = niah.NIAHSettings(frames=(frames,), depths=tuple(depths), cache_dir=str(work / "cache"),
                                 clips_per_chunk=clips_per_chunk)
    setup_kb = status_kb("VmRSS")
    start = time.perf_counter()
    tokens = niah.haystack_tokens(model, processor, video, settings)
    encode_s = time.perf_counter() - start
    del tokens
    encode_peak_kb = status_kb("VmHWM")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: the cells' own peak from here
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    results = niah.run_niah(model, processor, video, work / "needles.json", work / "out", settings)
    cells_s = time.perf_counter() - start
    return {"frames": frames, "tokens": 16 * frames + 64, "encode_s": encode_s, "cell_s": cells_s / len(depths),
            "setup_mb": setup_kb / 1024, "encode_peak_mb": encode_peak_kb / 1024,
            "cells_peak_mb": status_kb("VmHWM") / 1024 if reset else None,
            "peak_mb": max(encode_peak_kb, status_kb("VmHWM")) / 1024, "score": results["average_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.5])
    parser.add_argument("--clips-per-chunk", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--decoder-chunk-tokens", type=int, default=8192,
                        help="the model's decoder_chunk_tokens (0: whole decoder layers)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--video", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.depths, args.clips_per_chunk, args.video, args.dtype,
                              args.decoder_chunk_tokens)))
        return
    video = haystack_video(max(args.frames))
    pieces = args.decoder_chunk_tokens or "all"
    print(f"haystack {video}; tiny model in {args.dtype}, decoder layers in pieces of {pieces} tokens; one process "
          "per length", flush=True)
    print(f"{'frames':>7} {'tokens':>8} {'encode s':>9} {'s/cell':>8} {'setup MB':>9} {'encode peak':>12} "
          f"{'cells peak':>11} {'peak MB':>8}")
    rows = []
    for frames in args.frames:
        command = [sys.executable, __file__, "--child", str(frames), "--video", video, "--clips-per-chunk",
                   str(args.clips_per_chunk), "--dtype", args.dtype, "--decoder-chunk-tokens",
                   str(args.decoder_chunk_tokens),
                   "--depths", *map(str, args.depths)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        rows.append(row)
        cells_peak = f"{row['cells_peak_mb']:.0f}" if row["cells_peak_mb"] is not None else "n/a"
        print(f"{frames:>7} {row['tokens']:>8} {row['encode_s']:>9.1f} {row['cell_s']:>8.2f} {row['setup_mb']:>9.0f} "
              f"{row['encode_peak_mb']:>12.0f} {cells_peak:>11} {row['peak_mb']:>8.0f}", flush=True)
    first = rows[0]
    for row in rows[1:]:
        print(f"{row['frames']:,} vs {first['frames']:,} frames: peak RSS {row['peak_mb'] / first['peak_mb']:.2f}x "
              f"(target <= 1.5x), seconds per cell {row['cell_s'] / first['cell_s']:.1f}x "
              f"({row['frames'] / first['frames']:.0f}x the frames)")


if __name__ == "__main__":
    main()
