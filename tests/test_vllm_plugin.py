"""The vLLM plugin's plain helpers, without vLLM (scripts/check_vllm.sh runs vLLM itself): the weight names it maps,
the video text it writes into prompts, the frames its loader hands over, and why it expands prompts as text."""

import numpy as np
import pytest
from media import encode

from videochat_flash.processing_videochat_flash import VideoChatFlashProcessor, VideoChatFlashVideoProcessor
from videochat_flash.tiny_model import TINY_VISION, build_tiny_model, tiny_processor
from videochat_flash.video_loading import load_video
from videochat_flash.vllm_videochat_flash import (WEIGHT_PREFIXES, max_video_frames, padded_frame_count,
                                                  video_input, video_prompt_text)

VIDEO_PAD = "<|video_pad|>"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("vllm") / "clip.mp4", 30, w=96, h=64, fps=10)


def map_name(name: str) -> str:
    """vLLM's WeightsMapper on prefixes: each matching prefix in turn replaces the start of the name."""
    for prefix, new in WEIGHT_PREFIXES.items():
        if name.startswith(prefix):
            name = new + name[len(prefix):]
    return name


def test_weight_names_map_onto_the_vision_modules_and_vllms_qwen2():
    model = build_tiny_model()
    mapped = {map_name(name) for name in model.state_dict()}
    vision = {f"vision_tower.{name}" for name in model.model.vision_tower.state_dict()}
    projector = {f"mm_projector.{name}" for name in model.model.mm_projector.state_dict()}
    assert vision | projector <= mapped
    language = mapped - vision - projector
    assert language and all(name.startswith(("language_model.model.", "language_model.lm_head.")) for name in language)
    assert "language_model.model.embed_tokens.weight" in language and "language_model.lm_head.weight" in language


def test_video_prompt_text_is_what_the_processor_writes(clip):
    processor = tiny_processor()
    _, meta = load_video(clip)
    assert video_prompt_text(meta.num_frames, {"duration": meta.duration}, VIDEO_PAD) == processor.video_replacement(
        meta.num_frames, meta)
    # vLLM's metadata may give the duration as frames / rate only; none at all: no time message, as the processor
    assert video_prompt_text(8, {"total_num_frames": 30, "fps": 10.0}, VIDEO_PAD).endswith("lasts for 3.00 seconds, "
                                                                                        "and 8 frames are uniformly "
                                                                                        "sampled from it. ")
    assert video_prompt_text(8, None, VIDEO_PAD) == VIDEO_PAD * 128


def test_loader_frames_give_the_pixels_of_the_file(clip):
    frames, metadata = video_input(clip)
    processor = VideoChatFlashVideoProcessor(size=TINY_VISION["image_size"])
    from_file = processor(clip, return_tensors="np")["pixel_values_videos"]
    # the plugin keeps every frame the loader sampled, padded to whole clips
    from_frames = processor(frames, max_num_frames=padded_frame_count(len(frames)),
                            return_tensors="np")["pixel_values_videos"]
    assert metadata["do_sample_frames"] is False and metadata["duration"] == pytest.approx(3.0)
    np.testing.assert_array_equal(from_frames, from_file)


def test_frame_counts():
    assert [padded_frame_count(n) for n in (1, 4, 6, 24)] == [4, 4, 8, 24]
    assert max_video_frames(4096) == 256 and max_video_frames(10) == 4


def test_prompts_are_expanded_as_text(clip, qwen2_tokenizer_dir):
    """With a real BPE the time message's trailing space merges with the question (" What"): the plugin expands
    the prompt as text and encodes it once, as the processor does; splicing the message's own tokens would not."""
    from transformers import AutoTokenizer

    processor = VideoChatFlashProcessor(video_processor=VideoChatFlashVideoProcessor(size=TINY_VISION["image_size"]),
                                        tokenizer=AutoTokenizer.from_pretrained(qwen2_tokenizer_dir))
    tokenizer = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "video", "path": clip},
                                             {"type": "text", "text": "What is moving?"}]}]
    expected = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="np")["input_ids"][0].tolist()
    frames, metadata = video_input(clip)
    expansion = video_prompt_text(padded_frame_count(len(frames)), metadata, VIDEO_PAD)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    as_text = tokenizer.encode(prompt.replace(VIDEO_PAD, expansion, 1), add_special_tokens=False)
    before, after = prompt.split(VIDEO_PAD)
    spliced = [token for part in (before, expansion, after)
               for token in tokenizer.encode(part, add_special_tokens=False)]
    assert as_text == expected
    assert spliced != expected
