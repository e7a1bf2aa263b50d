"""vision_tower/internvideo2.py: the InternVideo2 tower of VideoChat-Flash-Qwen2_5-7B_InternVideo2-1B against the
original implementation's goldens (small dims), its attention switch, dtypes, and the ToMe projector on its features."""

import json

import pytest
import torch

from conftest import golden_path
from safetensors.torch import load_file

from videochat_flash.vision_tower import InternVideo2VisionTower, ToMeProjector
from videochat_flash.vision_tower.token_merging import merge_schedule

ATOL = 2e-5


@pytest.fixture(scope="module")
def golden():
    sidecar = json.loads(golden_path("internvideo2_tower_224.json").read_text())
    return sidecar, load_file(golden_path("internvideo2_tower_224.safetensors"))


def small_tower(sidecar, **kwargs):
    dims = sidecar["vision_dims"]
    return InternVideo2VisionTower(dims["embed_dim"], dims["depth"], dims["num_heads"], dims["patch_size"], **kwargs)


@pytest.fixture(scope="module")
def tower(golden):
    sidecar, tensors = golden
    model = small_tower(sidecar)
    weights = {k.removeprefix("vision_tower."): v for k, v in tensors.items() if k.startswith("vision_tower.")}
    model.load_state_dict(weights, strict=True)  # raises on any key mismatch
    return model.eval()


@pytest.mark.parametrize("kind", ["video", "image"])
def test_tower_matches_golden(tower, golden, kind):
    """A 4-frame clip (pos_embed) and a single frame (img_pos_embed): (1, T * 256, C), the CLS position dropped."""
    _, tensors = golden
    with torch.no_grad():
        out = tower(tensors[f"input.{kind}"])
    expected = tensors[f"output.{kind}"]
    diff = (out - expected).abs().max().item()
    print(f"\ninternvideo2 tower {kind}: {tuple(out.shape)}, max abs diff {diff:.2e}")
    assert out.shape == expected.shape and diff <= ATOL


def test_only_the_selected_blocks_and_the_published_dims(golden):
    sidecar, _ = golden
    assert len(small_tower(sidecar).vision_tower.blocks) == sidecar["blocks_built"] == 2
    with torch.device("meta"):
        real = InternVideo2VisionTower(1408, 40, 16)  # InternVideo2-1B
    assert len(real.vision_tower.blocks) == 39 and real.intermediate_size == 6144
    assert real.num_patches_per_frame == 256 and real.vision_tower.pos_embed.shape == (1, 4 * 256 + 1, 1408)


def test_eager_sdpa_and_flash_fallback_agree(tower, golden):
    _, tensors = golden
    clip = tensors["input.video"]
    with torch.no_grad():
        results = {}
        for implementation in ("eager", "flash_attention_2", "sdpa"):  # flash-attn absent on CPU: sdpa
            tower.set_attn_implementation(implementation)
            results[implementation] = tower(clip)
    assert (results["eager"] - results["sdpa"]).abs().max().item() < 1e-5
    assert torch.equal(results["flash_attention_2"], results["sdpa"])
    with pytest.raises(ValueError, match="attn_implementation"):
        tower.set_attn_implementation("flex")


def test_bfloat16_and_batches(tower, golden):
    _, tensors = golden
    clips = torch.cat([tensors["input.video"], tensors["input.video"].flip(-1)])
    with torch.no_grad():
        batched = tower(clips)
        single = torch.cat([tower(clip[None]) for clip in clips])
        bf16 = tower.to(torch.bfloat16)(clips.bfloat16()).float()
    tower.float()
    assert (batched - single).abs().max().item() < 1e-5
    assert bf16.dtype == torch.float32 and (bf16 - batched).abs().max().item() < 0.1 * batched.abs().max().item()


def test_bad_inputs_are_refused(tower):
    with pytest.raises(ValueError, match="4-frame clips"):
        tower(torch.zeros(1, 2, 3, 224, 224))
    with pytest.raises(ValueError, match="224, 224"):
        tower(torch.zeros(1, 4, 3, 112, 112))


