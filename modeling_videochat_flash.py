"""VideoChat-Flash: UMT video encoder + ToMe projector (16 tokens per frame) + Qwen2 with in-LLM token dropping.

The language model is assembled from transformers' own Qwen2 decoder layers, rotary embedding and RMSNorm; only
the layer loop is ours, because the published model can drop visual tokens between layers. State-dict keys are
those of the published checkpoints (``model.layers.N.*``, ``model.vision_tower.vision_tower.encoder.*``,
``model.mm_projector.*``, ``lm_head.weight``), so their safetensors load unchanged.
"""

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2Model,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    rotate_half,
)
from transformers.utils import logging

from .chat_videochat_flash import VideoChatFlashChatMixin
from .configuration_videochat_flash import VideoChatFlashConfig, VideoChatFlashQwenConfig
from .vision_tower.token_merging import ToMeProjector
from .vision_tower.umt import UMTVisionTower

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the `past_key_values` argument and output field to `cache`; 5.23 and older use the old
# name. Everything below speaks `cache` and translates at the boundary with transformers.
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"

DROP_STATE_ATTRIBUTE = "videochat_flash_drop_state"
# On a CPU a vision-tower call runs fastest while its widest activation (the MLP's hidden layer) stays about the size
# of a last-level cache: larger calls spill it (UMT-L float32 at 224 px: 8 clips per call 6% slower than 2), much
# smaller ones pay per-call overhead (the tiny test tower: 2 clips per call 1.7x slower than 16).
CPU_TOWER_CALL_BYTES = 32 * 1024**2


@dataclass
class VisualTokenDropState:
    """What cached decoding needs to know after visual tokens were dropped inside the LLM.

    Layers after a drop cache fewer keys than layer 0, so positions and masks of later tokens cannot be derived
    from ``cache.get_seq_length()``. Stored on the cache object, so it travels with the cache (and its copies).

    Attributes:
        dropped: stage -> `(batch,)` visual tokens removed before that stage's layers; new tokens' positions in
            those layers are shifted down by this amount.
        key_masks: stage -> `(batch, cached_len)` bool, which cached keys of that stage's layers are real tokens.
    """

    dropped: dict = field(default_factory=dict)
    key_masks: dict = field(default_factory=dict)


@dataclass
class VideoChatFlashModelOutput(BaseModelOutputWithPast):
    """
    kept_token_index (`torch.LongTensor` of shape `(batch, kept_len)`, *optional*):
        Set when visual tokens were dropped inside the LLM: for each output position, the index of the input
        position it comes from (-1 for padding). Labels and positions map through it.
    """

    kept_token_index: torch.LongTensor | None = None


@dataclass
class VideoChatFlashCausalLMOutput(CausalLMOutputWithPast):
    """
    kept_token_index (`torch.LongTensor` of shape `(batch, kept_len)`, *optional*):
        See [`VideoChatFlashModelOutput`]; logits are given for the kept positions only.
    """

    kept_token_index: torch.LongTensor | None = None


def _model_output(output_class, cache, **fields):
    """Build an output with the cache under the field name of the installed transformers version."""
    return output_class(**fields, **{CACHE_KWARG: cache})


