"""Streaming: iter_video_chunks (the frames of load_video, chunk by chunk), encode_video_streaming (the tokens of a
one-shot encode, in bounded memory) and chat()'s reuse of the previous turn's KV cache. Tiny model, small videos."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from media import encode, naive_decode, pattern

import videochat_flash.video_loading as vl
from videochat_flash.hub_export import make_tiny_folder, tiny_processor
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM
from videochat_flash.processing_videochat_flash import VideoChatFlashVideoProcessor
from videochat_flash.streaming_videochat_flash import _prefetch, as_mm_encoder_outputs, encode_video_streaming
from videochat_flash.tiny_model import build_tiny_model
from videochat_flash.video_loading import iter_video_chunks, load_video

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:  # pragma: no cover
    HAVE_DECORD = False

REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_media")
    gop = {"bf": "3", "x264-params": "open-gop=1:keyint=20:min-keyint=20:scenecut=0"}
    return {
        "open_gop": encode(d / "open_gop.mp4", 300, 96, 64, options=gop),
        "mkv": encode(d / "open_gop.mkv", 120, 64, 48, fmt="matroska", options=gop),
        "five": encode(d / "five.mp4", 5),
        "raw_h264": encode(d / "raw.h264", 30, fmt="h264"),  # no timestamps: decoded straight through, counted
        "vfr_webm": encode(d / "vfr.webm", 8, codec="libvpx-vp9", fmt="webm",
                           timestamps=[0, 10, 30, 70, 150, 310, 630, 1270]),
        "clip": encode(d / "clip.mp4", 200, 96, 64, fps=10, options={"g": "12"}),
        "main": encode(d / "main.mp4", 16, fps=8),
    }


def _chunks(video, chunk_frames, **kwargs):
    meta, it = iter_video_chunks(video, chunk_frames=chunk_frames, **kwargs)
    return meta, list(it)


def _same_metadata(a, b):
    for name in ("frame_indices", "fps", "duration", "total_frames", "backend", "width", "height", "time_message",
                 "path"):
        assert getattr(a, name) == getattr(b, name), name


# ----------------------------------------------------------------------------------------------------------------
# iter_video_chunks == load_video
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["open_gop", "mkv", "five", "raw_h264", "vfr_webm", "clip"])
@pytest.mark.parametrize("chunk_frames", [1, 4, 7, 32, 4096])
def test_chunks_concatenate_to_load_video_frames(media, key, chunk_frames):
    for kwargs in ({}, {"num_frames": 36, "size": 32}, {"num_frames": 300}, {"num_frames": 8}, {"fps": 3.0}):
        frames, md = load_video(media[key], **kwargs)
        meta, chunks = _chunks(media[key], chunk_frames, **kwargs)
        _same_metadata(meta, md)
        assert [len(c) for c in chunks[:-1]] == [chunk_frames] * (len(chunks) - 1)
        assert all(c.dtype == np.uint8 and c.flags.c_contiguous for c in chunks)
        np.testing.assert_array_equal(np.concatenate(chunks), frames, err_msg=f"{key} {kwargs}")
        assert "retry" not in meta.extra and meta.extra["streaming"] is True


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
@pytest.mark.parametrize("chunk_frames", [4, 12])
def test_chunks_with_decord_equal_load_video(media, chunk_frames):
    for kwargs in ({"num_frames": 40}, {"num_frames": 40, "size": 32}, {}):
        frames, md = load_video(media["clip"], backend="decord", **kwargs)
        meta, chunks = _chunks(media["clip"], chunk_frames, backend="decord", **kwargs)
        _same_metadata(meta, md)
        np.testing.assert_array_equal(np.concatenate(chunks), frames)


@pytest.mark.parametrize("kind", ["array", "tensor", "tensor_chw", "list_pil", "list_arrays"])
@pytest.mark.parametrize("chunk_frames", [4, 5, 64])
def test_decoded_frames_and_images_chunk_like_load_video(kind, chunk_frames):
    raw = np.stack([pattern(i, 40, 30) for i in range(70)])
    video = {
        "array": raw,
        "tensor": torch.from_numpy(raw),
        "tensor_chw": torch.from_numpy(raw).permute(0, 3, 1, 2),
        "list_pil": [Image.fromarray(f) for f in raw],
        "list_arrays": list(raw),
    }[kind]
    for kwargs in ({}, {"size": 24}, {"num_frames": 10}, {"video_fps": 5.0}):
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


@pytest.mark.parametrize("seek", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("skip_nonref", [True, False])
def test_every_decoding_plan_streams_the_plain_decode_frames(media, monkeypatch, seek, threads, skip_nonref):
    """Seek (spans shared among threads, per chunk) or read through (one decoder), with and without skipping
    unreferenced H.264 frames: the frames of a plain straight decode, like load_video."""
    monkeypatch.setattr(vl, "_use_seek", lambda *a: seek)
    if not skip_nonref:
        monkeypatch.setattr(vl, "_h264_nonref_test", lambda cc: None)
    for key in ("open_gop", "mkv"):
        reference = naive_decode(media[key])
        for n, chunk_frames in ((8, 4), (36, 8), (300, 32)):
            meta, chunks = _chunks(media[key], chunk_frames, num_frames=n, num_threads=threads)
            assert meta.extra["mode"] == ("seek" if seek else "sequential") and "retry" not in meta.extra
            np.testing.assert_array_equal(np.concatenate(chunks), reference[meta.frame_indices], err_msg=f"{key} {n}")


def test_only_one_chunk_is_decoded_ahead(media, monkeypatch):
    """The iterator is lazy: after the first chunk only about that chunk's frames have been decoded."""
    decoded = []
    original = vl._frame_rgb
    monkeypatch.setattr(vl, "_frame_rgb", lambda f: decoded.append(1) or original(f))
    meta, it = iter_video_chunks(media["open_gop"], chunk_frames=8, num_frames=300)
    assert not decoded  # nothing decoded before the first chunk is asked for
    first = next(it)
    assert first.shape[0] == 8 and len(decoded) <= 8 + 4
    rest = list(it)
    assert len(decoded) == 300 and sum(len(c) for c in rest) == 292


