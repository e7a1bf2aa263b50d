"""video_loading.py, the decoder: goldens of the ORIGINAL implementation across backends and input kinds, every PyAV
decoding plan against a plain decode, chunks (iter_video_chunks) against load_video, and bad or unusual inputs.

Bad-input cases run load_video in a fresh subprocess with a 10 s timeout, so a decoder that segfaults or hangs
fails one test instead of taking the run down. Test media are written with PyAV (tests/media.py) into temporary
directories."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conftest import REPO_ROOT, golden_path
from media import OPEN_GOP, audio_only, encode, image, naive_decode, pattern, zero_mp4_durations

import videochat_flash.video_loading as vl
from videochat_flash.frame_sampling import FrameSampling, time_message
from videochat_flash.video_loading import VideoLoadMetadata, VideoSegment, iter_video_chunks, load_video, resize_frame

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:  # pragma: no cover
    HAVE_DECORD = False

needs_decord = pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
VIDEOS = [
    "synthetic_main_12s_25fps_320x240.mp4",
    "synthetic_short_2s_25fps_160x120.mp4",
    "synthetic_tiny_5frames_25fps_64x48.mp4",
    "synthetic_long_100s_5fps_64x48.mp4",
]
MAIN = VIDEOS[0]
BACKENDS = ["pyav"] + (["decord"] if HAVE_DECORD else [])
BACKEND_CHOICES = [None] + BACKENDS
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
    assert time_message(md.duration, md.num_frames) == exp["time_msg"]
    assert list(frames.shape) == exp["frames_shape"] and frames.dtype == np.uint8
    info = pre["videos"][video]
    assert (md.total_frames, md.width, md.height) == (info["decord_len"], info["width"], info["height"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_uint8_frames(pre, tensors, backend):
    frames, md = load_video(str(golden_path(MAIN)), backend=backend)
    assert md.frame_indices == tensors["frame_indices"].tolist() == pre["main_video"]["frame_indices"]
    positions = pre["main_video"]["subset_frames_uint8_(positions in frame_indices)"]
    np.testing.assert_array_equal(frames[positions], tensors["frames_uint8_subset"])
    assert frames.flags.owndata and frames.flags.c_contiguous  # the decoder's own buffer: no copy behind it


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
    assert (ma.frame_indices, ma.fps, ma.duration) == (mb.frame_indices, mb.fps, mb.duration)
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
    return [encode(d / "open_gop.mp4", 300, 96, 64, options=OPEN_GOP),
            encode(d / "open_gop.mkv", 300, 96, 64, fmt="matroska", options=OPEN_GOP)]


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
# sampling options
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [{"max_num_frames": 0}, {"max_num_frames": -3}, {"num_frames": 0}, {"fps": -1}, {"fps": float("nan")},
     {"frames_multiple": 10}, {"min_num_frames": -1}, {"num_frames": 4, "fps": 1}],
)
def test_sampling_argument_errors(kwargs):
    with pytest.raises(ValueError):
        load_video(np.zeros((4, 8, 8, 3), np.uint8), **kwargs)
    with pytest.raises(ValueError):
        iter_video_chunks(str(golden_path(MAIN)), **kwargs)


def test_max_num_frames_error_names_the_value():
    with pytest.raises(ValueError, match="max_num_frames=0"):
        load_video(str(golden_path(MAIN)), max_num_frames=0)


def test_num_frames_and_fps_options_on_files():
    path = str(golden_path("synthetic_long_100s_5fps_64x48.mp4"))
    frames, md = load_video(path, num_frames=16)
    assert frames.shape[0] == 16 and md.frame_indices == FrameSampling(num_frames=16).file_indices(500, 5.0)
    frames, md = load_video(path, fps=2)
    assert frames.shape[0] == 200 and md.duration == 100.0
    frames, md = load_video(path, fps=2, max_num_frames=128)
    assert frames.shape[0] == 128
    np.testing.assert_array_equal(frames, naive_decode(path)[md.frame_indices])


def test_sampling_object_or_options():
    path = str(golden_path(MAIN))
    frames, md = load_video(path, sampling=FrameSampling(num_frames=12, max_num_frames=16))
    same, md2 = load_video(path, num_frames=12, max_num_frames=16)
    assert md.frame_indices == md2.frame_indices and len(md.frame_indices) == 12
    np.testing.assert_array_equal(frames, same)
    _, md = load_video(path, sampling=FrameSampling.training())  # 12 s in 4-frame groups, at least 64
    assert md.frame_indices == FrameSampling.training().file_indices(300, 25.0)
    with pytest.raises(ValueError, match="not both"):
        load_video(path, sampling=FrameSampling(), num_frames=8)
    with pytest.raises(TypeError, match="num_frame"):
        load_video(path, num_frame=8)


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
    # every frame as given (100 is a multiple of 4 and under max_num_frames); no rate given: no duration
    assert md.backend == "frames" and md.total_frames == 100 and md.frame_indices == list(range(100))
    assert md.fps is None and md.duration is None and md.timestamps is None
    assert (md.width, md.height) == (40, 30)
    want = clip[md.frame_indices]
    if size:
        want = np.stack([resize_frame(f, size) for f in want])
    np.testing.assert_array_equal(frames, want)


def test_decoded_frames_options(clip):
    frames, md = load_video(clip[:30])
    assert md.frame_indices == list(range(30)) + [29, 29]  # padded to whole 4-frame clips with the last frame
    np.testing.assert_array_equal(frames, clip[md.frame_indices])
    frames, md = load_video(clip, video_fps=25.0)
    assert md.duration == 4.0 and md.fps == 25.0 and frames.shape[0] == 100
    assert md.timestamps[:2] == [0.0, 0.04]
    frames, md = load_video(clip, video_fps=25.0, fps=2)  # 4 s at 2 frames/s
    assert md.frame_indices == FrameSampling(fps=2).decoded_indices(100, 25.0) and frames.shape[0] == 8
    with pytest.raises(ValueError, match="video_fps"):
        load_video(clip, fps=2)  # a rate to sample at needs the frames' own rate
    with pytest.raises(ValueError, match="video_fps"):
        load_video(clip, video_fps=-1.0)
    frames, md = load_video(clip, max_num_frames=16)
    assert md.frame_indices == FrameSampling(max_num_frames=16).decoded_indices(100) and frames.shape[0] == 16
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
    assert frames.shape == (4, 16, 16, 3)


@pytest.mark.parametrize("kind", ["pil", "array"])
def test_still_image_inputs(clip, kind):
    img = clip[7]
    video = Image.fromarray(img) if kind == "pil" else img
    frames, md = load_video(video, size=20)
    assert frames.shape == (4, 20, 20, 3) and md.frame_indices == [0, 0, 0, 0]
    assert md.backend == "frames" and md.fps == 1.0 and md.duration == 1.0
    np.testing.assert_array_equal(frames, np.stack([resize_frame(img, 20)] * 4))


def test_resize_frame_is_pil_bicubic(clip):
    f = clip[3]
    want = np.asarray(Image.fromarray(f).resize((50, 70), Image.BICUBIC))
    np.testing.assert_array_equal(resize_frame(f, (70, 50)), want)
    assert resize_frame(f, 16).shape == (16, 16, 3)


def test_rgb_frame(clip):
    torch = pytest.importorskip("torch")
    f = clip[5]
    for item in (f, Image.fromarray(f), torch.from_numpy(f), np.ascontiguousarray(f.transpose(2, 0, 1)),
                 Image.fromarray(f).convert("L").convert("RGB")):
        out = vl.rgb_frame(item)
        assert out.shape == (30, 40, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(vl.rgb_frame(torch.from_numpy(f).permute(2, 0, 1)), f)
    with pytest.raises(ValueError, match="uint8"):
        vl.rgb_frame(f.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        vl.rgb_frame(f[..., :2])


# --------------------------------------------------------------------------------------------------------------
# metadata, fallback, memory, module hygiene
# --------------------------------------------------------------------------------------------------------------
def test_metadata_access():
    _, md = load_video(str(golden_path("synthetic_tiny_5frames_25fps_64x48.mp4")))
    assert isinstance(md, VideoLoadMetadata)
    assert md["frame_indices"] == md.frame_indices == [0, 1, 2, 3, 4, 4, 4, 4]
    d = md.to_dict()
    assert {"frame_indices", "fps", "duration", "total_frames", "backend", "width", "height", "path", "extra"} == set(d)
    assert time_message(d["duration"], len(d["frame_indices"])) == (
        "\nThe video lasts for 0.20 seconds, and 8 frames are uniformly sampled from it. ")
    assert md.num_frames == md["num_frames"] == 8 and md.timestamps[4] == pytest.approx(0.16)
    assert md.get("nope", 1) == 1 and "fps" in md and md.get("duration") == 0.2
    assert {"mode", "codec", "gop", "fps_source", "workers", "spans", "packets_in_spans"} <= set(md.extra)
    with pytest.raises(KeyError):
        md["nope"]


def _failing_after(n_frames):
    """_pyav_worker_frames that raises once ``n_frames`` frames have come out of all its calls together."""
    original, count = vl._pyav_worker_frames, itertools.count()

    def failing(*args, **kwargs):
        for item in original(*args, **kwargs):
            if next(count) >= n_frames:
                raise RuntimeError("simulated PyAV failure")
            yield item

    return failing


@needs_decord
def test_auto_falls_back_to_decord_when_pyav_fails(monkeypatch):
    monkeypatch.setattr(vl, "_pyav_worker_frames", _failing_after(0))
    with pytest.warns(UserWarning, match="simulated PyAV failure"):
        frames, md = load_video(str(golden_path(MAIN)))
    assert md.extra["fallback"] == "decord from chunk 0" and frames.shape == (64, 240, 320, 3)
    np.testing.assert_array_equal(frames, naive_decode(str(golden_path(MAIN)))[md.frame_indices])
    with pytest.raises(ValueError, match="simulated PyAV failure"):
        load_video(str(golden_path(MAIN)), backend="pyav")  # forced: no fallback


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import videochat_flash.video_loading as vl
    from videochat_flash.frame_sampling import FrameSampling
    def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's at fork time)
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    before = peak_kb()
    path, backend, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    if backend == "original":  # decord get_batch of every sampled frame at full resolution, then resize
        import decord, numpy as np
        from PIL import Image
        idx = FrameSampling(num_frames=n).file_indices(24, 25.0)
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
    """transformers' remote-code loader requires every unguarded import to be installed: only numpy and PIL (and
    the sibling module frame_sampling, which needs numpy only)."""
    from transformers.dynamic_module_utils import get_imports

    for name in ("video_loading.py", "frame_sampling.py"):
        imports = set(get_imports(str(REPO_ROOT / name))) - set(sys.stdlib_module_names)
        assert imports <= {"numpy", "PIL"}, name


# --------------------------------------------------------------------------------------------------------------
# iter_video_chunks: the frames of load_video, chunk by chunk
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream_media(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_media")
    return {
        "open_gop": encode(d / "open_gop.mp4", 300, 96, 64, options=OPEN_GOP),
        "mkv": encode(d / "open_gop.mkv", 120, 64, 48, fmt="matroska", options=OPEN_GOP),
        "five": encode(d / "five.mp4", 5),
        "raw_h264": encode(d / "raw.h264", 30, fmt="h264"),  # no timestamps: decoded straight through, counted
        "vfr_webm": encode(d / "vfr.webm", 8, codec="libvpx-vp9", fmt="webm",
                           timestamps=[0, 10, 30, 70, 150, 310, 630, 1270]),
        "clip": encode(d / "clip.mp4", 200, 96, 64, fps=10, options={"g": "12"}),
    }


def _chunks(video, chunk_frames, **kwargs):
    meta, it = iter_video_chunks(video, chunk_frames=chunk_frames, **kwargs)
    return meta, list(it)


def _same_metadata(a, b):
    for name in ("frame_indices", "fps", "duration", "total_frames", "backend", "width", "height", "path"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.extra.get("mode") == b.extra.get("mode") and a.extra.get("input") == b.extra.get("input")


@pytest.mark.parametrize("key", ["open_gop", "mkv", "five", "raw_h264", "vfr_webm", "clip"])
def test_chunks_concatenate_to_load_video_frames(stream_media, key):
    for kwargs in ({}, {"num_frames": 36, "size": 32}, {"num_frames": 300}, {"num_frames": 8}, {"fps": 3.0}):
        frames, md = load_video(stream_media[key], **kwargs)
        for chunk_frames in (1, 4, 7, 32, 4096):
            meta, chunks = _chunks(stream_media[key], chunk_frames, **kwargs)
            _same_metadata(meta, md)
            assert [len(c) for c in chunks[:-1]] == [chunk_frames] * (len(chunks) - 1)
            assert all(c.dtype == np.uint8 and c.flags.c_contiguous for c in chunks)
            np.testing.assert_array_equal(np.concatenate(chunks), frames, err_msg=f"{key} {kwargs} {chunk_frames}")
            assert "retry" not in meta.extra and "retry" not in md.extra


@needs_decord
@pytest.mark.parametrize("chunk_frames", [4, 12])
def test_chunks_with_decord_equal_load_video(stream_media, chunk_frames):
    for kwargs in ({"num_frames": 40}, {"num_frames": 40, "size": 32}, {}):
        frames, md = load_video(stream_media["clip"], backend="decord", **kwargs)
        meta, chunks = _chunks(stream_media["clip"], chunk_frames, backend="decord", **kwargs)
        _same_metadata(meta, md)
        np.testing.assert_array_equal(np.concatenate(chunks), frames)


@pytest.mark.parametrize("kind", ["array", "tensor", "tensor_chw", "list_pil", "list_arrays"])
@pytest.mark.parametrize("chunk_frames", [4, 5, 64])
def test_decoded_frames_and_images_chunk_like_load_video(kind, chunk_frames):
    torch = pytest.importorskip("torch")
    raw = np.stack([pattern(i, 40, 30) for i in range(70)])
    video = {
        "array": raw,
        "tensor": torch.from_numpy(raw),
        "tensor_chw": torch.from_numpy(raw).permute(0, 3, 1, 2),
        "list_pil": [Image.fromarray(f) for f in raw],
        "list_arrays": list(raw),
    }[kind]
    for kwargs in ({}, {"size": 24}, {"num_frames": 10}, {"video_fps": 5.0}, {"video_fps": 5.0, "fps": 2.0}):
        frames, md = load_video(video, **kwargs)
        meta, chunks = _chunks(video, chunk_frames, **kwargs)
        _same_metadata(meta, md)
        np.testing.assert_array_equal(np.concatenate(chunks), frames)
    image = Image.fromarray(raw[3])
    for still in (image, raw[3]):
        frames, md = load_video(still, size=16)
        meta, chunks = _chunks(still, 1, size=16)
        _same_metadata(meta, md)
        assert len(chunks) == 4
        np.testing.assert_array_equal(np.concatenate(chunks), frames)


def test_padding_repeated_across_chunks(stream_media):
    """A 5-frame video asked for 24 frames: the last frame fills the tail of one chunk and every later chunk."""
    frames, md = load_video(stream_media["five"], num_frames=24)
    assert md.frame_indices == [0, 1, 2, 3, 4] + [4] * 19
    meta, chunks = _chunks(stream_media["five"], 4, num_frames=24)
    assert len(chunks) == 6 and len({id(c) for c in chunks}) == 6  # separate arrays: a caller may write into one
    np.testing.assert_array_equal(np.concatenate(chunks), naive_decode(stream_media["five"])[md.frame_indices])
    np.testing.assert_array_equal(np.concatenate(chunks), frames)


@pytest.mark.parametrize("seek", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("skip_nonref", [True, False])
def test_every_decoding_plan_streams_the_plain_decode_frames(stream_media, monkeypatch, seek, threads, skip_nonref):
    """Seek or read through, with one decoder or the spans of each chunk shared among threads, with and without
    skipping unreferenced H.264 frames: the frames of a plain straight decode."""
    monkeypatch.setattr(vl, "_use_seek", lambda *a: seek)
    if not skip_nonref:
        monkeypatch.setattr(vl, "_h264_nonref_test", lambda cc: None)
    for key in ("open_gop", "mkv"):
        reference = naive_decode(stream_media[key])
        for n, chunk_frames in ((8, 4), (36, 8), (300, 32)):
            meta, chunks = _chunks(stream_media[key], chunk_frames, num_frames=n, num_threads=threads)
            assert meta.extra["mode"] == ("seek" if seek else "sequential") and "retry" not in meta.extra
            assert meta.extra["workers"] == 1 or threads > 1
            np.testing.assert_array_equal(np.concatenate(chunks), reference[meta.frame_indices], err_msg=f"{key} {n}")


def test_only_one_chunk_is_decoded_ahead(stream_media, monkeypatch):
    """The iterator is lazy: after the first chunk only about that chunk's frames have been decoded."""
    decoded = []
    original = vl._Decoder.decode

    def counting_decode(self, pkt):
        frames = original(self, pkt)
        decoded.extend(frames)
        return frames

    monkeypatch.setattr(vl._Decoder, "decode", counting_decode)
    meta, it = iter_video_chunks(stream_media["open_gop"], chunk_frames=8, num_frames=300)
    assert not decoded  # nothing decoded before the first chunk is asked for
    first = next(it)
    assert first.shape[0] == 8 and len(decoded) <= 8 + 4
    rest = list(it)
    assert len(decoded) == 300 and sum(len(c) for c in rest) == 292


