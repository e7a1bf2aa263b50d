#!/usr/bin/env bash
# From a fresh clone, in one command: set up .venv (as .ci/run does), write a sample video with PyAV, and ask the
# tiny offline model about it. The tiny model has random weights, so its answer is random text: the demo shows that
# everything installs and runs, offline, in a few minutes on a laptop CPU.
#
#   bash scripts/demo.sh                      # set up .venv, then answer
#   DEMO_PYTHON=/path/to/python bash scripts/demo.sh   # use an existing environment instead (installs nothing)
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false

if [ -n "${DEMO_PYTHON:-}" ]; then
    PY="$DEMO_PYTHON"
else
    python3 -m venv .venv
    # One pip call, with torch pinned, so pip takes the CPU wheel of torch 2.13.0 (the same line as .ci/run).
    .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 "transformers==5.24.0" -e ".[train,test,niah,demo,quant]"
    PY=.venv/bin/python
fi

OUT="${DEMO_DIR:-tmp/demo}"
mkdir -p "$OUT"
VIDEO="$OUT/sample.mp4"

# A 10-second clip of a white square moving across a blue background (H.264, written by PyAV).
"$PY" - "$VIDEO" <<'PYEOF'
import sys

import av
import numpy as np

path, fps, seconds, width, height = sys.argv[1], 10, 10, 160, 120
with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(fps * seconds):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 2] = 160
        x = int((width - 32) * i / (fps * seconds - 1))
        frame[44:76, x : x + 32] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
print(f"sample video: {path} ({seconds} s, {fps} fps, {width}x{height})")
PYEOF

"$PY" -m videochat_flash.videochat_flash_cli chat "$VIDEO" "What is moving in the video?" --model tiny
