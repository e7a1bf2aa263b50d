"""VideoChat-Flash: UMT video encoder + ToMe projector (16 tokens per frame) + Qwen2 with in-LLM token dropping.

The LLM is built from transformers' Qwen2 decoder layers, rotary embedding and RMSNorm; only the layer loop is ours,
because the published model can drop visual tokens between layers (`token_dropping.py`). State-dict keys are the
published checkpoints' (``model.layers.N.*``, ``model.vision_tower.vision_tower.encoder.*``, ``model.mm_projector.*``,
``lm_head.weight``), so their safetensors load unchanged.
"""

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .chat_videochat_flash import VideoChatFlashChatMixin
from .configuration_videochat_flash import CACHE_KWARG, VideoChatFlashConfig, VideoChatFlashQwenConfig
from .pipeline_videochat_flash import VideoTextToTextPipeline  # noqa: F401 - imported so that saving copies the file
from .token_dropping import decoding_stage, drop_stage, labels_at_kept_positions, prepare_dropping, record_stage
from .vision_tower.internvideo2 import InternVideo2ViT, LayerScale
from .vision_tower.visual_tokens import build_projector, build_vision_tower, clip_tokens, tile_raster

# On a CPU a vision-tower call runs fastest while its widest activation (the MLP's hidden layer) stays about the size
# of a last-level cache: larger calls spill it (UMT-L float32 at 224 px: 8 clips per call 6% slower than 2), much
# smaller ones pay per-call overhead (the tiny test tower: 2 clips per call 1.7x slower than 16).
CPU_TOWER_CALL_BYTES = 32 * 1024**2
# Rows per piece when a decoder layer runs a long sequence in pieces (`VideoChatFlashDecoderLayer`); 8192 rows of a
# 7B model's MLP activation are ~300 MB in bf16, small beside what a whole 10,000-frame sequence would hold.
DECODER_CHUNK_TOKENS = 8192
# Up to this many rows, a torchao int8 weight-only linear on a CPU runs ATen's int8 x bfloat16 kernel (5.7x faster
# than torchao's eager path for one decode row of Qwen2.5-1.5B's MLP, 1.2x at 16 rows, slower beyond: it is a
# matrix-vector kernel); longer inputs (prefill) keep torchao's path.
INT8_KERNEL_MAX_ROWS = 16


class VideoChatFlashDecoderLayer(Qwen2DecoderLayer):
    """transformers' Qwen2 decoder layer (same weights, same math), lean on memory for long sequences.

    A layer over `L` tokens holds about eight `(L, hidden)` activations at once (norm, q, k, v, the rotary
    temporaries, attention output, its projection, the residual sum) plus the MLP's `(L, intermediate)`: at 10,000
    frames (160K tokens) these, not the weights, set the peak. When `chunk_tokens` is given, inference runs sdpa's
    causal path (no mask: no padding, no past) and the sequence is longer, the norms, projections, rotary embedding
    and MLP run over `chunk_tokens` rows at a time into preallocated tensors, and attention once over the whole
    sequence (sdpa's flash kernel does not materialise the scores): q, k, v and one output at the peak.
    """

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, chunk_tokens=None, **kwargs):
        attention = self.self_attn
        if (chunk_tokens is None or hidden_states.shape[1] <= chunk_tokens or attention_mask is not None
                or attention.config._attn_implementation != "sdpa" or attention.sliding_window is not None
                or torch.is_grad_enabled() or kwargs.get("output_attentions")):
            return super().forward(hidden_states, attention_mask=attention_mask,
                                   position_embeddings=position_embeddings, **kwargs)
        return self._forward_in_pieces(hidden_states, position_embeddings, chunk_tokens, kwargs.get(CACHE_KWARG))

    def _forward_in_pieces(self, hidden_states, position_embeddings, chunk_tokens, cache):
        attention, (cos, sin) = self.self_attn, position_embeddings
        batch, length, hidden_size = hidden_states.shape
        pieces = [slice(start, start + chunk_tokens) for start in range(0, length, chunk_tokens)]

        def heads(projection, x):  # (batch, rows, heads * head_dim) -> (batch, heads, rows, head_dim)
            return projection(x).view(batch, x.shape[1], -1, attention.head_dim).transpose(1, 2)

        query = hidden_states.new_empty(batch, attention.config.num_attention_heads, length, attention.head_dim)
        key = hidden_states.new_empty(batch, attention.config.num_key_value_heads, length, attention.head_dim)
        value = torch.empty_like(key)
        for piece in pieces:
            x = self.input_layernorm(hidden_states[:, piece])
            query[:, :, piece], key[:, :, piece] = apply_rotary_pos_emb(
                heads(attention.q_proj, x), heads(attention.k_proj, x), cos[:, piece], sin[:, piece])
            value[:, :, piece] = heads(attention.v_proj, x)
        if cache is not None:
            key, value = cache.update(key, value, attention.layer_idx)
        context = nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                             scale=attention.scaling, enable_gqa=True)
        del query, key, value
        output = torch.empty_like(hidden_states)
        for piece in pieces:
            residual = hidden_states[:, piece] + attention.o_proj(
                context[:, :, piece].transpose(1, 2).reshape(batch, -1, hidden_size))
            output[:, piece] = residual + self.mlp(self.post_attention_layernorm(residual))
        return output


