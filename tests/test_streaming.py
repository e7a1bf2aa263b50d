"""streaming_videochat_flash: encode_video_streaming gives the processor + get_video_features tokens, chunk by chunk,
in bounded memory. Tiny model, small videos; the chunked decoder itself is tested in test_video_loading.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from media import OPEN_GOP, encode, pattern

from videochat_flash.processing_videochat_flash import VideoChatFlashVideoProcessor
from videochat_flash.streaming_videochat_flash import _prefetch, as_mm_encoder_outputs, encode_video_streaming
from videochat_flash.tiny_model import build_tiny_model, tiny_processor
from videochat_flash.video_loading import load_video

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_media")
    return {
        "open_gop": encode(d / "open_gop.mp4", 300, 96, 64, options=OPEN_GOP),
        "clip": encode(d / "clip.mp4", 200, 96, 64, fps=10, options={"g": "12"}),
        "main": encode(d / "main.mp4", 16, fps=8),
        "ten_seconds": encode(d / "ten_seconds.mp4", 250, 96, 64, fps=25),
    }


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


@pytest.mark.parametrize("kind", ["decoded_frames", "file"])
def test_processor_and_streaming_give_the_same_tokens(tiny, media, kind):
    """One input, one answer: 100 decoded (128, 128, 3) frames, or a 10-second file, through the processor (chat
    template, pixels) + get_video_features and through encode_video_streaming: the same count and values."""
    processor = tiny_processor()
    video = [pattern(i, 128, 128) for i in range(100)] if kind == "decoded_frames" else media["ten_seconds"]
    messages = [{"role": "user", "content": [{"type": "video", ("video" if kind == "decoded_frames" else "path"): video},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        reference = tiny.get_video_features(inputs["pixel_values_videos"], inputs["video_frame_counts"])[0]
    features, meta = encode_video_streaming(tiny, video, video_processor=processor.video_processor, clips_per_chunk=3)
    frames = 100 if kind == "decoded_frames" else 64  # as given / the original's 1 fps rule with its 64-frame floor
    assert meta.num_frames == frames and features.shape == reference.shape == (16 * frames, 64)
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == 16 * frames
    diff = (features - reference).abs().max().item()
    print(f"\n{kind}: {features.shape[0]} visual tokens both ways, max |diff| {diff:.2g}")
    assert diff <= 1e-5


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
    # a still image: one clip of 4 copies, as the processor's video path gives it
    image = Image.fromarray(pattern(5, 70, 50))
    features, meta = encode_video_streaming(tiny, image, clips_per_chunk=1)
    torch.testing.assert_close(features, _one_shot(tiny, load_video(image)[0]), rtol=0, atol=1e-5)


def test_streamed_tokens_stand_in_for_the_pixels_in_forward_and_generate(tiny, media):
    """The module's usage: `mm_encoder_outputs=as_mm_encoder_outputs(features)` with the prompt ids gives the logits
    and greedy ids of the processor's pixels."""
    processor = tiny_processor()
    messages = [{"role": "user", "content": [{"type": "video", "path": media["main"]},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    features, _ = encode_video_streaming(tiny, media["main"], video_processor=processor.video_processor,
                                         clips_per_chunk=1)
    prompt = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        expected = tiny(**inputs).logits
        streamed = tiny(**prompt, mm_encoder_outputs=as_mm_encoder_outputs(features)).logits
        expected_ids = tiny.generate(**inputs, max_new_tokens=8, do_sample=False)
        streamed_ids = tiny.generate(**prompt, mm_encoder_outputs=as_mm_encoder_outputs(features), max_new_tokens=8,
                                     do_sample=False)
    assert (streamed - expected).abs().max().item() <= 1e-5
    assert streamed_ids.tolist() == expected_ids.tolist()


def test_progress_bar_on_terminals_only(tiny, media, capsys, monkeypatch):
    """A bar on a terminal; none in a log (tqdm's disable=None), so logs get no control characters."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    encode_video_streaming(tiny, media["clip"], num_frames=24, clips_per_chunk=2, progress=True)
    assert capsys.readouterr().err == ""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    encode_video_streaming(tiny, media["clip"], num_frames=24, clips_per_chunk=2, progress=True)
    assert "Encoding video" in terminal.getvalue() and "/24" in terminal.getvalue()


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
    from videochat_flash.streaming_videochat_flash import encode_video_streaming
    from videochat_flash.tiny_model import build_tiny_model
    def kb(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])
    model = build_tiny_model(0)
    encode_video_streaming(model, sys.argv[1], num_frames=64)  # warm up the allocator and thread pools
    setup = kb("VmRSS")
    features, meta = encode_video_streaming(model, sys.argv[1], num_frames=int(sys.argv[2]), clips_per_chunk=8)
    print(json.dumps({"grew_kb": kb("VmHWM") - setup, "frames": meta.num_frames,
                      "token_kb": features.numel() * features.element_size() // 1024}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_streaming_memory_does_not_grow_with_frames(tmp_path):
    """1,024 frames at 128 px: the original's float pixels alone would take 192 MiB; streaming keeps the tokens
    (4 MiB) and one chunk. bench/bench_long_video.py measures 64 / 1,024 / 10,000 frames."""
    frames = 1024
    video = encode(tmp_path / "long.mp4", frames, 64, 48, fps=25, options={"g": "250"})
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, video, str(frames)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pixels_mib = frames * 3 * 128 * 128 * 4 / 2**20
    print(f"\n{frames:,} frames streamed: peak RSS grew {result['grew_kb'] / 1024:.0f} MiB (tokens "
          f"{result['token_kb'] / 1024:.0f} MiB; all-frames float pixels would be {pixels_mib:.0f} MiB)")
    assert result["frames"] == frames
    assert result["grew_kb"] / 1024 < pixels_mib / 4


def test_segments_folders_and_gifs_agree_across_entry_points(tiny, tmp_path):
    """A segment of a file, a folder of frames and a GIF give the same frames and prompt through load_video, the
    processor's video blocks ({"start", "end"} keys), streaming encoding and chat(media_dict=...)."""
    import numpy as np

    from videochat_flash.frame_sampling import time_message

    model, processor = tiny, tiny_processor()
    clip = encode(tmp_path / "clip.mp4", 120, fps=10, w=64, h=48)  # 12 s
    folder = tmp_path / "frames"
    folder.mkdir()
    decoded, _ = load_video(clip, num_frames=12)
    for n, frame in enumerate(decoded):
        Image.fromarray(frame).save(folder / f"f_{n}.jpg" if n % 2 else folder / f"f_{n}.png")
    gif = tmp_path / "clip.gif"
    Image.fromarray(decoded[0]).save(gif, save_all=True, append_images=[Image.fromarray(f) for f in decoded[1:]])
    cases = [(str(clip), {"start": 2.5, "end": 9.0}, "pyav"), (str(folder), {"start": 2.0, "end": 10.0}, "img"),
             (str(folder), {}, "frame"), (str(gif), {}, "gif")]
    settings = {"max_num_frames": 16, "generation_config": {"max_new_tokens": 3, "do_sample": False}}
    for path, segment, read_type in cases:
        frames, meta = load_video(path, **segment, max_num_frames=16)
        block = {"type": "video", "path": path, **segment}
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": [block, {"type": "text", "text": "What?"}]}], add_generation_prompt=True,
            tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"max_num_frames": 16})
        assert int(inputs["video_frame_counts"][0]) == meta.num_frames
        text = processor.tokenizer.decode(inputs["input_ids"][0])
        assert time_message(meta.duration, meta.num_frames) in text
        with torch.no_grad():
            streamed, streamed_meta = encode_video_streaming(model, path, video_processor=processor.video_processor,
                                                             max_num_frames=16, clips_per_chunk=1, **segment)
            one_shot = model.get_video_features(inputs["pixel_values_videos"])[0]
            answer = processor.tokenizer.decode(model.generate(**inputs, max_new_tokens=3, do_sample=False)[
                0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert streamed_meta.frame_indices == meta.frame_indices and (streamed - one_shot).abs().max() < 1e-5
        chat, history = model.chat(path, processor.tokenizer, "What?", processor=processor,
                                   media_dict={**segment, "video_read_type": read_type}, **settings)
        assert chat == answer and time_message(meta.duration, meta.num_frames) in history[0]["content"]
        print(f"\n{Path(path).name} {segment or ''}: {meta.num_frames} frames {meta.frame_indices[:3]}..., "
              f"{meta.duration:.2f} s; processor, streaming and chat() agree")
    assert np.array_equal(load_video(folder)[0], load_video(folder, start=None)[0])
