"""Bad and unusual inputs for video_loading.load_video.

Every case runs load_video in a fresh subprocess with a 10 s timeout, so a decoder that segfaults or hangs
fails one test instead of taking the run down. The documented outcome is asserted: either a correct result
(checked against a plain PyAV decode of the same file) or a ValueError / FileNotFoundError naming the file
and the reason. Test media are written with PyAV (libx264 is bundled) into a temporary directory.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from media import encode, naive_decode, pattern

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:  # pragma: no cover
    HAVE_DECORD = False

# --------------------------------------------------------------------------------------------------------------
# media makers
# --------------------------------------------------------------------------------------------------------------








def zero_mp4_durations(src, dst):
    """Zero every sample duration (stts) and the track/media/movie durations of an mp4: no frame rate left."""
    b = bytearray(Path(src).read_bytes())

    def walk(off, end):
        while off + 8 <= end:
            size, typ = struct.unpack(">I4s", b[off : off + 8])
            if size < 8:
                return
            if typ in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
                walk(off + 8, off + size)
            elif typ == b"stts":
                for k in range(struct.unpack(">I", b[off + 12 : off + 16])[0]):
                    struct.pack_into(">I", b, off + 16 + 8 * k + 4, 0)
            elif typ in (b"mvhd", b"mdhd"):
                struct.pack_into(">I", b, off + 24, 0)
            elif typ == b"tkhd":
                struct.pack_into(">I", b, off + 28, 0)
            off += size

    walk(0, len(b))
    Path(dst).write_bytes(bytes(b))
    return str(dst)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
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
    m["audio"] = str(d / "audio_only.m4a")
    with av.open(m["audio"], "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for i in range(20):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    # still images
    img = pattern(3, 90, 70)
    m["png"] = str(d / "still.png")
    Image.fromarray(img).save(m["png"])
    m["jpg"] = str(d / "still.jpg")
    Image.fromarray(img).save(m["jpg"], quality=90)
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
    m["open_gop"] = encode(d / "open_gop.mp4", 120, options={"bf": "3", "x264-params": "open-gop=1:keyint=20:min-keyint=20:scenecut=0"})
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
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_video hung (> {TIMEOUT_S} s) on {video!r} with {kwargs}")
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
    assert md["time_message"] == (
        f"\nThe video lasts for {md['duration']:.2f} seconds, and {res['shape'][0]} frames are uniformly sampled from it. "
    )
    return md


def saved(media, name):
    return np.load(os.path.join(media["out"], name))


# --------------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------------
BACKENDS = [None, "pyav"] + (["decord"] if HAVE_DECORD else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_path(media, backend):
    path = os.path.join(media["out"], "does_not_exist.mp4")
    expect_error(run_case(path, backend=backend), "FileNotFoundError", "does_not_exist.mp4", "not found")


@pytest.mark.parametrize("backend", BACKENDS)
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
def test_unreadable_files_raise_value_error(media, key, needle, backend):
    if key not in media:
        pytest.skip("no mkfifo on this platform")
    res = run_case(media[key], backend=backend)
    expect_error(res, "ValueError", os.path.basename(media[key]), needle)


def test_truncated_faststart_loads_readable_frames(media):
    """The header survives the cut: the readable frames are sampled, with a warning, and they are the
    right frames (equal to the complete file's frames at the same indices)."""
    out = os.path.join(media["out"], "trunc.npy")
    res = run_case(media["trunc_faststart"], save=out, num_frames=16)
    md = expect_frames(res, media, "trunc_faststart", backend="pyav")
    assert 0 < md["total_frames"] < 60
    assert any("truncated" in w for w in res["warnings"])
    full = naive_decode(media["faststart"])
    np.testing.assert_array_equal(np.load(out), full[md["frame_indices"]])


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
def test_truncated_faststart_forced_decord_refuses(media):
    expect_error(run_case(media["trunc_faststart"], backend="decord"), "ValueError", "trunc_faststart.mp4", "truncated")


def test_damaged_payload_never_crashes(media):
    """Random bytes written over the middle of the media data: any documented outcome, but no crash or hang."""
    res = run_case(media["damaged"])
    if res["ok"]:
        expect_frames(res, media, "damaged")
    else:
        expect_error(res, "ValueError", "damaged.mp4")


@pytest.mark.parametrize("key", ["png", "jpg"])
@pytest.mark.parametrize("size", [None, 32])
def test_still_image_is_one_clip_of_four_frames(media, key, size):
    out = os.path.join(media["out"], f"still_{key}_{size}.npy")
    res = run_case(media[key], save=out, size=size)
    expect_frames(res, media, key, [0, 0, 0, 0], backend="frames", total_frames=1, fps=1.0, duration=1.0,
                  width=90, height=70)
    img = np.asarray(Image.open(media[key]).convert("RGB"))
    if size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    np.testing.assert_array_equal(np.load(out), np.stack([img] * 4))


def test_broken_image_raises(media):
    expect_error(run_case(media["bad_png"]), "ValueError", "broken.png", "cannot read image")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, indices", [(1, [0] * 8), (2, [0] + [1] * 7), (3, [0, 1] + [2] * 6)]
)
def test_videos_of_one_to_three_frames_pad_with_last_frame(media, n, indices, backend):
    out = os.path.join(media["out"], f"short{n}_{backend}.npy")
    res = run_case(media[f"frames{n}"], save=out, backend=backend)
    expect_frames(res, media, f"frames{n}", indices, total_frames=n, fps=25.0, duration=n / 25.0)
    np.testing.assert_array_equal(np.load(out), naive_decode(media[f"frames{n}"])[indices])


