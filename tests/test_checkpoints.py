"""The five published checkpoints, as original-format folders at tiny size: each checkpoint's config fields (the key
manifests' `config_used`; the 1M model: a Qwen2.5-7B-1M LLM), its vocabulary size and tokenizer specials (Qwen2's
real vocabulary, + Qwen2.5's specials), random weights under the original key names. Each loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` with no missing or unexpected key and chats;
conversion keeps the original ``model_type`` and ``architectures``."""

import json

import pytest
import torch
from conftest import golden_path
from media import encode
from safetensors.torch import save_file

from videochat_flash.configuration_videochat_flash import VideoChatFlashQwenConfig
from videochat_flash.hub_export import convert_original_checkpoint, copy_code_files, resolve_model
from videochat_flash.modeling_videochat_flash import VideoChatFlashQwenForCausalLM

ORIGINAL_AUTO_MAP = {
    "AutoConfig": "configuration_videochat_flash.VideoChatFlashQwenConfig",
    "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
    "AutoModelForCausalLM": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
}
# checkpoint -> (the manifest whose config it shares, tokenizer, fields of its own)
CHECKPOINTS = {
    "VideoChat-Flash-Qwen2-7B_res224": ("VideoChat-Flash-Qwen2-7B_res224", "qwen2", {}),
    "VideoChat-Flash-Qwen2-7B_res448": ("VideoChat-Flash-Qwen2-7B_res448", "qwen2", {}),
    "VideoChat-Flash-Qwen2_5-2B_res448": ("VideoChat-Flash-Qwen2_5-2B_res448", "qwen25", {}),
    "VideoChat-Flash-Qwen2_5-7B_InternVideo2-1B": ("VideoChat-Flash-Qwen2_5-7B_InternVideo2-1B", "qwen25", {}),
    # same tensor shapes as 7B_res224, a Qwen2.5-7B-Instruct-1M language model (its rope base and context)
    "VideoChat-Flash-Qwen2_5-7B-1M_res224": ("VideoChat-Flash-Qwen2-7B_res224", "qwen25", {
        "max_position_embeddings": 1010000, "rope_theta": 10000000.0, "sliding_window": 32768,
        "tokenizer_model_max_length": 1010000}),
}
# the tiny sizes of the fixtures (vocabulary sizes stay the checkpoints': the placeholder ids depend on them)
TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_window_layers": 2}
TINY_TOWERS = {  # mm_vision_tower -> tiny dims of that tower (its patch size and frame size kept)
    "umt-large": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 16,
                  "image_size": 224},
    "umt-hd-large": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 16,
                     "image_size": 448},
    "internvideo2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 14,
                     "image_size": 224},
}


def original_folder(name, folder, tokenizer_dir):
    """An original-format folder of checkpoint `name` (our code files stand in for the original remote code)."""
    from transformers import AutoTokenizer

    manifest, _, own = CHECKPOINTS[name]
    config = json.loads(golden_path(f"keys_{manifest}.json").read_text())["config_used"]
    config.update(own, **TINY_LLM, model_type="videochat_flash_qwen", architectures=["VideoChatFlashQwenForCausalLM"],
                  auto_map=ORIGINAL_AUTO_MAP, vision_config=TINY_TOWERS[config["mm_vision_tower"]],
                  mm_hidden_size=TINY_TOWERS[config["mm_vision_tower"]]["hidden_size"])
    for key in ("_attn_implementation", "video_token_id", "image_token_id"):  # a published config has none of these
        config.pop(key, None)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = VideoChatFlashQwenForCausalLM(VideoChatFlashQwenConfig(**config))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (config["tie_word_embeddings"] and k == "lm_head.weight")}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    copy_code_files(folder)
    return config


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("clip") / "clip.mp4", 8, fps=4, w=64, h=48)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_each_published_checkpoint_loads_chats_and_converts(name, tmp_path, clip, qwen2_tokenizer_dir,
                                                            qwen25_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = {"qwen2": qwen2_tokenizer_dir, "qwen25": qwen25_tokenizer_dir}[CHECKPOINTS[name][1]]
    config = original_folder(name, tmp_path / name, tokenizer_dir)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__module__.startswith("transformers_modules")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / name)
    # placeholder ids from the tokenizer: Qwen2.5's own tokens, appended after Qwen2's vocabulary
    expected = (151656, 151655) if CHECKPOINTS[name][1] == "qwen25" else (151646, 151647)
    assert (model.config.video_token_id, model.config.image_token_id) == expected
    assert model.config.max_position_embeddings == config["max_position_embeddings"]
    assert model.model.rotary_emb.inv_freq[1].item() == pytest.approx(config["rope_theta"] ** (-2 / 16))
    answer, history = model.chat(clip, tokenizer, "What is moving?", max_num_frames=8,
                                 generation_config={"max_new_tokens": 3, "do_sample": False})
    assert isinstance(answer, str) and history[0]["content"].startswith("<image>")

    for path in tmp_path.joinpath(name).glob("*.py"):  # the published folder: the original remote code, not ours
        path.unlink()
    converted = convert_original_checkpoint(tmp_path / name, tmp_path / "converted")
    written = json.loads((converted / "config.json").read_text())
    assert written["model_type"] == "videochat_flash_qwen" and written["architectures"] == [
        "VideoChatFlashQwenForCausalLM"]
    assert (written["video_token_id"], written["image_token_id"]) == expected
    assert resolve_model(tmp_path / name, cache_dir=tmp_path / "cache").is_dir()
    again = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
    probe = torch.tensor([[151644, 872, 198]])
    with torch.no_grad():
        assert torch.equal(again(probe).logits, model(probe).logits)
    print(f"\n{name}: {len(model.state_dict())} keys, placeholders {expected}, answer {answer!r}")