@dataclass
class VideoChatFlashModelOutput(BaseModelOutputWithPast):
    """kept_token_index (`(batch, kept_len)`, *optional*): set when visual tokens were dropped inside the LLM: for each
    output position, the input position it comes from (-1 for padding). Labels and positions map through it."""

    kept_token_index: torch.LongTensor | None = None


@dataclass
class VideoChatFlashCausalLMOutput(CausalLMOutputWithPast):
    """kept_token_index: see [`VideoChatFlashModelOutput`]; logits are given for the kept positions only."""

    kept_token_index: torch.LongTensor | None = None


def _model_output(output_class, cache, **fields):
    """Build an output with the cache under the field name of the installed transformers version."""
    return output_class(**fields, **{CACHE_KWARG: cache})


def _causal_mask(key_mask, query_length, key_length, dtype, device, attn_implementation, query_start=None):
    """Mask of `query_length` new tokens at `query_start` (default: the last ones) attending to `key_length` keys
    (`key_mask` `(batch, <= key_length)` bool, None when all are real; a static cache's unwritten slots beyond it are
    masked): None where the kernel needs none (sdpa's causal path, single-token decoding), the 2D key mask for flash
    attention, else `(batch, 1, query, key)`, bool for sdpa, additive float for eager. Padded queries attend to
    themselves, so no row is fully masked (that would give NaN with sdpa)."""
    query_start = key_length - query_length if query_start is None else query_start
    written = query_start + query_length
    if key_mask is not None:
        key_mask = nn.functional.pad(key_mask.bool(), (0, key_length - key_mask.shape[1]))
    all_real = (key_mask is None or bool(key_mask[:, :written].all())) and written == key_length
    if "flash" in attn_implementation:
        return None if all_real or key_mask is None else key_mask.long()
    if all_real and (query_length == 1 or (query_length == key_length and attn_implementation == "sdpa")):
        return None
    key_index = torch.arange(key_length, device=device)
    query_index = key_index[query_start:written]
    allowed = (key_index[None, :] <= query_index[:, None])[None]  # (1, query, key)
    if key_mask is not None:
        allowed = (allowed & key_mask[:, None, :]) | (key_index[None, :] == query_index[:, None])
    allowed = allowed[:, None]  # (batch, 1, query, key)
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _default_position_ids(key_mask, past_length, batch, query_length, device):
    """`(batch, seq)` positions of the new tokens: with a padding mask `(batch, past + seq)` they count real tokens
    only (so a left-padded row starts at 0, as it would alone), else they run on from `past_length`."""
    if key_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device)[None].expand(batch, -1)
    return (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]


def _unpad_frames(video, count, prefer_end):
    """The `count` real frames of a `(T, 3, S, S)` row padded with zero frames. Normalised real frames are never all
    zero, so the padding is the all-zero rest, after the real frames or (left padding) before them; when both qualify
    (count == T, or zero test frames) `prefer_end` (left-padded text) picks the end. ValueError when neither does."""
    start_ok, end_ok = not bool(video[count:].any()), not bool(video[: len(video) - count].any())
    if not 0 < count <= len(video) or not (start_ok or end_ok):
        raise ValueError(f"video_frame_counts gives {count} real frames of {len(video)}, but neither the first nor the "
                         "last frames beyond them are zero padding")
    return video[len(video) - count :] if end_ok and (prefer_end or not start_ok) else video[:count]