def test_argument_and_path_errors_are_raised_at_once(stream_media, tmp_path):
    with pytest.raises(ValueError, match="chunk_frames"):
        iter_video_chunks(stream_media["clip"], chunk_frames=0)
    with pytest.raises(ValueError, match="max_num_frames"):
        iter_video_chunks(stream_media["clip"], max_num_frames=0)
    with pytest.raises(FileNotFoundError):
        iter_video_chunks(str(tmp_path / "missing.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    with pytest.raises(ValueError, match="notes.mp4"):
        iter_video_chunks(str(text))


@pytest.mark.parametrize("url", ["RTSP://cam/live", "ftp://host/clip.mp4", "s3://bucket/clip.mp4"])
def test_urls_are_refused_as_not_supported_yet(url):
    """Not "file not found": URLs other than http(s) and data: are not supported yet (download first), for load_video
    and the video processor (http(s) and data: URLs: test_remote_inputs.py)."""
    from videochat_flash.processing_videochat_flash import VideoChatFlashVideoProcessor

    for load in (load_video, lambda video: iter_video_chunks(video, 8), VideoChatFlashVideoProcessor()):
        with pytest.raises(ValueError, match=r"only http\(s\) and data: URLs are fetched: download .* first") as error:
            load(url)
        assert not isinstance(error.value, FileNotFoundError) and url in str(error.value)


def test_unmatched_timestamps_are_decoded_again_by_counting(stream_media, monkeypatch):
    """A frame the timestamp-matched pass does not deliver is decoded straight through, matched by counting."""
    original = vl._pyav_worker_frames
    lost = FrameSampling(num_frames=100).file_indices(300, 25.0)[37]  # a frame of the third chunk

    def lossy(*args, **kwargs):
        for idx, rgb in original(*args, **kwargs):
            if idx != lost:
                yield idx, rgb

    monkeypatch.setattr(vl, "_pyav_worker_frames", lossy)
    frames, md = load_video(stream_media["open_gop"], num_frames=100, num_threads=1)
    assert md.extra["retry"].startswith(f"frames [{lost}] not matched by timestamp; chunks 0..")
    meta, chunks = _chunks(stream_media["open_gop"], 16, num_frames=100)
    assert meta.extra["retry"].startswith(f"frames [{lost}] not matched by timestamp; chunks 2..")
    np.testing.assert_array_equal(np.concatenate(chunks), frames)
    np.testing.assert_array_equal(frames, naive_decode(stream_media["open_gop"])[md.frame_indices])


@needs_decord
def test_pyav_failure_part_way_continues_with_decord(stream_media, monkeypatch):
    frames, _ = load_video(stream_media["clip"], num_frames=40)
    monkeypatch.setattr(vl, "_pyav_worker_frames", _failing_after(20))
    meta, it = iter_video_chunks(stream_media["clip"], chunk_frames=8, num_frames=40)
    with pytest.warns(UserWarning, match="simulated PyAV failure"):
        chunks = list(it)
    assert meta.extra["fallback"] == "decord from chunk 2"
    np.testing.assert_array_equal(np.concatenate(chunks), frames)
    meta, it = iter_video_chunks(stream_media["clip"], chunk_frames=8, num_frames=40, backend="pyav")
    with pytest.raises(ValueError, match="simulated PyAV failure"):
        list(it)  # forced backend: no fallback


# --------------------------------------------------------------------------------------------------------------
# bad and unusual inputs (each in its own interpreter): a correct result or a clear error, never a crash or hang
# --------------------------------------------------------------------------------------------------------------
BAD_INPUT_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_media")
    m = {}
    m["dir"] = str(d / "a_directory.mp4")
    os.mkdir(m["dir"])
    m["empty"] = str(d / "empty.mp4")
    Path(m["empty"]).write_bytes(b"")
    m["random"] = str(d / "random.mp4")
    Path(m["random"]).write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    m["text"] = str(d / "notes.mp4")
    Path(m["text"]).write_text("this is not a video\n" * 100)
    # truncated: moov at the end (lost with the cut) and faststart (moov first, mdat cut short)
    full = encode(d / "full.mp4", 60, options={"g": "10"})
    blob = Path(full).read_bytes()
    m["trunc_moov_lost"] = str(d / "trunc_moov_lost.mp4")
    Path(m["trunc_moov_lost"]).write_bytes(blob[: len(blob) // 2])
    m["faststart"] = encode(d / "faststart.mp4", 60, options={"g": "10", "bf": "3"},
                            container_options={"movflags": "faststart"})
    blob = Path(m["faststart"]).read_bytes()
    m["trunc_faststart"] = str(d / "trunc_faststart.mp4")
    Path(m["trunc_faststart"]).write_bytes(blob[: int(len(blob) * 0.6)])
    damaged = bytearray(blob)
    rng = np.random.default_rng(1)
    for off in rng.integers(len(blob) // 3, len(blob) - 100, 8):
        damaged[off : off + 40] = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
    m["damaged"] = str(d / "damaged.mp4")
    Path(m["damaged"]).write_bytes(bytes(damaged))
    # audio only
    m["audio"] = audio_only(d / "audio_only.m4a")
    # still images
    img = pattern(3, 90, 70)
    m["png"] = image(d / "still.png", img)
    m["jpg"] = image(d / "still.jpg", img, quality=90)
    m["bad_png"] = str(d / "broken.png")
    Path(m["bad_png"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    # very short videos
    for n in (1, 2, 3):
        m[f"frames{n}"] = encode(d / f"frames{n}.mp4", n)
    # frame rate / timestamps missing
    m["mjpeg"] = encode(d / "mjpeg.mp4", 6, codec="mjpeg", pix_fmt="yuvj420p")
    m["no_fps"] = zero_mp4_durations(m["mjpeg"], d / "no_fps.mp4")
    m["h264_zero_ts"] = zero_mp4_durations(encode(d / "h264_6.mp4", 6, options={"bf": "0"}), d / "h264_zero_ts.mp4")
    m["mkv"] = encode(d / "no_count.mkv", 30, fmt="matroska", options={"bf": "2"})
    m["webm_vfr"] = encode(d / "vfr.webm", 8, codec="libvpx-vp9", fmt="webm",
                           timestamps=[0, 10, 30, 70, 150, 310, 630, 1270])
    m["raw_h264"] = encode(d / "raw.h264", 30, fmt="h264")
    # sizes and pixel formats
    m["4k"] = encode(d / "uhd.mp4", 3, 3840, 2160)
    m["portrait"] = encode(d / "portrait.mp4", 10, 120, 200)
    m["odd"] = encode(d / "odd.mp4", 10, 97, 203, pix_fmt="yuv444p")
    m["10bit"] = encode(d / "ten_bit.mp4", 10, pix_fmt="yuv420p10le")
    m["444"] = encode(d / "yuv444.mp4", 10, pix_fmt="yuv444p")
    m["good"] = encode(d / "good.mp4", 40)
    # files where decord 0.6.0 returns wrong frames (checked against a straight decode)
    m["open_gop"] = encode(d / "open_gop.mp4", 120, options=OPEN_GOP)
    m["h264_avi"] = encode(d / "h264.avi", 120, fmt="avi", options={"g": "12"})
    m["hevc"] = encode(d / "hevc.mp4", 120, codec="libx265", options={"g": "15", "x265-params": "log-level=error"})
    m["mpegts"] = encode(d / "h264.ts", 120, fmt="mpegts", options={"g": "15"})
    fifo = d / "pipe.mp4"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        m["fifo"] = str(fifo)
    m["out"] = str(d)
    return m


# --------------------------------------------------------------------------------------------------------------
# subprocess runner
# --------------------------------------------------------------------------------------------------------------
RUNNER = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    spec = json.loads(sys.argv[1])
    import videochat_flash.video_loading as vl
    if spec.get("no_pyav"):
        vl.av = None
    if spec.get("no_decord"):
        vl.decord = None
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            video = spec["video"]
            frames, meta = vl.load_video(video, **spec["kwargs"])
            out.update(ok=True, shape=list(frames.shape), dtype=str(frames.dtype), meta=meta.to_dict())
            if spec.get("save"):
                np.save(spec["save"], frames)
        except BaseException as e:
            out.update(ok=False, type=type(e).__name__, bases=[c.__name__ for c in type(e).__mro__], msg=str(e))
    out["warnings"] = [str(w.message) for w in caught]
    print("RESULT " + json.dumps(out))
    """
)


def run_case(video, save=None, no_pyav=False, no_decord=False, **kwargs):
    spec = dict(repo=str(REPO_ROOT), video=video, kwargs=kwargs, save=save, no_pyav=no_pyav, no_decord=no_decord)
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True,
                              timeout=BAD_INPUT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_video hung (> {BAD_INPUT_TIMEOUT_S} s) on {video!r} with {kwargs}")
    assert proc.returncode == 0, f"interpreter died (rc {proc.returncode}) on {video!r}:\n{proc.stderr[-2000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def expect_error(res, exc: str, *needles: str):
    assert not res["ok"], f"expected {exc}, got a result {res.get('shape')}"
    assert exc in res["bases"], f"expected {exc}, got {res['type']}: {res['msg']}"
    for needle in needles:
        assert needle.lower() in res["msg"].lower(), f"{needle!r} not in {res['msg']!r}"


def expect_frames(res, media, key, expected_indices=None, **meta):
    assert res["ok"], f"{res.get('type')}: {res.get('msg')}"
    assert res["dtype"] == "uint8" and res["shape"][0] % 4 == 0
    md = res["meta"]
    assert len(md["frame_indices"]) == res["shape"][0]
    if expected_indices is not None:
        assert md["frame_indices"] == expected_indices
    for k, v in meta.items():
        assert md[k] == v, (k, md[k], v)
    assert md["duration"] == md["total_frames"] / md["fps"] and "time_message" not in md
    return md




# --------------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_missing_path(bad_media, backend):
    path = os.path.join(bad_media["out"], "does_not_exist.mp4")
    expect_error(run_case(path, backend=backend), "FileNotFoundError", "does_not_exist.mp4", "not found")


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
@pytest.mark.parametrize(
    "key, needle",
    [
        ("dir", "directory"),
        ("empty", "empty"),
        ("random", "not a readable media file"),
        ("text", "not a readable media file"),
        ("trunc_moov_lost", "not a readable media file"),
        ("audio", "no video stream"),
        ("fifo", "not a regular file"),
    ],
)
def test_unreadable_files_raise_value_error(bad_media, key, needle, backend):
    if key not in bad_media:
        pytest.skip("no mkfifo on this platform")
    res = run_case(bad_media[key], backend=backend)
    expect_error(res, "ValueError", os.path.basename(bad_media[key]), needle)


def test_truncated_faststart_loads_readable_frames(bad_media):
    """The header survives the cut: the readable frames are sampled, with a warning, and they are the
    right frames (equal to the complete file's frames at the same indices)."""
    out = os.path.join(bad_media["out"], "trunc.npy")
    res = run_case(bad_media["trunc_faststart"], save=out, num_frames=16)
    md = expect_frames(res, bad_media, "trunc_faststart", backend="pyav")
    assert 0 < md["total_frames"] < 60
    assert any("truncated" in w for w in res["warnings"])
    full = naive_decode(bad_media["faststart"])
    np.testing.assert_array_equal(np.load(out), full[md["frame_indices"]])


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
def test_truncated_faststart_forced_decord_refuses(bad_media):
    expect_error(run_case(bad_media["trunc_faststart"], backend="decord"), "ValueError", "trunc_faststart.mp4",
                 "truncated")


def test_damaged_payload_never_crashes(bad_media):
    """Random bytes written over the middle of the media data: any documented outcome, but no crash or hang."""
    res = run_case(bad_media["damaged"])
    if res["ok"]:
        expect_frames(res, bad_media, "damaged")
    else:
        expect_error(res, "ValueError", "damaged.mp4")


@pytest.mark.parametrize("key", ["png", "jpg"])
@pytest.mark.parametrize("size", [None, 32])
def test_still_image_is_one_clip_of_four_frames(bad_media, key, size):
    out = os.path.join(bad_media["out"], f"still_{key}_{size}.npy")
    res = run_case(bad_media[key], save=out, size=size)
    expect_frames(res, bad_media, key, [0, 0, 0, 0], backend="frames", total_frames=1, fps=1.0, duration=1.0,
                  width=90, height=70)
    img = np.asarray(Image.open(bad_media[key]).convert("RGB"))
    if size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    np.testing.assert_array_equal(np.load(out), np.stack([img] * 4))


def test_broken_image_raises(bad_media):
    expect_error(run_case(bad_media["bad_png"]), "ValueError", "broken.png", "cannot read image")


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
@pytest.mark.parametrize(
    "n, indices", [(1, [0] * 8), (2, [0] + [1] * 7), (3, [0, 1] + [2] * 6)]
)
def test_videos_of_one_to_three_frames_pad_with_last_frame(bad_media, n, indices, backend):
    out = os.path.join(bad_media["out"], f"short{n}_{backend}.npy")
    res = run_case(bad_media[f"frames{n}"], save=out, backend=backend)
    expect_frames(res, bad_media, f"frames{n}", indices, total_frames=n, fps=25.0, duration=n / 25.0)
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media[f"frames{n}"])[indices])


def test_missing_fps_falls_back_to_one_fps(bad_media):
    """mjpeg in mp4 with every duration zeroed: no frame rate anywhere and all timestamps equal. fps falls back
    to 1.0 (duration = frames / 1.0) and frames are matched by decode order."""
    out = os.path.join(bad_media["out"], "nofps.npy")
    res = run_case(bad_media["no_fps"], save=out)
    md = expect_frames(res, bad_media, "no_fps", [0, 1, 2, 3, 4, 5, 5, 5], fps=1.0, duration=6.0, total_frames=6,
                       backend="pyav")
    assert md["extra"]["fps_source"] == "fallback"
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media["mjpeg"])[md["frame_indices"]])


def test_zero_timestamps_take_fps_from_bitstream(bad_media):
    out = os.path.join(bad_media["out"], "zero_ts.npy")
    res = run_case(bad_media["h264_zero_ts"], save=out)
    md = expect_frames(res, bad_media, "h264_zero_ts", [0, 1, 2, 3, 4, 5, 5, 5], fps=25.0, total_frames=6)
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media["h264_zero_ts"])[md["frame_indices"]])


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
@pytest.mark.parametrize("key", ["no_fps", "h264_zero_ts", "raw_h264"])
def test_decord_refused_without_unique_timestamps(bad_media, key):
    """decord 0.6.0 returns wrong frames (the last ones repeated) when timestamps repeat: it is not run."""
    expect_error(run_case(bad_media[key], backend="decord"), "ValueError", os.path.basename(bad_media[key]),
                 "timestamps")


@pytest.mark.parametrize("key", ["open_gop", "h264_avi", "hevc", "mpegts"])
def test_files_decord_gets_wrong_are_read_by_pyav(bad_media, key):
    """decord 0.6.0 silently returns wrong frames on these: forcing it is refused, the default reads them right."""
    out = os.path.join(bad_media["out"], f"{key}_auto.npy")
    res = run_case(bad_media[key], save=out, num_frames=24)
    md = expect_frames(res, bad_media, key, backend="pyav", total_frames=120)
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media[key])[md["frame_indices"]])
    if HAVE_DECORD:
        expect_error(run_case(bad_media[key], backend="decord"), "ValueError", os.path.basename(bad_media[key]),
                     "wrong frames")


