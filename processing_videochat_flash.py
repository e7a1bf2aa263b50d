"""Pixels and prompts of VideoChat-Flash, on transformers' processor machinery (torchvision-free).

The video processor turns a video (a file, or decoded frames: :mod:`video_loading`, :mod:`frame_sampling`) into
pixels, each frame squashed to S x S with PIL bicubic, x 1/255, ImageNet mean/std (the original ``UMTImageProcessor``,
bit for bit); ``iter_pixel_chunks`` gives them chunk by chunk, ``preprocess`` at once. The image processor uses the
same pixel function. The processor adds a Qwen2 tokenizer and the ``qwen_2`` chat template and only fills
ProcessorMixin's hooks: a ``<|video_pad|>`` becomes 16 tokens per frame + the time message, an ``<|image_pad|>`` 64
tokens per tile of the image. Batches are padded on the left (ready for ``generate``) unless ``padding_side="right"``.
"""


import ast
import dataclasses
import functools
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import Qwen2Config
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor, select_best_resolution
from transformers.image_utils import make_flat_list_of_images, make_nested_list_of_images
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, VideosKwargs
from transformers.utils import logging
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import make_batched_videos

from .configuration_videochat_flash import MEDIA_MARKER
from .frame_sampling import FrameSampling, time_message
from .video_loading import (VideoSegment, iter_video_chunks, load_video, local_media, parse_size, resize_frame,
                            rgb_frame)

logger = logging.get_logger(__name__)

