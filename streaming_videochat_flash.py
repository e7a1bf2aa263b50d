"""Streaming visual encoding for VideoChat-Flash: frame count costs time, not memory.

The original reads every sampled frame into one array and preprocesses it into one float tensor before the vision
tower sees it (10,000 frames at 448 px: about 24 GB). Here a video goes through decode -> preprocess -> encode ->
merge one chunk of clips at a time, and only the merged tokens (16 per frame) are kept::

    features, metadata = encode_video_streaming(model, "long.mp4", max_num_frames=10_000, progress=True)
    # features: (16 * T, hidden) on the model's device and dtype; metadata: video_loading.VideoLoadMetadata
    output = model.generate(**inputs, mm_encoder_outputs=as_mm_encoder_outputs(features))

* Frames: :func:`video_loading.iter_video_chunks` samples the index list once (same rule, same frames as
  ``load_video``) and decodes each chunk's frames only, resized as they are decoded.
* Pixels: each chunk goes through :meth:`VideoChatFlashVideoProcessor.videos_to_arrays`, the processor's own code
  path (PIL bicubic, 1/255, ImageNet mean/std; a last partial clip is padded with the last frame, as there).
* Tokens: ``model.model.encode_clips`` (UMT tower + ToMe projector) on the chunk's clips, written into one
  preallocated ``(clips, 64, hidden)`` buffer.

Every clip is encoded on its own (attention and token merging never cross clips), so the result equals encoding
the whole video at once (``get_video_features`` on the processor's pixels) up to float rounding of batched matmuls.
Peak memory is the model, the tokens, and ``clips_per_chunk`` clips of frames / pixels / tower activations (plus one
decoded chunk ahead with ``prefetch``); it does not grow with the frame count beyond the 16 tokens per frame.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .processing_videochat_flash import PIL_BICUBIC, VideoChatFlashVideoProcessor
from .video_loading import iter_video_chunks

__all__ = ["DEFAULT_CLIPS_PER_CHUNK", "as_mm_encoder_outputs", "encode_video_streaming", "iter_pixel_chunks"]

DEFAULT_CLIPS_PER_CHUNK = 8


def _vision_model(model):
    """The module holding ``encode_clips``: a VideoChatFlashForCausalLM's ``.model`` or a VideoChatFlashModel."""
    if hasattr(model, "encode_clips"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "encode_clips"):
        return inner
    raise TypeError(f"expected a VideoChat-Flash model (with .model.encode_clips), got {type(model).__name__}")


def _load_size(options: dict[str, Any]):
    """The size load_video resizes to while decoding: what the processor's own ``fetch_videos`` asks for."""
    if options["do_resize"] and options["resample"] == PIL_BICUBIC:
        height, width = options["size"]["height"], options["size"]["width"]
        return height if height == width else (height, width)
    return None  # frames keep their size; the processor resizes them with its own resample