def test_raw_h264_stream(bad_media):
    out = os.path.join(bad_media["out"], "raw.npy")
    res = run_case(bad_media["raw_h264"], save=out)
    md = expect_frames(res, bad_media, "raw_h264", total_frames=30, backend="pyav")
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media["raw_h264"])[md["frame_indices"]])


@pytest.mark.parametrize("key, total", [("mkv", 30), ("webm_vfr", 8)])
@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_containers_without_frame_count(bad_media, key, total, backend):
    out = os.path.join(bad_media["out"], f"{key}_{backend}.npy")
    res = run_case(bad_media[key], save=out, backend=backend)
    md = expect_frames(res, bad_media, key, total_frames=total)
    assert md["fps"] > 0
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media[key])[md["frame_indices"]])


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_4k_frames_resized(bad_media, backend):
    out = os.path.join(bad_media["out"], f"uhd_{backend}.npy")
    res = run_case(bad_media["4k"], save=out, backend=backend, size=224)
    expect_frames(res, bad_media, "4k", [0, 1] + [2] * 6, width=3840, height=2160, total_frames=3)
    assert res["shape"] == [8, 224, 224, 3]
    ref = naive_decode(bad_media["4k"])
    want = np.stack([np.asarray(Image.fromarray(ref[i]).resize((224, 224), Image.BICUBIC)) for i in [0, 1] + [2] * 6])
    np.testing.assert_array_equal(np.load(out), want)


