"""video_loading.py against the ORIGINAL implementation's goldens, across backends and input kinds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conftest import golden_path
from media import encode, naive_decode, pattern

import videochat_flash.video_loading as vl
from videochat_flash.video_loading import (
    VideoLoadMetadata,
    load_video,
    resize_frame,
    sample_frame_indices,
    sample_frame_indices_training,
    time_message,
)

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:  # pragma: no cover
    HAVE_DECORD = False

needs_decord = pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
REPO_ROOT = Path(__file__).resolve().parent.parent
VIDEOS = [
    "synthetic_main_12s_25fps_320x240.mp4",
    "synthetic_short_2s_25fps_160x120.mp4",
    "synthetic_tiny_5frames_25fps_64x48.mp4",
    "synthetic_long_100s_5fps_64x48.mp4",
]
MAIN = VIDEOS[0]
BACKENDS = ["pyav"] + (["decord"] if HAVE_DECORD else [])
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope="module")
def pre():
    return json.loads(golden_path("preprocess.json").read_text())


@pytest.fixture(scope="module")
def tensors():
    return load_file(str(golden_path("preprocess.safetensors")))


def normalise(frames_uint8: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32, /255 then ImageNet mean/std (the original's processor)."""
    x = frames_uint8.astype(np.float32) * np.float32(1 / 255)
    return ((x - MEAN) / STD).transpose(0, 3, 1, 2)








# --------------------------------------------------------------------------------------------------------------
# goldens: sampling, uint8 frames, processed pixels
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_num_frames", [16, 64, 512])
@pytest.mark.parametrize("video", VIDEOS)
def test_golden_sampling(pre, video, max_num_frames, backend):
    exp = pre["sampling"][video][f"hf_chat.max_num_frames={max_num_frames}"]
    frames, md = load_video(str(golden_path(video)), max_num_frames=max_num_frames, backend=backend)
    assert md.backend == backend
    assert md.frame_indices == exp["frame_indices"]
    assert md.fps == exp["fps"]
    assert md.duration == exp["duration"]
    assert md.time_message == exp["time_msg"]
    assert list(frames.shape) == exp["frames_shape"] and frames.dtype == np.uint8
    info = pre["videos"][video]
    assert (md.total_frames, md.width, md.height) == (info["decord_len"], info["width"], info["height"])


