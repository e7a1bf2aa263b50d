"""VideoChat-Flash as a native vLLM model: vLLM's own Qwen2 as the LLM, this package's vision tower (UMT or
InternVideo2) and ToMe projector unchanged, and the multimodal processing that gives vLLM the prompt the package's
processor (and ``chat()``) builds.

* **Videos**: frames (decoded by :mod:`vllm_video_loader` for ``video_url`` requests) -> this package's video
  processor (S x S pixels, padded to whole 4-frame clips) -> 16 tokens per frame; in the prompt a ``<|video_pad|>``
  becomes ``16 * T`` placeholders + the original time message.
* **Images** (one per prompt): the image processor's base image + tiles, 64 tokens per tile.
* **Not in vLLM**: in-LLM visual token dropping (``mm_llm_compress``): every layer of vLLM sees every scheduled
  token, so the model is served with dropping off, as the original's evaluations run it.

Registered by the plugin (:func:`vllm_videochat_flash.register`) under both architecture names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.logger import init_logger
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper, init_vllm_registered_model,
                                              maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser, VideoProcessorItems
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdate, PromptUpdateDetails)
from vllm.sequence import IntermediateTensors

from .configuration_videochat_flash import VideoChatFlashConfig
from .processing_videochat_flash import VideoChatFlashImageProcessor, VideoChatFlashVideoProcessor, grid_pinpoints
from .vision_tower.visual_tokens import build_projector, build_vision_tower, clip_tokens, tile_raster
from .vllm_videochat_flash import WEIGHT_PREFIXES, max_video_frames, padded_frame_count, video_prompt_text

logger = init_logger(__name__)

VIDEO_TOKEN, IMAGE_TOKEN = "<|video_pad|>", "<|image_pad|>"  # the placeholders of the package's chat template
TOKENS_PER_IMAGE_TILE = 64
TOWER_CLIPS_PER_CALL = 16  # clips per vision-tower call (the package's model: 16 on accelerators, at most 16 on CPU)


# ---------------------------------------------------------------------------------------------------- processing
class VideoChatFlashProcessingInfo(BaseProcessingInfo):
    """The model's settings for vLLM's multimodal processing: this package's image and video processors (built from
    the config, not its ProcessorMixin, whose call needs transformers >= 5.20) and the token counts."""

    def get_hf_config(self) -> VideoChatFlashConfig:
        return self.ctx.get_hf_config()

    @cached_property
    def video_processor(self) -> VideoChatFlashVideoProcessor:
        return VideoChatFlashVideoProcessor(size=self.get_hf_config().image_size)

    @cached_property
    def image_processor(self) -> VideoChatFlashImageProcessor:
        return VideoChatFlashImageProcessor.from_model_config(self.get_hf_config())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # One image per prompt: it is tiled; several would each be padded (a rule across items, which vLLM's
        # per-item processing cache cannot follow).
        return {"video": None, "image": 1}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # Frames are sampled by the video loader (--media-io-kwargs), pixels follow the checkpoint: nothing to route.
        return {"text_kwargs": set(), "images_kwargs": set(), "videos_kwargs": set()}

    def get_data_parser(self) -> MultiModalDataParser:
        # Videos come with their metadata: the time message needs their duration.
        return MultiModalDataParser(video_needs_metadata=True, expected_hidden_size=self._get_expected_hidden_size(),
                                    allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    @property
    def tokens_per_frame(self) -> int:
        return self.get_hf_config().tokens_per_frame

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        """Most frames one of `mm_counts["video"]` videos can have within `seq_len` tokens."""
        return max_video_frames(seq_len // max(mm_counts.get("video", 0), 1), self.tokens_per_frame)

    def largest_tiling(self) -> tuple[int, int]:
        """`(height, width)` in pixels of the largest tile grid an image may get (the config's pinpoints)."""
        side = self.get_hf_config().image_size
        return max(grid_pinpoints(self.image_processor.image_grid_pinpoints, side), key=lambda hw: hw[0] * hw[1])

    def max_image_tiles(self) -> int:
        side, (height, width) = self.get_hf_config().image_size, self.largest_tiling()
        return 1 + (height // side) * (width // side)  # the base image + the largest grid

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        frames = self.get_num_frames_with_most_features(seq_len, mm_counts)
        return {"video": self.tokens_per_frame * frames, "image": TOKENS_PER_IMAGE_TILE * self.max_image_tiles()}


class VideoChatFlashDummyInputsBuilder(BaseDummyInputsBuilder[VideoChatFlashProcessingInfo]):
    """Profiling inputs: the longest video that fits, and an image with the most tiles."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return VIDEO_TOKEN * mm_counts.get("video", 0) + IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        side = self.info.get_hf_config().image_size
        frames = self.info.get_num_frames_with_most_features(seq_len, mm_counts)
        videos = self._get_dummy_videos(width=side, height=side, num_frames=frames,
                                        num_videos=mm_counts.get("video", 0), overrides=mm_options.get("video"))
        height, width = self.info.largest_tiling()
        images = self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0),
                                        overrides=mm_options.get("image"))
        return {"video": [(video, _one_fps_metadata(len(video))) for video in videos], "image": images}


def _one_fps_metadata(num_frames: int) -> dict:
    return {"total_num_frames": num_frames, "fps": 1.0, "duration": float(num_frames),
            "frames_indices": list(range(num_frames)), "video_backend": "dummy", "do_sample_frames": False}


class VideoChatFlashMultiModalProcessor(BaseMultiModalProcessor[VideoChatFlashProcessingInfo]):
    """Pixels from this package's processors; each ``<|video_pad|>`` -> 16 tokens per frame + the time message, each
    ``<|image_pad|>`` -> 64 tokens per tile."""

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        grids = hf_inputs.get("image_grids", torch.empty(0, 2, dtype=torch.long))
        return {
            "pixel_values_videos": MultiModalFieldConfig.batched("video"),  # (T_i, 3, S, S) per video
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", 1 + grids.prod(-1)),  # tiles of each image
            "image_grids": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        outputs = {}
        if videos := hf_data.get("videos"):
            outputs["pixel_values_videos"] = [self._video_pixels(frames) for frames, _metadata in videos]
        if images := hf_data.get("images"):
            # each image its own sample: tiled (see get_supported_mm_limits)
            outputs.update(self.info.image_processor([[image] for image in images], return_tensors="pt"))
        return BatchFeature(outputs)

    def _video_pixels(self, frames) -> torch.Tensor:
        """`(T, 3, S, S)` pixels of decoded frames: every frame kept (the loader sampled them), whole clips."""
        processor = self.info.video_processor
        pixels = processor(frames, max_num_frames=padded_frame_count(len(frames)), return_tensors="pt")
        return pixels["pixel_values_videos"][0]

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config, tokenizer = self.info.get_hf_config(), self.info.get_tokenizer()

        def video_replacement(item_idx: int) -> PromptUpdateDetails:
            frames = out_mm_kwargs["video"][item_idx]["pixel_values_videos"].data.shape[0]
            metadata = mm_items.get_items("video", VideoProcessorItems).metadata[item_idx]
            text = video_prompt_text(frames, metadata, VIDEO_TOKEN, config.tokens_per_frame)
            return PromptUpdateDetails.select_token_id(tokenizer.encode(text, add_special_tokens=False),
                                                       config.video_token_id)

        def image_replacement(item_idx: int) -> list[int]:
            rows, cols = out_mm_kwargs["image"][item_idx]["image_grids"].data.tolist()
            return [config.image_token_id] * (TOKENS_PER_IMAGE_TILE * (1 + rows * cols))

        return [
            PromptReplacement(modality="video", target=[config.video_token_id], replacement=video_replacement),
            PromptReplacement(modality="image", target=[config.image_token_id], replacement=image_replacement),
        ]

    def _apply_prompt_updates(self, token_ids: list[int], mm_prompt_updates):
        # The time message is text that runs into the question: encoded on its own, its last space would stay a token
        # of its own where the package's processor, which encodes the expanded prompt in one pass, merges it with the
        # question's first word (" What"). So the prompt is expanded as text and encoded once, like there.
        new_token_ids, result = self._apply_prompt_updates_via_text(token_ids, mm_prompt_updates)
        matched = self._matched_updates_from_result(mm_prompt_updates, result)
        return new_token_ids, self._find_mm_placeholders(new_token_ids, _visual_tokens_only(matched))


def _visual_tokens_only(updates: Mapping[str, list[Sequence]]) -> dict[str, list[list]]:
    """The updates with their content cut to the placeholder tokens (where embeddings go), for locating them in a
    prompt encoded in one pass (the time message's tokens there can differ from those of its own encoding)."""
    def placeholders(update):
        full, is_embed = update.content.full, update.content.is_embed
        kept = full if is_embed is None else [t for t, keep in zip(full, is_embed(full).tolist()) if keep]
        return replace(update, content=PromptUpdateDetails.from_seq(kept))

    return {modality: [[placeholders(update) for update in item] for item in items]
            for modality, items in updates.items()}


# ---------------------------------------------------------------------------------------------------- model
@MULTIMODAL_REGISTRY.register_processor(VideoChatFlashMultiModalProcessor, info=VideoChatFlashProcessingInfo,
                                        dummy_inputs=VideoChatFlashDummyInputsBuilder)
class VideoChatFlashForVLLM(nn.Module, SupportsMultiModal, SupportsPP):
    """VideoChat-Flash for vLLM: the package's vision tower + ToMe projector, and vLLM's Qwen2ForCausalLM."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix=WEIGHT_PREFIXES)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("video"):
            return VIDEO_TOKEN
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError(f"VideoChat-Flash takes videos and images, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        if config.mm_llm_compress:
            logger.warning("VideoChat-Flash in vLLM runs without in-LLM visual token dropping (mm_llm_compress): "
                           "vLLM keeps every token in every layer")
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.vision_tower = build_vision_tower(config)
            self.mm_projector = build_projector(config)
        with self._mark_language_model(vllm_config):
            # Our flat config is a Qwen2Config: vLLM's Qwen2 reads its text fields (and any hf_overrides) directly.
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config, prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ---------------------------------------------------------------------------------------------- vision
    def encode_clips(self, clips: torch.Tensor) -> torch.Tensor:
        """`(n, clip_frames, 3, S, S)` pixels -> `(n, tokens, hidden)`: 4-frame clips 16 tokens per frame, 1-frame
        clips (image tiles) 64 tokens (the package model's ``encode_clips``)."""
        dtype = next(self.vision_tower.parameters()).dtype
        outputs = []
        for chunk in torch.split(clips.to(dtype), TOWER_CLIPS_PER_CALL):
            outputs.append(clip_tokens(self.mm_projector, self.vision_tower(chunk), chunk.shape[1]))
        return torch.cat(outputs)

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(T, 3, S, S)` -> `(16 * T, hidden)` in time order."""
        clips = pixels.reshape(-1, self.config.mm_local_num_frames, *pixels.shape[1:])
        tokens = self.encode_clips(clips)
        return tokens.reshape(-1, tokens.shape[-1])

    def encode_image(self, tiles: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """`(1 + rows * cols, 3, S, S)` tiles -> the base's 64 tokens, then the tiles' as one `(rows * 8, cols * 8)`
        raster (the package model's ``get_image_features``)."""
        rows, cols = (int(n) for n in grid)
        return tile_raster(self.encode_clips(tiles[:, None]), rows, cols)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        embeddings: list[torch.Tensor] = []
        for name, value in kwargs.items():  # in the order vLLM gives the modalities
            if name == "pixel_values_videos":
                embeddings += [self.encode_video(video) for video in value]
            elif name == "pixel_values":
                tiles = torch.cat(list(value)) if isinstance(value, (list, tuple)) else value
                grids = kwargs["image_grids"]
                grids = torch.stack(list(grids)) if isinstance(grids, (list, tuple)) else grids.reshape(-1, 2)
                per_image = torch.split(tiles, (1 + grids.prod(-1)).tolist())
                embeddings += [self.encode_image(t, grid) for t, grid in zip(per_image, grids)]
        return embeddings

    # ---------------------------------------------------------------------------------------------- LLM
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:  # a later pipeline stage
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
