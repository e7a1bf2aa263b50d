"""Processor of VideoChat-Flash: video/image pixels, placeholder expansion and the chat prompt.

Two classes, both torchvision-free (only numpy, torch and Pillow):

* :class:`VideoChatFlashVideoProcessor` turns videos (file paths, decoded by our ``load_video``, or already
  decoded frames) and still images into normalised pixels: every frame is resized to exactly ``S x S``
  (aspect ratio not kept, no crop) with PIL bicubic on uint8, divided by 255 and normalised with the
  ImageNet mean/std. ``S`` is 224 or 448 depending on the checkpoint. This is bit-identical to the original
  ``UMTImageProcessor``.
* :class:`VideoChatFlashProcessor` pairs it with a Qwen2 tokenizer and the ``qwen_2`` chat template. Every video
  placeholder ``<|video_pad|>`` in the text becomes ``16 * T`` placeholder tokens (``T`` = frames of that video)
  followed by the original time message (``"\\nThe video lasts for 12.00 seconds, and 64 frames are uniformly
  sampled from it. "``); every image placeholder ``<|image_pad|>`` becomes 64 placeholder tokens and ``"\\n"``.
  The model splices the visual features in place of those tokens.

Typical use::

    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"},
                                             {"type": "text", "text": "What is moving in the video?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", max_num_frames=512)
    # inputs: input_ids, attention_mask, pixel_values_videos (1, T, 3, S, S), video_frame_counts (1,)

Batches of several prompts are padded on the LEFT by default (ready for ``generate``); pass
``padding_side="right"`` for training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging
from transformers.video_processing_utils import VideoProcessorMixin

try:  # Pillow does the resizing (the original used PIL bicubic); it is only needed when frames are resized.
    from PIL import Image as PILImage
except ImportError:  # pragma: no cover - exercised only where Pillow is missing
    PILImage = None

from .video_loading import load_video


logger = logging.get_logger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TIME_MESSAGE",
    "VideoChatFlashProcessor",
    "VideoChatFlashVideoProcessor",
    "build_byte_level_tokenizer",
    "load_video",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

# The sentence the original chat() puts between the video slot and the question.
TIME_MESSAGE = "\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled from it. "

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML as the original `qwen_2` conversation template renders it:
#   <|im_start|>system\n{system}<|im_end|>\n  (left out when the system prompt is empty)
#   <|im_start|>{role}\n{content}<|im_end|>\n  for every turn
#   <|im_start|>assistant\n                    with add_generation_prompt
# Content blocks are concatenated in order; a video block becomes <|video_pad|>, an image block <|image_pad|>
# (the processor expands them). A leading system message replaces the default system prompt.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + DEFAULT_SYSTEM_PROMPT + "') -%}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}"
    "{%- set ns.system = '' -%}"
    "{%- for block in messages[0]['content'] -%}"
    "{%- if block['type'] == 'text' -%}{%- set ns.system = ns.system + block['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if ns.system -%}{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'video' -%}{{- '<|video_pad|>' -}}"
    "{%- elif block['type'] == 'image' -%}{{- '<|image_pad|>' -}}"
    "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Keyword arguments of `load_video` that the processors pass through.
SAMPLING_KWARGS = ("max_num_frames", "num_frames", "fps")


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / Qwen2 byte-level alphabet: byte value -> printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def build_byte_level_tokenizer(chat_template: str | None = None):
    """A tiny, fully offline Qwen2-style tokenizer: one token per byte (id = byte value), no merges, plus
    ``<|endoftext|>`` (256, pad), ``<|im_start|>`` (257) and ``<|im_end|>`` (258, eos); no BOS, like Qwen2.

    It is a :class:`~transformers.Qwen2Tokenizer` (Qwen2's NFC normaliser and pre-tokenizer), so it saves and
    reloads with ``AutoTokenizer``. On NFC text its ids equal those of the golden ``byte_tokenizer.json`` (which has
    no normaliser). The processor appends its placeholder tokens to it (``<|video_pad|>`` 259, ``<|image_pad|>`` 260).
    """
    from transformers import Qwen2Tokenizer

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _meta_get(meta: Any, key: str) -> Any:
    if meta is None:
        return None
    if isinstance(meta, dict):
        return meta.get(key)
    return getattr(meta, key, None)


def time_message_from_metadata(metadata: Any, num_frames: int) -> str | None:
    """The original time message for a video of ``num_frames`` sampled frames, or ``None`` when the metadata does
    not tell the duration. Accepts our ``load_video`` metadata (uses its ``time_message``), a transformers
    ``VideoMetadata`` or a dict (``duration``, or ``total_num_frames``/``total_frames`` and ``fps``)."""
    if metadata is None:
        return None
    message = _meta_get(metadata, "time_message")
    indices = _meta_get(metadata, "frame_indices")
    if message and (indices is None or len(indices) == num_frames):
        return message
    duration = _meta_get(metadata, "duration")
    if duration is None:
        total = _meta_get(metadata, "total_num_frames") or _meta_get(metadata, "total_frames")
        fps = _meta_get(metadata, "fps")
        if total and fps:
            duration = total / fps
    if duration is None:
        return None
    return TIME_MESSAGE.format(duration=float(duration), num_frames=num_frames)


def _is_pil_image(obj: Any) -> bool:
    return PILImage is not None and isinstance(obj, PILImage.Image)


def _is_array(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, torch.Tensor))


def _is_frame(obj: Any) -> bool:
    return _is_pil_image(obj) or (_is_array(obj) and obj.ndim in (2, 3))


def _is_single_video(obj: Any) -> bool:
    if isinstance(obj, (str, os.PathLike)):
        return True
    if _is_array(obj):
        return obj.ndim == 4
    if isinstance(obj, (list, tuple)) and len(obj) > 0:
        return all(_is_frame(frame) for frame in obj)
    return False


def flatten_videos(videos: Any) -> list:
    """Flat list of videos from any nesting: a path, a (T,H,W,C)/(T,C,H,W) array or tensor, a list of frames
    (PIL images or (H,W,C) arrays), a 5-D batch, or (nested) lists of those (e.g. one list per conversation)."""
    if videos is None:
        return []
    if _is_single_video(videos):
        return [videos]
    if _is_array(videos) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, (list, tuple)):
        flat = []
        for item in videos:
            flat.extend(flatten_videos(item))
        return flat
    raise TypeError(
        f"Cannot interpret {type(videos).__name__} as a video: pass a file path, a (T,H,W,3) uint8 array/tensor, "
        "a list of frames (PIL images or (H,W,3) arrays), or a list of those"
    )


def flatten_images(images: Any) -> list:
    """Flat list of images from a PIL image, an (H,W,C)/(C,H,W) array, a 4-D batch, or (nested) lists."""
    if images is None:
        return []
    if _is_frame(images) or isinstance(images, (str, os.PathLike)):
        return [images]
    if _is_array(images) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item))
        return flat
    raise TypeError(f"Cannot interpret {type(images).__name__} as an image")


def _frame_to_uint8_hwc(frame: Any) -> np.ndarray:
    """One frame as a contiguous uint8 (H, W, 3) RGB array."""
    if _is_pil_image(frame):
        return np.asarray(frame.convert("RGB"))
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3:
        raise ValueError(f"A frame must be 2-D or 3-D, got shape {frame.shape}")
    if frame.shape[-1] not in (1, 3, 4) and frame.shape[0] in (1, 3, 4):
        frame = frame.transpose(1, 2, 0)  # channels first -> channels last
    if frame.dtype != np.uint8:
        if np.issubdtype(frame.dtype, np.floating) and frame.size and float(frame.max()) <= 1.0:
            frame = frame * 255.0  # float frames in [0, 1]
        frame = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    elif frame.shape[-1] == 4:
        frame = frame[..., :3]
    elif frame.shape[-1] != 3:
        raise ValueError(f"Frames must have 1, 3 or 4 channels, got shape {frame.shape}")
    return np.ascontiguousarray(frame)


def _video_to_frames(video: Any) -> list[np.ndarray]:
    """A decoded video as a list of uint8 (H, W, 3) frames."""
    if _is_array(video):
        if video.ndim != 4:
            raise ValueError(f"A decoded video must be 4-D (T,H,W,C) or (T,C,H,W), got shape {tuple(video.shape)}")
        return [_frame_to_uint8_hwc(frame) for frame in video]
    return [_frame_to_uint8_hwc(frame) for frame in video]


def _normalize_size(size: Any) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return {"height": int(size["height"]), "width": int(size["width"])}
        if "shortest_edge" in size:  # frames are always squashed to a square
            return {"height": int(size["shortest_edge"]), "width": int(size["shortest_edge"])}
    raise ValueError(f"Unsupported size {size!r}: use an int S (frames become S x S) or {{'height': S, 'width': S}}")


# ----------------------------------------------------------------------------------------------------------
# Video processor
# ----------------------------------------------------------------------------------------------------------


class VideoChatFlashVideoProcessor(VideoProcessorMixin):
    r"""
    Pixels for VideoChat-Flash, without torchvision: frames are resized to exactly ``size x size`` with PIL
    bicubic on uint8 (aspect ratio not kept, no crop), rescaled by 1/255 and normalised with the ImageNet mean/std.
    Video files are decoded and sampled by :func:`video_loading.load_video` (never torchcodec).

    Args:
        size (`int` or `dict`, defaults to 224): output side ``S`` (224 or 448 for the published checkpoints).
        max_num_frames (`int`, defaults to 512): cap of the original dynamic sampling (about 1 frame per second,
            at least 64 frames, a multiple of 4), passed to ``load_video``.
        num_frames (`int`, *optional*): sample exactly this many frames instead (``load_video``'s rules).
        fps (`float`, *optional*): sample at this rate instead.
        video_backend (`str`, *optional*): decoder handed to ``load_video`` (``None`` = its default).
        local_num_frames (`int`, defaults to 4): frames per clip; already-decoded videos whose length is not a
            multiple of it are padded by repeating their last frame (as the original sampler does).
        resample, do_resize, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb:
            the usual image-processor switches; defaults reproduce the original.

    Returns of `__call__` / `preprocess(videos=None, images=None, return_tensors=None, ...)`: a `BatchFeature` with
    ``pixel_values_videos`` (float32; ``(num_videos, T, 3, S, S)`` when every video has the same ``T``, else the
    frames of all videos concatenated ``(sum T, 3, S, S)``; a list of per-video arrays when ``return_tensors`` is
    ``None``), ``video_frame_counts`` (``(num_videos,)``), ``pixel_values`` ``(num_images, 3, S, S)`` for images,
    and ``video_metadata`` when ``return_metadata=True``.
    """

    model_input_names = ["pixel_values_videos", "video_frame_counts", "pixel_values"]
    _auto_class = "AutoVideoProcessor"

    def __init__(
        self,
        size: int | dict[str, int] = 224,
        max_num_frames: int = 512,
        num_frames: int | None = None,
        fps: float | None = None,
        video_backend: str | None = None,
        local_num_frames: int = 4,
        resample: int = PIL_BICUBIC,
        do_resize: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        do_convert_rgb: bool = True,
        **kwargs,
    ) -> None:
        kwargs.pop("video_processor_type", None)
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.size = _normalize_size(size)
        self.max_num_frames = max_num_frames
        self.num_frames = num_frames
        self.fps = fps
        self.video_backend = video_backend
        self.local_num_frames = local_num_frames
        self.resample = int(resample)
        self.do_resize = do_resize
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.do_convert_rgb = do_convert_rgb

    # ---- options -------------------------------------------------------------------------------------------

    _OPTION_NAMES = (
        "size",
        "max_num_frames",
        "num_frames",
        "fps",
        "video_backend",
        "local_num_frames",
        "resample",
        "do_resize",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )
    # Standard transformers video kwargs that have no meaning here (sampling is always on for files).
    _IGNORED_KWARGS = ("do_sample_frames", "device", "input_data_format", "data_format", "default_to_square")

    def _options(self, **overrides) -> dict[str, Any]:
        options = {name: getattr(self, name) for name in self._OPTION_NAMES}
        for key, value in overrides.items():
            if key in self._IGNORED_KWARGS:
                continue
            if key not in options:
                raise TypeError(f"{type(self).__name__} got an unexpected keyword argument {key!r}")
            if value is not None or key in ("num_frames", "fps"):
                options[key] = value
        options["size"] = _normalize_size(options["size"])
        return options

    # ---- decoding --------------------------------------------------------------------------------------------

    def fetch_videos(self, video_url_or_urls, sample_indices_fn=None, **load_kwargs):
        """Decode and sample file paths (or URLs ``load_video`` accepts) with our ``load_video``, never torchcodec.
        A single path gives ``(frames, metadata)``; a list gives ``(list_of_frames, list_of_metadata)``."""
        if sample_indices_fn is not None:
            logger.warning_once("sample_indices_fn is ignored: load_video samples frames with the original rules")
        if isinstance(video_url_or_urls, (list, tuple)):
            pairs = [self.fetch_videos(item, **load_kwargs) for item in video_url_or_urls]
            return [frames for frames, _ in pairs], [meta for _, meta in pairs]
        options = self._options(**load_kwargs)
        size = None  # frames resized while decoding (PIL bicubic, as here) keep memory low on long videos
        if options["do_resize"] and options["resample"] == PIL_BICUBIC:
            height, width = options["size"]["height"], options["size"]["width"]
            size = height if height == width else (height, width)
        return load_video(
            video_url_or_urls,
            max_num_frames=options["max_num_frames"],
            num_frames=options["num_frames"],
            fps=options["fps"],
            size=size,
            backend=options["video_backend"],
        )

    def _decode_and_sample_videos(
        self, videos, video_metadata=None, do_sample_frames=None, sample_indices_fn=None, **load_kwargs
    ):
        """Flat list of decoded videos (lists of uint8 (H,W,3) frames) and their metadata. Paths go through
        ``fetch_videos``; already-decoded videos are used as given (with the metadata passed in, if any)."""
        videos = flatten_videos(videos)
        if video_metadata is None:
            video_metadata = [None] * len(videos)
        elif isinstance(video_metadata, (list, tuple)):
            flat = []
            for item in video_metadata:  # one list per conversation, like the videos
                flat.extend(item if isinstance(item, (list, tuple)) else [item])
            video_metadata = flat
        else:
            video_metadata = [video_metadata]
        if len(video_metadata) != len(videos):
            raise ValueError(f"Got {len(video_metadata)} video_metadata entries for {len(videos)} videos")
        decoded, metadata = [], []
        for video, meta in zip(videos, video_metadata):
            if isinstance(video, (str, os.PathLike)):
                frames, loaded_meta = self.fetch_videos(os.fspath(video), sample_indices_fn, **load_kwargs)
                decoded.append(frames)
                metadata.append(meta if meta is not None else loaded_meta)
            else:
                decoded.append(video)
                metadata.append(meta)
        return decoded, metadata

    def sample_frames(self, *args, **kwargs):
        raise NotImplementedError(
            "VideoChat-Flash samples frames while decoding (load_video with max_num_frames / num_frames / fps); "
            "already-decoded frames are used as given"
        )

    def _prepare_input_videos(self, videos, do_convert_rgb=True, input_data_format=None, device=None):
        """Decoded videos -> lists of uint8 (H, W, 3) RGB frames."""
        prepared = []
        for video in videos:
            frames = _video_to_frames(video)
            if not frames:
                raise ValueError("Got a video with no frames")
            prepared.append(frames)
        return prepared

    # ---- pixels ---------------------------------------------------------------------------------------------

    def _frames_to_pixels(self, frames: list[np.ndarray], options: dict[str, Any]) -> np.ndarray:
        """uint8 (H,W,3) frames -> float32 (T, 3, H', W'), filled frame by frame (bounded temporary memory)."""
        height, width = options["size"]["height"], options["size"]["width"]
        mean = np.asarray(options["image_mean"], dtype=np.float32)
        std = np.asarray(options["image_std"], dtype=np.float32)
        output = None
        for index, frame in enumerate(frames):
            if options["do_resize"] and (frame.shape[0] != height or frame.shape[1] != width):
                if PILImage is None:
                    raise ImportError("Resizing frames needs Pillow: pip install Pillow")
                frame = np.asarray(PILImage.fromarray(frame).resize((width, height), options["resample"]))
            if output is None:
                output = np.empty((len(frames), 3, frame.shape[0], frame.shape[1]), dtype=np.float32)
            elif frame.shape[:2] != output.shape[2:]:
                raise ValueError("Frames of one video have different sizes; enable do_resize")
            if options["do_rescale"]:
                # float64 product then float32, as transformers' rescale() in the original pipeline
                pixels = (frame.astype(np.float64) * options["rescale_factor"]).astype(np.float32)
            else:
                pixels = frame.astype(np.float32)
            if options["do_normalize"]:
                pixels = (pixels - mean) / std
            output[index] = pixels.transpose(2, 0, 1)
        return output

    def _pad_to_clip_multiple(self, pixels: np.ndarray, multiple: int | None) -> np.ndarray:
        if not multiple or pixels.shape[0] % multiple == 0:
            return pixels
        missing = multiple - pixels.shape[0] % multiple
        return np.concatenate([pixels, np.repeat(pixels[-1:], missing, axis=0)], axis=0)

    def videos_to_arrays(self, videos, video_metadata=None, **kwargs) -> tuple[list[np.ndarray], list[Any]]:
        """Per-video float32 ``(T, 3, S, S)`` arrays and per-video metadata (``None`` when unknown)."""
        options = self._options(**kwargs)
        load_kwargs = {key: options[key] for key in self._OPTION_NAMES}
        decoded, metadata = self._decode_and_sample_videos(videos, video_metadata=video_metadata, **load_kwargs)
        frames_per_video = self._prepare_input_videos(decoded, do_convert_rgb=options["do_convert_rgb"])
        arrays = [
            self._pad_to_clip_multiple(self._frames_to_pixels(frames, options), options["local_num_frames"])
            for frames in frames_per_video
        ]
        return arrays, metadata

    def images_to_arrays(self, images, **kwargs) -> list[np.ndarray]:
        """Per-image float32 ``(3, S, S)`` arrays (an image is processed as a single frame)."""
        options = self._options(**kwargs)
        arrays = []
        for image in flatten_images(images):
            if isinstance(image, (str, os.PathLike)):
                if PILImage is None:
                    raise ImportError("Reading image files needs Pillow: pip install Pillow")
                with PILImage.open(image) as opened:
                    image = opened.convert("RGB")
            arrays.append(self._frames_to_pixels([_frame_to_uint8_hwc(image)], options)[0])
        return arrays

    @staticmethod
    def pack_videos(arrays: list[np.ndarray], return_tensors=None):
        """``(N, T, 3, S, S)`` if all videos have the same T, else ``(sum T, 3, S, S)``; a list without tensors."""
        if return_tensors is None:
            return list(arrays)
        if len(arrays) == 1:
            packed = arrays[0][None]  # a view: no copy of a long video
        elif all(array.shape == arrays[0].shape for array in arrays):
            packed = np.stack(arrays)
        else:
            packed = np.concatenate(arrays, axis=0)
        return torch.from_numpy(packed) if return_tensors == "pt" else packed

    def _preprocess(self, videos=None, images=None, video_metadata=None, return_tensors=None, **kwargs):
        data = {}
        metadata = []
        if videos is not None:
            arrays, metadata = self.videos_to_arrays(videos, video_metadata=video_metadata, **kwargs)
            data["pixel_values_videos"] = self.pack_videos(arrays, return_tensors)
            data["video_frame_counts"] = [array.shape[0] for array in arrays]
        if images is not None:
            image_arrays = self.images_to_arrays(images, **kwargs)
            data["pixel_values"] = np.stack(image_arrays) if return_tensors is not None else image_arrays
        return BatchFeature(data, tensor_type=return_tensors), metadata

    def preprocess(
        self,
        videos=None,
        images=None,
        return_tensors=None,
        return_metadata: bool = False,
        video_metadata=None,
        **kwargs,
    ) -> BatchFeature:
        """Process ``videos`` (paths or decoded frames; see :func:`flatten_videos`) and/or ``images``.
        Keyword overrides: any constructor option (``size``, ``max_num_frames``, ``num_frames``, ``fps``, ...)."""
        if videos is None and images is None:
            raise ValueError("Pass videos and/or images")
        features, metadata = self._preprocess(
            videos=videos, images=images, video_metadata=video_metadata, return_tensors=return_tensors, **kwargs
        )
        if return_metadata and videos is not None:
            features["video_metadata"] = metadata
        return features

    def __call__(self, videos=None, images=None, **kwargs) -> BatchFeature:
        return self.preprocess(videos=videos, images=images, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in ("_processor_class", "_valid_kwargs_names"):
            output.pop(key, None)
        return output


# ----------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------


def _ensure_special_token(tokenizer, token: str) -> int:
    """Id of ``token``; appended to the tokenizer as a special token when it is missing (the model's embedding
    matrix is never touched: the published ones have spare rows)."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    encoded = tokenizer.encode(token, add_special_tokens=False)
    if encoded != [token_id]:
        raise ValueError(f"{token!r} must tokenize to the single id {token_id}, got {encoded}")
    return token_id


class VideoChatFlashProcessor(ProcessorMixin):
    r"""
    VideoChat-Flash processor: :class:`VideoChatFlashVideoProcessor` + a Qwen2 tokenizer + the ``qwen_2`` chat
    template.

    Args:
        video_processor (`VideoChatFlashVideoProcessor`, *optional*): built with defaults (224 px) when omitted.
        tokenizer (Qwen2 tokenizer): the placeholder tokens are appended to it when missing.
        chat_template (`str`, *optional*): defaults to :data:`CHAT_TEMPLATE`.
        video_token (`str`, defaults to ``"<|video_pad|>"``) / image_token (``"<|image_pad|>"``): placeholders.
        tokens_per_frame (`int`, defaults to 16): visual tokens per video frame (64 per 4-frame clip).
        num_image_tokens (`int`, defaults to 64): visual tokens per image.
        padding_side (`str`, defaults to ``"left"``): side used to pad batches of prompts (left = ready for
            ``generate``); a call's ``padding_side=`` overrides it.

    ``processor(images=None, text=None, videos=None, return_tensors=None, padding=True, padding_side=None,
    video_metadata=None, max_num_frames=None, num_frames=None, fps=None, **tokenizer_kwargs)`` returns a
    ``BatchFeature`` with ``input_ids``, ``attention_mask`` and, when given, ``pixel_values_videos``,
    ``video_frame_counts`` and ``pixel_values`` (see :class:`VideoChatFlashVideoProcessor`). Each ``video_token`` in
    ``text`` becomes ``tokens_per_frame * T`` tokens followed by the time message (known for files; for decoded
    frames only when ``video_metadata`` gives the duration or ``total_num_frames`` and ``fps``); each
    ``image_token`` becomes ``num_image_tokens`` tokens followed by ``"\n"``.
    """

    _auto_class = "AutoProcessor"

    def __init__(
        self,
        video_processor=None,
        tokenizer=None,
        chat_template=None,
        video_token: str = "<|video_pad|>",
        image_token: str = "<|image_pad|>",
        tokens_per_frame: int = 16,
        num_image_tokens: int = 64,
        padding_side: str = "left",
    ):
        if tokenizer is None:
            raise ValueError("VideoChatFlashProcessor needs a tokenizer")
        if video_processor is None:
            video_processor = VideoChatFlashVideoProcessor()
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.video_token = video_token
        self.image_token = image_token
        self.tokens_per_frame = tokens_per_frame
        self.num_image_tokens = num_image_tokens
        self.padding_side = padding_side
        super().__init__(video_processor, tokenizer, chat_template=chat_template)
        # Video first, then image: with Qwen2's 151646 tokens they get 151646 and 151647.
        self.video_token_id = _ensure_special_token(tokenizer, video_token)
        self.image_token_id = _ensure_special_token(tokenizer, image_token)

    def check_argument_for_proper_class(self, argument_name, argument):
        # The stock check looks the base class up by name in the top-level transformers namespace, which only
        # exports it when torchvision is importable. Check against the mixin itself (never against our own class:
        # a Hub folder may import this file twice, as two distinct classes).
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Build the video processor from our own (sibling) class instead of AutoVideoProcessor, whose native
        # branch needs torchvision; the tokenizer loads as usual through AutoTokenizer.
        subfolder = kwargs.pop("subfolder", "")
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        video_processor_dict = (processor_dict or {}).get("video_processor")
        if isinstance(video_processor_dict, dict):
            video_processor = VideoChatFlashVideoProcessor.from_dict(video_processor_dict)
        else:
            video_processor = VideoChatFlashVideoProcessor.from_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, **kwargs
            )
        return [video_processor, tokenizer]

    # ---- placeholder expansion ----------------------------------------------------------------------------

    def video_replacement(self, num_frames: int, metadata: Any = None) -> str:
        """Text that replaces one video placeholder: ``tokens_per_frame * num_frames`` tokens + time message."""
        message = time_message_from_metadata(metadata, num_frames)
        if message is None:
            logger.warning_once(
                "No duration known for a decoded video: the time message is left out of the prompt. Pass "
                "video_metadata={'duration': seconds} (or load the video from a file) to keep the original prompt."
            )
            message = ""
        return self.video_token * (self.tokens_per_frame * num_frames) + message

    def image_replacement(self) -> str:
        return self.image_token * self.num_image_tokens + "\n"

    @staticmethod
    def _pop_nested(kwargs: dict, name: str) -> dict:
        nested = kwargs.pop(name, None) or {}
        return dict(nested)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        if audio is not None:
            raise ValueError("VideoChat-Flash takes no audio")
        # transformers-style nested kwargs are flattened; ours win over theirs.
        common = self._pop_nested(kwargs, "common_kwargs")
        video_kwargs = {
            **common,
            **self._pop_nested(kwargs, "videos_kwargs"),
            **self._pop_nested(kwargs, "images_kwargs"),
        }
        text_kwargs = {**common, **self._pop_nested(kwargs, "text_kwargs")}
        kwargs = {**video_kwargs, **text_kwargs, **kwargs}

        return_tensors = kwargs.pop("return_tensors", None)
        padding = kwargs.pop("padding", True)
        padding_side = kwargs.pop("padding_side", None) or self.padding_side
        video_metadata = kwargs.pop("video_metadata", None)
        return_metadata = kwargs.pop("return_metadata", False)
        return_offsets = kwargs.pop("return_text_replacement_offsets", False)
        if kwargs.pop("sanitize_control_tokens", False):
            raise ValueError("sanitize_control_tokens is not supported by VideoChatFlashProcessor")
        kwargs.pop("return_mm_token_type_ids", None)
        processor_option_names = set(VideoChatFlashVideoProcessor._OPTION_NAMES) | set(
            VideoChatFlashVideoProcessor._IGNORED_KWARGS
        )
        pixel_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in processor_option_names}
        tokenizer_kwargs = kwargs

        data: dict[str, Any] = {}
        video_replacements, image_replacements = [], []
        metadata = []
        if videos is not None:
            arrays, metadata = self.video_processor.videos_to_arrays(
                videos, video_metadata=video_metadata, **pixel_kwargs
            )
            data["pixel_values_videos"] = self.video_processor.pack_videos(arrays, return_tensors)
            data["video_frame_counts"] = [array.shape[0] for array in arrays]
            video_replacements = [
                self.video_replacement(array.shape[0], meta) for array, meta in zip(arrays, metadata)
            ]
        if images is not None:
            image_arrays = self.video_processor.images_to_arrays(images, **pixel_kwargs)
            data["pixel_values"] = np.stack(image_arrays) if return_tensors is not None else image_arrays
            image_replacements = [self.image_replacement() for _ in image_arrays]

        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(sample, str) for sample in texts):
                raise ValueError("`text` must be a string or a list of strings")
            self._check_placeholder_counts(texts, len(video_replacements), len(image_replacements))
            texts, offsets = self.get_text_with_replacements(texts, image_replacements, video_replacements)
            text_inputs = self.tokenizer(
                texts,
                padding=padding,
                padding_side=padding_side,
                return_tensors=return_tensors,
                **tokenizer_kwargs,
            )
            self._check_placeholder_ids(texts, text_inputs["input_ids"])
            data = {**dict(text_inputs), **data}
            if return_offsets:
                data["text_replacement_offsets"] = offsets
        elif tokenizer_kwargs:
            logger.warning_once(f"Ignoring {sorted(tokenizer_kwargs)}: no text was given")

        if return_metadata and videos is not None:
            data["video_metadata"] = metadata
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _check_placeholder_counts(self, texts: list[str], num_videos: int, num_images: int) -> None:
        for token, count, kind in ((self.video_token, num_videos, "videos"), (self.image_token, num_images, "images")):
            in_text = sum(sample.count(token) for sample in texts)
            if in_text != count:
                raise ValueError(
                    f"The text has {in_text} {token} placeholder(s) but {count} {kind} were given: put one {token} "
                    f"where each of the {kind} goes (apply_chat_template does it for you)"
                )

    def _check_placeholder_ids(self, texts: list[str], input_ids) -> None:
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        for token, token_id in ((self.video_token, self.video_token_id), (self.image_token, self.image_token_id)):
            expected = [sample.count(token) for sample in texts]
            found = [list(row).count(token_id) for row in rows]
            if expected != found:
                raise ValueError(
                    f"{token} count changed by tokenization (text {expected}, ids {found}): truncation cut into the "
                    "visual tokens; raise max_length or disable truncation"
                )

    # ---- chat ---------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' multimodal ``apply_chat_template``; video blocks (``{"type": "video", "path"|"url"|"video":
        ...}``) are loaded with ``load_video``. Sampling (``max_num_frames``, ``num_frames``, ``fps``,
        ``video_backend``) and ``padding``/``padding_side``/``video_metadata`` may be passed directly as keyword
        arguments."""
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        for key in (*SAMPLING_KWARGS, "video_backend", "size", "padding", "padding_side", "video_metadata"):
            if key in kwargs:
                processor_kwargs[key] = kwargs.pop(key)
        return super().apply_chat_template(conversation, chat_template, processor_kwargs=processor_kwargs, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values_videos", "video_frame_counts", "pixel_values"]


__all__ += ["flatten_images", "flatten_videos", "time_message_from_metadata"]