def test_projector_merges_internvideo2_clips_to_64_tokens(tower, golden):
    """The ToMe projector follows the tower's grid: 4 x 256 patches -> 64 tokens a clip ([512, 256, 128, 64]
    merged away), an image's 256 -> 64 ([128, 64])."""
    sidecar, tensors = golden
    projector = ToMeProjector(mm_hidden_size=64, hidden_size=32, num_attention_heads=4, image_size=224, patch_size=14)
    assert merge_schedule(1024, 64) == [512, 256, 128, 64] and merge_schedule(256, 64) == [128, 64]
    with torch.no_grad():
        video = tower(tensors["input.video"]).reshape(4, 256, -1)
        clip_tokens = projector(video, compress=True, local_num_frames=4)
        image_tokens = projector(tower(tensors["input.image"]), compress=False)
    assert clip_tokens.shape == (1, 64, 32) and image_tokens.shape == (1, 64, 32)


# ------------------------------------------------------------------------------------------------ in the model
INTERNVIDEO2_TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "patch_size": 14,
                     "image_size": 112}


@pytest.fixture(scope="module")
def tiny_internvideo2():
    from videochat_flash.processing_videochat_flash import VideoChatFlashProcessor, VideoChatFlashVideoProcessor
    from videochat_flash.tiny_model import build_byte_level_tokenizer, build_tiny_model

    model = build_tiny_model(3, mm_vision_tower="internvideo2", vision_config=INTERNVIDEO2_TINY)
    processor = VideoChatFlashProcessor(video_processor=VideoChatFlashVideoProcessor(size=112),
                                        tokenizer=build_byte_level_tokenizer())
    return model, processor


def test_internvideo2_model_videos_images_dropping_batches_and_streaming(tiny_internvideo2):
    """The InternVideo2 tower in the whole model: videos of 8 and 12 frames (16 tokens a frame), an image in tiles,
    in-LLM token dropping, a left-padded batch equal to single runs, and streaming equal to one-shot encoding."""
    import numpy as np

    from videochat_flash.streaming_videochat_flash import encode_video_streaming

    model, processor = tiny_internvideo2
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (n, 60, 80, 3), dtype=np.uint8) for n in (8, 12)]
    image = rng.integers(0, 256, (50, 150, 3), dtype=np.uint8)
    conversations = [[{"role": "user", "content": [{"type": "video", "video": videos[0]},
                                                   {"type": "image", "image": image},
                                                   {"type": "text", "text": "What happens?"}]}],
                     [{"role": "user", "content": [{"type": "video", "video": videos[1]},
                                                   {"type": "text", "text": "And here, in this longer clip?"}]}]]
    settings = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    single = [processor.apply_chat_template(c, **settings) for c in conversations]
    assert [int((s["input_ids"] == processor.video_token_id).sum()) for s in single] == [16 * 8, 16 * 12]
    batch = processor.apply_chat_template(conversations, **settings)
    for dropping in (False, True):
        model.config.mm_llm_compress = dropping
        with torch.no_grad():
            together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
            alone = [model.generate(**s, max_new_tokens=4, do_sample=False)[0, s["input_ids"].shape[1]:].tolist()
                     for s in single]
        assert together.tolist() == alone, dropping
    model.config.mm_llm_compress = False
    with torch.no_grad():
        streamed, _ = encode_video_streaming(model, videos[1], video_processor=processor.video_processor,
                                             clips_per_chunk=1)
        one_shot = model.get_video_features(single[1]["pixel_values_videos"])[0]
    assert streamed.shape == (16 * 12, 64) and (streamed - one_shot).abs().max().item() < 1e-5


def test_ddp_looks_for_unused_parameters_while_its_tower_trains(tiny_internvideo2):
    """Each InternVideo2 call adds one of two learned position tables (clips or images), so DDP must look for unused
    parameters while the tower trains (not while it is frozen; UMT's tables are fixed)."""
    from videochat_flash.tiny_model import build_tiny_model
    from videochat_flash.training_videochat_flash import _uses_one_position_table

    model = tiny_internvideo2[0]
    assert _uses_one_position_table(model)
    model.model.vision_tower.requires_grad_(False)
    try:
        assert not _uses_one_position_table(model)
    finally:
        model.model.vision_tower.requires_grad_(True)
    assert not _uses_one_position_table(build_tiny_model(0))