@pytest.mark.parametrize("key, w, h", [("portrait", 120, 200), ("odd", 97, 203), ("444", 64, 48)])
@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_portrait_odd_sizes_and_yuv444(bad_media, key, w, h, backend):
    out = os.path.join(bad_media["out"], f"{key}_{backend}.npy")
    res = run_case(bad_media[key], save=out, backend=backend)
    md = expect_frames(res, bad_media, key, [0, 1, 2, 3, 5, 6, 7, 8], width=w, height=h, total_frames=10)
    assert res["shape"] == [8, h, w, 3]
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media[key])[md["frame_indices"]])


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_ten_bit_video(bad_media, backend):
    """10-bit 4:2:0: decoded and converted to 8-bit RGB. decord (FFmpeg 4.1) and PyAV (FFmpeg 8) convert
    slightly differently at sharp chroma edges, so the check is against the source pattern."""
    out = os.path.join(bad_media["out"], f"tenbit_{backend}.npy")
    res = run_case(bad_media["10bit"], save=out, backend=backend)
    md = expect_frames(res, bad_media, "10bit", [0, 1, 2, 3, 5, 6, 7, 8], total_frames=10)
    got = np.load(out).astype(int)
    src = np.stack([pattern(i, 64, 48) for i in md["frame_indices"]]).astype(int)
    assert np.abs(got - src).mean() < 8
    if backend in (None, "pyav"):
        np.testing.assert_array_equal(got, naive_decode(bad_media["10bit"])[md["frame_indices"]])