__all__ = ["CHAT_TEMPLATE", "VideoChatFlashImageProcessor", "VideoChatFlashProcessor", "VideoChatFlashVideoProcessor",
           "load_video", "media_blocks"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML as the original `qwen_2` conversation template renders it: a system turn (the default unless a leading
# system message replaces it; left out when empty), then `<|im_start|>{role}\n{content}<|im_end|>\n` per turn and
# `<|im_start|>assistant\n` with add_generation_prompt. Content blocks are concatenated; video and image blocks become
# the placeholders the processor expands (an image followed by "\n", as in the original's "<image>\n" prompts).
# `{% generation %}` marks what an assistant turn trains on (its text, its <|im_end|> and the newline after it), so
# `return_assistant_tokens_mask=True` gives training labels.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'video' -%}{{- '<|video_pad|>' -}}"
    "{%- elif block['type'] == 'image' -%}{{- '<|image_pad|>' -}}{%- if block.get('newline', true) -%}{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- elif block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools or documents or messages | selectattr('tool_calls', 'defined') | list or messages | rejectattr("
    "'role', 'in', ['system', 'user', 'assistant']) | list -%}{{- raise_exception('this chat template (the original "
    "qwen_2) has no tools, documents or tool turns') -}}{%- endif -%}"
    "{%- set ns = namespace(system='" + DEFAULT_SYSTEM_PROMPT + "', messages=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = render(messages[0]['content']) -%}{%- set ns.messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if ns.system -%}{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in ns.messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- render(message['content']) + '<|im_end|>\\n' -}}{% endgeneration %}"
    "{%- else -%}{{- render(message['content']) + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def media_blocks(text: str, kinds: Sequence[str]) -> list[dict]:
    """Content blocks of a turn written the original's way, with one ``<image>`` marker per video/image:
    ``"<image>\\nWhat?"`` with kinds ``["video"]`` -> ``[{"type": "video"}, {"type": "text", "text": "\\nWhat?"}]``.
    The one converter of chat() histories and LLaVA-style training records into chat-template messages. The template
    renders an image as its placeholder and "\\n" (the original's ``<image>\\n``), so the newline written after an
    image marker is that one; a marker without one gets ``"newline": False``."""
    pieces = text.split(MEDIA_MARKER)
    if len(pieces) - 1 != len(kinds):
        raise ValueError(f"{text[:80]!r} has {len(pieces) - 1} {MEDIA_MARKER} markers for {len(kinds)} videos/images")
    blocks = [{"type": "text", "text": pieces[0]}]
    for kind, piece in zip(kinds, pieces[1:]):
        if kind == "image":
            blocks += [{"type": "image"} if piece.startswith("\n") else {"type": "image", "newline": False},
                       {"type": "text", "text": piece.removeprefix("\n")}]
        else:
            blocks += [{"type": kind}, {"type": "text", "text": piece}]
    return [block for block in blocks if block["type"] != "text" or block["text"]]


def frames_to_pixels(frames, size: dict, do_resize: bool = True, do_rescale: bool = True,
                     rescale_factor: float = 1 / 255, do_normalize: bool = True, image_mean=IMAGENET_MEAN,
                     image_std=IMAGENET_STD) -> np.ndarray:
    """`(n, H, W, 3)` uint8 frames -> `(n, 3, S, S)` float32 pixels, one frame at a time (bounded temporaries). The one
    pixel function of images and videos, with the original's arithmetic: PIL bicubic on the uint8 frame, a float64
    product with `rescale_factor` rounded to float32 (transformers' ``rescale``), then ``(x - mean) / std``. A numpy
    array gives a numpy array; a tensor (on any device) gives a tensor on its device, equal bit for bit
    (`_tensor_frames_to_pixels`: made on an accelerator, it leaves the CPU to decoding)."""
    if isinstance(frames, torch.Tensor):
        return _tensor_frames_to_pixels(frames, size, do_resize, do_rescale, rescale_factor, do_normalize, image_mean,
                                        image_std)
    hw, mean, std = (size["height"], size["width"]), np.float32(image_mean), np.float32(image_std)
    output = None
    for index, frame in enumerate(frames):
        frame = resize_frame(frame, hw) if do_resize and frame.shape[:2] != hw else frame
        if output is None:
            output = np.empty((len(frames), 3, *frame.shape[:2]), np.float32)
        pixels = (frame * np.float64(rescale_factor)).astype(np.float32) if do_rescale else frame.astype(np.float32)
        output[index] = ((pixels - mean) / std if do_normalize else pixels).transpose(2, 0, 1)
    return output


# Pillow's fixed-point resampling (Resample.c): coefficients scaled by 2^22, sums rounded by adding 2^21.
_PIL_PRECISION_BITS = 22
_DEVICE_RESIZE_BYTES = 256 * 1024**2  # float64 frames resized per step on the device (bounds its temporaries)


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5), with its operation order."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=16)  # per size and device: built and copied once, not per chunk
def _pil_bicubic_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """`(in_size, out_size)` float64 matrix on `device` of Pillow's fixed-point bicubic coefficients (integers, scaled
    2^22) for one axis, computed as Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` do, step for step."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    tap = np.arange(taps)[None, :]
    used = tap < count[:, None]
    weights = np.where(used, _pil_bicubic(((first[:, None] + tap) - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.zeros(out_size)
    for t in range(taps):  # summed in Pillow's order
        total = total + weights[:, t]
    weights = np.where(used & (total[:, None] != 0.0), weights / total[:, None], weights)
    fixed = np.trunc(weights * (1 << _PIL_PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
    matrix = np.zeros((in_size, out_size))
    rows, cols = (first[:, None] + tap)[used], np.broadcast_to(np.arange(out_size)[:, None], used.shape)[used]
    matrix[rows, cols] = fixed[used]
    return torch.from_numpy(matrix).to(device)


@functools.lru_cache(maxsize=16)
def _channel_constants(values: tuple, device: torch.device) -> torch.Tensor:
    """`(3, 1, 1)` float32 per-channel constants (mean, std) on `device`, copied there once."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None].to(device)


def _resize_axis(pixels: torch.Tensor, out_size: int) -> torch.Tensor:
    """Pillow's bicubic pass over the last axis of float64 uint8-valued `pixels`, rounded and clipped to uint8 values
    as Pillow does (``clip8`` of the fixed-point sum)."""
    if pixels.shape[-1] == out_size:
        return pixels  # Pillow skips a pass that keeps the size
    sums = pixels @ _pil_bicubic_matrix(pixels.shape[-1], out_size, pixels.device) + (1 << (_PIL_PRECISION_BITS - 1))
    return torch.floor(sums / (1 << _PIL_PRECISION_BITS)).clamp_(0, 255)


def _pil_resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(..., H, W)` uint8-valued float64 -> `(..., height, width)`, the passes in Pillow's order: horizontal first,
    except for images over 100 times taller than wide that shrink in height (Pillow 12's ``Image.resize``)."""
    def horizontal(x):
        return _resize_axis(x, width)

    def vertical(x):
        return _resize_axis(x.transpose(-1, -2), height).transpose(-1, -2)

    in_height, in_width = pixels.shape[-2:]
    if in_height > in_width * 100 and height < in_height:
        return horizontal(vertical(pixels))
    return vertical(horizontal(pixels))


def _tensor_frames_to_pixels(frames: torch.Tensor, size: dict, do_resize, do_rescale, rescale_factor, do_normalize,
                             image_mean, image_std) -> torch.Tensor:
    """`frames_to_pixels` of a `(n, H, W, 3)` uint8 tensor, on its device: Pillow's bicubic resize (its two passes,
    each rounded to uint8) as float64 matmuls, exact because the sums are of integers below 2^53, then the same
    float64 rescale and float32 normalisation; the frames go in steps that bound the float64 temporaries."""
    height, width = size["height"], size["width"]
    mean = _channel_constants(tuple(float(m) for m in image_mean), frames.device)
    std = _channel_constants(tuple(float(s) for s in image_std), frames.device)
    step = max(1, _DEVICE_RESIZE_BYTES // (8 * frames[0].numel())) if len(frames) else 1
    output = torch.empty((len(frames), 3, height, width) if do_resize else (len(frames), 3, *frames.shape[1:3]),
                         dtype=torch.float32, device=frames.device)
    for start in range(0, len(frames), step):
        pixels = frames[start : start + step].permute(0, 3, 1, 2).double()  # (n, 3, H, W), uint8 values
        if do_resize:
            pixels = _pil_resize(pixels, height, width)
        pixels = (pixels * rescale_factor).float() if do_rescale else pixels.float()
        output[start : start + step] = (pixels - mean) / std if do_normalize else pixels
    return output


def frames_to_device(frames: np.ndarray, device) -> torch.Tensor:
    """`(n, H, W, 3)` uint8 frames as a tensor on `device`; to an accelerator through pinned memory, so the copy is
    queued without waiting for the work before it (the model's, when a prefetch thread sends the next chunk)."""
    tensor, device = torch.from_numpy(frames), torch.device(device)
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is not None and accelerator.type == device.type:
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _size_dict(size) -> dict[str, int]:
    return dict(zip(("height", "width"), parse_size(size)))


def grid_pinpoints(pinpoints, side: int, max_tiles: int | None = None) -> list[tuple[int, int]]:
    """The `(height, width)` resolutions an image may be tiled at: the config's ``image_grid_pinpoints`` (``[width,
    height]`` pairs in pixels, their Python-literal string, or the original's ``"(1x1),...,(6x6)"`` range in tiles of
    `side`; None: that range), in their order (the first wins a tie), without those over `max_tiles` tiles (at least
    the smallest stays). Raises ValueError for anything else."""
    if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1):
        raise ValueError(f"max_image_tiles must be a positive int or None, got {max_tiles!r}")
    try:
        if pinpoints is None or isinstance(pinpoints, str) and "x" in pinpoints:  # the original's range of tiles
            ends = re.findall(r"\((\d+)x(\d+)\)", pinpoints or "(1x1),(6x6)")
            (w0, h0), (w1, h1) = [tuple(map(int, end)) for end in (ends[0], ends[-1])]
            pinpoints = [(i * side, j * side) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
        pinpoints = [(int(w), int(h)) for w, h in (ast.literal_eval(pinpoints) if isinstance(pinpoints, str)
                                                   else pinpoints)]
    except (ValueError, TypeError, IndexError, SyntaxError):
        raise ValueError(f"image_grid_pinpoints: {pinpoints!r} is not a list of [width, height] or a "
                         "'(1x1),...,(6x6)' range") from None
    if not pinpoints or any(w % side or h % side or w <= 0 or h <= 0 for w, h in pinpoints):
        raise ValueError(f"image_grid_pinpoints must be multiples of the {side} px tile side, got {pinpoints}")
    kept = [(h, w) for w, h in pinpoints if max_tiles is None or (w // side) * (h // side) <= max_tiles]
    return kept or [min(((h, w) for w, h in pinpoints), key=lambda hw: hw[0] * hw[1])]


def image_tiles(image: np.ndarray, side: int, resolutions) -> tuple[np.ndarray, tuple[int, int]]:
    """One `(H, W, 3)` uint8 image the original's ``anyres_nopad`` way -> `(1 + rows * cols, side, side, 3)`: the base
    (the whole image squashed to side x side), then the tiles row-major of the whole image squashed to the best of
    `resolutions` (transformers' ``select_best_resolution``: most of the image kept, then least waste); `(rows, cols)`."""
    height, width = select_best_resolution(image.shape[:2], resolutions)
    rows, cols = height // side, width // side
    tiles = resize_frame(image, (height, width)).reshape(rows, side, cols, side, 3).swapaxes(1, 2)
    return np.concatenate([resize_frame(image, side)[None], tiles.reshape(-1, side, side, 3)]), (rows, cols)


def pad_to_square(image: np.ndarray, fill) -> np.ndarray:
    """`(H, W, 3)` centred on a square of colour `fill` (the original's ``expand2square``)."""
    height, width = image.shape[:2]
    canvas = np.empty((max(height, width),) * 2 + (3,), np.uint8)
    canvas[:] = fill
    top, left = (len(canvas) - height) // 2, (len(canvas) - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


class VideoChatFlashImagesKwargs(ImagesKwargs, total=False):
    """Image keyword arguments beyond transformers' own (see :class:`VideoChatFlashImageProcessor`)."""

    image_aspect_ratio: str
    image_grid_pinpoints: Any
    max_image_tiles: int | None


class VideoChatFlashImageProcessor(BaseImageProcessor):
    r"""Still images -> `pixel_values` `(tiles, 3, S, S)` + `image_grids` `(images, 2)`, as the published model was
    trained: the only image of a sample in tiles (``anyres_nopad``: a base image then `rows x cols` tiles, 64 tokens
    each; its grid ``(rows, cols)``), each of several images padded to a square of the mean colour and squashed to S x S
    (``pad``: one tile, grid ``(0, 0)``). Images come as one sample (an image, a list) or a batch (a list of lists).

    Args:
        size (`int` or `dict`, defaults to 224): the tower's frame side (224 or 448 for the published checkpoints).
        do_resize, do_rescale, rescale_factor, do_normalize, image_mean, image_std: as in transformers' image
            processors (defaults: 1/255, ImageNet mean/std); frames are resized with PIL bicubic (``resample=3``).
        image_aspect_ratio: ``"anyres_nopad"`` (the checkpoints' config) or ``"pad"`` (every image one padded tile).
        image_grid_pinpoints: see :func:`grid_pinpoints` (default: 1x1 to 6x6 tiles).
        max_image_tiles: a cap on the tiles of one image, to bound its cost (default: none).
    """

    _auto_class = "AutoImageProcessor"  # save_pretrained writes auto_map and copies this file (remote code)
    valid_kwargs = VideoChatFlashImagesKwargs
    model_input_names = ["pixel_values", "image_grids"]
    PIXEL_OPTIONS = ("size", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
    TILE_OPTIONS = ("image_aspect_ratio", "image_grid_pinpoints", "max_image_tiles")

    def __init__(self, size=224, resample=PIL_BICUBIC, do_resize=True, do_rescale=True, rescale_factor=1 / 255,
                 do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, image_aspect_ratio="anyres_nopad",
                 image_grid_pinpoints=None, max_image_tiles=None, **kwargs):
        for name in ("image_processor_type", "video_processor_type", "processor_class"):
            kwargs.pop(name, None)
        super().__init__(**kwargs)
        if int(resample) != PIL_BICUBIC:
            raise ValueError(f"resample={resample}: frames are resized with PIL bicubic (3), as the model was trained")
        self.size = _size_dict(size)
        self.resample, self.do_resize, self.do_rescale = PIL_BICUBIC, do_resize, do_rescale
        self.rescale_factor, self.do_normalize = rescale_factor, do_normalize
        self.image_mean, self.image_std = [float(m) for m in image_mean], [float(s) for s in image_std]
        self.image_aspect_ratio, self.image_grid_pinpoints = image_aspect_ratio, image_grid_pinpoints
        self.max_image_tiles = max_image_tiles
        self._tiling({name: getattr(self, name) for name in ("size", *self.TILE_OPTIONS)})  # bad settings fail here

    def _options(self, names: Sequence[str], overrides: dict) -> dict[str, Any]:
        """Settings `names` with one call's `overrides` (None keeps a setting; for num_frames / fps it means off)."""
        unknown = set(overrides) - set(names) - set(self.IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}; its options "
                            f"are {', '.join(names)}")
        options = {name: getattr(self, name) for name in names}
        options.update({name: value for name, value in overrides.items()
                        if name in names and (value is not None or name in ("num_frames", "fps"))})
        options["size"] = _size_dict(options["size"])
        return options

    # transformers' generic kwargs that mean nothing here: frames are always sampled by frame_sampling's rules
    IGNORED_KWARGS = ("do_sample_frames", "do_convert_rgb", "device", "input_data_format", "data_format",
                      "default_to_square", "return_metadata", "time_message")

    def fetch_images(self, images):
        # URLs, data URLs, bytes and file objects through video_loading's one fetch (a size limit, errors naming them);
        # transformers' fetch_images calls this one for each item of a list
        return super().fetch_images(local_media(images))

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        """Images (PIL, arrays, tensors, paths, URLs, bytes), one sample or a batch of samples (nested lists) ->
        ``pixel_values`` `(tiles, 3, S, S)` (each image's tiles in turn) and ``image_grids`` `(images, 2)`."""
        options = self._options(self.PIXEL_OPTIONS + self.TILE_OPTIONS, kwargs)
        mode, side, resolutions = self._tiling(options)
        pixel_options = {name: options[name] for name in self.PIXEL_OPTIONS}
        fill = tuple(int(m * 255) for m in options["image_mean"])
        pixels, grids = [], []
        if isinstance(images, (list, tuple)) and not images:
            raise ValueError("no images were given")
        for sample in make_nested_list_of_images(self.fetch_images(images)):
            for image in sample:
                image = rgb_frame(image)
                tiles, grid = image_tiles(image, side, resolutions) if mode == "anyres_nopad" and len(sample) == 1 \
                    else (pad_to_square(image, fill)[None], (0, 0))
                pixels.append(frames_to_pixels(tiles, **pixel_options))
                grids.append(grid)
        data = {"pixel_values": np.concatenate(pixels), "image_grids": np.array(grids, np.int64).reshape(-1, 2)}
        return BatchFeature(data, tensor_type=return_tensors)

    @classmethod
    def from_model_config(cls, config) -> "VideoChatFlashImageProcessor":
        """The image processor a checkpoint's config asks for: its tower size, and its ``image_aspect_ratio`` /
        ``image_grid_pinpoints`` (the original's fields) where it has them."""
        tiles = {name: getattr(config, name) for name in ("image_aspect_ratio", "image_grid_pinpoints")
                 if getattr(config, name, None) is not None}
        return cls(size=config.image_size, **tiles)

    @staticmethod
    def _tiling(options: dict) -> tuple[str, int, list[tuple[int, int]]]:
        """`(image_aspect_ratio, tile side, tile resolutions)` of these settings; ValueError for bad ones."""
        mode, side = options["image_aspect_ratio"], options["size"]["height"]
        if mode not in ("anyres_nopad", "pad") or side != options["size"]["width"]:
            raise ValueError(f"image_aspect_ratio={mode!r}, size={options['size']}: images are 'anyres_nopad' or "
                             "'pad', on square tiles")
        return mode, side, grid_pinpoints(options["image_grid_pinpoints"], side, options["max_image_tiles"])

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in self.NOT_SAVED:
            output.pop(key, None)
        return output

    NOT_SAVED = ("_processor_class", "_valid_kwargs_names")


class VideoChatFlashVideosKwargs(VideosKwargs, total=False):
    """Video keyword arguments beyond transformers' own (``num_frames``, ``fps``, ``size``, ...)."""

    max_num_frames: int  # frame cap (files: ~1 frame/s, at least min_num_frames; decoded frames: see frame_sampling)
    min_num_frames: int
    frames_multiple: int
    video_backend: str | None  # "pyav", "decord" or None (PyAV, decord fallback)
    time_message: str | None  # "short" (the original chat/eval prompt), "long" (per-frame seconds) or None (left out)


class VideoChatFlashVideoProcessor(VideoProcessorMixin, VideoChatFlashImageProcessor):
    r"""Videos -> `pixel_values_videos` + `video_frame_counts` (+ `video_metadata`), torchvision-free.

    Files are decoded by ``video_loading`` (PyAV, decord fallback) with the original chat()/lmms-eval sampling (about
    1 frame per second, 64..`max_num_frames`), frames resized while they are decoded; decoded frames (arrays, tensors,
    lists of PIL images) follow ``frame_sampling``'s rule for them (used as given up to `max_num_frames`, padded to a
    multiple of 4 with the last frame, unless `num_frames` / `fps` ask for sampling). `pixel_values_videos` is
    `(videos, T, 3, S, S)` when every video has T frames, else `(sum T, 3, S, S)`.

    Args:
        size, do_*, rescale_factor, image_mean, image_std: see :class:`VideoChatFlashImageProcessor`.
        max_num_frames, num_frames, fps, min_num_frames, frames_multiple: the sampling (:class:`FrameSampling`).
        video_backend: decoder (None: PyAV, then decord).
    """

    _auto_class = "AutoVideoProcessor"
    valid_kwargs = VideoChatFlashVideosKwargs
    model_input_names = ["pixel_values_videos", "video_frame_counts"]
    SAMPLING_OPTIONS = tuple(field.name for field in dataclasses.fields(FrameSampling))
    VIDEO_OPTIONS = VideoChatFlashImageProcessor.PIXEL_OPTIONS + SAMPLING_OPTIONS + ("video_backend",)
    NOT_SAVED = VideoChatFlashImageProcessor.NOT_SAVED + VideoChatFlashImageProcessor.TILE_OPTIONS  # images only

    def __init__(self, size=224, max_num_frames=FrameSampling.max_num_frames, num_frames=None, fps=None,
                 min_num_frames=FrameSampling.min_num_frames, frames_multiple=FrameSampling.frames_multiple,
                 video_backend=None, **kwargs):
        kwargs.pop("local_num_frames", None)  # a setting of earlier versions: clips are always 4 frames
        super().__init__(size=size, **kwargs)
        self.max_num_frames, self.num_frames, self.fps = max_num_frames, num_frames, fps
        self.min_num_frames, self.frames_multiple, self.video_backend = min_num_frames, frames_multiple, video_backend

    def iter_pixel_chunks(self, video, chunk_frames: int | None = None, video_metadata=None, pixel_device=None,
                          **kwargs):
        """``(metadata, iterator of (n, 3, S, S) float32 pixel chunks)`` of one video, in time order.

        The frames are sampled and decoded chunk by chunk (``iter_video_chunks``), so memory holds one chunk of
        frames; ``chunk_frames=None`` gives one chunk. `video_metadata` (a dict or transformers ``VideoMetadata``) of
        decoded frames tells how long they last: ``duration``, or ``total_num_frames / fps`` of the video they come
        from, or their own ``fps``; it sets their frame rate, hence ``fps`` sampling, timestamps and the time message.
        Files describe themselves. With a `pixel_device`, the frames of a video file (or URL) are decoded at their
        own size and go there as uint8 to be resized and normalised (``frames_to_pixels`` of a tensor: the same
        pixels, as tensors on that device; a chunk then holds full-size frames); else chunks are numpy arrays.
        """
        options = self._options(self.VIDEO_OPTIONS, kwargs)
        size = options["size"]
        # One size for all frames, as the device resize needs: a file's stream (folders and frame lists may vary)
        on_device = pixel_device is not None and isinstance(video, (str, os.PathLike)) and not os.path.isdir(video)
        # Frames resized while they are decoded (as frames_to_pixels would) keep memory low on long videos.
        load_size = (size["height"], size["width"]) if options["do_resize"] and not on_device else None
        metadata, chunks = iter_video_chunks(
            video, chunk_frames, size=load_size, backend=options["video_backend"],
            video_fps=None if isinstance(video, str) else _frame_rate(video, video_metadata),
            sampling=FrameSampling(**{name: options[name] for name in self.SAMPLING_OPTIONS}),
        )
        pixel_options = {name: options[name] for name in self.PIXEL_OPTIONS}
        return metadata, (frames_to_pixels(frames_to_device(chunk, pixel_device) if on_device else chunk,
                                           **pixel_options) for chunk in chunks)

    def preprocess(self, videos, video_metadata=None, return_tensors=None, **kwargs) -> BatchFeature:
        """Videos (paths, URLs, bytes, decoded frames, nested lists of them) -> ``pixel_values_videos``,
        ``video_frame_counts`` and ``video_metadata`` (one ``VideoLoadMetadata`` per video). Keyword overrides: any
        constructor option."""
        videos = make_batched_videos(_fetched(videos))
        video_metadata = _per_video(video_metadata, len(videos))
        arrays, metadata = [], []
        for video, meta in zip(videos, video_metadata):
            loaded, chunks = self.iter_pixel_chunks(video, None, meta, **kwargs)
            arrays.append(next(chunks))
            metadata.append(loaded)
        if return_tensors is None:
            pixels = arrays
        elif all(array.shape == arrays[0].shape for array in arrays):
            pixels = np.stack(arrays) if len(arrays) > 1 else arrays[0][None]  # [None]: a view, no copy
        else:
            pixels = np.concatenate(arrays)
        data = {"pixel_values_videos": pixels, "video_frame_counts": [len(a) for a in arrays]}
        return BatchFeature({**data, "video_metadata": metadata}, tensor_type=return_tensors,
                            skip_tensor_conversion=["video_metadata"])


def _fetched(videos):
    """Videos (nested lists too) with bytes and file objects as local copies, which transformers' batching keeps
    (URLs, strings, are fetched where they are read, their segments kept)."""
    if isinstance(videos, (list, tuple)):
        return [_fetched(video) for video in videos]
    return local_media(videos, urls=False)


def _per_video(metadata, count: int) -> list:
    """One metadata entry per video from None, one entry, or a (per conversation nested) list of entries."""
    if metadata is None:
        return [None] * count
    entries = metadata if isinstance(metadata, (list, tuple)) else [metadata]
    flat = [entry for item in entries for entry in (item if isinstance(item, (list, tuple)) else [item])]
    if len(flat) != count:
        raise ValueError(f"got {len(flat)} video_metadata entries for {count} videos")
    return flat


def _frame_rate(video, metadata) -> float | None:
    """Frames per second of decoded frames by a caller's metadata: their number over the seconds they span (the
    ``duration``, or ``total_num_frames / fps`` of their source video), else the ``fps`` given; None if unknown."""
    if metadata is None:
        return None
    duration, total, fps = ((metadata.get(key) if isinstance(metadata, dict) else getattr(metadata, key, None))
                            for key in ("duration", "total_num_frames", "fps"))
    duration = duration or (total / fps if total and fps else None)
    frames = len(video) if isinstance(video, (list, tuple)) or getattr(video, "ndim", 3) == 4 else 1
    return frames / duration if duration else fps


class VideoChatFlashProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: VideoChatFlashImagesKwargs
    videos_kwargs: VideoChatFlashVideosKwargs


def _ensure_special_token(tokenizer, token: str) -> int:
    """Id of `token`, appended to the tokenizer as a special token when missing (the embedding matrix is never
    resized: the published checkpoints have spare rows)."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        raise ValueError(f"{token!r} must tokenize to the single id {token_id}")
    return token_id


class VideoChatFlashProcessor(ProcessorMixin):
    r"""VideoChat-Flash processor: image + video processors, a Qwen2 tokenizer and the ``qwen_2`` chat template.

    ``processor(text=..., videos=..., images=...)`` returns ``input_ids``, ``attention_mask`` and, when given,
    ``pixel_values_videos`` + ``video_frame_counts`` and ``pixel_values`` + ``image_grids``. Each `video_token` in the text becomes
    ``tokens_per_frame * T`` tokens followed by the original time message (known for files; for decoded frames when
    ``video_metadata`` gives ``duration``, or ``fps`` / ``total_num_frames``; the ``time_message`` video kwarg
    chooses ``"short"``, ``"long"`` or None), each `image_token` ``num_image_tokens`` per tile of the image (base + grid).

    Args:
        image_processor / video_processor: built with defaults (224 px) when omitted.
        tokenizer: a Qwen2 tokenizer; the placeholder tokens are appended to it when missing.
        chat_template: defaults to :data:`CHAT_TEMPLATE`.
        video_token / image_token: the placeholders (``<|video_pad|>`` / ``<|image_pad|>``).
        tokens_per_frame (16) / num_image_tokens (64): visual tokens per video frame / per image tile.
        padding_side (``"left"``): how the tokenizer pads batches (left: ready for ``generate``, and what the
            pipelines' batching follows); set on the tokenizer.
    """

    _auto_class = "AutoProcessor"
    valid_processor_kwargs = VideoChatFlashProcessorKwargs

    def __init__(self, image_processor=None, video_processor=None, tokenizer=None, chat_template=None,
                 video_token="<|video_pad|>", image_token="<|image_pad|>", tokens_per_frame=16, num_image_tokens=64,
                 padding_side="left"):
        if tokenizer is None:
            raise ValueError("VideoChatFlashProcessor needs a tokenizer")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if chat_template is None and (video_token, image_token) != ("<|video_pad|>", "<|image_pad|>"):
            raise ValueError("the default chat template writes <|video_pad|> / <|image_pad|>: pass a chat_template "
                             "that writes your placeholder tokens")
        video_processor = video_processor if video_processor is not None else VideoChatFlashVideoProcessor()
        if image_processor is None:
            image_processor = VideoChatFlashImageProcessor(**{name: getattr(video_processor, name)
                                                              for name in VideoChatFlashImageProcessor.PIXEL_OPTIONS})
        self.video_token, self.image_token, self.padding_side = video_token, image_token, padding_side
        self.tokens_per_frame, self.num_image_tokens = tokens_per_frame, num_image_tokens
        tokenizer.padding_side = padding_side
        super().__init__(image_processor, video_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        # video first, then image: appended to Qwen2's 151646 tokens they get 151646 and 151647
        self.video_token_id = _ensure_special_token(tokenizer, video_token)
        self.image_token_id = _ensure_special_token(tokenizer, image_token)

    text_kwargs = {"padding": True}  # ProcessorMixin's lowest-priority defaults: a batch of prompts is padded

    def check_argument_for_proper_class(self, argument_name, argument):
        # The stock check looks the base class up in transformers' namespace, which exports VideoProcessorMixin only
        # when torchvision is importable; check against the mixin itself.
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image and video processors are this file's classes, built from processor_config.json (AutoVideoProcessor's
        # native branch needs torchvision); the tokenizer loads through AutoTokenizer as usual.
        # Keyword arguments go to the sub-processor that owns them (`max_num_frames=16, size=448`: the video processor).
        subfolder, processor_dict = kwargs.pop("subfolder", ""), processor_dict or {}
        video = {k: kwargs.pop(k) for k in VideoChatFlashVideoProcessor.VIDEO_OPTIONS if k in kwargs}
        # A Qwen2 tokenizer: no remote code to ask about (or prompt for), nor a config.json to read for its class.
        kwargs.update(trust_remote_code=False, config=Qwen2Config())
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, subfolder=subfolder,
                                                        **kwargs)
        video_processor = VideoChatFlashVideoProcessor(**{**processor_dict.get("video_processor", {}), **video})
        pixels = VideoChatFlashImageProcessor.PIXEL_OPTIONS
        image = {k: kwargs.pop(k) for k in VideoChatFlashImageProcessor.TILE_OPTIONS if k in kwargs}
        image.update({k: v for k, v in video.items() if k in pixels})
        image_dict = processor_dict.get("image_processor") or {k: getattr(video_processor, k) for k in pixels}
        return [VideoChatFlashImageProcessor(**{**image_dict, **image}), video_processor, tokenizer]

    # ---- ProcessorMixin's hooks: what replaces each placeholder
    def video_replacement(self, num_frames: int, metadata=None, time_message_style: str | None = "short") -> str:
        """The text of one video: ``tokens_per_frame * num_frames`` placeholders + the time message (when asked and
        the duration is known)."""
        if time_message_style not in ("short", "long", None):
            raise ValueError(f"time_message={time_message_style!r}: expected 'short', 'long' or None")
        message = ""
        if time_message_style is not None:
            duration = getattr(metadata, "duration", None)
            if duration is None:
                logger.warning_once("No duration known for a decoded video: the time message is left out of the "
                                    "prompt. Pass video_metadata={'fps': ...} or {'duration': seconds} to keep it.")
            else:
                seconds = metadata.timestamps if time_message_style == "long" else None
                message = time_message(duration, num_frames, seconds)
        return self.video_token * (self.tokens_per_frame * num_frames) + message

    def replace_video_token(self, video_inputs, video_idx: int, time_message: str | None = "short", **kwargs) -> str:
        num_frames = int(video_inputs["video_frame_counts"][video_idx])
        return self.video_replacement(num_frames, video_inputs["video_metadata"][video_idx], time_message)

    def replace_image_token(self, image_inputs, image_idx: int, **kwargs) -> str:
        rows, cols = (int(n) for n in image_inputs["image_grids"][image_idx])
        return self.image_token * (self.num_image_tokens * (1 + rows * cols))  # the base image, then each tile

    def _multimodal_inputs_from_conversations(self, conversations, *args, **kwargs):
        # A video block may name a segment ({"type": "video", "path": ..., "start": s, "end": e}, in seconds), which
        # the stock traversal drops: its path becomes a VideoSegment, a path that carries it.
        segments = [[(block.get("start"), block.get("end")) for message in conversation
                     if isinstance(message.get("content"), list) for block in message["content"]
                     if block.get("type") == "video"] for conversation in conversations]
        images, videos, *rest = super()._multimodal_inputs_from_conversations(conversations, *args, **kwargs)
        videos = [[VideoSegment(video, *segment) if segment != (None, None) else video
                   for video, segment in zip(row, row_segments)] for row, row_segments in zip(videos, segments)]
        return (images, videos, *rest)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        images, text, videos, audio = super().prepare_inputs_layout(images, text, videos, audio, **kwargs)
        videos = None if videos is None else _fetched(videos)  # before transformers' checks, which drop bytes
        if images is not None and text is not None:  # grouped by the sample whose text holds them: one image -> tiles
            flat, counts = make_flat_list_of_images(images), [sample.count(self.image_token) for sample in text]
            if sum(counts) == len(flat):  # (else validate_inputs says what is wrong)
                ends = np.cumsum([0, *counts]).tolist()
                images = [flat[start:end] for start, end in zip(ends, ends[1:])]
        return images, text, videos, audio