@pytest.mark.parametrize("video", VIDEOS)
def test_golden_training_indices(pre, video):
    exp = pre["sampling"][video]["train.process_video(upbound=512,lowbound=64,local=4)"]
    info = pre["videos"][video]
    idx = sample_frame_indices_training(info["decord_len"], info["decord_avg_fps"])
    assert idx == exp["frame_indices"]
    assert time_message(info["decord_len"] / info["decord_avg_fps"], len(idx)) == exp["time_msg"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_uint8_frames(pre, tensors, backend):
    frames, md = load_video(str(golden_path(MAIN)), backend=backend)
    assert md.frame_indices == tensors["frame_indices"].tolist() == pre["main_video"]["frame_indices"]
    positions = pre["main_video"]["subset_frames_uint8_(positions in frame_indices)"]
    np.testing.assert_array_equal(frames[positions], tensors["frames_uint8_subset"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [224, 448])
def test_golden_processed_pixels(pre, tensors, size, backend):
    frames, md = load_video(str(golden_path(MAIN)), size=size, backend=backend)
    assert frames.shape == (64, size, size, 3)
    pixels = normalise(frames)
    subset = pre["main_video"][f"subset_frames_{size}"]
    np.testing.assert_allclose(pixels[subset], tensors[f"pixel_values_{size}_subset"], rtol=0, atol=1e-5)
    # all 64 frames through the per-frame / per-channel sums (float64 over the whole frame)
    p64 = pixels.astype(np.float64)
    sums, sq = p64.sum(axis=(2, 3)), (p64**2).sum(axis=(2, 3))
    gold = tensors[f"pixel_stats_{size}"].astype(np.float64)
    npix = size * size
    assert np.abs(sums - gold[..., 0]).max() / npix < 1e-5
    np.testing.assert_allclose(sq, gold[..., 1], rtol=1e-5)


@needs_decord
@pytest.mark.parametrize("video", VIDEOS)
def test_decord_and_pyav_agree_on_golden_videos(video):
    path = str(golden_path(video))
    a, ma = load_video(path, backend="pyav", max_num_frames=512)
    b, mb = load_video(path, backend="decord", max_num_frames=512)
    assert ma.frame_indices == mb.frame_indices and ma.fps == mb.fps and ma.time_message == mb.time_message
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, naive_decode(path)[ma.frame_indices])
    a, _ = load_video(path, backend="pyav", size=224, num_frames=12)
    b, _ = load_video(path, backend="decord", size=224, num_frames=12)
    np.testing.assert_array_equal(a, b)


def test_auto_backend_is_pyav():
    _, md = load_video(str(golden_path(MAIN)))
    assert md.backend == "pyav"
    assert vl.available_backends()[0] == "pyav"


# --------------------------------------------------------------------------------------------------------------
# PyAV decode strategies all give the plain decode's frames
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bframe_videos(tmp_path_factory):
    """B-frames, open GOPs (frames shown before their keyframe), short GOPs: mp4 and mkv."""
    d = tmp_path_factory.mktemp("gop")
    opts = {"bf": "3", "x264-params": "open-gop=1:keyint=20:min-keyint=20:scenecut=0"}
    return [encode(d / "open_gop.mp4", 300, 96, 64, options=opts), encode(d / "open_gop.mkv", 300, 96, 64, fmt="matroska", options=opts)]


@pytest.mark.parametrize("seek", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("skip_nonref", [True, False])
def test_pyav_strategies_are_frame_exact(bframe_videos, monkeypatch, seek, threads, skip_nonref):
    monkeypatch.setattr(vl, "_use_seek", lambda *a: seek)
    if not skip_nonref:
        monkeypatch.setattr(vl, "_h264_nonref_test", lambda cc: None)
    for path in bframe_videos:
        ref = naive_decode(path)
        for n in (8, 36, 300):
            frames, md = load_video(path, num_frames=n, num_threads=threads, backend="pyav")
            assert md.extra["mode"] == ("seek" if seek else "sequential")
            np.testing.assert_array_equal(frames, ref[md.frame_indices], err_msg=f"{path} n={n}")


FORMATS = {
    "h264.ts": dict(fmt="mpegts", options={"g": "15", "bf": "2"}),
    "h264.avi": dict(fmt="avi", options={"g": "15", "bf": "0"}),
    "mpeg4_bframes.mp4": dict(codec="mpeg4", options={"g": "15", "bf": "2"}),
    "hevc.mkv": dict(codec="libx265", fmt="matroska", options={"g": "15", "x265-params": "log-level=error"}),
    "vp9.webm": dict(codec="libvpx-vp9", fmt="webm", options={"g": "15"}),
    "mjpeg.avi": dict(codec="mjpeg", fmt="avi", pix_fmt="yuvj420p"),
    "anim.gif": dict(codec="gif", fmt="gif", pix_fmt="rgb8"),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_pyav_frame_exact_across_formats(tmp_path, name):
    path = encode(tmp_path / name, 90, 64, 48, **FORMATS[name])
    ref = naive_decode(path)
    for n in (8, 36):
        for threads in (1, 2):
            frames, md = load_video(path, num_frames=n, num_threads=threads)
            assert md.backend == "pyav" and md.total_frames == len(ref) == 90
            np.testing.assert_array_equal(frames, ref[md.frame_indices])


def test_h264_nonref_packets_are_detected(bframe_videos):
    with av.open(bframe_videos[0]) as c:
        vs = c.streams.video[0]
        test = vl._h264_nonref_test(vs.codec_context)
        flags = [test(p) for p in c.demux(vs) if p.size]
    assert 0 < sum(flags) < len(flags)  # some B frames are non-reference, I/P frames never are


# --------------------------------------------------------------------------------------------------------------
# sampling rules
# --------------------------------------------------------------------------------------------------------------
def test_sampling_rules():
    assert sample_frame_indices(5, 25.0) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert sample_frame_indices(1, 25.0) == [0] * 8
    assert sample_frame_indices(2, 25.0) == [0] + [1] * 7
    assert sample_frame_indices(3, 25.0) == [0, 1] + [2] * 6
    assert len(sample_frame_indices(50, 25.0, max_num_frames=16)) == 48  # short: 8 * (50 // 8), max ignored
    assert len(sample_frame_indices(300, 25.0, max_num_frames=16)) == 64  # long: never below 64
    assert len(sample_frame_indices(18000, 30.0)) == 512  # 600 s -> 600 -> capped
    assert len(sample_frame_indices(500, 5.0, max_num_frames=70)) == 68  # 96 -> 70 -> multiple of 4
    assert len(sample_frame_indices(500, 5.0, max_num_frames=100)) == 96
    assert len(sample_frame_indices(500, 5.0, frames_multiple=4, max_num_frames=512)) == 100
    # fps option: frames per second of video, same clamping
    assert len(sample_frame_indices(500, 5.0, fps=2)) == 200
    assert len(sample_frame_indices(500, 5.0, fps=0.5)) == 64
    assert len(sample_frame_indices(500, 5.0, fps=0.5, min_num_frames=0)) == 48
    assert len(sample_frame_indices(500, 5.0, fps=10, max_num_frames=256)) == 256
    # num_frames: exact, rounded up to a multiple of 4
    assert sample_frame_indices(300, 25.0, num_frames=16) == [int((a + b - 1) // 2) for a, b in zip(
        np.linspace(0, 300, 17).astype(int)[:-1], np.linspace(0, 300, 17).astype(int)[1:])]
    assert len(sample_frame_indices(300, 25.0, num_frames=6)) == 8
    assert len(sample_frame_indices(300, 25.0, num_frames=1000)) == 1000
    for total in (1, 2, 3, 4, 7, 9, 33, 63, 64, 65, 101, 999, 4321):
        for fps in (1.0, 7.5, 25.0, 29.97, 60.0):
            for mx in (1, 6, 16, 70, 512):
                for kw in ({}, {"fps": 0.3}, {"num_frames": 5}, {"min_num_frames": 10}):
                    idx = sample_frame_indices(total, fps, max_num_frames=mx, **kw)
                    assert len(idx) % 4 == 0 and len(idx) >= 4
                    assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < total


@pytest.mark.parametrize(
    "kwargs",
    [{"max_num_frames": 0}, {"max_num_frames": -3}, {"num_frames": 0}, {"fps": -1}, {"fps": float("nan")},
     {"frames_multiple": 10}, {"min_num_frames": -1}, {"num_frames": 4, "fps": 1}],
)
def test_sampling_argument_errors(kwargs):
    with pytest.raises(ValueError):
        sample_frame_indices(100, 25.0, **kwargs)
    with pytest.raises(ValueError):
        load_video(np.zeros((4, 8, 8, 3), np.uint8), **kwargs)


def test_max_num_frames_error_names_the_value():
    with pytest.raises(ValueError, match="max_num_frames=0"):
        load_video(str(golden_path(MAIN)), max_num_frames=0)


def test_num_frames_and_fps_options_on_files():
    path = str(golden_path("synthetic_long_100s_5fps_64x48.mp4"))
    frames, md = load_video(path, num_frames=16)
    assert frames.shape[0] == 16 and md.frame_indices == sample_frame_indices(500, 5.0, num_frames=16)
    assert md.time_message == time_message(100.0, 16)
    frames, md = load_video(path, fps=2)
    assert frames.shape[0] == 200 and md.duration == 100.0
    frames, md = load_video(path, fps=2, max_num_frames=128)
    assert frames.shape[0] == 128
    np.testing.assert_array_equal(frames, naive_decode(path)[md.frame_indices])


# --------------------------------------------------------------------------------------------------------------
# already-decoded inputs and still images
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    return np.stack([pattern(i, 40, 30) for i in range(100)])


def _as_input(clip, kind):
    if kind == "numpy":
        return clip
    if kind == "torch_thwc":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(clip)
    if kind == "torch_tchw":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(clip).permute(0, 3, 1, 2)
    if kind == "numpy_tchw":
        return np.ascontiguousarray(clip.transpose(0, 3, 1, 2))
    if kind == "pil_list":
        return [Image.fromarray(f) for f in clip]
    if kind == "array_list":
        return list(clip)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["numpy", "torch_thwc", "torch_tchw", "numpy_tchw", "pil_list", "array_list"])
@pytest.mark.parametrize("size", [None, 24])
def test_decoded_frames_inputs(clip, kind, size):
    frames, md = load_video(_as_input(clip, kind), size=size)
    # 100 frames at the default 1 fps: 100 s -> 96 frames
    assert md.backend == "frames" and md.total_frames == 100 and md.fps == 1.0 and md.duration == 100.0
    assert md.frame_indices == sample_frame_indices(100, 1.0)
    assert (md.width, md.height) == (40, 30)
    want = clip[md.frame_indices]
    if size:
        want = np.stack([resize_frame(f, size) for f in want])
    np.testing.assert_array_equal(frames, want)


def test_decoded_frames_options(clip):
    frames, md = load_video(clip[:32])
    assert md.frame_indices == list(range(32))  # up to 64 frames: kept as they are
    frames, md = load_video(clip, video_fps=25.0)
    assert md.duration == 4.0 and frames.shape[0] == 64
    frames, md = load_video(clip, num_frames=8)
    np.testing.assert_array_equal(frames, clip[md.frame_indices])
    with pytest.raises(ValueError, match="uint8"):
        load_video(clip.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        load_video([])
    with pytest.raises(ValueError):
        load_video(np.zeros((4, 10, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="size"):
        load_video([clip[0], clip[1][:20]])  # differing sizes need size=
    frames, _ = load_video([clip[0], clip[1][:20]], size=16)
    assert frames.shape == (8, 16, 16, 3)


@pytest.mark.parametrize("kind", ["pil", "array"])
def test_still_image_inputs(clip, kind):
    img = clip[7]
    video = Image.fromarray(img) if kind == "pil" else img
    frames, md = load_video(video, size=20)
    assert frames.shape == (4, 20, 20, 3) and md.frame_indices == [0, 0, 0, 0]
    assert md.backend == "frames" and md.duration == 1.0
    np.testing.assert_array_equal(frames, np.stack([resize_frame(img, 20)] * 4))


def test_resize_frame_is_pil_bicubic(clip):
    f = clip[3]
    want = np.asarray(Image.fromarray(f).resize((50, 70), Image.BICUBIC))
    np.testing.assert_array_equal(resize_frame(f, (70, 50)), want)
    assert resize_frame(f, 16).shape == (16, 16, 3)


# --------------------------------------------------------------------------------------------------------------
# metadata, fallback, module hygiene
# --------------------------------------------------------------------------------------------------------------
def test_metadata_access():
    _, md = load_video(str(golden_path("synthetic_tiny_5frames_25fps_64x48.mp4")))
    assert isinstance(md, VideoLoadMetadata)
    assert md["frame_indices"] == md.frame_indices == [0, 1, 2, 3, 4, 4, 4, 4]
    d = md.to_dict()
    assert {"frame_indices", "fps", "duration", "total_frames", "backend", "width", "height", "time_message"} <= set(d)
    assert d["time_message"] == "\nThe video lasts for 0.20 seconds, and 8 frames are uniformly sampled from it. "
    assert md.num_frames == 8 and md.timestamps[4] == pytest.approx(0.16)
    assert md.get("nope", 1) == 1 and "fps" in md
    with pytest.raises(KeyError):
        md["nope"]


@needs_decord
def test_auto_falls_back_to_decord_when_pyav_fails(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated PyAV failure")

    monkeypatch.setattr(vl, "_pyav_decode", boom)
    with pytest.warns(UserWarning, match="simulated PyAV failure"):
        frames, md = load_video(str(golden_path(MAIN)))
    assert md.backend == "decord" and frames.shape == (64, 240, 320, 3)
    with pytest.raises(ValueError, match="simulated PyAV failure"):
        load_video(str(golden_path(MAIN)), backend="pyav")  # forced: no fallback


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import videochat_flash.video_loading as vl
    def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's at fork time)
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    before = peak_kb()
    path, backend, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    if backend == "original":  # decord get_batch of every sampled frame at full resolution, then resize
        import decord, numpy as np
        from PIL import Image
        idx = vl.sample_frame_indices(24, 25.0, num_frames=n)
        full = decord.VideoReader(path, num_threads=1).get_batch(idx).asnumpy()
        frames = np.stack([np.asarray(Image.fromarray(f).resize((224, 224), Image.BICUBIC)) for f in full])
    else:
        frames, md = vl.load_video(path, size=224, backend=backend, num_frames=n)
    print(json.dumps({"grew_kb": peak_kb() - before, "shape": list(frames.shape), "torch": "torch" in sys.modules}))
    """
)
UHD_FRAME_KB = 3840 * 2160 * 3 / 1024


@pytest.fixture(scope="module")
def uhd_video(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("uhd") / "uhd24.mp4", 24, 3840, 2160, options={"g": "12"})


def _peak_growth_kb(video, backend, n):
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(REPO_ROOT), video, backend, str(n)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["shape"] == [n, 224, 224, 3]
    assert not res["torch"]  # the module never imports torch itself
    return res["grew_kb"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
@pytest.mark.parametrize("backend", BACKENDS)
def test_resizing_is_per_frame_4k(uhd_video, backend):
    """Frames are resized as they are decoded, so the peak does not grow with the number of frames: 16 more UHD
    frames at full resolution would be 380 MB. decord's own decoder thread buffers up to ~20 decoded frames ahead
    of the reader (about 0.5 GB at UHD, whatever the frame count), so for decord the check is against the
    original way (get_batch of all 24 frames at full resolution, then resize: ~1.3 GB here)."""
    if backend == "pyav":
        few, many = _peak_growth_kb(uhd_video, backend, 8), _peak_growth_kb(uhd_video, backend, 24)
        assert many - few < 4 * UHD_FRAME_KB, (few, many)
        assert many < 8 * UHD_FRAME_KB, (few, many)
    else:
        ours, original = _peak_growth_kb(uhd_video, backend, 24), _peak_growth_kb(uhd_video, "original", 24)
        assert ours < 0.6 * original, (ours, original)


def test_only_guarded_optional_imports():
    """transformers' remote-code loader requires every unguarded import to be installed: only numpy and PIL."""
    from transformers.dynamic_module_utils import get_imports

    imports = set(get_imports(str(REPO_ROOT / "video_loading.py"))) - set(sys.stdlib_module_names)
    assert imports == {"numpy", "PIL"}
