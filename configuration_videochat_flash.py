"""Configuration of VideoChat-Flash (UMT video encoder + ToMe projector + Qwen2 language model).

Flat, like the published ``config.json``: the Qwen2 text fields sit at the top level (transformers' Qwen2 decoder
layers read them directly) beside the original ``mm_*`` / ``llm_*`` fields, so an original ``config.json`` loads
unchanged; unknown fields are kept.
"""

import json
from dataclasses import fields

from transformers import Qwen2Config
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS
from transformers.modeling_outputs import BaseModelOutputWithPast

# Published vision towers: name -> the real dims a published config.json leaves out (`vision_config` overrides them).
# The two UMT towers are ViT-L/16 with tubelet 1; InternVideo2-1B is a ViT-g/14 (vision_tower/internvideo2.py).
VIT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16}
VISION_TOWERS = {
    "umt-large": {**VIT_LARGE, "image_size": 224},
    "umt-hd-large": {**VIT_LARGE, "image_size": 448},
    "internvideo2": {"hidden_size": 1408, "num_hidden_layers": 40, "num_attention_heads": 16, "patch_size": 14,
                     "image_size": 224},
}

# Placeholder ids of the published tokenizers, none of which needs the embeddings resized. Qwen2 (151646
# tokens for 152064 rows) gets <|video_pad|> and <|image_pad|> appended; Qwen2.5 (151665 tokens for 151936
# rows) already has both, as ids 151656 and 151655.
DEFAULT_PLACEHOLDER_IDS = {152064: (151646, 151647), 151936: (151656, 151655)}

# transformers 5.24 renamed the cache argument of models, decoder layers and generate (and the output field) from
# `past_key_values` to `cache`. The model speaks `cache` and translates at the boundary. Read from an output class
# (a light import; the signature of Qwen2Model.forward would need the whole modeling module); a test checks both agree.
CACHE_KWARG = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"

# The original model card's answer length: what generate() gets when nothing else sets one (chat(), Hub folders).
DEFAULT_MAX_NEW_TOKENS = 1024
MEDIA_MARKER = "<image>"  # marks a video/image slot in the original's conversations (chat history, training records)
IM_END = "<|im_end|>"  # ends every ChatML turn: the eos of generation
LLM_COMPRESS_TYPES = ("attention", "uniform", "uniform0_attention", "uniform1_attention")


