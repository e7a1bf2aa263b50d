"""VideoChat-Flash: UMT video encoder + ToMe projector (16 tokens per frame) + Qwen2 with in-LLM token dropping.

The LLM is built from transformers' Qwen2 decoder layers, rotary embedding and RMSNorm; only the layer loop is ours,
because the published model can drop visual tokens between layers (`token_dropping.py`). State-dict keys are the
published checkpoints' (``model.layers.N.*``, ``model.vision_tower.vision_tower.encoder.*``, ``model.mm_projector.*``,
``lm_head.weight``), so their safetensors load unchanged.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from .chat_videochat_flash import VideoChatFlashChatMixin
from .configuration_videochat_flash import CACHE_KWARG, VideoChatFlashConfig, VideoChatFlashQwenConfig
from .token_dropping import decoding_stage, drop_stage, labels_at_kept_positions, prepare_dropping, record_stage
from .vision_tower.token_merging import ToMeProjector
from .vision_tower.umt import UMTVisionTower

# On a CPU a vision-tower call runs fastest while its widest activation (the MLP's hidden layer) stays about the size
# of a last-level cache: larger calls spill it (UMT-L float32 at 224 px: 8 clips per call 6% slower than 2), much
# smaller ones pay per-call overhead (the tiny test tower: 2 clips per call 1.7x slower than 16).
CPU_TOWER_CALL_BYTES = 32 * 1024**2


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
    """Mask of `query_length` new tokens attending to `key_length` cached + new keys (`key_mask` `(batch, key_length)`
    bool, None when all are real): None where the kernel needs none (sdpa's causal path, single-token decoding), the
    2D key mask for flash attention, else `(batch, 1, query, key)`, bool for sdpa, additive float for eager. Padded
    queries attend to themselves, so no row is fully masked (that would give NaN with sdpa)."""
    all_real = key_mask is None or bool(key_mask.all())
    if "flash" in attn_implementation:
        return None if all_real else key_mask.long()
    if all_real and (query_length == 1 or (query_length == key_length and attn_implementation == "sdpa")):
        return None
    key_index = torch.arange(key_length, device=device)
    query_index = key_index[key_length - query_length :]
    allowed = (key_index[None, :] <= query_index[:, None])[None]  # (1, query, key)
    if key_mask is not None:
        allowed = (allowed & key_mask[:, None, :].bool()) | (key_index[None, :] == query_index[:, None])
    allowed = allowed[:, None]  # (batch, 1, query, key)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _default_position_ids(key_mask, past_length, batch, query_length, device):
    """`(batch, seq)` positions of the new tokens: with a padding mask `(batch, past + seq)` they count real tokens
    only (so a left-padded row starts at 0, as it would alone), else they run on from `past_length`."""
    if key_mask is not None:
        position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]
    else:
        position_ids = torch.arange(past_length, past_length + query_length, device=device)[None]
    return position_ids.expand(batch, -1)


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
        for name in ("video_token_id", "image_token_id"):
            token_id = getattr(config, name)
            if token_id is not None and not 0 <= token_id < config.vocab_size:
                raise ValueError(
                    f"config.{name}={token_id} is outside the embedding table (vocab_size={config.vocab_size}); "
                    "placeholder tokens must be added to the tokenizer without resizing the embeddings"
                )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, index) for index in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        vision = config.vision_config
        self.vision_tower = UMTVisionTower(
            hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"], patch_size=vision["patch_size"],
            image_size=vision["image_size"], num_frames=config.mm_local_num_frames,
            select_layer=config.mm_vision_select_layer,
        )
        self.mm_projector = ToMeProjector(
            mm_hidden_size=config.mm_hidden_size, hidden_size=config.hidden_size,
            num_attention_heads=vision["num_attention_heads"], image_size=vision["image_size"],
            patch_size=vision["patch_size"], tokens_per_frame=config.tokens_per_frame,
        )
        self.gradient_checkpointing = False
        # Clips encoded per vision-tower call (None: `clips_per_tower_call` picks by device). Bounds activation memory
        # on long videos without changing results.
        self.vision_clips_per_batch: int | None = None
        self.post_init()

    # ------------------------------------------------------------------------------------------------ vision
    def _split_videos(self, pixel_values_videos, video_frame_counts=None):
        """The accepted video layouts (see `get_video_features`) as a list of `(frames, 3, S, S)` tensors."""
        if isinstance(pixel_values_videos, (list, tuple)) or pixel_values_videos.dim() == 5:
            videos = list(pixel_values_videos)
        elif pixel_values_videos.dim() == 4 and video_frame_counts is None:
            videos = [pixel_values_videos]
        elif pixel_values_videos.dim() == 4:
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

    def encode_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """`(num_clips, clip_frames, 3, S, S)` normalised pixels -> `(num_clips, 16 * clip_frames, hidden_size)`
        projected tokens in time order, `clips_per_tower_call` clips per vision-tower call."""
        clip_frames = clips.shape[1]
        outputs = []
        for chunk in torch.split(clips, self.clips_per_tower_call):
            chunk = chunk.to(device=self.vision_tower_device, dtype=self.vision_tower_dtype)
            features = self._run_vision_tower(chunk)  # (clips, frames * patches, width)
            features = features.reshape(chunk.shape[0] * clip_frames, -1, features.shape[-1])
            outputs.append(self.mm_projector(features, compress=True, local_num_frames=clip_frames))
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
        """Videos `(videos, frames, 3, S, S)`, a list of `(frames_i, 3, S, S)`, or `(total_frames, 3, S, S)` with
        `video_frame_counts` -> a tuple of one `(16 * frames_i, hidden_size)` tensor per video (the ``pooler_output``
        of a `BaseModelOutputWithPooling` when `return_dict`). Raises ValueError for other layouts and for frame
        counts that are not multiples of ``mm_local_num_frames``."""
        videos = self._split_videos(pixel_values_videos, video_frame_counts)
        clip = self.config.mm_local_num_frames
        clips = torch.cat([video.reshape(-1, clip, *video.shape[1:]) for video in videos])
        tokens = self.encode_clips(clips)  # (total_clips, 64, hidden)
        per_video = torch.split(tokens, [video.shape[0] // clip for video in videos])
        features = tuple(t.reshape(-1, t.shape[-1]) for t in per_video)
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def get_image_features(self, pixel_values, return_dict=False, **kwargs):
        """Images `(images, 3, S, S)` (or one `(3, S, S)`) -> a tuple of one `(64, hidden_size)` tensor per image (the
        ``pooler_output`` of a `BaseModelOutputWithPooling` when `return_dict`)."""
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        pixel_values = pixel_values.to(device=self.vision_tower_device, dtype=self.vision_tower_dtype)
        features = self._run_vision_tower(pixel_values[:, None])  # single frame -> image position table
        tokens = self.mm_projector(features, compress=False)  # (images, 64, hidden)
        features = tuple(tokens)
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def embed_multimodal(
        self, input_ids, inputs_embeds=None, pixel_values_videos=None, video_frame_counts=None, pixel_values=None,
        mm_encoder_outputs=None,
    ):
        """`(batch, seq, hidden)` text embeddings with the visual tokens written at their placeholders; the pixels are
        encoded unless `mm_encoder_outputs` (``{"video" / "image": BaseModelOutputWithPooling}``) holds their tokens.
        Raises ValueError when placeholders and visual tokens do not match."""
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
            if encoded is None:
                if input_ids is not None and token_id is not None and bool((input_ids == token_id).any()):
                    raise ValueError(
                        f"input_ids hold {int((input_ids == token_id).sum())} {kind} placeholder tokens but no {kind} "
                        "input was given (0 visual tokens)"
                    )
                continue
            if input_ids is None:
                raise ValueError("visual inputs need input_ids to locate their placeholder tokens")
            if token_id is None:
                raise ValueError(f"config.{kind}_token_id is not set, so {kind} placeholders cannot be located")
            features = torch.cat(list(encoded.pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
            placeholder = input_ids == token_id
            if int(placeholder.sum()) != features.shape[0]:
                raise ValueError(
                    f"{kind} placeholders and {kind} features do not match: input_ids hold {int(placeholder.sum())} "
                    f"{kind} tokens (id {token_id}) but the {kind} inputs give {features.shape[0]} visual tokens"
                )
            inputs_embeds = inputs_embeds.masked_scatter(placeholder[..., None].expand_as(inputs_embeds), features)
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
        # text and cache, in Qwen2Model's order (`past_key_values`, last, is the cache's name before transformers 5.24)
        input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None, inputs_embeds=None,
        use_cache=None,
        # visual inputs: see `embed_multimodal`
        pixel_values_videos=None, video_frame_counts=None, pixel_values=None, mm_encoder_outputs=None,
        # token dropping and outputs
        labels=None, drop_query_position=None, output_hidden_states=None, past_key_values: Cache | None = None,
        **kwargs,
    ) -> VideoChatFlashModelOutput:
        r"""Decoder states of `(batch, seq)` `input_ids` (one placeholder per visual token) with a `(batch, past + seq)`
        `attention_mask` (0 for padding). `labels` `(batch, seq)` only serve attention-based dropping in training,
        which ranks visual tokens from the tokens right before each answer. `drop_query_position` (an index or
        `(batch,)`) is the token whose attention ranks them (default: the last real token, the end of the prompt);
        the prompt's last index lets an uncached forward over prompt + generated tokens rank as the cached prefill did.
        """
        cache = cache if cache is not None else past_key_values
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You must specify input_ids or inputs_embeds")
        if inputs_embeds is None or pixel_values_videos is not None or pixel_values is not None or mm_encoder_outputs:
            inputs_embeds = self.embed_multimodal(
                input_ids, inputs_embeds, pixel_values_videos, video_frame_counts, pixel_values, mm_encoder_outputs
            )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers would append to the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, query_length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0  # layer 0 is never shortened
        key_mask = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            position_ids = _default_position_ids(key_mask, past_length, batch, query_length, inputs_embeds.device)
        # Labels choose the queries that rank visual tokens in training only; inference ranks from the prompt's end.
        drop, state = prepare_dropping(self.config, self.visual_token_mask(input_ids), key_mask, cache, use_cache,
                                       labels if self.training else None, drop_query_position)
        hidden_states, all_hidden_states, drop = self._decoder_layers(
            inputs_embeds, position_ids, key_mask, past_length, cache, use_cache, drop, state, output_hidden_states,
            **kwargs,
        )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        kept_token_index = drop.kept_index if drop is not None else None
        return _model_output(VideoChatFlashModelOutput, cache if use_cache else None, last_hidden_state=hidden_states,
                             hidden_states=all_hidden_states, kept_token_index=kept_token_index)

    def _decoder_layers(
        self, hidden_states, position_ids, key_mask, past_length, cache, use_cache, drop, state, output_hidden_states,
        **kwargs,
    ):
        """The decoder layers on `(batch, seq, hidden)` embeddings; a drop stage opens after each layer of
        ``llm_compress_layer_list``. A prefill with visual tokens (`drop` set) drops them there and records the stage
        in the cache's `state`; a cached decoding step takes the stage's positions and key mask from `state`. The mask
        and rotary embeddings change only when a stage opens. Returns the last layer's `(batch, kept_len, hidden)`
        output, every layer's input (with `output_hidden_states`, else None) and the bookkeeping after the last drop.
        """
        stage_layers = self.config.llm_compress_layer_list if self.config.mm_llm_compress else []
        new_valid = key_mask[:, -hidden_states.shape[1] :] if key_mask is not None else None
        positions = position_ids  # stage 0 uses the given positions
        layer_mask, position_embeddings = self._stage_inputs(
            hidden_states, positions, key_mask, past_length + hidden_states.shape[1]
        )
        all_hidden_states = () if output_hidden_states else None
        for layer_index, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = decoder_layer(
                hidden_states, attention_mask=layer_mask, position_ids=positions, use_cache=use_cache,
                position_embeddings=position_embeddings, **{CACHE_KWARG: cache}, **kwargs,
            )
            if layer_index + 1 not in stage_layers:
                continue
            stage = stage_layers.index(layer_index + 1) + 1
            if drop is not None:  # prefill: drop visual tokens now
                hidden_states, positions, drop = drop_stage(
                    self.config, self.layers, self.rotary_emb, stage, drop, hidden_states, positions
                )
                if state is not None:
                    record_stage(state, stage, drop)
                stage_key_mask = drop.valid
            else:  # decoding (or text only): follow what the prefill dropped, if anything
                decoded = decoding_stage(state, stage, position_ids, new_valid) if state is not None else None
                if decoded is None:
                    continue
                positions, stage_key_mask = decoded
            layer_mask, position_embeddings = self._stage_inputs(
                hidden_states, positions, stage_key_mask, stage_key_mask.shape[1]
            )
        return hidden_states, all_hidden_states, drop

    def _stage_inputs(self, hidden_states, positions, key_mask, key_length):
        """Attention mask (see `_causal_mask`) and rotary `(cos, sin)` shared by the layers of one stage."""
        layer_mask = _causal_mask(
            key_mask, hidden_states.shape[1], key_length, hidden_states.dtype, hidden_states.device,
            self.config._attn_implementation,
        )
        return layer_mask, self.rotary_emb(hidden_states, positions)


class VideoChatFlashForCausalLM(VideoChatFlashPreTrainedModel, GenerationMixin, VideoChatFlashChatMixin):
    """`VideoChatFlashModel` with its LM head, `generate` and `chat`. The embedding and decoder accessors are
    transformers' defaults (`model.embed_tokens`, `lm_head`, `model`), as for Qwen2."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: VideoChatFlashConfig):
        super().__init__(config)
        self.model = VideoChatFlashModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_video_features(self, pixel_values_videos, video_frame_counts=None, return_dict=False, **kwargs):
        return self.model.get_video_features(pixel_values_videos, video_frame_counts, return_dict, **kwargs)

    def get_image_features(self, pixel_values, return_dict=False, **kwargs):
        return self.model.get_image_features(pixel_values, return_dict, **kwargs)

    def forward(
        self,
        # every model input is named, as generate() needs (see `VideoChatFlashModel.forward`)
        input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None, inputs_embeds=None,
        labels=None, use_cache=None, logits_to_keep=0,
        pixel_values_videos=None, video_frame_counts=None, pixel_values=None, mm_encoder_outputs=None,
        drop_query_position=None, past_key_values: Cache | None = None,
        **kwargs,
    ) -> VideoChatFlashCausalLMOutput:
        r"""Logits (and with `labels` the loss) of [`VideoChatFlashModel.forward`]'s states. `labels` `(batch, seq)` are
        next-token targets aligned with `input_ids` (shifted inside the loss); visual placeholders and padding are
        ignored (-100) whatever the caller put there. With in-LLM dropping, logits cover the kept positions
        (`kept_token_index` maps them back)."""
        if labels is not None:
            labels = self._ignore_visual_and_padding(labels, input_ids, attention_mask)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            pixel_values_videos=pixel_values_videos, video_frame_counts=video_frame_counts, pixel_values=pixel_values,
            mm_encoder_outputs=mm_encoder_outputs, labels=labels, drop_query_position=drop_query_position, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if outputs.kept_token_index is not None:  # logits cover the kept positions only
                labels = labels_at_kept_positions(labels, outputs.kept_token_index)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return _model_output(VideoChatFlashCausalLMOutput, getattr(outputs, CACHE_KWARG), loss=loss, logits=logits,
                             hidden_states=outputs.hidden_states, kept_token_index=outputs.kept_token_index)

    def _ignore_visual_and_padding(self, labels, input_ids, attention_mask):
        """`(batch, seq)` labels with visual placeholders and padding set to -100 (nothing to predict there)."""
        ignored = self.model.visual_token_mask(input_ids)
        if attention_mask is not None:
            padding = ~attention_mask[:, -labels.shape[1] :].bool()
            ignored = padding if ignored is None else ignored | padding
        return labels.masked_fill(ignored, -100) if ignored is not None else labels


class VideoChatFlashQwenForCausalLM(VideoChatFlashForCausalLM):
    """Alias under the original remote code's class name (``architectures`` of the published config.json)."""

    config_class = VideoChatFlashQwenConfig


__all__ = [
    "VideoChatFlashConfig", "VideoChatFlashQwenConfig", "VideoChatFlashPreTrainedModel", "VideoChatFlashModel",
    "VideoChatFlashForCausalLM", "VideoChatFlashQwenForCausalLM",
]