def test_missing_fps_falls_back_to_one_fps(media):
    """mjpeg in mp4 with every duration zeroed: no frame rate anywhere and all timestamps equal. fps falls back
    to 1.0 (duration = frames / 1.0) and frames are matched by decode order."""
    out = os.path.join(media["out"], "nofps.npy")
    res = run_case(media["no_fps"], save=out)
    md = expect_frames(res, media, "no_fps", [0, 1, 2, 3, 4, 5, 5, 5], fps=1.0, duration=6.0, total_frames=6,
                       backend="pyav")
    assert md["extra"]["fps_source"] == "fallback"
    np.testing.assert_array_equal(np.load(out), naive_decode(media["mjpeg"])[md["frame_indices"]])


def test_zero_timestamps_take_fps_from_bitstream(media):
    out = os.path.join(media["out"], "zero_ts.npy")
    res = run_case(media["h264_zero_ts"], save=out)
    md = expect_frames(res, media, "h264_zero_ts", [0, 1, 2, 3, 4, 5, 5, 5], fps=25.0, total_frames=6)
    np.testing.assert_array_equal(np.load(out), naive_decode(media["h264_zero_ts"])[md["frame_indices"]])


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
@pytest.mark.parametrize("key", ["no_fps", "h264_zero_ts", "raw_h264"])
def test_decord_refused_without_unique_timestamps(media, key):
    """decord 0.6.0 returns wrong frames (the last ones repeated) when timestamps repeat: it is not run."""
    expect_error(run_case(media[key], backend="decord"), "ValueError", os.path.basename(media[key]), "timestamps")


@pytest.mark.parametrize("key", ["open_gop", "h264_avi", "hevc", "mpegts"])
def test_files_decord_gets_wrong_are_read_by_pyav(media, key):
    """decord 0.6.0 silently returns wrong frames on these: forcing it is refused, the default reads them right."""
    out = os.path.join(media["out"], f"{key}_auto.npy")
    res = run_case(media[key], save=out, num_frames=24)
    md = expect_frames(res, media, key, backend="pyav", total_frames=120)
    np.testing.assert_array_equal(np.load(out), naive_decode(media[key])[md["frame_indices"]])
    if HAVE_DECORD:
        expect_error(run_case(media[key], backend="decord"), "ValueError", os.path.basename(media[key]), "wrong frames")


def test_raw_h264_stream(media):
    out = os.path.join(media["out"], "raw.npy")
    res = run_case(media["raw_h264"], save=out)
    md = expect_frames(res, media, "raw_h264", total_frames=30, backend="pyav")
    np.testing.assert_array_equal(np.load(out), naive_decode(media["raw_h264"])[md["frame_indices"]])


