"""configuration_videochat_flash: original config.json fields and unknown ones kept, tower dims, placeholder ids,
the dropping settings' checks, and the one cache-argument constant."""

import inspect
import json

import pytest

from conftest import golden_path
from videochat_flash.configuration_videochat_flash import CACHE_KWARG, VideoChatFlashConfig


def test_config_round_trip_keeps_original_and_unknown_fields(tmp_path):
    spec = json.loads(golden_path("keys_VideoChat-Flash-Qwen2-7B_res448.json").read_text())
    config = VideoChatFlashConfig(**spec["config_used"], some_future_field={"kept": True})
    assert config.vision_config == {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                    "patch_size": 16, "image_size": 448}
    assert config.some_future_field == {"kept": True} and config.image_grid_pinpoints[0] == [448, 448]
    assert (config.video_token_id, config.image_token_id) == (151646, 151647)
    config.save_pretrained(tmp_path)
    reloaded = VideoChatFlashConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    tiny = VideoChatFlashConfig(mm_vision_tower="umt-large", vision_config={"hidden_size": 32, "num_hidden_layers": 3})
    assert tiny.vision_config["image_size"] == 224 and tiny.mm_hidden_size == 32


def test_cache_kwarg_is_the_name_transformers_uses():
    """CACHE_KWARG is read from an output class; the model passes it to Qwen2 decoder layers and returns it."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model

    for forward in (Qwen2Model.forward, Qwen2DecoderLayer.forward):
        assert CACHE_KWARG in inspect.signature(forward).parameters


def test_settings_are_checked_with_clear_errors():
    with pytest.raises(ValueError, match="unknown mm_vision_tower"):
        VideoChatFlashConfig(mm_vision_tower="clip-large")
    towers = r"the supported towers are \['internvideo2', 'umt-hd-large', 'umt-large'\]"
    with pytest.raises(ValueError, match=towers):  # explicit dims do not make an unknown tower buildable
        VideoChatFlashConfig(mm_vision_tower="something-else", vision_config={"hidden_size": 64, "patch_size": 14})
    internvideo2 = VideoChatFlashConfig(mm_vision_tower="internvideo2")
    assert internvideo2.vision_config == {"hidden_size": 1408, "num_hidden_layers": 40, "num_attention_heads": 16,
                                          "patch_size": 14, "image_size": 224} and internvideo2.mm_hidden_size == 1408
    with pytest.raises(ValueError, match="mm_projector_type"):
        VideoChatFlashConfig(mm_projector_type="mlp2x_gelu")
    with pytest.raises(ValueError, match="mm_hidden_size"):
        VideoChatFlashConfig(mm_hidden_size=512)
    config = VideoChatFlashConfig(num_hidden_layers=4, mm_llm_compress=True, llm_compress_layer_list=[4],
                                  llm_image_token_ratio_list=[1, 0.5])
    with pytest.raises(ValueError, match="llm_compress_layer_list"):
        config.validate_token_dropping()
    config.llm_compress_layer_list, config.llm_image_token_ratio_list = [2], [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="one more entry"):
        config.validate_token_dropping()


def test_values_of_the_wrong_kind_are_refused_or_read_the_original_way():
    with pytest.raises(ValueError, match="mm_llm_compress must be True or False"):
        VideoChatFlashConfig(mm_llm_compress="false")
    config = VideoChatFlashConfig(llm_compress_layer_list="8,16,24", llm_image_token_ratio_list="1,0.5,0.25,0.125")
    assert config.llm_compress_layer_list == [8, 16, 24] and config.llm_image_token_ratio_list == [1, 0.5, 0.25, 0.125]
    for ratios in ([0.5, 0.5, 0.25], [1.0, 0.5, -0.5], [1.0, 2.0, 2.0], [1.0, float("nan"), 0.5]):
        config = VideoChatFlashConfig(num_hidden_layers=4, llm_compress_layer_list=[1, 2],
                                      llm_image_token_ratio_list=ratios)
        with pytest.raises(ValueError, match="must start at 1"):
            config.validate_token_dropping()


def test_tower_names_are_matched_like_the_original_builder():
    """The original's builder matches tower names by substring: paths and suffixed names pick the same tower."""
    for name, tower in (("OpenGVLab/umt-hd-large", "umt-hd-large"), ("umt-large", "umt-large"), ("umt", "umt-large"),
                        ("InternVideo2-1B", "internvideo2"), ("internvideo2", "internvideo2")):
        assert VideoChatFlashConfig(mm_vision_tower=name).mm_vision_tower == tower, name


def test_placeholder_ids_come_from_the_tokenizer_files(tmp_path):
    """A published config names no placeholder ids: they are those the processor gives with the folder's tokenizer
    (tokenizer.json, or vocab.json + tokenizer_config.json), whatever the vocabulary size says."""
    import json

    from videochat_flash.configuration_videochat_flash import placeholder_ids_of_tokenizer

    vocab = {f"t{i}": i for i in range(100)}
    fast = {"model": {"vocab": vocab}, "added_tokens": [{"id": 150, "content": "<|im_end|>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(fast))
    assert placeholder_ids_of_tokenizer(tmp_path) == {"video_token_id": 101, "image_token_id": 102}  # len(tokenizer)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "100": {"content": "<|image_pad|>"}, "101": {"content": "<|video_pad|>"}}}))
    assert placeholder_ids_of_tokenizer(tmp_path) == {"video_token_id": 101, "image_token_id": 100}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "videochat_flash_qwen", "vocab_size": 152064}))
    config = VideoChatFlashConfig.from_pretrained(tmp_path)
    assert (config.video_token_id, config.image_token_id) == (101, 100)  # not the Qwen2 default of 152064 rows