def _int8_linear(layer: nn.Linear, stock_forward, hidden_states: torch.Tensor) -> torch.Tensor:
    """`layer` (a torchao int8 weight-only ``nn.Linear``) over `hidden_states`: few bfloat16 rows on a CPU through
    ``aten._weight_int8pack_mm`` (the op inductor's weight-only-int8 pattern lowers torchao's graph to; torchao's
    eager path converts the whole int8 weight to bfloat16 per call instead), anything else through `stock_forward`."""
    rows, weight = hidden_states.numel() // hidden_states.shape[-1], layer.weight
    if (rows > INT8_KERNEL_MAX_ROWS or hidden_states.dtype != torch.bfloat16 or hidden_states.device.type != "cpu"
            or weight.device.type != "cpu" or torch.is_grad_enabled() or not hasattr(weight, "qdata")):
        return stock_forward(hidden_states)  # (a weight swapped since: its own forward)
    output = torch.ops.aten._weight_int8pack_mm(hidden_states.reshape(rows, -1), weight.qdata,
                                                 weight.scale.reshape(-1).to(torch.bfloat16))
    output = output.reshape(*hidden_states.shape[:-1], -1)
    return output if layer.bias is None else output + layer.bias


def use_int8_cpu_kernel(model: nn.Module) -> int:
    """Routes the decode steps of `model`'s torchao int8 weight-only linear layers (per-row scales, no activation
    quantization) to ATen's CPU kernel (`_int8_linear`); returns how many layers. Nothing else changes: longer inputs,
    other devices and gradients keep torchao's forward, and the state dict is untouched."""
    try:
        from torchao.quantization import Int8Tensor
    except ImportError:
        return 0
    count = 0
    for layer in model.modules():
        weight = getattr(layer, "weight", None)
        # (layers under accelerate's hooks keep their forward: the hooks move offloaded weights in around it)
        if (isinstance(layer, nn.Linear) and isinstance(weight, Int8Tensor) and weight.act_quant_kwargs is None
                and weight.act_pre_scale is None and tuple(weight.block_size) == (1, weight.shape[-1])
                and not hasattr(layer, "_stock_forward") and not hasattr(layer, "_hf_hook")):
            layer._stock_forward = layer.forward
            layer.forward = functools.partial(_int8_linear, layer, layer._stock_forward)
            count += 1
    return count


class VideoChatFlashPreTrainedModel(PreTrainedModel):
    config_class = VideoChatFlashConfig
    config: VideoChatFlashConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VideoChatFlashDecoderLayer", "UMTVisionTower", "InternVideo2VisionTower"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Never quantized: torchao's and bitsandbytes' quantizers skip these modules (and their own defaults keep
    # lm_head). The tower and projector are a small part of the weights but feed every visual token; as a side
    # effect of the attribute, a float16 load keeps them float32 (their inputs are cast to the tower's dtype, their
    # tokens back to the LLM's). Quantizers match names from the start, so both prefixes are listed.
    _keep_in_fp32_modules = ["model.vision_tower", "model.mm_projector", "vision_tower", "mm_projector"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _can_record_outputs = {"attentions": "self_attn"}  # output 1 (eager weights) of modules named so: Qwen2Attention

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loading, then `use_int8_cpu_kernel` (a no-op unless torchao int8 weight-only layers load)."""
        loaded = super().from_pretrained(*args, **kwargs)
        use_int8_cpu_kernel(loaded[0] if isinstance(loaded, tuple) else loaded)  # (model, info): output_loading_info
        return loaded

    def _apply(self, fn, *args, **kwargs):
        """nn.Module's moves and casts, but rotary frequencies stay float32 (as transformers builds them for any load
        dtype): rounded to bfloat16, the angles at a long video prompt's positions would be off by radians."""
        kept = [(m, dict(m._buffers)) for m in self.modules() if isinstance(m, Qwen2RotaryEmbedding)]
        super()._apply(fn, *args, **kwargs)
        for module, buffers in kept:
            module._buffers.update({name: v.to(module._buffers[name].device) for name, v in buffers.items()})
        return self

    def _init_weights(self, module):
        super()._init_weights(module)
        # UMT attention keeps separate q and v biases (k has none); they are plain parameters.
        for bias in (getattr(module, name, None) for name in ("q_bias", "v_bias")):
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)
        if isinstance(module, InternVideo2ViT):  # learned tables and CLS token (when not loaded): small random values
            for table in (module.cls_token, module.pos_embed, module.img_pos_embed):
                nn.init.trunc_normal_(table, std=0.02)
        if isinstance(module, LayerScale):
            nn.init.constant_(module.weight, 1e-5)


