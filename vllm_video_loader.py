"""The video loader of ``video_url`` requests to VideoChat-Flash in vLLM: the package's decoding and the original
frame sampling (about 1 frame per second, 64..512 frames, a multiple of 8), registered in vLLM's
``VIDEO_LOADER_REGISTRY`` for this package's video processor (imported by the plugin's ``register``).

Options come from ``--media-io-kwargs '{"video": {...}}'`` (or a request's ``media_io_kwargs``): the frame sampling
of :class:`~frame_sampling.FrameSampling` but ``num_frames`` (``max_num_frames``, ``min_num_frames``,
``frames_multiple``, ``fps``) and ``size`` (frames resized while decoded, e.g. to the tower's side: less memory
between vLLM's processes, the same pixels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoLoader

from .vllm_videochat_flash import VIDEO_LOADER, VIDEO_PROCESSOR, video_input

LOADER_OPTIONS = ("max_num_frames", "min_num_frames", "frames_multiple", "fps", "size")


@VIDEO_LOADER_REGISTRY.register(VIDEO_LOADER, video_processor=VIDEO_PROCESSOR)
class VideoChatFlashVideoLoader(VideoLoader):
    """Bytes of a video (or an animated GIF) -> the frames the original ``chat()`` samples and their metadata."""

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = -1, **kwargs) -> tuple[np.ndarray, dict[str, Any]]:
        # vLLM's `num_frames` (32 unless set) is its generic default, not this model's sampling: it is not used.
        options = {name: kwargs[name] for name in LOADER_OPTIONS if kwargs.get(name) is not None}
        return video_input(data, **options)  # (bytes become a local copy, a GIF by its content, as for load_video)
