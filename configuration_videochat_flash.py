"""Configuration of VideoChat-Flash (UMT video encoder + ToMe projector + Qwen2 language model).

The config is *flat*, like the published checkpoints' ``config.json``: the Qwen2 text fields sit at the
top level (so the Qwen2 decoder layers of transformers read them directly), next to the original
``mm_*`` / ``llm_*`` multimodal fields. An original ``config.json`` loads unchanged; unknown fields are kept.
"""

from dataclasses import fields

from transformers import Qwen2Config
from transformers.modeling_outputs import BaseModelOutputWithPast

# Published vision towers: name -> (image size). Both are UMT ViT-L/16 with tubelet 1.
VISION_TOWER_IMAGE_SIZE = {"umt-large": 224, "umt-hd-large": 448}
VIT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 16}

# Placeholder ids of the published tokenizers, none of which needs the embeddings resized. Qwen2 (151646
# tokens for 152064 rows) gets <|video_pad|> and <|image_pad|> appended; Qwen2.5 (151665 tokens for 151936
# rows) already has both, as ids 151656 and 151655.
DEFAULT_PLACEHOLDER_IDS = {152064: (151646, 151647), 151936: (151656, 151655)}

# transformers 5.24 renamed the cache argument of models, decoder layers and generate, and the matching output field,
# from `past_key_values` to `cache`; 5.23 and older use the old name. The model speaks `cache` and translates at the
# boundary with transformers. Read from the installed version's own output class (one light import, where the
# signature of Qwen2Model.forward would need the whole modeling module); a test checks both agree.
CACHE_KWARG = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"

LLM_COMPRESS_TYPES = ("attention", "uniform", "uniform0_attention", "uniform1_attention")


class VideoChatFlashConfig(Qwen2Config):
    r"""
    Args:
        mm_vision_tower (`str`): ``"umt-large"`` (224 px) or ``"umt-hd-large"`` (448 px).
        mm_hidden_size (`int`): width of the vision features entering the projector (the tower width).
        mm_vision_select_layer (`int`): which block's output is used; ``-2`` builds ``depth - 1`` blocks.
        mm_projector_type (`str`): only ``"tome16_mlp_hd64"`` exists.
        mm_local_num_frames (`int`): frames per clip; a clip is encoded as one sequence and merged to 64 tokens.
        mm_llm_compress (`bool`): drop visual tokens inside the LLM.
        llm_compress_type (`str`): one of ``attention``, ``uniform``, ``uniform0_attention``, ``uniform1_attention``.
        llm_compress_layer_list (`list[int]`): after these many layers a drop stage happens.
        llm_image_token_ratio_list (`list[float]`): fraction of the visual tokens alive in each stage
            (one more entry than ``llm_compress_layer_list``).
        vision_config (`dict`, *optional*): explicit tower dims (``hidden_size``, ``num_hidden_layers`` = nominal
            depth before the select-layer cut, ``num_attention_heads``, ``patch_size``, ``image_size``) overriding
            the ViT-L defaults implied by ``mm_vision_tower``.
        video_token_id / image_token_id (`int`, *optional*): placeholder ids; default from the vocabulary size of
            the published checkpoints.
        tokens_per_frame (`int`): visual tokens per video frame after merging (16).
    """

    model_type = "videochat_flash"

    def __init__(
        self,
        mm_vision_tower="umt-hd-large",
        mm_hidden_size=None,
        mm_vision_select_layer=-2,
        mm_projector_type="tome16_mlp_hd64",
        mm_local_num_frames=4,
        mm_newline_position="nothing",
        mm_llm_compress=False,
        llm_compress_type="attention",
        llm_compress_layer_list=(8, 16, 24),
        llm_image_token_ratio_list=(1.0, 0.5, 0.25, 0.125),
        tokenizer_model_max_length=None,
        vision_config=None,
        video_token_id=None,
        image_token_id=None,
        tokens_per_frame=16,
        **kwargs,
    ):
        if mm_vision_tower not in VISION_TOWER_IMAGE_SIZE and not vision_config:
            raise ValueError(
                f"unknown mm_vision_tower {mm_vision_tower!r}: expected one of {sorted(VISION_TOWER_IMAGE_SIZE)} "
                "or explicit vision_config dims"
            )
        if mm_projector_type != "tome16_mlp_hd64":
            raise ValueError(f"unsupported mm_projector_type {mm_projector_type!r}: only 'tome16_mlp_hd64' exists")
        if mm_newline_position not in ("nothing", None):
            raise ValueError(
                f"mm_newline_position={mm_newline_position!r} is not supported: the published checkpoints use 'nothing'"
            )
        kwargs.pop("model_type", None)  # an original config.json names its own model_type; ours is the class's
        resolved_vision = {**VIT_LARGE, "image_size": VISION_TOWER_IMAGE_SIZE.get(mm_vision_tower, 224)}
        resolved_vision.update(vision_config or {})
        self.vision_config = resolved_vision
        self.mm_vision_tower = mm_vision_tower
        self.mm_hidden_size = mm_hidden_size if mm_hidden_size is not None else resolved_vision["hidden_size"]
        if self.mm_hidden_size != resolved_vision["hidden_size"]:
            raise ValueError(
                f"mm_hidden_size={self.mm_hidden_size} differs from the vision tower width {resolved_vision['hidden_size']}"
            )
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_projector_type = mm_projector_type
        self.mm_local_num_frames = mm_local_num_frames
        self.mm_newline_position = mm_newline_position
        self.mm_llm_compress = mm_llm_compress
        self.llm_compress_type = llm_compress_type
        self.llm_compress_layer_list = list(llm_compress_layer_list)
        self.llm_image_token_ratio_list = [float(r) for r in llm_image_token_ratio_list]
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
    def image_tokens(self) -> int:
        """Visual tokens per still image (a single frame is merged to a whole clip's worth: 64)."""
        return self.tokens_per_frame * self.mm_local_num_frames

    def validate_token_dropping(self) -> None:
        """Raise a clear error when the in-LLM dropping settings cannot work with this LLM depth.

        Checked when dropping is used (the model card switches it on after loading), not at construction.
        """
        layers, ratios = self.llm_compress_layer_list, self.llm_image_token_ratio_list
        if self.llm_compress_type not in LLM_COMPRESS_TYPES:
            raise ValueError(f"llm_compress_type={self.llm_compress_type!r}: expected one of {LLM_COMPRESS_TYPES}")
        if len(ratios) != len(layers) + 1:
            raise ValueError(
                f"llm_image_token_ratio_list needs one more entry than llm_compress_layer_list "
                f"(got {len(ratios)} ratios for {len(layers)} layers)"
            )
        if sorted(set(layers)) != list(layers) or not all(1 <= n < self.num_hidden_layers for n in layers):
            raise ValueError(
                f"llm_compress_layer_list={layers} must be increasing and within [1, {self.num_hidden_layers - 1}]: "
                "a drop after layer n is scored with layer n's successor, so the last layer cannot drop"
            )
        if any(b > a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"llm_image_token_ratio_list={ratios} must not increase")


class VideoChatFlashQwenConfig(VideoChatFlashConfig):
    """Alias under the original remote code's class name and ``model_type``, so an original ``config.json``
    (``architectures`` / ``auto_map``) resolves to this package's classes."""

    model_type = "videochat_flash_qwen"

    # Spelled out: transformers turns config subclasses into dataclasses, which would otherwise generate an
    # __init__ from the Qwen2 fields and skip ours.
    def __init__(self, **kwargs):
        super().__init__(**kwargs)


__all__ = ["VideoChatFlashConfig", "VideoChatFlashQwenConfig"]