def _prefetch(iterable: Iterable, depth: int) -> Iterator:
    """Items of `iterable` computed by a background thread, at most `depth` ahead of the consumer. Exceptions are
    re-raised in the consumer; leaving early stops the producer (after the item it is computing) and closes the
    source."""
    if depth <= 0:
        yield from iterable
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        source = iter(iterable)
        try:
            for item in source:
                if not offer((True, item)):
                    return
            offer((True, done))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
            offer((False, e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="videochat-flash-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        worker.join()


def iter_pixel_chunks(
    video,
    video_processor: VideoChatFlashVideoProcessor,
    *,
    chunk_frames: int,
    max_num_frames: int = 512,
    num_frames: int | None = None,
    fps: float | None = None,
    backend: str | None = None,
    video_fps: float | None = None,
    num_threads: int | None = None,
):
    """``(metadata, iterator of float32 (n, 3, S, S) numpy pixel chunks)``: the processor's pixels of the video, in
    time order, ``chunk_frames`` frames at a time (their concatenation is ``video_processor.videos_to_arrays``'s
    output for the file). Sampling arguments left at None fall back to the processor's settings."""
    options = video_processor._options()
    if num_frames is None and fps is None:
        num_frames, fps = options["num_frames"], options["fps"]
    metadata, frames = iter_video_chunks(
        video,
        chunk_frames=chunk_frames,
        max_num_frames=max_num_frames,
        num_frames=num_frames,
        fps=fps,
        size=_load_size(options),
        backend=backend if backend is not None else options["video_backend"],
        video_fps=video_fps,
        num_threads=num_threads,
    )

    def pixels():
        for chunk in frames:
            # decoded frames are used as given by the processor: the same code path as a whole video
            arrays, _ = video_processor.videos_to_arrays([chunk])
            yield arrays[0]

    return metadata, pixels()


def encode_video_streaming(
    model,
    video,
    *,
    video_processor: VideoChatFlashVideoProcessor | None = None,
    size: int | dict[str, int] | None = None,
    max_num_frames: int = 512,
    num_frames: int | None = None,
    fps: float | None = None,
    clips_per_chunk: int = DEFAULT_CLIPS_PER_CHUNK,
    backend: str | None = None,
    video_fps: float | None = None,
    num_threads: int | None = None,
    prefetch: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, Any]:
    """Visual tokens of one video, computed chunk by chunk in bounded memory.

    Args:
        model: a VideoChatFlashForCausalLM (or its VideoChatFlashModel).
        video: what ``load_video`` accepts: a video file, a still image, decoded frames.
        video_processor: the processor whose pixels to reproduce (default: one of ``size``, else the model's
            ``config.image_size``). Give this or ``size``, not both.
        max_num_frames, num_frames, fps: the sampling of ``load_video`` (about 1 frame/s, at least 64 frames, at most
            ``max_num_frames``, e.g. 10,000; or exactly ``num_frames``; or ``fps`` frames/s). When ``num_frames`` and
            ``fps`` are both None the processor's settings apply.
        clips_per_chunk: 4-frame clips decoded, normalised and encoded together (memory grows with it, not with the
            frame count); the vision tower further splits a chunk by ``model.model.clips_per_tower_call``.
        backend, video_fps, num_threads: passed to ``iter_video_chunks`` (decoder, rate of decoded frames, threads).
        prefetch: chunks decoded and normalised ahead by a background thread while the model encodes (0: none).
        progress: show tqdm bars over the frames decoded and the clips encoded.

    Returns:
        ``(features, metadata)``: ``(16 * T, hidden)`` tokens on the model's device and dtype, in time order (what
        ``get_video_features`` returns for the processor's pixels), and the ``VideoLoadMetadata`` of the sampling.
    """
    base = _vision_model(model)
    clip = int(base.config.mm_local_num_frames)
    clips_per_chunk = int(clips_per_chunk)
    if clips_per_chunk <= 0:
        raise ValueError(f"clips_per_chunk must be > 0, got {clips_per_chunk}")
    if video_processor is None:
        image_size = size if size is not None else getattr(base.config, "image_size", None)
        if image_size is None:
            raise ValueError("pass size= or video_processor= (the model config has no image_size)")
        video_processor = VideoChatFlashVideoProcessor(size=image_size, local_num_frames=clip)
    elif size is not None:
        raise ValueError("pass video_processor= or size=, not both")

    metadata, chunks = iter_pixel_chunks(
        video,
        video_processor,
        chunk_frames=clips_per_chunk * clip,
        max_num_frames=max_num_frames,
        num_frames=num_frames,
        fps=fps,
        backend=backend,
        video_fps=video_fps,
        num_threads=num_threads,
    )
    total_frames = len(metadata.frame_indices)
    total_clips = -(-total_frames // clip)

    decode_bar = encode_bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            tqdm = None
        if tqdm is not None:
            decode_bar = tqdm(total=total_frames, desc="Decoding frames", unit="frame", leave=False, position=0)
            encode_bar = tqdm(total=total_clips, desc="Encoding clips", unit="clip", leave=False, position=1)

    tokens = None  # (clips, tokens per clip, hidden), allocated once the first chunk tells the shape
    done = 0
    try:
        with torch.no_grad():
            for pixels in _prefetch(chunks, prefetch):
                if decode_bar is not None:  # decoded, resized and normalised
                    decode_bar.update(min(pixels.shape[0], total_frames - decode_bar.n))
                clips = torch.from_numpy(pixels).reshape(-1, clip, *pixels.shape[1:])
                encoded = base.encode_clips(clips)
                del clips, pixels
                if tokens is None:
                    tokens = torch.empty(
                        (total_clips, *encoded.shape[1:]), dtype=encoded.dtype, device=encoded.device
                    )
                if done + encoded.shape[0] > total_clips:
                    raise RuntimeError(f"got more clips than the {total_clips} sampled")  # pragma: no cover
                tokens[done : done + encoded.shape[0]] = encoded
                done += encoded.shape[0]
                if encode_bar is not None:
                    encode_bar.update(encoded.shape[0])
    finally:
        for bar in (encode_bar, decode_bar):
            if bar is not None:
                bar.close()
    if tokens is None or done != total_clips:
        raise RuntimeError(f"encoded {done} of {total_clips} clips")  # pragma: no cover - iterator ended early
    return tokens.reshape(-1, tokens.shape[-1]), metadata


def as_mm_encoder_outputs(*features: torch.Tensor) -> dict[str, BaseModelOutputWithPooling]:
    """``mm_encoder_outputs`` for ``forward`` / ``generate`` from per-video token tensors (in prompt order)."""
    return {"video": BaseModelOutputWithPooling(pooler_output=tuple(features))}
