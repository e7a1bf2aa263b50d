"""The tiny random VideoChat-Flash of the tests, the offline demo and ``videochat-flash make-tiny``.

Small enough to build in milliseconds on a CPU, large enough to exercise every code path: a 4-layer Qwen2
(GQA), a 2-block UMT tower on 128 px frames (64 patches per frame, so ToMe really merges a 4-frame clip of 256
patches down to 64 tokens and an image of 64 patches stays at 64), and a byte-level tokenizer.
"""

import torch

from .configuration_videochat_flash import VideoChatFlashConfig

TINY_TEXT = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,  # wider than the default so random logits have clear greedy margins
}
# vLLM's CPU attention takes head sizes of 32 and up, not the tiny LLM's 16: the vLLM checks use the tiny model with
# these overrides (a 128-wide LLM of 4 heads), exported as any tiny folder.
TINY_VLLM_TEXT = {"hidden_size": 128, "intermediate_size": 256}
TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "patch_size": 16, "image_size": 128}
# Byte-level tokenizer: 256 bytes + <|endoftext|>, <|im_start|>, <|im_end|>, then the two placeholders.
TINY_SPECIAL_IDS = {"pad_token_id": 256, "bos_token_id": 256, "eos_token_id": 258, "video_token_id": 259,
                    "image_token_id": 260}


def tiny_config(**overrides) -> VideoChatFlashConfig:
    settings = {
        **TINY_TEXT,
        **TINY_SPECIAL_IDS,
        "mm_vision_tower": "umt-large",
        "vision_config": dict(TINY_VISION),
        "llm_compress_layer_list": [1, 3],
        "llm_image_token_ratio_list": [1.0, 0.75, 0.25],
        "llm_compress_type": "uniform0_attention",
    }
    settings.update(overrides)
    return VideoChatFlashConfig(**settings)


def build_tiny_model(seed: int = 0, **overrides):
    """A randomly initialised tiny model in float32, eval mode. Same seed, same weights."""
    from .modeling_videochat_flash import VideoChatFlashForCausalLM
    torch.manual_seed(seed)
    model = VideoChatFlashForCausalLM(tiny_config(**overrides))
    # Non-trivial biases and norms so that tests exercise every parameter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith(("q_bias", "v_bias")):
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def build_byte_level_tokenizer():
    """An offline Qwen2-style tokenizer: one token per byte (id = byte value), no merges, then ``<|endoftext|>``
    (256, pad), ``<|im_start|>`` (257) and ``<|im_end|>`` (258, eos); no BOS, like Qwen2.

    A :class:`~transformers.Qwen2Tokenizer` (Qwen2's NFC normaliser and pre-tokenizer), so it saves and reloads with
    ``AutoTokenizer``; on NFC text its ids equal those of the golden ``byte_tokenizer.json``. The processor appends its
    placeholders (``<|video_pad|>`` 259, ``<|image_pad|>`` 260).
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", extra_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_processor():
    """The byte-level tokenizer + 128 px image and video processors: what the tiny model is built for."""
    from .processing_videochat_flash import VideoChatFlashProcessor, VideoChatFlashVideoProcessor

    return VideoChatFlashProcessor(video_processor=VideoChatFlashVideoProcessor(size=TINY_VISION["image_size"]),
                                   tokenizer=build_byte_level_tokenizer())