def _causal_mask(key_mask, query_length, key_length, dtype, device, attn_implementation):
    """Attention mask for `query_length` new tokens attending to `key_length` cached + new keys.

    Args:
        key_mask: `(batch, key_length)` bool, or None when every key is a real token.
    Returns:
        None where the attention function can do without one (sdpa's causal kernel, single-token decoding),
        the 2D key mask for flash attention, else a `(batch, 1, query_length, key_length)` mask (bool for sdpa,
        additive float for eager). Padded queries attend to themselves only, so no row is fully masked (which
        would give NaN with sdpa).
    """
    all_real = key_mask is None or bool(key_mask.all())
    if "flash" in attn_implementation:
        return None if all_real else key_mask.long()
    if all_real and (query_length == 1 or (query_length == key_length and attn_implementation == "sdpa")):
        return None
    key_index = torch.arange(key_length, device=device)
    query_index = key_index[key_length - query_length :]
    allowed = key_index[None, :] <= query_index[:, None]  # (query, key)
    if key_mask is not None:
        allowed = allowed[None] & key_mask[:, None, :].bool()
        allowed = allowed | (key_index[None, :] == query_index[:, None])[None]
    else:
        allowed = allowed[None]
    allowed = allowed[:, None]  # (batch, 1, query, key)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class VideoChatFlashPreTrainedModel(PreTrainedModel):
    config_class = VideoChatFlashConfig
    config: VideoChatFlashConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "UMTVisionTower"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        super()._init_weights(module)
        # UMT attention keeps separate q and v biases (k has none); they are plain parameters.
        for name in ("q_bias", "v_bias"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                nn.init.zeros_(getattr(module, name))


class VideoChatFlashModel(VideoChatFlashPreTrainedModel):
    """Qwen2 decoder with the vision tower and projector beside it (the original's ``model.*`` layout)."""

    def __init__(self, config: VideoChatFlashConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        for name in ("video_token_id", "image_token_id"):
            token_id = getattr(config, name)
            if token_id is not None and not 0 <= token_id < config.vocab_size:
                raise ValueError(
                    f"config.{name}={token_id} is outside the embedding table (vocab_size={config.vocab_size}); "
                    "placeholder tokens must be added to the tokenizer without resizing the embeddings"
                )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [Qwen2DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        vision = config.vision_config
        self.vision_tower = UMTVisionTower(
            hidden_size=vision["hidden_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"],
            patch_size=vision["patch_size"],
            image_size=vision["image_size"],
            num_frames=config.mm_local_num_frames,
            select_layer=config.mm_vision_select_layer,
        )
        self.mm_projector = ToMeProjector(
            mm_hidden_size=config.mm_hidden_size,
            hidden_size=config.hidden_size,
            num_attention_heads=vision["num_attention_heads"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            tokens_per_frame=config.tokens_per_frame,
        )
        self.gradient_checkpointing = False
        # Clips encoded per vision-tower call (None: `clips_per_tower_call` picks by device). Bounds activation memory
        # on long videos without changing results.
        self.vision_clips_per_batch: int | None = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # ------------------------------------------------------------------------------------------------ vision
    def _split_videos(self, pixel_values_videos, video_frame_counts=None):
        """Normalise the accepted video layouts into a list of `(frames, 3, S, S)` tensors."""
        if isinstance(pixel_values_videos, (list, tuple)):
            videos = list(pixel_values_videos)
        elif pixel_values_videos.dim() == 5:
            videos = list(pixel_values_videos)
        elif pixel_values_videos.dim() == 4:
            if video_frame_counts is None:
                videos = [pixel_values_videos]
            else:
                videos = list(torch.split(pixel_values_videos, [int(n) for n in video_frame_counts], dim=0))
        else:
            raise ValueError(
                "pixel_values_videos must be (videos, frames, 3, S, S), a list of (frames, 3, S, S) tensors, or "
                f"(total_frames, 3, S, S) with video_frame_counts; got shape {tuple(pixel_values_videos.shape)}"
            )
        clip = self.config.mm_local_num_frames
        for index, video in enumerate(videos):
            if video.dim() != 4 or video.shape[0] % clip:
                raise ValueError(
                    f"video {index} has {video.shape[0] if video.dim() == 4 else tuple(video.shape)} frames: the model "
                    f"encodes clips of mm_local_num_frames={clip} frames, so the frame count must be a positive "
                    f"multiple of {clip} (the processor always samples such counts)"
                )
        return videos

    @property
    def clips_per_tower_call(self) -> int:
        """`vision_clips_per_batch` if set; else 16 clips on an accelerator, which needs large calls to fill it, and
        on a CPU as many (1 to 16) as keep one call's MLP activation within `CPU_TOWER_CALL_BYTES` (UMT-L: 2 clips
        at 224 px in float32, 5 in bfloat16, 1 at 448 px)."""
        if self.vision_clips_per_batch is not None:
            return max(1, int(self.vision_clips_per_batch))
        if self.vision_tower_device.type != "cpu":
            return 16
        tower = self.vision_tower
        clip_bytes = (tower.num_patches_per_frame * self.config.mm_local_num_frames * tower.intermediate_size
                      * self.vision_tower_dtype.itemsize)
        return max(1, min(16, CPU_TOWER_CALL_BYTES // clip_bytes))

    def encode_clips(self, clips: torch.Tensor, on_chunk=None) -> torch.Tensor:
        """Visual tokens of 4-frame clips, `clips_per_tower_call` clips per vision-tower call.

        Args:
            clips: `(num_clips, clip_frames, 3, S, S)` normalised pixels.
            on_chunk: optional callable, given the number of clips after each tower call (e.g. a progress bar's
                `update`).
        Returns:
            `(num_clips, 16 * clip_frames, hidden_size)` projected tokens, in time order.
        """
        clip_frames = clips.shape[1]
        outputs = []
        for chunk in torch.split(clips, self.clips_per_tower_call):
            chunk = chunk.to(device=self.vision_tower_device, dtype=self.vision_tower_dtype)
            features = self._run_vision_tower(chunk)  # (clips, frames * patches, width)
            features = features.reshape(chunk.shape[0] * clip_frames, -1, features.shape[-1])
            outputs.append(self.mm_projector(features, compress=True, local_num_frames=clip_frames))
            if on_chunk is not None:
                on_chunk(chunk.shape[0])
        return torch.cat(outputs)

    def _run_vision_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower follows the model's attention choice (flash/sdpa/eager; anything else runs as sdpa)."""
        wanted = self.config._attn_implementation
        wanted = wanted if wanted in ("eager", "sdpa", "flash_attention_2") else "sdpa"
        if getattr(self, "_vision_attn_implementation", "sdpa") != wanted:
            self.vision_tower.set_attn_implementation(wanted)
            self._vision_attn_implementation = wanted
        return self.vision_tower(pixel_values)

    @property
    def vision_tower_device(self):
        return next(self.vision_tower.parameters()).device

    @property
    def vision_tower_dtype(self):
        return next(self.vision_tower.parameters()).dtype

    def get_video_features(self, pixel_values_videos, video_frame_counts=None, return_dict=False, **kwargs):
        """Project videos to visual tokens (16 per frame).

        Args:
            pixel_values_videos: `(videos, frames, 3, S, S)`, a list of `(frames_i, 3, S, S)`, or
                `(total_frames, 3, S, S)` with `video_frame_counts`.
        Returns:
            A tuple with one `(16 * frames_i, hidden_size)` tensor per video (as ``pooler_output`` of a
            `BaseModelOutputWithPooling` when `return_dict`).
        """
        videos = self._split_videos(pixel_values_videos, video_frame_counts)
        clip = self.config.mm_local_num_frames
        clips = torch.cat([video.reshape(-1, clip, *video.shape[1:]) for video in videos])
        tokens = self.encode_clips(clips)  # (total_clips, 64, hidden)
        per_video = torch.split(tokens, [video.shape[0] // clip for video in videos])
        features = tuple(t.reshape(-1, t.shape[-1]) for t in per_video)
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def get_image_features(self, pixel_values, return_dict=False, **kwargs):
        """Project still images to 64 visual tokens each.

        Args:
            pixel_values: `(images, 3, S, S)`.
        Returns:
            A tuple with one `(64, hidden_size)` tensor per image.
        """
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        pixel_values = pixel_values.to(device=self.vision_tower_device, dtype=self.vision_tower_dtype)
        features = self._run_vision_tower(pixel_values[:, None])  # single frame -> image position table
        tokens = self.mm_projector(features, compress=False)  # (images, 64, hidden)
        features = tuple(tokens)
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def _scatter_visual_features(self, input_ids, inputs_embeds, token_id, features, kind):
        """Write visual tokens into the embedding rows of their placeholders (checking the counts)."""
        if token_id is None:
            raise ValueError(f"config.{kind}_token_id is not set, so {kind} placeholders cannot be located")
        features = torch.cat(list(features)).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = input_ids == token_id
        num_placeholders = int(placeholder.sum())
        if num_placeholders != features.shape[0]:
            raise ValueError(
                f"{kind} placeholders and {kind} features do not match: input_ids hold {num_placeholders} "
                f"{kind} tokens (id {token_id}) but the {kind} inputs give {features.shape[0]} visual tokens"
            )
        return inputs_embeds.masked_scatter(placeholder[..., None].expand_as(inputs_embeds), features)

    def embed_multimodal(
        self, input_ids, inputs_embeds=None, pixel_values_videos=None, video_frame_counts=None, pixel_values=None,
        mm_encoder_outputs=None,
    ):
        """Text embeddings with the visual tokens spliced in at their placeholders."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if mm_encoder_outputs.get("video") is None and pixel_values_videos is not None:
            mm_encoder_outputs["video"] = self.get_video_features(pixel_values_videos, video_frame_counts, True)
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(pixel_values, True)
        for kind in ("video", "image"):
            token_id = getattr(self.config, f"{kind}_token_id")
            encoded = mm_encoder_outputs.get(kind)
            if encoded is not None:
                if input_ids is None:
                    raise ValueError("visual inputs need input_ids to locate their placeholder tokens")
                inputs_embeds = self._scatter_visual_features(
                    input_ids, inputs_embeds, token_id, encoded.pooler_output, kind
                )
            elif input_ids is not None and token_id is not None and bool((input_ids == token_id).any()):
                raise ValueError(
                    f"input_ids hold {int((input_ids == token_id).sum())} {kind} placeholder tokens but no {kind} "
                    "input was given (0 visual tokens)"
                )
        return inputs_embeds

    def visual_token_mask(self, input_ids):
        """`(batch, seq)` bool: which positions hold visual tokens (None without input_ids)."""
        if input_ids is None:
            return None
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in (self.config.video_token_id, self.config.image_token_id):
            if token_id is not None:
                mask |= input_ids == token_id
        return mask

    # ------------------------------------------------------------------------------------------------ LLM
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        use_cache=None,
        pixel_values_videos=None,
        video_frame_counts=None,
        pixel_values=None,
        mm_encoder_outputs=None,
        labels=None,
        drop_query_position=None,
        output_hidden_states=None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> VideoChatFlashModelOutput:
        r"""
        Args:
            input_ids (`(batch, seq)`): text with one placeholder token per visual token.
            attention_mask (`(batch, past + seq)`): 1 for real tokens, 0 for padding.
            pixel_values_videos: see [`~VideoChatFlashModel.get_video_features`].
            pixel_values (`(images, 3, S, S)`): still images.
            labels (`(batch, seq)`, *optional*): only used by attention-based token dropping during training,
                which scores visual tokens from the tokens right before each answer.
            drop_query_position (`int` or `(batch,)`, *optional*): index in `input_ids` of the token whose attention
                ranks the visual tokens (default: the last real token, i.e. the end of the prompt). Passing the
                prompt's last index lets an uncached forward over prompt + generated tokens rank exactly as the
                cached prefill did.
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None) and input_ids is None:
            raise ValueError("You must specify input_ids or inputs_embeds")
        if inputs_embeds is None or pixel_values_videos is not None or pixel_values is not None or mm_encoder_outputs:
            inputs_embeds = self.embed_multimodal(
                input_ids, inputs_embeds, pixel_values_videos, video_frame_counts, pixel_values, mm_encoder_outputs
            )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, query_length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_length = cache.get_seq_length() if cache is not None else 0  # layer 0 is never shortened
        key_mask = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            if key_mask is not None:
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
            else:
                position_ids = torch.arange(past_length, past_length + query_length, device=device)[None]
            position_ids = position_ids.expand(batch, -1)

        visual = self.visual_token_mask(input_ids)
        dropping = self.config.mm_llm_compress
        state = getattr(cache, DROP_STATE_ATTRIBUTE, None) if cache is not None else None
        prefill_drop = dropping and visual is not None and bool(visual.any())
        if dropping:
            self.config.validate_token_dropping()
        if prefill_drop and past_length > 0:
            raise ValueError(
                "in-LLM visual token dropping needs the visual tokens in the first forward pass of a sequence; "
                "this call has a non-empty cache. Disable config.mm_llm_compress to continue from a cached prefix."
            )
        if prefill_drop and use_cache:
            state = VisualTokenDropState()
            setattr(cache, DROP_STATE_ATTRIBUTE, state)
        drop_layers = self.config.llm_compress_layer_list if dropping else []

        # Per-sample bookkeeping for the drop stages (prefill only).
        query_valid = key_mask[:, -query_length:] if key_mask is not None else None
        drop_inputs = None
        if prefill_drop:
            valid = query_valid if query_valid is not None else torch.ones_like(visual)
            if drop_query_position is None:
                last_real = valid.shape[1] - 1 - valid.flip(-1).long().argmax(-1)
                query_index = last_real
            else:
                query_index = torch.as_tensor(drop_query_position, device=device).expand(batch)
            query = torch.zeros_like(valid)
            query[torch.arange(batch, device=device), query_index] = True
            drop_inputs = {
                "query": query,
                "valid": valid,
                "visual": visual & valid,
                "num_visual": (visual & valid).sum(-1),
                "kept_index": torch.arange(query_length, device=device).expand(batch, -1),
                "labels": labels,
            }
        stage_positions = position_ids  # stage 0 uses the given positions

        hidden_states = inputs_embeds
        attn_impl = self.config._attn_implementation
        layer_mask = _causal_mask(
            key_mask, query_length, past_length + query_length, hidden_states.dtype, device, attn_impl
        )
        position_embeddings = self.rotary_emb(hidden_states, stage_positions)
        all_hidden_states = () if output_hidden_states else None
        for layer_index, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=layer_mask,
                position_ids=stage_positions,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{CACHE_KWARG: cache},
                **kwargs,
            )
            if (layer_index + 1) not in drop_layers:
                continue
            stage = drop_layers.index(layer_index + 1) + 1
            if prefill_drop:
                hidden_states, stage_positions, drop_inputs = self._drop_visual_tokens(
                    stage, hidden_states, stage_positions, drop_inputs
                )
                stage_key_mask = drop_inputs["valid"]
                if state is not None:
                    state.dropped[stage] = drop_inputs["num_visual"] - drop_inputs["keep"]
                    state.key_masks[stage] = stage_key_mask
            elif state is not None and stage in state.key_masks:
                new_columns = query_valid if query_valid is not None else torch.ones(
                    batch, query_length, dtype=torch.bool, device=device
                )
                state.key_masks[stage] = torch.cat([state.key_masks[stage], new_columns], dim=1)
                stage_key_mask = state.key_masks[stage]
                stage_positions = position_ids - state.dropped[stage][:, None]
            else:
                continue  # nothing was dropped for this sequence (text only)
            key_length = stage_key_mask.shape[1]
            layer_mask = _causal_mask(
                stage_key_mask, hidden_states.shape[1], key_length, hidden_states.dtype, device, attn_impl
            )
            position_embeddings = self.rotary_emb(hidden_states, stage_positions)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return _model_output(
            VideoChatFlashModelOutput,
            cache if use_cache else None,
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            kept_token_index=drop_inputs["kept_index"] if drop_inputs is not None else None,
        )

    # ------------------------------------------------------------------------------------ token dropping
    def _stage_drop_type(self, stage: int) -> str:
        """'uniform' or 'attention' for the drop that opens `stage` (1-based)."""
        compress_type = self.config.llm_compress_type
        uniform_stages = {"uniform0_attention": 1, "uniform1_attention": 2}.get(compress_type)
        if uniform_stages is not None:
            return "uniform" if stage <= uniform_stages else "attention"
        return compress_type

    @torch.no_grad()  # a ranking only: topk is not differentiable, and the original scores detached states
    def _visual_token_scores(self, next_layer, hidden_states, positions, valid, query_mask, labels, batch_index):
        """Attention that the query tokens pay to every key, as the next layer would compute it.

        The query is the last prompt token at inference (`query_mask`); in training, the tokens right before each answer
        span (labels != -100), averaged. Heads are averaged. Returns `(seq,)` float scores, or None when a
        training sample has no answer (its visual tokens are then all kept, as in the original).
        """
        sample = hidden_states[batch_index]
        sample_valid = valid[batch_index]
        if labels is not None and self.training:
            answer = labels[batch_index] != -100
            starts = answer[1:] & ~answer[:-1]
            queries = torch.nonzero(starts).flatten()
            if queries.numel() == 0:
                return None
        else:
            queries = torch.nonzero(query_mask[batch_index]).flatten()
        attention = next_layer.self_attn
        normed = next_layer.input_layernorm(sample)
        head_dim = attention.head_dim
        query = attention.q_proj(normed[queries]).view(len(queries), -1, head_dim).transpose(0, 1)
        key = attention.k_proj(normed).view(sample.shape[0], -1, head_dim).transpose(0, 1)
        cos, sin = self.rotary_emb(sample, positions[batch_index][None])
        cos, sin = cos[0], sin[0]
        query = query * cos[queries] + rotate_half(query) * sin[queries]
        key = key * cos + rotate_half(key) * sin
        key = key.repeat_interleave(attention.num_key_value_groups, dim=0)
        weights = torch.matmul(query, key.transpose(1, 2)) * attention.scaling  # (heads, queries, seq)
        key_index = torch.arange(sample.shape[0], device=sample.device)
        allowed = (key_index[None, :] <= queries[:, None]) & sample_valid[None, :]
        weights = weights.masked_fill(~allowed[None], torch.finfo(weights.dtype).min)
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(sample.dtype)
        return weights.mean(0).mean(0)

    def _drop_visual_tokens(self, stage, hidden_states, positions, drop_inputs):
        """Keep the most useful visual tokens before the layers of `stage`; text and padding rules are unchanged.

        Each sample keeps ``int(n * ratio[stage])`` of its ``n`` visual tokens (in their original order), chosen
        by the next layer's attention from the last prompt token, or uniformly spaced for 'uniform' stages.
        Kept sequences are right-aligned (left padding) so generation can append to them; positions of the kept
        tokens close the gaps, so each sample is numbered without holes as in the original.

        Returns:
            hidden_states `(batch, kept_len, dim)`, positions `(batch, kept_len)`, and the updated bookkeeping.
        """
        valid, visual = drop_inputs["valid"], drop_inputs["visual"]
        num_visual = drop_inputs["num_visual"]
        ratio = self.config.llm_image_token_ratio_list[stage]
        keep_counts = (num_visual.double() * ratio).long()  # int(n * ratio), as the original
        drop_type = self._stage_drop_type(stage)
        next_layer = self.layers[self.config.llm_compress_layer_list[stage - 1]]
        batch, length = visual.shape
        selected = torch.zeros_like(visual)
        for i in range(batch):
            visual_positions = torch.nonzero(visual[i]).flatten()
            current, keep = visual_positions.numel(), int(keep_counts[i])
            if current == 0:
                continue
            if drop_type == "uniform":
                chosen = torch.linspace(0, current - 1, keep, dtype=torch.long)
            else:
                scores = self._visual_token_scores(
                    next_layer, hidden_states, positions, valid, drop_inputs["query"], drop_inputs["labels"], i
                )
                if scores is None:
                    chosen = torch.arange(current)
                    keep_counts[i] = current
                else:
                    chosen = scores[visual_positions].topk(keep).indices
            selected[i, visual_positions[chosen.to(visual_positions.device)]] = True
        kept = valid & (~visual | selected)
        dropped_before = torch.cumsum(visual & ~selected, dim=-1)
        new_positions = positions - dropped_before

        kept_lengths = kept.sum(-1)
        new_length = int(kept_lengths.max())
        # Right-align: output slot j of sample i holds its (j - (new_length - len_i))-th kept token.
        order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)[:, :new_length]  # kept first, in order
        shift = new_length - kept_lengths
        slots = torch.arange(new_length, device=valid.device)[None, :]
        source_slot = slots - shift[:, None]
        new_valid = source_slot >= 0
        gather_index = order.gather(1, source_slot.clamp(min=0))  # (batch, new_length) indices into length

        def take(tensor, fill):
            picked = tensor.gather(1, gather_index) if tensor.dim() == 2 else tensor.gather(
                1, gather_index[..., None].expand(-1, -1, tensor.shape[-1])
            )
            mask = new_valid if tensor.dim() == 2 else new_valid[..., None]
            return picked.masked_fill(~mask, fill) if fill is not None else picked * mask

        hidden_states = take(hidden_states, None)
        labels = drop_inputs["labels"]
        updated = {
            "query": take(drop_inputs["query"], False),
            "valid": new_valid,
            "visual": take(visual & selected, False),
            "num_visual": num_visual,
            "keep": keep_counts,
            "kept_index": take(drop_inputs["kept_index"], -1),
            "labels": take(labels, -100) if labels is not None else None,
        }
        return hidden_states, take(new_positions, 0), updated


class VideoChatFlashForCausalLM(VideoChatFlashPreTrainedModel, GenerationMixin, VideoChatFlashChatMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: VideoChatFlashConfig):
        super().__init__(config)
        self.model = VideoChatFlashModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model

    def get_video_features(self, pixel_values_videos, video_frame_counts=None, return_dict=False, **kwargs):
        return self.model.get_video_features(pixel_values_videos, video_frame_counts, return_dict, **kwargs)

    def get_image_features(self, pixel_values, return_dict=False, **kwargs):
        return self.model.get_image_features(pixel_values, return_dict, **kwargs)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        pixel_values_videos=None,
        video_frame_counts=None,
        pixel_values=None,
        mm_encoder_outputs=None,
        drop_query_position=None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> VideoChatFlashCausalLMOutput:
        r"""
        labels (`(batch, seq)`, *optional*): next-token targets aligned with `input_ids` (shifted inside the
            loss). Visual placeholders and padding are ignored (-100) whatever the caller put there.

        With in-LLM token dropping, logits cover the kept positions (`kept_token_index` maps them back).
        """
        if labels is not None:
            ignored = self.model.visual_token_mask(input_ids)
            if attention_mask is not None:
                padding = ~attention_mask[:, -labels.shape[1] :].bool()
                ignored = padding if ignored is None else ignored | padding
            if ignored is not None:
                labels = labels.masked_fill(ignored, -100)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values_videos=pixel_values_videos,
            video_frame_counts=video_frame_counts,
            pixel_values=pixel_values,
            mm_encoder_outputs=mm_encoder_outputs,
            labels=labels,
            drop_query_position=drop_query_position,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if outputs.kept_token_index is not None:
                index = outputs.kept_token_index
                labels = labels.gather(1, index.clamp(min=0)).masked_fill(index < 0, -100)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return _model_output(
            VideoChatFlashCausalLMOutput,
            getattr(outputs, CACHE_KWARG),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            kept_token_index=outputs.kept_token_index,
        )


class VideoChatFlashQwenForCausalLM(VideoChatFlashForCausalLM):
    """Alias under the original remote code's class name (``architectures`` of the published config.json)."""

    config_class = VideoChatFlashQwenConfig


__all__ = [
    "VideoChatFlashConfig",
    "VideoChatFlashQwenConfig",
    "VideoChatFlashPreTrainedModel",
    "VideoChatFlashModel",
    "VideoChatFlashForCausalLM",
    "VideoChatFlashQwenForCausalLM",
]