class VideoChatFlashModel(VideoChatFlashPreTrainedModel):
    """Qwen2 decoder with the vision tower and projector beside it (the original's ``model.*`` layout)."""

    def __init__(self, config: VideoChatFlashConfig):
        super().__init__(config)
        for name in ("video_token_id", "image_token_id"):
            if getattr(config, name) is not None and not 0 <= getattr(config, name) < config.vocab_size:
                raise ValueError(f"config.{name}={getattr(config, name)} is outside the embedding table (vocab_size="
                                 f"{config.vocab_size}); placeholder tokens must be added to the tokenizer without "
                                 "resizing the embeddings")
        if config.mm_llm_compress:  # before any weights load (the model card's way, switched on later, is checked then)
            config.validate_token_dropping()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([VideoChatFlashDecoderLayer(config, index) for index in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.vision_tower, self.mm_projector = build_vision_tower(config), build_projector(config)
        self.gradient_checkpointing = False
        # Clips encoded per vision-tower call (None: `clips_per_tower_call` picks by device). Bounds activation memory
        # on long videos without changing results.
        self.vision_clips_per_batch: int | None = None
        # Decoder layers run sequences longer than this in pieces of this many rows (None: never); bounds activation
        # memory on thousands of frames without changing results.
        self.decoder_chunk_tokens: int | None = DECODER_CHUNK_TOKENS
        self.post_init()

    # ------------------------------------------------------------------------------------------------ vision
    language_model = property(lambda self: self, doc="The decoder (embeddings, layers, norm): this model itself.")

    def _split_videos(self, pixel_values_videos, video_frame_counts=None, padding_side=None):
        """The accepted video layouts (see `get_video_features`) as a list of `(frames, 3, S, S)` tensors."""
        videos, counts = pixel_values_videos, video_frame_counts
        counts = None if counts is None else [int(n) for n in counts]
        if not isinstance(videos, (list, tuple)) and videos.dim() == 4:
            videos = [videos] if counts is None else torch.split(videos, counts, dim=0)
        elif not isinstance(videos, (list, tuple)) and videos.dim() != 5:
            raise ValueError("pixel_values_videos must be (videos, frames, 3, S, S), a list of (frames, 3, S, S) "
                             "tensors, or (total_frames, 3, S, S) with video_frame_counts; got shape "
                             f"{tuple(videos.shape)}")
        elif not isinstance(videos, (list, tuple)) and counts is not None:  # zero-padded rows of a batch
            if len(counts) != len(videos):
                raise ValueError(f"{len(counts)} video_frame_counts for {len(videos)} padded videos")
            videos = [_unpad_frames(video, count, padding_side == "left") for video, count in zip(videos, counts)]
        clip = self.config.mm_local_num_frames
        for index, video in enumerate(videos):
            if video.dim() != 4 or video.shape[0] % clip or not video.shape[0]:
                raise ValueError(
                    f"video {index} has {video.shape[0] if video.dim() == 4 else tuple(video.shape)} frames: the model "
                    f"encodes clips of mm_local_num_frames={clip} frames, so the frame count must be a positive "
                    f"multiple of {clip} (the processor always samples such counts)")
        return list(videos)

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
        projected tokens in time order, `clips_per_tower_call` clips per vision-tower call. 1-frame clips are still
        images (tiles): the tower's image position table, and 64 tokens each (the projector's ``compress=False``)."""
        clip_frames, outputs = clips.shape[1], []
        for chunk in torch.split(clips, self.clips_per_tower_call * (self.config.mm_local_num_frames // clip_frames)):
            chunk = chunk.to(device=self.vision_tower_device, dtype=self.vision_tower_dtype)
            outputs.append(clip_tokens(self.mm_projector, self._run_vision_tower(chunk), clip_frames))
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
        """Where the tower runs: the execution device of accelerate's hooks when offloaded (weights on `meta`)."""
        hooks = (m._hf_hook for m in self.vision_tower.modules() if hasattr(m, "_hf_hook"))
        device = next((h.execution_device for h in hooks if getattr(h, "execution_device", None) is not None), None)
        return torch.device(device) if device is not None else next(self.vision_tower.parameters()).device

    @property
    def vision_tower_dtype(self):
        return next(p.dtype for p in self.vision_tower.parameters() if p.is_floating_point())

    def get_video_features(self, pixel_values_videos, video_frame_counts=None, return_dict=False, padding_side=None,
                           **kwargs):
        """Videos `(videos, frames, 3, S, S)` (with `video_frame_counts`: zero-padded along frames, as pipelines batch
        them; see `_unpad_frames`), a list of `(frames_i, 3, S, S)`, or `(total_frames, 3, S, S)` with
        `video_frame_counts` -> a tuple of one `(16 * frames_i, hidden_size)` tensor per video (the ``pooler_output``
        of a `BaseModelOutputWithPooling` when `return_dict`). Raises ValueError for other layouts and for frame
        counts that are not multiples of ``mm_local_num_frames``."""
        videos = self._split_videos(pixel_values_videos, video_frame_counts, padding_side)
        clip = self.config.mm_local_num_frames
        tokens = self.encode_clips(torch.cat([video.reshape(-1, clip, *video.shape[1:]) for video in videos]))
        per_video = torch.split(tokens, [video.shape[0] // clip for video in videos])  # (clips_i, 64, hidden) each
        features = tuple(t.reshape(-1, t.shape[-1]) for t in per_video)
        return BaseModelOutputWithPooling(pooler_output=features) if return_dict else features

    def get_image_features(self, pixel_values, image_grids=None, return_dict=False, **kwargs):
        """Image tiles `(tiles, 3, S, S)` (or one `(3, S, S)`) and `image_grids` `(images, 2)`: each image's base tile,
        then its `rows x cols` grid of tiles row-major (``(0, 0)``: the base alone, as a padded image) ->
        a tuple of one `(64 * (1 + rows * cols), hidden_size)` tensor per image (the ``pooler_output`` of a
        `BaseModelOutputWithPooling` when `return_dict`): the base's 64 tokens, then the tiles' as one
        `(rows * 8, cols * 8)` raster (the original's ``spatial_nopad``)."""
        pixel_values = pixel_values[None] if pixel_values.dim() == 3 else pixel_values
        if image_grids is None:  # a silent default would read an image's tiles as images of their own
            raise ValueError("pixel_values need their image_grids (the processor returns both; (0, 0) for an image of "
                             "one tile)")
        grids = torch.as_tensor(image_grids).reshape(-1, 2).long().cpu()
        counts = (1 + grids.prod(-1)).tolist()
        if sum(counts) != len(pixel_values):
            raise ValueError(f"image_grids={grids.tolist()} make {sum(counts)} tiles, pixel_values has {len(pixel_values)}")
        features = []
        for tokens, (rows, cols) in zip(self.encode_clips(pixel_values[:, None]).split(counts), grids.tolist()):
            features.append(tile_raster(tokens, rows, cols))
        return BaseModelOutputWithPooling(pooler_output=tuple(features)) if return_dict else tuple(features)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        """`(batch, seq, 1)` bool image and video placeholder masks, from `input_ids` (else by matching placeholder
        embeddings), as LLaVA-OneVision's. Raises ValueError unless given `(tokens, hidden)` features have one row
        per placeholder."""
        masks = []
        for kind, features in (("image", image_features), ("video", video_features)):
            token_id = getattr(self.config, f"{kind}_token_id")
            mask = torch.zeros_like(inputs_embeds[..., 0], dtype=torch.bool)
            if token_id is not None and input_ids is not None:
                mask = input_ids == token_id
            elif token_id is not None:  # located by the placeholder's embedding
                mask = (inputs_embeds == self.embed_tokens(torch.tensor(token_id, device=mask.device))).all(-1)
            if features is not None and int(mask.sum()) * inputs_embeds.shape[-1] != features.numel():
                raise ValueError(f"{kind} placeholders and {kind} features do not match: input_ids hold "
                                 f"{int(mask.sum())} {kind} tokens (id {token_id}) but the {kind} inputs give "
                                 f"{features.shape[0]} visual tokens")
            masks.append(mask[..., None].to(inputs_embeds.device))
        return tuple(masks)

    def embed_multimodal(
        self, input_ids, inputs_embeds=None, pixel_values_videos=None, video_frame_counts=None, pixel_values=None,
        image_grids=None, mm_encoder_outputs=None, attention_mask=None,
    ):
        """`(batch, seq, hidden)` text embeddings with the visual tokens written at their placeholders; the pixels are
        encoded unless `mm_encoder_outputs` (``{"video" / "image": BaseModelOutputWithPooling}``) holds their tokens.
        Raises ValueError when placeholders and visual tokens do not match."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        encoded = dict(mm_encoder_outputs or {})
        if encoded.get("video") is None and pixel_values_videos is not None:  # padding side: the text's, if padded
            left = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, 0].all())
            encoded["video"] = self.get_video_features(pixel_values_videos, video_frame_counts, True,
                                                       "left" if left else None)
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(pixel_values, image_grids, True)
        features = {kind: torch.cat(list(output.pooler_output)).to(inputs_embeds.device, inputs_embeds.dtype)
                    for kind, output in encoded.items() if output is not None}
        if input_ids is None:
            if features:
                raise ValueError("visual inputs need input_ids to locate their placeholder tokens")
            return inputs_embeds
        masks = self.get_placeholder_mask(input_ids, inputs_embeds, features.get("image"), features.get("video"))
        for kind, mask in zip(("image", "video"), masks):
            if kind in features:
                inputs_embeds = inputs_embeds.masked_scatter(mask.expand_as(inputs_embeds), features[kind])
            elif bool(mask.any()):
                raise ValueError(f"input_ids hold {int(mask.sum())} {kind} placeholder tokens but no {kind} input was "
                                 "given (an assistant_model of generate gets none: use prompt_lookup_num_tokens)")
        return inputs_embeds

    def set_rope_scaling(self, rope_scaling: dict | None) -> None:
        """Switch the LLM's rotary position scaling of a loaded model, as ``from_pretrained(..., rope_scaling=...)``
        would when loading: any type transformers' Qwen2 takes, e.g. the original's needle-in-a-haystack setting
        ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}``; None: plain RoPE."""
        config, previous = self.config, self.config.rope_parameters
        theta = previous.get("rope_theta", config.default_theta)
        config.rope_parameters = {"rope_theta": theta, **(rope_scaling or {"rope_type": "default"})}
        try:
            config.standardize_rope_params()
            config.validate_rope()
            rotary = Qwen2RotaryEmbedding(config=config).to(self.rotary_emb.inv_freq.device)
        except Exception:
            config.rope_parameters = previous  # a bad setting changes nothing
            raise
        self.rotary_emb = rotary

    def visual_token_mask(self, input_ids):
        """`(batch, seq)` bool: which positions hold visual tokens (None without input_ids)."""
        if input_ids is None:
            return None
        ids = [i for i in (self.config.video_token_id, self.config.image_token_id) if i is not None]
        return torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))

    # ------------------------------------------------------------------------------------------------ LLM
    @capture_outputs
    def forward(
        self,
        # text and cache, in Qwen2Model's order (`past_key_values`, last, is the cache's name before transformers 5.24)
        input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None, inputs_embeds=None,
        use_cache=None,
        # visual inputs: see `embed_multimodal`
        pixel_values_videos=None, video_frame_counts=None, pixel_values=None, image_grids=None, mm_encoder_outputs=None,
        # token dropping and outputs
        labels=None, drop_query_position=None, output_hidden_states=None, past_key_values: Cache | None = None,
        **kwargs,
    ) -> VideoChatFlashModelOutput:
        r"""Decoder states of `(batch, seq)` `input_ids` (one placeholder per visual token) with a `(batch, past + seq)`
        `attention_mask` (0 for padding). `labels` `(batch, seq)` only serve attention-based dropping in training,
        which ranks visual tokens from the tokens right before each answer. `drop_query_position` (an index or
        `(batch,)`) is the token whose attention ranks them (default: the last real token, the end of the prompt);
        the prompt's last index lets an uncached forward over prompt + generated tokens rank as the cached prefill did.
        `output_attentions` needs eager attention (after a drop, the weights cover the kept positions).
        """
        cache = cache if cache is not None else past_key_values
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You must specify input_ids or inputs_embeds")
        attention = self.config._attn_implementation
        if kwargs.get("output_attentions", self.config.output_attentions) and attention != "eager":
            raise ValueError(f"output_attentions=True needs attn_implementation='eager' (got {attention!r}, which "
                             "returns no attention weights)")
        # Not with checkpointing in training: recomputed layers would append to the cache twice.
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and not (
            self.gradient_checkpointing and self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        key_mask = attention_mask.bool() if attention_mask is not None else None
        # Before encoding, so bad dropping settings fail first. Labels choose the queries that rank visual tokens in
        # training only; inference ranks from the prompt's end.
        drop, state = prepare_dropping(self.config, self.visual_token_mask(input_ids), key_mask, cache, use_cache,
                                       labels if self.training else None, drop_query_position)
        if inputs_embeds is None or pixel_values_videos is not None or pixel_values is not None or mm_encoder_outputs:
            inputs_embeds = self.embed_multimodal(input_ids, inputs_embeds, pixel_values_videos, video_frame_counts,
                                                  pixel_values, image_grids, mm_encoder_outputs, attention_mask)
        batch, query_length = inputs_embeds.shape[:2]
        past_length = int(cache.get_seq_length()) if cache is not None else 0  # layer 0 is never shortened
        # Keys the layers see: cached + new, or a static cache's full length (its unwritten slots are masked).
        key_length = cache.get_mask_sizes(query_length, 0)[0] if cache is not None else query_length
        if position_ids is None:
            position_ids = _default_position_ids(key_mask, past_length, batch, query_length, inputs_embeds.device)
        stage_inputs = self._stage_inputs(inputs_embeds, position_ids, key_mask, key_length, past_length)
        hidden_states, all_hidden_states, drop = self._decoder_layers(
            inputs_embeds, position_ids, key_mask, stage_inputs, cache, use_cache, drop, state, output_hidden_states,
            **kwargs)
        hidden_states = self.norm(hidden_states)
        all_hidden_states = all_hidden_states + (hidden_states,) if output_hidden_states else None
        return _model_output(VideoChatFlashModelOutput, cache if use_cache else None, last_hidden_state=hidden_states,
                             hidden_states=all_hidden_states, kept_token_index=getattr(drop, "kept_index", None))

    def _decoder_layers(
        self, hidden_states, position_ids, key_mask, stage_inputs, cache, use_cache, drop, state, output_hidden_states,
        **kwargs,
    ):
        """The decoder layers on `(batch, seq, hidden)` embeddings, from the first stage's `(mask, rotary)` inputs; a
        drop stage opens after each layer of ``llm_compress_layer_list``. A prefill with visual tokens (`drop` set)
        drops them there and records the stage in the cache's `state`; a cached decoding step takes the stage's
        positions and key mask from `state`. The mask and rotary embeddings change only when a stage opens. Returns
        the last layer's `(batch, kept_len, hidden)` output, every layer's input (a tuple) and the bookkeeping after
        the last drop."""
        stage_layers = self.config.llm_compress_layer_list if self.config.mm_llm_compress else []
        new_valid = key_mask[:, -hidden_states.shape[1] :] if key_mask is not None else None
        positions, (layer_mask, position_embeddings) = position_ids, stage_inputs  # stage 0: the given positions
        all_hidden_states = ()
        for layer_index, decoder_layer in enumerate(self.layers):
            all_hidden_states += (hidden_states,) if output_hidden_states else ()
            hidden_states = decoder_layer(
                hidden_states, attention_mask=layer_mask, position_ids=positions, use_cache=use_cache,
                position_embeddings=position_embeddings, chunk_tokens=self.decoder_chunk_tokens, **{CACHE_KWARG: cache},
                **kwargs)
            if layer_index + 1 not in stage_layers:
                continue
            stage = stage_layers.index(layer_index + 1) + 1
            if drop is not None:  # prefill: drop visual tokens now
                hidden_states, positions, drop = drop_stage(self.config, self.layers, stage, drop, hidden_states,
                                                            positions, position_embeddings)
                if state is not None:
                    record_stage(state, stage, drop)
                stage_key_mask = drop.valid
            else:  # decoding (or text only): follow what the prefill dropped, if anything
                if state is None or (decoded := decoding_stage(state, stage, position_ids, new_valid)) is None:
                    continue
                positions, stage_key_mask = decoded
            layer_mask, position_embeddings = self._stage_inputs(hidden_states, positions, stage_key_mask,
                                                                 stage_key_mask.shape[1])
        return hidden_states, all_hidden_states, drop

    def _stage_inputs(self, hidden_states, positions, key_mask, key_length, query_start=None):
        """Attention mask (see `_causal_mask`) and rotary `(cos, sin)` shared by the layers of one stage."""
        layer_mask = _causal_mask(key_mask, hidden_states.shape[1], key_length, hidden_states.dtype,
                                  hidden_states.device, self.config._attn_implementation, query_start)
        return layer_mask, self.rotary_emb(hidden_states, positions)


class VideoChatFlashForCausalLM(VideoChatFlashPreTrainedModel, GenerationMixin, VideoChatFlashChatMixin):
    """`VideoChatFlashModel` with its LM head, `generate` and `chat`. The embedding and decoder accessors are
    transformers' defaults (`model.embed_tokens`, `lm_head`, `model`), as for Qwen2."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    language_model = property(lambda self: self.model, doc="The decoder (embeddings, layers, norm).")
    vision_tower = property(lambda self: self.model.vision_tower)

    def __init__(self, config: VideoChatFlashConfig):
        super().__init__(config)
        self.model = VideoChatFlashModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    get_video_features = property(lambda self: self.model.get_video_features)  # the base model's, bound

    def set_rope_scaling(self, rope_scaling: dict | None) -> None:
        """See `VideoChatFlashModel.set_rope_scaling`; chat()'s caches, computed with the old positions, are dropped."""
        self.model.set_rope_scaling(rope_scaling)
        self.clear_chat_cache()
    get_image_features = property(lambda self: self.model.get_image_features)

    def _prepare_generation_config(self, generation_config, **kwargs):
        """generate()'s settings; with in-LLM dropping, bad ones (a fixed-length cache) fail before any encoding."""
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        if "max_length" in kwargs and "max_new_tokens" not in kwargs:  # the caller's length beats the folder default
            generation_config.max_new_tokens = None
        if self.config.mm_llm_compress:
            self.config.validate_token_dropping(model_kwargs.get("cache"), generation_config.cache_implementation)
        return generation_config, model_kwargs

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """generate() builds 4D masks for static caches; the layer loop makes its own per drop stage from the 2D one."""
        return attention_mask

    @can_return_tuple
    def forward(
        self,
        # every model input is named, as generate() needs (see `VideoChatFlashModel.forward`)
        input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None, inputs_embeds=None,
        labels=None, use_cache=None, logits_to_keep=0,
        pixel_values_videos=None, video_frame_counts=None, pixel_values=None, image_grids=None, mm_encoder_outputs=None,
        drop_query_position=None, past_key_values: Cache | None = None, **kwargs,
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
            image_grids=image_grids, mm_encoder_outputs=mm_encoder_outputs, labels=labels, drop_query_position=drop_query_position, **kwargs)
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # 0: all
        logits, loss = self.lm_head(outputs.last_hidden_state[:, kept]), None
        if labels is not None:
            if outputs.kept_token_index is not None:  # logits cover the kept positions only
                labels = labels_at_kept_positions(labels, outputs.kept_token_index)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return _model_output(VideoChatFlashCausalLMOutput, getattr(outputs, CACHE_KWARG), loss=loss, logits=logits,
                             hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                             kept_token_index=outputs.kept_token_index)

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