class VideoChatFlashConfig(Qwen2Config):
    r"""The Qwen2 fields plus the original multimodal ones. ``mm_vision_tower``: ``"umt-large"`` (UMT ViT-L, 224 px),
    ``"umt-hd-large"`` (448 px) or ``"internvideo2"`` (InternVideo2-1B, 224 px), whose dims ``vision_config``
    (``hidden_size``, nominal ``num_hidden_layers``, ``num_attention_heads``, ``patch_size``, ``image_size``) can
    override; ``mm_vision_select_layer`` picks the block
    whose output is used (-2: the second to last). ``mm_local_num_frames`` frames make a clip, encoded as one sequence
    and merged to ``tokens_per_frame`` tokens per frame. ``mm_llm_compress`` drops visual tokens inside the LLM (see
    `validate_token_dropping`). Placeholder ids default from the published vocabularies. Raises ValueError for a
    tower, projector, newline position or ``mm_hidden_size`` the published model lacks.
    """

    model_type = "videochat_flash"

    def __init__(
        self,
        # vision tower and projector
        mm_vision_tower="umt-hd-large", mm_hidden_size=None, mm_vision_select_layer=-2,
        mm_projector_type="tome16_mlp_hd64", mm_local_num_frames=4, mm_newline_position="nothing",
        # in-LLM token dropping
        mm_llm_compress=False, llm_compress_type="attention", llm_compress_layer_list=(8, 16, 24),
        llm_image_token_ratio_list=(1.0, 0.5, 0.25, 0.125),
        # the original's tokenizer length (kept), explicit tower dims, placeholder ids, merged tokens per frame
        tokenizer_model_max_length=None, vision_config=None, video_token_id=None, image_token_id=None,
        tokens_per_frame=16,
        **kwargs,
    ):
        # The original's builder matches names by substring (a path such as "OpenGVLab/umt-hd-large" works there too).
        lowered = str(mm_vision_tower).lower()
        mm_vision_tower = next((name for name, part in (("internvideo2", "internvideo2"), ("umt-hd-large", "umt-hd"),
                                                        ("umt-large", "umt")) if part in lowered), mm_vision_tower)
        if mm_vision_tower not in VISION_TOWERS:
            raise ValueError(f"unknown mm_vision_tower {mm_vision_tower!r}: the supported towers are "
                             f"{sorted(VISION_TOWERS)} (vision_config only changes their dims)")
        rope = kwargs.get("rope_scaling")
        theta = kwargs.get("rope_theta") or (kwargs.get("rope_parameters") or {}).get("rope_theta")
        if isinstance(rope, dict) and "rope_theta" not in rope and theta:  # from_pretrained(..., rope_scaling=...)
            kwargs["rope_scaling"] = {**rope, "rope_theta": theta}
        if mm_projector_type != "tome16_mlp_hd64":
            raise ValueError(f"unsupported mm_projector_type {mm_projector_type!r}: only 'tome16_mlp_hd64' exists")
        if mm_newline_position not in ("nothing", None):
            raise ValueError(f"mm_newline_position={mm_newline_position!r} is not supported: "
                             "the published checkpoints use 'nothing'")
        kwargs.pop("model_type", None)  # an original config.json names its own model_type; ours is the class's
        self.vision_config = {**VISION_TOWERS[mm_vision_tower], **(vision_config or {})}
        tower_width = self.vision_config["hidden_size"]
        self.mm_vision_tower = mm_vision_tower
        self.mm_hidden_size = mm_hidden_size if mm_hidden_size is not None else tower_width
        if self.mm_hidden_size != tower_width:
            raise ValueError(f"mm_hidden_size={self.mm_hidden_size} differs from the vision tower width {tower_width}")
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_projector_type = mm_projector_type
        self.mm_local_num_frames = mm_local_num_frames
        self.mm_newline_position = mm_newline_position
        self.mm_llm_compress = mm_llm_compress
        self.llm_compress_type = llm_compress_type
        if not isinstance(mm_llm_compress, bool):  # "false" would be true
            raise ValueError(f"mm_llm_compress must be True or False, got {mm_llm_compress!r}")
        # lists, or the original training arguments' "8,16,24" strings
        self.llm_compress_layer_list = [int(n) for n in str(llm_compress_layer_list).strip("[]()").split(",") if n]
        self.llm_image_token_ratio_list = [float(r) for r in str(llm_image_token_ratio_list).strip("[]()").split(",")
                                           if r]
        self.tokenizer_model_max_length = tokenizer_model_max_length
        self.tokens_per_frame = tokens_per_frame
        super().__init__(**kwargs)
        default_ids = DEFAULT_PLACEHOLDER_IDS.get(self.vocab_size, (None, None))
        self.video_token_id = video_token_id if video_token_id is not None else default_ids[0]
        self.image_token_id = image_token_id if image_token_id is not None else default_ids[1]

    @property
    def image_size(self) -> int:
        return self.vision_config["image_size"]

    @property
    def rope_scaling(self):
        return self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value):
        # transformers' old name of rope_parameters, which the original's long-context runs set; a value without a
        # rope base keeps the model's (transformers would leave none).
        theta = (getattr(self, "rope_parameters", None) or {}).get("rope_theta")
        value = {"rope_type": "default"} if value is None and theta else value  # None: plain RoPE, same base
        value = {**value, "rope_theta": theta} if isinstance(value, dict) and "rope_theta" not in value and theta else value
        Qwen2Config.rope_scaling.fset(self, value)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reading of ``config.json``; a published config names no placeholder ids, so they come from
        the folder's tokenizer as the processor assigns them (Qwen2.5's own ``<|video_pad|>`` / ``<|image_pad|>``,
        else appended after the vocabulary), never from the vocabulary size alone: Qwen2.5-7B has Qwen2-7B's."""
        config_dict, unused = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("video_token_id") is None or config_dict.get("image_token_id") is None:
            config_dict = {**placeholder_ids_of_tokenizer(pretrained_model_name_or_path, **kwargs), **{
                key: value for key, value in config_dict.items() if value is not None}}
        return config_dict, unused

    def validate_token_dropping(self, cache=None, cache_implementation=None) -> None:
        """Raise ValueError unless ``llm_compress_type``, ``llm_compress_layer_list`` (drop stages open after these
        layers) and ``llm_image_token_ratio_list`` (visual tokens alive per stage, one more entry) can work with this
        LLM depth, and the `cache` (or generate()'s `cache_implementation`) is not of fixed length: the layers after a
        drop cache fewer keys than layer 0. Checked when dropping is used (the model card switches it on after
        loading), not at construction."""
        layers, ratios = self.llm_compress_layer_list, self.llm_image_token_ratio_list
        if self.llm_compress_type not in LLM_COMPRESS_TYPES:
            raise ValueError(f"llm_compress_type={self.llm_compress_type!r}: expected one of {LLM_COMPRESS_TYPES}")
        if len(ratios) != len(layers) + 1:
            raise ValueError(f"llm_image_token_ratio_list needs one more entry than llm_compress_layer_list "
                             f"(got {len(ratios)} ratios for {len(layers)} layers)")
        if sorted(set(layers)) != list(layers) or not all(1 <= n < self.num_hidden_layers for n in layers):
            raise ValueError(f"llm_compress_layer_list={layers} must be increasing and within [1, "
                             f"{self.num_hidden_layers - 1}]: a drop after layer n is scored with layer n's successor, "
                             "so the last layer cannot drop")
        if not (ratios[0] == 1 and all(0 < r <= 1 for r in ratios)) or any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"llm_image_token_ratio_list={ratios} must start at 1 (all tokens before the first drop) "
                             "and not increase, within (0, 1]")
        if getattr(cache, "is_compileable", False) or cache_implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS:
            name = type(cache).__name__ if cache is not None else f"cache_implementation={cache_implementation!r}"
            raise ValueError(f"in-LLM visual token dropping (config.mm_llm_compress) shortens the caches of the layers "
                             f"after each drop, which a cache of fixed length ({name}) cannot hold: use the default "
                             "dynamic cache, or disable config.mm_llm_compress to use a static one")