@pytest.mark.parametrize("key, total", [("mkv", 30), ("webm_vfr", 8)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_containers_without_frame_count(media, key, total, backend):
    out = os.path.join(media["out"], f"{key}_{backend}.npy")
    res = run_case(media[key], save=out, backend=backend)
    md = expect_frames(res, media, key, total_frames=total)
    assert md["fps"] > 0
    np.testing.assert_array_equal(np.load(out), naive_decode(media[key])[md["frame_indices"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_4k_frames_resized(media, backend):
    out = os.path.join(media["out"], f"uhd_{backend}.npy")
    res = run_case(media["4k"], save=out, backend=backend, size=224)
    expect_frames(res, media, "4k", [0, 1] + [2] * 6, width=3840, height=2160, total_frames=3)
    assert res["shape"] == [8, 224, 224, 3]
    ref = naive_decode(media["4k"])
    want = np.stack([np.asarray(Image.fromarray(ref[i]).resize((224, 224), Image.BICUBIC)) for i in [0, 1] + [2] * 6])
    np.testing.assert_array_equal(np.load(out), want)


@pytest.mark.parametrize("key, w, h", [("portrait", 120, 200), ("odd", 97, 203), ("444", 64, 48)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_portrait_odd_sizes_and_yuv444(media, key, w, h, backend):
    out = os.path.join(media["out"], f"{key}_{backend}.npy")
    res = run_case(media[key], save=out, backend=backend)
    md = expect_frames(res, media, key, [0, 1, 2, 3, 5, 6, 7, 8], width=w, height=h, total_frames=10)
    assert res["shape"] == [8, h, w, 3]
    np.testing.assert_array_equal(np.load(out), naive_decode(media[key])[md["frame_indices"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_bit_video(media, backend):
    """10-bit 4:2:0: decoded and converted to 8-bit RGB. decord (FFmpeg 4.1) and PyAV (FFmpeg 8) convert
    slightly differently at sharp chroma edges, so the check is against the source pattern."""
    out = os.path.join(media["out"], f"tenbit_{backend}.npy")
    res = run_case(media["10bit"], save=out, backend=backend)
    md = expect_frames(res, media, "10bit", [0, 1, 2, 3, 5, 6, 7, 8], total_frames=10)
    got = np.load(out).astype(int)
    src = np.stack([pattern(i, 64, 48) for i in md["frame_indices"]]).astype(int)
    assert np.abs(got - src).mean() < 8
    if backend in (None, "pyav"):
        np.testing.assert_array_equal(got, naive_decode(media["10bit"])[md["frame_indices"]])


@pytest.mark.parametrize("value", [0, -1, -512])
def test_non_positive_max_num_frames(media, value):
    expect_error(run_case(media["good"], max_num_frames=value), "ValueError", f"max_num_frames={value}")


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
def test_bad_arguments(media, kwargs, needle):
    expect_error(run_case(media["good"], **kwargs), "ValueError", needle)


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
def test_without_pyav_decord_is_used(media):
    out = os.path.join(media["out"], "nopyav.npy")
    res = run_case(media["good"], save=out, no_pyav=True)
    md = expect_frames(res, media, "good", backend="decord", total_frames=40, fps=25.0)
    np.testing.assert_array_equal(np.load(out), naive_decode(media["good"])[md["frame_indices"]])


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
@pytest.mark.parametrize("key", ["random", "audio", "trunc_moov_lost"])
def test_without_pyav_decord_errors_are_value_errors(media, key):
    expect_error(run_case(media[key], no_pyav=True), "ValueError", os.path.basename(media[key]))


def test_without_decord_forcing_it_is_an_import_error(media):
    expect_error(run_case(media["good"], no_decord=True, backend="decord"), "ImportError", "decord")
    res = run_case(media["good"], no_decord=True)
    assert res["ok"] and res["meta"]["backend"] == "pyav"


def test_unsupported_input_type(media):
    res = run_case(12345)
    assert not res["ok"] and res["type"] == "TypeError"
