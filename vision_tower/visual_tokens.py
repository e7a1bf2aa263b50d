"""The visual side of VideoChat-Flash as both implementations build and run it (this package's model and its vLLM
plugin): the checkpoint's tower and ToMe projector from a config, one tower call's features to tokens, and an
image's tile tokens to the original's raster.

The Hub export copies it as `vision_tower_visual_tokens.py`.
"""

import math

import torch
from torch import nn

from .internvideo2 import InternVideo2VisionTower
from .token_merging import ToMeProjector
from .umt import UMTVisionTower


def build_vision_tower(config) -> nn.Module:
    """The checkpoint's tower (``config.mm_vision_tower``: UMT-L, or InternVideo2-1B) with ``vision_config``'s dims."""
    vision = config.vision_config
    tower = InternVideo2VisionTower if config.mm_vision_tower == "internvideo2" else UMTVisionTower
    return tower(**{k: vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")},
                 image_size=vision["image_size"], num_frames=config.mm_local_num_frames,
                 select_layer=config.mm_vision_select_layer)


def build_projector(config) -> ToMeProjector:
    """The ToMe projector: 16 tokens per frame of a clip, 64 per image tile."""
    vision = config.vision_config
    return ToMeProjector(mm_hidden_size=config.mm_hidden_size, hidden_size=config.hidden_size,
                         num_attention_heads=vision["num_attention_heads"], image_size=vision["image_size"],
                         patch_size=vision["patch_size"], tokens_per_frame=config.tokens_per_frame)


def clip_tokens(projector: ToMeProjector, features: torch.Tensor, clip_frames: int) -> torch.Tensor:
    """`(clips, clip_frames * patches, width)` tower features -> `(clips, tokens, hidden)`: 16 per frame of a clip
    (merged frame by frame), 64 per 1-frame clip (an image tile: ``compress=False``)."""
    if clip_frames == 1:
        return projector(features, compress=False)
    features = features.reshape(features.shape[0] * clip_frames, -1, features.shape[-1])
    return projector(features, compress=True, local_num_frames=clip_frames)


def tile_raster(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`(1 + rows * cols, side * side, hidden)` tokens of an image's base tile, then its tiles row-major ->
    `((1 + rows * cols) * side * side, hidden)`: the base's tokens, then the tiles' as one `(rows * side, cols *
    side)` raster (the original's ``spatial_nopad``)."""
    side, width = math.isqrt(tokens.shape[1]), tokens.shape[-1]
    grid = tokens[1:].reshape(rows, cols, side, side, width).transpose(1, 2).reshape(-1, width)
    return torch.cat([tokens[0], grid])
