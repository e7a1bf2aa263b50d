"""The accelerator-side paths of the pipeline, run on the CPU: resizing and normalising frames where the model runs
(`frames_to_pixels` of a tensor) gives the CPU processor's pixels bit for bit; the video processor and the streaming
encoder take that path when asked, and the CPU path when the model is on the CPU; the end-to-end benchmark runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, golden_path
from media import encode
from safetensors.torch import load_file
from videochat_flash.processing_videochat_flash import (
    VideoChatFlashVideoProcessor,
    frames_to_device,
    frames_to_pixels,
)
from videochat_flash.streaming_videochat_flash import encode_video_streaming
from videochat_flash.tiny_model import build_tiny_model

MAIN_VIDEO = "synthetic_main_12s_25fps_320x240.mp4"


def random_frames(count, height, width, seed=0):
    """Noise and a smooth pattern (bicubic overshoot clips at 0 and 255 on the noise)."""
    frames = np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    frames[-1] = ((np.sin(cols / 7.0) + np.cos(rows / 5.0)) * 60 + 128).astype(np.uint8)[..., None]
    return frames


@pytest.mark.parametrize("source, target", [
    ((720, 1280), (448, 448)),  # 720p to the 448 px tower: both axes shrink
    ((240, 320), (224, 224)),
    ((48, 64), (448, 448)),  # both axes grow
    ((300, 500), (100, 640)),  # one shrinks, one grows
    ((224, 224), (224, 224)),  # no pass at all
    ((224, 100), (224, 224)),  # one pass only
    ((1000, 7), (448, 448)),  # over 100 times taller than wide and shrinking: Pillow runs the vertical pass first
])
def test_device_pixels_equal_the_cpu_processors(source, target):
    frames = random_frames(2, *source)
    size = {"height": target[0], "width": target[1]}
    expected = frames_to_pixels(frames, size)
    pixels = frames_to_pixels(torch.from_numpy(frames), size)
    assert pixels.dtype == torch.float32 and pixels.shape == expected.shape
    assert np.array_equal(pixels.numpy(), expected)  # bit for bit: Pillow's fixed-point resize, the same arithmetic


def test_device_pixels_follow_the_processor_options():
    frames, size = random_frames(3, 60, 80), {"height": 32, "width": 48}
    options = [{"do_resize": False}, {"do_normalize": False}, {"do_rescale": False, "do_normalize": False},
               {"rescale_factor": 1 / 128, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.25, 0.5, 1.0)}]
    for option in options:
        expected = frames_to_pixels(frames, size, **option)
        assert np.array_equal(frames_to_pixels(torch.from_numpy(frames), size, **option).numpy(),
                              expected), option


def test_frames_go_to_the_device_as_they_are():
    frames = random_frames(2, 8, 8)
    on_cpu = frames_to_device(frames, "cpu")
    assert on_cpu.dtype == torch.uint8 and on_cpu.data_ptr() == frames.ctypes.data  # the CPU: no copy
    assert frames_to_device(frames, "meta").device.type == "meta"


@pytest.mark.parametrize("size, key, positions", [(224, "pixel_values_224_subset", [0, 63]),
                                                  (448, "pixel_values_448_subset", [63])])
def test_device_path_gives_the_golden_pixels_of_a_file(size, key, positions):
    """Frames decoded at full size and resized by the device path: the original's pixels of the golden video, and
    every chunk equal to the CPU path's."""
    goldens = load_file(str(golden_path("preprocess.safetensors")))
    processor = VideoChatFlashVideoProcessor(size=size)
    video = str(golden_path(MAIN_VIDEO))
    metadata, cpu_chunks = processor.iter_pixel_chunks(video, 24)
    device_metadata, device_chunks = processor.iter_pixel_chunks(video, 24, pixel_device="cpu")
    assert device_metadata.frame_indices == metadata.frame_indices
    device_chunks = list(device_chunks)
    assert all(isinstance(chunk, torch.Tensor) for chunk in device_chunks)
    for cpu_chunk, device_chunk in zip(cpu_chunks, device_chunks, strict=True):
        assert np.array_equal(device_chunk.numpy(), cpu_chunk)
    pixels = torch.cat(device_chunks)
    assert pixels.shape == (64, 3, size, size)
    assert torch.equal(pixels[positions], goldens[key])


def test_decoded_frames_and_folders_keep_the_cpu_path():
    """Frames that may differ in size (lists, arrays, folders) are resized on the CPU even with a pixel device."""
    frames = random_frames(8, 40, 56)
    _, chunks = VideoChatFlashVideoProcessor(size=32).iter_pixel_chunks(frames, None, pixel_device="cpu")
    assert isinstance(next(chunks), np.ndarray)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("e2e") / "clip.mp4", 120, 96, 64, fps=10, options={"g": "12", "bframes": "2"})


def test_streaming_on_a_pixel_device_gives_the_same_tokens(clip):
    model = build_tiny_model(0)
    with torch.no_grad():
        reference, metadata = encode_video_streaming(model, clip, num_frames=24, clips_per_chunk=2)
        on_device, device_metadata = encode_video_streaming(model, clip, num_frames=24, clips_per_chunk=2,
                                                            pixel_device="cpu")
        default, _ = encode_video_streaming(model, clip, num_frames=24)  # one tower call per chunk
    assert device_metadata.frame_indices == metadata.frame_indices
    assert torch.equal(on_device, reference) and torch.equal(default, reference)


def test_a_model_on_the_cpu_makes_its_pixels_on_the_cpu(clip, monkeypatch):
    """pixel_device="auto" falls back to the CPU path when the tower is on the CPU."""
    seen = {}
    original = VideoChatFlashVideoProcessor.iter_pixel_chunks

    def spy(self, *args, pixel_device=None, **kwargs):
        seen["pixel_device"] = pixel_device
        return original(self, *args, pixel_device=pixel_device, **kwargs)

    monkeypatch.setattr(VideoChatFlashVideoProcessor, "iter_pixel_chunks", spy)
    encode_video_streaming(build_tiny_model(0), clip, num_frames=8)
    assert seen == {"pixel_device": None}


def test_end_to_end_benchmark_runs_on_a_tiny_shape(clip):
    """bench/bench_e2e.py on the tiny shape and a short clip: both ways, the split and the ratios."""
    result = subprocess.run(
        [sys.executable, str(Path(REPO_ROOT) / "bench" / "bench_e2e.py"), "--shape", "tiny", "--size", "224",
         "--frames", "64", "--new-tokens", "3", "--video", clip, "--best-dtype", "none", "--no-warmup",
         "--peak-tflops", "1"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for way in ("original float32", "ours float32"):
        line = next(line for line in lines if line.strip().startswith(way))
        assert "first token" in line and all(stage in line for stage in ("open+probe", "tower", "decode tokens"))
    assert any("original float32 / ours float32: first token" in line for line in lines)
    # the tower's FLOP rate (against a given peak) and how busy it kept the encode phase, for each way
    assert sum("TFLOP/s = " in line and "% of the 1 TFLOP/s dense peak" in line and "of the encode phase" in line
               for line in lines) == 2, result.stdout[-2000:]