def test_argument_and_path_errors_are_raised_at_once(media, tmp_path):
    with pytest.raises(ValueError, match="chunk_frames"):
        iter_video_chunks(media["clip"], chunk_frames=0)
    with pytest.raises(ValueError, match="max_num_frames"):
        iter_video_chunks(media["clip"], max_num_frames=0)
    with pytest.raises(FileNotFoundError):
        iter_video_chunks(str(tmp_path / "missing.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    with pytest.raises(ValueError, match="notes.mp4"):
        iter_video_chunks(str(text))


def test_unmatched_timestamps_are_decoded_again_by_counting(media, monkeypatch):
    """A frame the timestamp-matched pass does not deliver is decoded straight through, matched by counting."""
    original = vl._pyav_worker_frames
    lost = vl.sample_frame_indices(300, 25.0, num_frames=100)[37]  # a frame of the third chunk

    def lossy(*args, **kwargs):
        for idx, rgb in original(*args, **kwargs):
            if idx != lost:
                yield idx, rgb

    monkeypatch.setattr(vl, "_pyav_worker_frames", lossy)
    frames, _ = load_video(media["open_gop"], num_frames=100, num_threads=1)  # load_video retries the same way
    meta, chunks = _chunks(media["open_gop"], 16, num_frames=100)
    assert meta.extra["retry"].startswith(f"frames [{lost}] not matched by timestamp; chunks 2..")
    np.testing.assert_array_equal(np.concatenate(chunks), frames)


def _failing_after(n_frames):
    original = vl._pyav_worker_frames

    def failing(*args, **kwargs):
        for count, item in enumerate(original(*args, **kwargs)):
            if count == n_frames:
                raise RuntimeError("simulated PyAV failure")
            yield item

    return failing


@pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")
def test_pyav_failure_part_way_continues_with_decord(media, monkeypatch):
    frames, _ = load_video(media["clip"], num_frames=40)
    monkeypatch.setattr(vl, "_pyav_worker_frames", _failing_after(20))
    meta, it = iter_video_chunks(media["clip"], chunk_frames=8, num_frames=40)
    with pytest.warns(UserWarning, match="simulated PyAV failure"):
        chunks = list(it)
    assert meta.extra["fallback"] == "decord from chunk 2"
    np.testing.assert_array_equal(np.concatenate(chunks), frames)
    meta, it = iter_video_chunks(media["clip"], chunk_frames=8, num_frames=40, backend="pyav")
    with pytest.raises(ValueError, match="simulated PyAV failure"):
        list(it)  # forced backend: no fallback


# ----------------------------------------------------------------------------------------------------------------
# encode_video_streaming == one-shot encoding
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(0)


def _one_shot(model, video, **kwargs):
    processor = VideoChatFlashVideoProcessor(size=model.config.image_size)
    pixels = processor(videos=[video], return_tensors="pt", **kwargs)["pixel_values_videos"]
    with torch.no_grad():
        return model.get_video_features(pixels)[0]


def test_streaming_encoding_equals_one_shot(tiny, media):
    """Acceptance 1: chunked == one-shot within 1e-5, token by token in the same (merge) order, for chunk sizes
    that do and do not divide the 13 clips, and for a tower batch smaller than the chunk."""
    reference = _one_shot(tiny, media["clip"], num_frames=52)  # 13 clips of 4 frames
    assert reference.shape == (16 * 52, 64)
    # nearest one-shot token of each streamed token must be the token at the same position
    spacing = torch.cdist(reference, reference)
    spacing.fill_diagonal_(float("inf"))
    min_spacing = spacing.min().item()
    report = []
    assert tiny.model.clips_per_tower_call == 16  # the CPU default for so small a tower
    for clips_per_chunk, tower_batch in ((1, 16), (3, None), (5, 2), (8, 16), (13, 3), (64, 16)):
        tiny.model.vision_clips_per_batch = tower_batch
        try:
            features, meta = encode_video_streaming(tiny, media["clip"], num_frames=52, clips_per_chunk=clips_per_chunk)
        finally:
            tiny.model.vision_clips_per_batch = None
        assert meta.num_frames == 52 and features.shape == reference.shape
        assert features.dtype == reference.dtype and features.device == reference.device
        diff = (features - reference).abs().max().item()
        assert diff <= 1e-5, (clips_per_chunk, diff)
        nearest = torch.cdist(features, reference).argmin(dim=1)
        assert torch.equal(nearest, torch.arange(reference.shape[0])), clips_per_chunk
        report.append(f"{clips_per_chunk} clips/chunk: max diff {diff:.2g}")
    print(f"\nstreamed vs one-shot (min token spacing {min_spacing:.3g}): " + "; ".join(report))


def test_streaming_follows_the_processor_settings_and_inputs(tiny, media):
    # default sampling (about 1 frame/s, at least 64 frames)
    features, meta = encode_video_streaming(tiny, media["open_gop"], size=128, clips_per_chunk=3)
    assert meta.num_frames == 64
    torch.testing.assert_close(features, _one_shot(tiny, media["open_gop"]), rtol=0, atol=1e-5)
    # the sampling configured on an explicit video processor
    processor = VideoChatFlashVideoProcessor(size=128, num_frames=20)
    features, meta = encode_video_streaming(tiny, media["open_gop"], video_processor=processor, clips_per_chunk=2)
    pixels = processor(videos=[media["open_gop"]], return_tensors="pt")["pixel_values_videos"]
    assert pixels.shape[1] == meta.num_frames == 20
    with torch.no_grad():
        reference = tiny.get_video_features(pixels)[0]
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        encode_video_streaming(tiny, media["clip"], video_processor=processor, size=64)
    # a still image: one clip of 4 copies, as the processor's video path gives it
    image = Image.fromarray(pattern(5, 70, 50))
    features, meta = encode_video_streaming(tiny, image, clips_per_chunk=1)
    torch.testing.assert_close(features, _one_shot(tiny, load_video(image)[0]), rtol=0, atol=1e-5)
    # mm_encoder_outputs for generate
    outputs = as_mm_encoder_outputs(features)
    assert outputs["video"].pooler_output[0] is features


def test_progress_bars(tiny, media, capsys):
    encode_video_streaming(tiny, media["clip"], num_frames=24, clips_per_chunk=2, progress=True)
    err = capsys.readouterr().err
    assert "Decoding frames" in err and "Encoding clips" in err


def test_prefetch_propagates_errors_and_stops_the_producer():
    closed = []

    def source(fail_at=None):
        try:
            for i in range(100):
                if i == fail_at:
                    raise RuntimeError("boom")
                yield i
        finally:
            closed.append(True)

    assert list(_prefetch(source(), 2)) == list(range(100))
    with pytest.raises(RuntimeError, match="boom"):
        list(_prefetch(source(fail_at=5), 1))
    gen = _prefetch(source(), 1)
    assert next(gen) == 0
    gen.close()  # leaving early: the producer stops and closes its source
    assert closed == [True, True, True]


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from videochat_flash.streaming_videochat_flash import encode_video_streaming
    from videochat_flash.tiny_model import build_tiny_model
    def kb(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])
    model = build_tiny_model(0)
    encode_video_streaming(model, sys.argv[2], num_frames=64)  # warm up the allocator and thread pools
    setup = kb("VmRSS")
    features, meta = encode_video_streaming(model, sys.argv[2], num_frames=int(sys.argv[3]), clips_per_chunk=8)
    print(json.dumps({"grew_kb": kb("VmHWM") - setup, "frames": meta.num_frames,
                      "token_kb": features.numel() * features.element_size() // 1024}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_streaming_memory_does_not_grow_with_frames(tmp_path):
    """2,048 frames at 128 px: the original's float pixels alone would take 384 MiB; streaming keeps the tokens
    (8 MiB) and one chunk. bench/bench_long_video.py measures 64 / 1,024 / 10,000 frames."""
    video = encode(tmp_path / "long.mp4", 2048, 64, 48, fps=25, options={"g": "250"})
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(REPO_ROOT), video, "2048"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pixels_mib = 2048 * 3 * 128 * 128 * 4 / 2**20
    print(f"\n2,048 frames streamed: peak RSS grew {result['grew_kb'] / 1024:.0f} MiB (tokens "
          f"{result['token_kb'] / 1024:.0f} MiB; all-frames float pixels would be {pixels_mib:.0f} MiB)")
    assert result["frames"] == 2048
    assert result["grew_kb"] / 1024 < 100


# ----------------------------------------------------------------------------------------------------------------
# chat(): the previous turn's KV cache is reused by a follow-up
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny_stream") / "model")


def _chat_model(tiny_dir, **config):
    model = VideoChatFlashForCausalLM.from_pretrained(tiny_dir).eval()
    for key, value in config.items():
        setattr(model.config, key, value)
    lengths, outputs = [], []
    model.model.embed_tokens.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    generate = model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        outputs.append((kwargs["input_ids"][0], out[0]))
        return out

    model.generate = spy
    return model, lengths, outputs


def _common_prefix(a, b):
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


SETTINGS = {"max_new_tokens": 12}


def test_follow_up_runs_only_its_new_tokens_and_answers_like_a_fresh_chat(tiny_dir, media):
    """Acceptance 3: turn 2 feeds the LLM only the tokens after the longest common prefix with turn 1's prompt +
    answer (counted by a pre-hook on embed_tokens at the first forward), and answers like a new chat with the same
    history and no cache."""
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    model, lengths, outputs = _chat_model(tiny_dir)
    first, history = model.chat(media["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    prompt1, output1 = outputs[-1]
    assert lengths[0] == prompt1.shape[0]  # turn 1: the whole prompt (16 frames -> 256 visual tokens)

    lengths.clear()
    second, history = model.chat(media["main"], tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    prompt2, _ = outputs[-1]
    cached = output1[: output1.shape[0] - 1]  # the last generated token is never fed to the model
    expected = prompt2.shape[0] - _common_prefix(cached, prompt2)
    assert lengths[0] == expected
    assert expected < 40 < prompt2.shape[0] / 10  # "<|im_end|>\n<|im_start|>user\nAnd then?..." and a token or so
    third, history = model.chat(media["main"], tokenizer, "Once more?", chat_history=history, generation_config=SETTINGS)

    fresh, fresh_lengths, _ = _chat_model(tiny_dir)
    same_second, _ = fresh.chat(media["main"], tokenizer, "And then?", chat_history=[dict(m) for m in history[:2]],
                                generation_config=SETTINGS)
    assert fresh_lengths[0] == prompt2.shape[0]  # no cache: the whole prompt
    assert same_second == second
    fresh.clear_chat_cache()
    same_third, _ = fresh.chat(media["main"], tokenizer, "Once more?", chat_history=[dict(m) for m in history[:4]],
                               generation_config=SETTINGS)
    assert same_third == third
    print(f"\nturn 2 ran {lengths[0]} of {prompt2.shape[0]} prompt tokens; answers equal fresh runs: "
          f"{second!r}, {third!r}")


def test_prefix_is_not_reused_for_other_visual_tokens_or_with_token_dropping(tiny_dir, media, tmp_path):
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    model, lengths, outputs = _chat_model(tiny_dir)
    _, history = model.chat(media["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    # another file with the same frame count and duration: the same prompt ids, other visual tokens
    other = encode(tmp_path / "other.mp4", 16, fps=8, w=48, h=64)
    lengths.clear()
    model.chat(other, tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    assert lengths[0] == outputs[-1][0].shape[0]

    # in-LLM token dropping: drop decisions depend on the question, so every turn is a fresh run, same answers
    model, lengths, outputs = _chat_model(tiny_dir, mm_llm_compress=True)
    _, history = model.chat(media["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    lengths.clear()
    second, _ = model.chat(media["main"], tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    assert lengths[0] == outputs[-1][0].shape[0]
    fresh, _, _ = _chat_model(tiny_dir, mm_llm_compress=True)
    assert fresh.chat(media["main"], tokenizer, "And then?", chat_history=history[:2], generation_config=SETTINGS)[0] == second

    # switched off: no cache kept
    model, lengths, outputs = _chat_model(tiny_dir)
    model.chat_reuse_prefix = False
    _, history = model.chat(media["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    lengths.clear()
    model.chat(media["main"], tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    assert lengths[0] == outputs[-1][0].shape[0]