def placeholder_ids_of_tokenizer(pretrained_model_name_or_path, **kwargs) -> dict[str, int]:
    """``{"video_token_id", "image_token_id"}`` the processor gives ``<|video_pad|>`` / ``<|image_pad|>`` with the
    tokenizer beside a config (their ids, else the next ids ``len(tokenizer)`` gives, in that order), read from its
    ``tokenizer.json`` (or ``vocab.json`` + ``tokenizer_config.json``); ``{}`` without one."""
    from transformers.utils import cached_file

    options = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
               if key in kwargs}

    def read(name):
        path = cached_file(pretrained_model_name_or_path, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **options)
        if path is None:
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    fast = read("tokenizer.json")
    if fast is not None:
        vocab, added = (fast.get("model") or {}).get("vocab"), fast.get("added_tokens", [])
    else:
        vocab, config = read("vocab.json"), read("tokenizer_config.json") or {}
        added = [{"id": int(i), **token} for i, token in (config.get("added_tokens_decoder") or {}).items()]
    if not isinstance(vocab, dict):
        return {}
    ids = {**vocab, **{token["content"]: token["id"] for token in added}}
    found, next_id = {}, len(set(ids.values()))
    for name, token in (("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>")):
        found[name] = ids.get(token, next_id)
        next_id += token not in ids
    return found


class VideoChatFlashQwenConfig(VideoChatFlashConfig):
    """Alias under the original's class name and ``model_type``, so an original ``config.json`` resolves here."""

    model_type = "videochat_flash_qwen"

    # Spelled out: transformers makes config subclasses dataclasses, whose generated __init__ would skip ours.
    def __init__(self, **kwargs):
        super().__init__(**kwargs)


__all__ = ["VideoChatFlashConfig", "VideoChatFlashQwenConfig"]