@pytest.mark.parametrize("value", [0, -1, -512])
def test_non_positive_max_num_frames(bad_media, value):
    expect_error(run_case(bad_media["good"], max_num_frames=value), "ValueError", f"max_num_frames={value}")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"num_frames": 0}, "num_frames=0"),
        ({"fps": 0}, "fps"),
        ({"num_frames": 8, "fps": 1.0}, "at most one"),
        ({"backend": "opencv"}, "backend"),
        ({"frames_multiple": 6}, "frames_multiple"),
        ({"size": 0}, "size"),
    ],
)
def test_bad_arguments(bad_media, kwargs, needle):
    expect_error(run_case(bad_media["good"], **kwargs), "ValueError", needle)


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
def test_without_pyav_decord_is_used(bad_media):
    out = os.path.join(bad_media["out"], "nopyav.npy")
    res = run_case(bad_media["good"], save=out, no_pyav=True)
    md = expect_frames(res, bad_media, "good", backend="decord", total_frames=40, fps=25.0)
    np.testing.assert_array_equal(np.load(out), naive_decode(bad_media["good"])[md["frame_indices"]])


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
@pytest.mark.parametrize("key", ["random", "audio", "trunc_moov_lost"])
def test_without_pyav_decord_errors_are_value_errors(bad_media, key):
    expect_error(run_case(bad_media[key], no_pyav=True), "ValueError", os.path.basename(bad_media[key]))


