"""frame_sampling.py: the sampling rules (files against the ORIGINAL implementation's goldens, training, decoded
frames) and the prompt's time message."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import golden_path

from videochat_flash.frame_sampling import CLIP_FRAMES, FrameSampling, time_message

VIDEOS = [
    "synthetic_main_12s_25fps_320x240.mp4",
    "synthetic_short_2s_25fps_160x120.mp4",
    "synthetic_tiny_5frames_25fps_64x48.mp4",
    "synthetic_long_100s_5fps_64x48.mp4",
]


@pytest.fixture(scope="module")
def pre():
    return json.loads(golden_path("preprocess.json").read_text())


def middle(total, n):
    """The original's index rule, written out: the middle of each of n equal segments."""
    edges = np.linspace(0, total, n + 1).astype(int)
    return [int((a + b - 1) // 2) for a, b in zip(edges[:-1], edges[1:])]


# --------------------------------------------------------------------------------------------------------------
# video files: the original chat() / lmms-eval rule, and the training rule
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_num_frames", [16, 64, 512])
@pytest.mark.parametrize("video", VIDEOS)
def test_golden_file_sampling(pre, video, max_num_frames):
    exp = pre["sampling"][video][f"hf_chat.max_num_frames={max_num_frames}"]
    info = pre["videos"][video]
    idx = FrameSampling(max_num_frames=max_num_frames).file_indices(info["decord_len"], info["decord_avg_fps"])
    assert idx == exp["frame_indices"]
    assert time_message(info["decord_len"] / info["decord_avg_fps"], len(idx)) == exp["time_msg"]


def test_middle_is_the_originals_rule(pre):
    """`middle`, the expectation of the tests below, gives the original's indices wherever it sampled at most as
    many frames as the video has."""
    checked = 0
    for video in VIDEOS:
        total = pre["videos"][video]["decord_len"]
        for key, exp in pre["sampling"][video].items():
            if key.startswith("hf_chat.") and len(exp["frame_indices"]) <= total:
                assert middle(total, len(exp["frame_indices"])) == exp["frame_indices"], (video, key)
                checked += 1
    assert checked == 9  # 3 settings x the 3 videos longer than 8 frames


@pytest.mark.parametrize("video", VIDEOS)
def test_golden_training_indices(pre, video):
    exp = pre["sampling"][video]["train.process_video(upbound=512,lowbound=64,local=4)"]
    info = pre["videos"][video]
    idx = FrameSampling.training().file_indices(info["decord_len"], info["decord_avg_fps"])
    assert idx == exp["frame_indices"]
    assert time_message(info["decord_len"] / info["decord_avg_fps"], len(idx)) == exp["time_msg"]


def test_training_presets():
    # dynamic_fps1: 1 frame/s in groups of local_num_frames within [lowbound, upbound]
    assert len(FrameSampling.training().file_indices(500, 5.0)) == 100  # 100 s; groups of 4 (chat() gives 96)
    assert len(FrameSampling.training(frames_upbound=32, frames_lowbound=8).file_indices(500, 5.0)) == 32
    assert len(FrameSampling.training(frames_lowbound=64).file_indices(300, 25.0)) == 64  # 12 s -> at least 64
    assert len(FrameSampling.training(local_num_frames=8).file_indices(500, 5.0)) == 96
    # middle: exactly frames_upbound frames, whatever the duration
    for total, fps in ((300, 25.0), (18000, 30.0), (5, 25.0)):
        idx = FrameSampling.training(frames_upbound=16, sample_type="middle").file_indices(total, fps)
        assert len(idx) == 16 and idx == FrameSampling(num_frames=16).file_indices(total, fps)
    with pytest.raises(ValueError, match="sample_type"):
        FrameSampling.training(sample_type="uniform")
    with pytest.raises(ValueError, match="frames_multiple"):
        FrameSampling.training(local_num_frames=6)


def test_file_rules():
    files = FrameSampling()
    assert files.file_indices(5, 25.0) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert files.file_indices(1, 25.0) == [0] * 8
    assert files.file_indices(2, 25.0) == [0] + [1] * 7
    assert files.file_indices(3, 25.0) == [0, 1] + [2] * 6
    assert len(FrameSampling(max_num_frames=16).file_indices(50, 25.0)) == 48  # short: 8 * (50 // 8), max ignored
    assert len(FrameSampling(max_num_frames=16).file_indices(300, 25.0)) == 64  # long: never below 64
    assert len(files.file_indices(18000, 30.0)) == 512  # 600 s -> 600 -> capped
    assert len(FrameSampling(max_num_frames=70).file_indices(500, 5.0)) == 68  # 96 -> 70 -> multiple of 4
    assert len(FrameSampling(max_num_frames=100).file_indices(500, 5.0)) == 96
    assert len(FrameSampling(frames_multiple=4).file_indices(500, 5.0)) == 100
    # fps option: frames per second of video, same clamping
    assert len(FrameSampling(fps=2).file_indices(500, 5.0)) == 200
    assert len(FrameSampling(fps=0.5).file_indices(500, 5.0)) == 64
    assert len(FrameSampling(fps=0.5, min_num_frames=0).file_indices(500, 5.0)) == 48
    assert len(FrameSampling(fps=10, max_num_frames=256).file_indices(500, 5.0)) == 256
    # num_frames: exact, rounded up to a multiple of 4
    assert FrameSampling(num_frames=16).file_indices(300, 25.0) == middle(300, 16)
    assert len(FrameSampling(num_frames=6).file_indices(300, 25.0)) == 8
    assert len(FrameSampling(num_frames=1000).file_indices(300, 25.0)) == 1000
    for total in (1, 2, 3, 4, 7, 9, 33, 63, 64, 65, 101, 999, 4321):
        for fps in (1.0, 7.5, 25.0, 29.97, 60.0):
            for mx in (1, 6, 16, 70, 512):
                for kw in ({}, {"fps": 0.3}, {"num_frames": 5}, {"min_num_frames": 10}):
                    idx = FrameSampling(max_num_frames=mx, **kw).file_indices(total, fps)
                    assert len(idx) % CLIP_FRAMES == 0 and len(idx) >= CLIP_FRAMES
                    assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < total


# --------------------------------------------------------------------------------------------------------------
# decoded frames: as given, capped, or sampled by count / rate
# --------------------------------------------------------------------------------------------------------------
def test_decoded_frames_are_used_as_given():
    s = FrameSampling()
    assert s.decoded_indices(100) == list(range(100))  # no 1-fps sampling of frames someone already picked
    assert s.decoded_indices(64) == list(range(64))
    assert s.decoded_indices(6) == [0, 1, 2, 3, 4, 5, 5, 5]  # padded to whole 4-frame clips with the last frame
    assert s.decoded_indices(1) == [0, 0, 0, 0]  # a still image: one clip
    assert s.decoded_indices(100, video_fps=25.0) == list(range(100))  # the rate changes nothing by default
    # min_num_frames / frames_multiple are file rules
    assert FrameSampling(min_num_frames=64, frames_multiple=16).decoded_indices(20) == list(range(20))


def test_decoded_frames_cap():
    assert FrameSampling().decoded_indices(1000) == middle(1000, 512)
    assert FrameSampling().decoded_indices(512) == list(range(512))
    assert FrameSampling(max_num_frames=70).decoded_indices(100) == middle(100, 68)  # rounded down to clips
    assert FrameSampling(max_num_frames=70).decoded_indices(70) == middle(70, 68)  # never more than the cap ...
    assert FrameSampling(max_num_frames=2).decoded_indices(100) == middle(100, 4)  # ... but at least one clip
    assert FrameSampling(max_num_frames=2).decoded_indices(1) == [0, 0, 0, 0]


def test_decoded_frames_num_frames_and_fps():
    assert FrameSampling(num_frames=8).decoded_indices(100) == middle(100, 8)
    assert FrameSampling(num_frames=6).decoded_indices(100) == middle(100, 8)  # rounded up to whole clips
    assert FrameSampling(num_frames=10).decoded_indices(4) == [0, 1, 2, 3] + [3] * 8  # more than given: padded
    assert FrameSampling(num_frames=16).decoded_indices(300) == FrameSampling(num_frames=16).file_indices(300, 25.0)
    # fps: T / video_fps seconds at fps frames per second
    assert FrameSampling(fps=2).decoded_indices(100, video_fps=25.0) == middle(100, 8)  # 4 s -> 8 frames
    assert FrameSampling(fps=1).decoded_indices(100, video_fps=10.0) == middle(100, 8)  # 10 frames -> 8 (clips)
    assert FrameSampling(fps=1).decoded_indices(10, video_fps=25.0) == middle(10, 4)  # 0.4 s: one clip
    assert FrameSampling(fps=1, max_num_frames=64).decoded_indices(1000, video_fps=1.0) == middle(1000, 64)
    assert FrameSampling(fps=2).decoded_indices(10, video_fps=1.0) == list(range(10)) + [9] * 10  # 20 > 10: padded
    with pytest.raises(ValueError, match="video_fps"):
        FrameSampling(fps=1).decoded_indices(100)
    with pytest.raises(ValueError, match="video_fps"):
        FrameSampling(fps=1).decoded_indices(100, video_fps=0)


# --------------------------------------------------------------------------------------------------------------
# arguments, time message
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [({"max_num_frames": 0}, "max_num_frames=0"), ({"max_num_frames": -3}, "max_num_frames=-3"),
     ({"num_frames": 0}, "num_frames=0"), ({"fps": -1}, "fps"), ({"fps": float("nan")}, "fps"),
     ({"fps": "fast"}, "fps"), ({"frames_multiple": 10}, "frames_multiple"),
     ({"min_num_frames": -1}, "min_num_frames"), ({"num_frames": 4, "fps": 1}, "at most one"),
     ({"max_num_frames": 16.0}, "integer"), ({"num_frames": True}, "integer")],
)
def test_sampling_argument_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        FrameSampling(**kwargs)


def test_sampling_values_and_bad_totals():
    s = FrameSampling(max_num_frames=np.int64(16), fps=np.float32(2.0))
    assert type(s.max_num_frames) is int and type(s.fps) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.fps = 3.0
    for bad in (lambda: s.file_indices(0, 25.0), lambda: s.decoded_indices(0), lambda: s.file_indices(10, 0)):
        with pytest.raises(ValueError):
            bad()


def test_time_message():
    assert time_message(12.0, 64) == (
        "\nThe video lasts for 12.00 seconds, and 64 frames are uniformly sampled from it. "
    )
    assert time_message(0.2, 8) == "\nThe video lasts for 0.20 seconds, and 8 frames are uniformly sampled from it. "
    # the training "long" variant names each frame's time (rounded to 0.1 s)
    assert time_message(1.5, 4, [0.0, 0.375, 0.75, 1.125]) == (
        "\nThe video lasts for 1.50 seconds, and 4 frames are uniformly sampled at 0.0, 0.4, 0.8, 1.1 seconds. "
    )
