"""Video -> visual tokens chunk by chunk: the frame count costs time, not memory.

``encode_video_streaming`` drives exactly the two steps every other path uses, one chunk of clips at a time:
the video processor's pixels (:meth:`VideoChatFlashVideoProcessor.iter_pixel_chunks`: sampling, decoding,
resizing, normalising) and the model's tokens (``get_video_features``: UMT tower + ToMe, 16 tokens per frame). Clips
never interact (attention and token merging stay inside a 4-frame clip), so the result is what the processor +
``get_video_features`` give for the whole video, while memory holds the tokens and one chunk of frames::

    features, metadata = encode_video_streaming(model, "long.mp4", max_num_frames=10_000, progress=True)
    output = model.generate(**inputs, mm_encoder_outputs=as_mm_encoder_outputs(features))
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .processing_videochat_flash import VideoChatFlashVideoProcessor
from .video_loading import VideoSegment

__all__ = ["as_mm_encoder_outputs", "encode_video_streaming"]


def _prefetch(iterable: Iterable, depth: int) -> Iterator:
    """The items of `iterable`, computed by a worker thread up to `depth` ahead (the next chunk is decoded while the
    model encodes this one). Errors re-raise here; leaving early stops the worker and closes the source."""
    if depth <= 0:
        yield from iterable
        return
    source, done = iter(iterable), object()
    pool = ThreadPoolExecutor(1, thread_name_prefix="videochat-flash-prefetch")
    ahead = deque(pool.submit(next, source, done) for _ in range(depth))
    try:
        while (item := ahead.popleft().result()) is not done:
            ahead.append(pool.submit(next, source, done))
            yield item
    finally:
        for future in ahead:
            future.cancel()
        pool.shutdown(wait=True)  # the source is closed only once no thread runs it
        getattr(source, "close", lambda: None)()


def encode_video_streaming(model, video, *, video_processor: VideoChatFlashVideoProcessor | None = None,
                           video_metadata=None, clips_per_chunk: int | None = None, prefetch: int = 1,
                           pixel_device="auto", progress: bool = False, start: float | None = None,
                           end: float | None = None, **processor_kwargs):
    """Visual tokens of one video, computed chunk by chunk in bounded memory.

    Args:
        model: a ``VideoChatFlashForCausalLM`` (or its ``VideoChatFlashModel``).
        video: what the video processor takes: a file (a GIF, a folder of frames), decoded frames (arrays, tensors,
            PIL images), a still image.
        video_processor: whose pixels to encode (default: one for the model's ``config.image_size``).
        video_metadata: of decoded frames (``fps``, ``duration``), as for the processor.
        clips_per_chunk: 4-frame clips decoded and encoded together (memory grows with it, not with the frame count).
            Default: the clips of one vision-tower call (``clips_per_tower_call``), so the tower starts once the first
            call's frames are decoded, and each later chunk is decoded while the tower encodes the one before.
        prefetch: chunks decoded ahead by a background thread while the model encodes (0: none).
        pixel_device: where frames are resized and normalised: "auto" (the tower's device when it is an
            accelerator: frames of a file go there as uint8, which leaves the CPU to decoding; else the CPU), None
            (the CPU), or a device (see ``iter_pixel_chunks``). The pixels are the same everywhere.
        progress: a tqdm bar over the frames, drawn only when stderr is a terminal (or in a notebook).
        start / end: a segment of a file or frame folder, in seconds (as ``load_video``).
        processor_kwargs: the video processor's options for this call (``max_num_frames``, ``num_frames``, ``fps``,
            ``video_backend``, ...).

    Returns:
        ``(features, metadata)``: ``(16 * T, hidden)`` tokens on the model's device and dtype, in time order, and the
        ``VideoLoadMetadata`` of the sampled frames.
    """
    base_model = getattr(model, "model", model)  # a VideoChatFlashForCausalLM or its VideoChatFlashModel
    if clips_per_chunk is None:
        clips_per_chunk = base_model.clips_per_tower_call
    if clips_per_chunk <= 0:
        raise ValueError(f"clips_per_chunk must be > 0, got {clips_per_chunk}")
    config = model.config
    if video_processor is None:
        video_processor = VideoChatFlashVideoProcessor(size=config.image_size)
    if start is not None or end is not None:
        video = VideoSegment(video, start, end)
    if pixel_device == "auto":
        pixel_device = _accelerator_of(base_model)
    metadata, chunks = video_processor.iter_pixel_chunks(
        video, clips_per_chunk * config.mm_local_num_frames, video_metadata, pixel_device=pixel_device,
        **processor_kwargs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=metadata.num_frames, desc="Encoding video", unit="frame", leave=False, disable=None)
    tokens, done = None, 0  # tokens: (16 * T, hidden), allocated once the first chunk tells width, dtype and device
    try:
        with torch.no_grad():
            for pixels in _prefetch(chunks, prefetch):
                features = model.get_video_features(torch.as_tensor(pixels)[None])[0]  # numpy, or on pixel_device
                if tokens is None:
                    per_frame = features.shape[0] // pixels.shape[0]
                    tokens = features.new_empty((per_frame * metadata.num_frames, features.shape[1]))
                tokens[done : done + features.shape[0]] = features
                done += features.shape[0]
                if bar is not None:
                    bar.update(pixels.shape[0])
    finally:
        if bar is not None:
            bar.close()
    if tokens is None or done != tokens.shape[0]:  # the decoder stopped early: never return unwritten rows
        raise RuntimeError(f"encoded {done // config.tokens_per_frame} of the {metadata.num_frames} sampled frames")
    return tokens, metadata


def _accelerator_of(model) -> torch.device | None:
    """The vision tower's device when it is an accelerator (pixels are best made there), else None (the CPU)."""
    device = model.vision_tower_device
    return device if device.type not in ("cpu", "meta") else None


def as_mm_encoder_outputs(*features: torch.Tensor, kind: str = "video") -> dict[str, BaseModelOutputWithPooling]:
    """``mm_encoder_outputs`` for ``forward`` / ``generate`` from per-video (or image) token tensors, in prompt order."""
    return {kind: BaseModelOutputWithPooling(pooler_output=tuple(features))}