def test_without_decord_forcing_it_is_an_import_error(bad_media):
    expect_error(run_case(bad_media["good"], no_decord=True, backend="decord"), "ImportError", "decord")
    res = run_case(bad_media["good"], no_decord=True)
    assert res["ok"] and res["meta"]["backend"] == "pyav"


def test_unsupported_input_type(bad_media):
    res = run_case(12345)
    assert not res["ok"] and res["type"] == "TypeError"


def test_decoded_frames_over_the_cap_are_sampled_with_a_warning():
    frames = np.stack([pattern(i, 16, 12) for i in range(600)])
    with pytest.warns(UserWarning, match="600 decoded frames are more than max_num_frames=512"):
        kept, meta = load_video(frames)
    assert kept.shape[0] == 512 and meta.frame_indices == FrameSampling().decoded_indices(600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        assert load_video(frames, max_num_frames=600)[0].shape[0] == 600
        assert load_video(frames, num_frames=8)[0].shape[0] == 8


# --------------------------------------------------------------------------------------------------------------
# The original's other readers: clip segments, folders of frames, GIFs
# --------------------------------------------------------------------------------------------------------------
GOLDEN = golden_path("README.md").parent
SEGMENT_CASES = json.loads((GOLDEN / "segments_and_folders.json").read_text())["cases"]


def _case_settings(case: str) -> dict:
    settings = {"max_num_frames": int(case.split("max_num_frames=")[1])}
    if "start=" in case:
        settings.update(start=float(case.split("start=")[1].split()[0]), end=float(case.split("end=")[1].split()[0]))
    return settings


@pytest.fixture(scope="module")
def frame_folders(tmp_path_factory):
    """The golden's folders: every 5th decoded frame of the long video / every 25th of the main one, as
    frame_<N>.png (written out of order, and beside a stray file, to check the reader's sorting)."""
    import av

    root = tmp_path_factory.mktemp("folders")
    folders = {}
    for name, step, count in (("synthetic_long_100s_5fps_64x48.mp4", 5, 100),
                              ("synthetic_main_12s_25fps_320x240.mp4", 25, 12)):
        with av.open(str(GOLDEN / name)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][::step]
        folder = root / name.split("_")[1]
        folder.mkdir()
        for n in reversed(range(len(frames))):
            Image.fromarray(frames[n]).save(folder / f"frame_{n}.png")
        (folder / "notes.txt").write_text("not a frame")
        folders[count] = (folder, np.stack(frames))
    return folders


@pytest.mark.parametrize("case", [c for c in SEGMENT_CASES if not c.startswith("folder")])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_file_segments_follow_the_original_reader(case, backend):
    """start / end seconds: the original's indices (offset by int(start * fps)), fps, the segment's duration and its
    time message, exactly; and the frames are those indices of the file."""
    expected = SEGMENT_CASES[case]
    path = GOLDEN / case.split()[0]
    frames, meta = load_video(path, backend=backend, **_case_settings(case))
    assert meta.frame_indices == expected["frame_indices"] and meta.fps == expected["fps"]
    assert meta.duration == pytest.approx(expected["duration"])
    assert time_message(meta.duration, meta.num_frames) == expected["time_msg"]
    np.testing.assert_array_equal(frames, naive_decode(path)[expected["frame_indices"]])
    segment = VideoSegment(path, _case_settings(case)["start"], _case_settings(case)["end"])  # a path with a segment
    assert load_video(segment, backend=backend, max_num_frames=_case_settings(case)["max_num_frames"])[
        1].frame_indices == expected["frame_indices"]


@pytest.mark.parametrize("case", [c for c in SEGMENT_CASES if c.startswith("folder")])
def test_frame_folders_follow_the_original_reader(case, frame_folders):
    expected = SEGMENT_CASES[case]
    folder, source = frame_folders[100 if "100 frames" in case else 12]
    frames, meta = load_video(folder, **_case_settings(case))
    assert meta.frame_indices == expected["frame_indices"] and meta.fps == expected["fps"] == 1.0
    assert meta.duration == expected["duration"]
    assert time_message(meta.duration, meta.num_frames) == expected["time_msg"]
    np.testing.assert_array_equal(frames, source[expected["frame_indices"]])


def test_gifs_count_every_frame_at_one_per_second(tmp_path):
    """The original's gif reader: every frame, 1 frame per second whatever the delays; no segments."""
    colours = [np.full((30, 40, 3), 12 * i, np.uint8) for i in range(20)]
    path = tmp_path / "clip.gif"
    Image.fromarray(colours[0]).save(path, save_all=True, append_images=[Image.fromarray(c) for c in colours[1:]],
                                     duration=[40, 200] * 10, loop=0)
    frames, meta = load_video(path)
    assert (meta.fps, meta.duration, meta.total_frames) == (1.0, 20.0, 20)
    assert meta.frame_indices == FrameSampling().file_indices(20, 1.0)  # get_frame_indices(vlen=20, input_fps=1)
    assert len(meta.frame_indices) == 16
    assert time_message(meta.duration, meta.num_frames) == (
        "\nThe video lasts for 20.00 seconds, and 16 frames are uniformly sampled from it. ")
    np.testing.assert_array_equal(frames[:, 0, 0, 0], [12 * i for i in meta.frame_indices])
    with pytest.raises(ValueError, match="gif reader has none"):
        load_video(path, start=1, end=5)


def test_segment_errors_are_clear(frame_folders, tmp_path):
    path = GOLDEN / "synthetic_main_12s_25fps_320x240.mp4"
    with pytest.raises(ValueError, match="is empty"):
        load_video(path, start=20, end=30)
    with pytest.raises(ValueError, match="not images"):
        load_video(np.zeros((32, 32, 3), np.uint8), start=0, end=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder of frames needs"):
        load_video(tmp_path / "empty")
