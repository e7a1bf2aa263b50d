"""InternVideo2-1B vision encoder of VideoChat-Flash-Qwen2_5-7B_InternVideo2-1B, as plain modules.

A ViT-g/14 (width 1408, 40 layers, 16 heads, MLP ratio 48/11) over 4-frame clips of 224 px frames: Conv3d patches
(tubelet 1), a CLS token, LEARNED position tables (``pos_embed`` for clips, ``img_pos_embed`` for single frames),
pre-norm blocks with RMSNorm, RMSNorm of q and k over the full width, LayerScale on both branches (in float32), qkv
without bias. The blocks up to ``select_layer`` are built; there is no final norm and the CLS position is dropped.
Same call as the UMT tower: `(batch, frames, 3, S, S) -> (batch, frames * patches, width)`. Key layout: the
checkpoint's (``vision_tower.cls_token``, ``vision_tower.blocks.N.attn.q_norm.weight``, ...).
"""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from .umt import UMTMLP, UMTPatchEmbedding, VisionTower, multi_head_attention, run_linear

INTERNVIDEO2_MLP_RATIO = 48 / 11
RMS_NORM_EPS = 1e-6


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, applied in float32 (the original forces it) and cast back."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1e-5))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return (hidden_states.float() * self.weight.float()).to(hidden_states.dtype)


class InternVideo2Attention(nn.Module):
    """Self-attention with a bias-free fused qkv and RMSNorm of the queries and keys over the whole width (before the
    heads are split), through the towers' shared attention dispatch."""

    def __init__(self, hidden_size: int, num_heads: int, attn_implementation: str = "sdpa"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads, self.scale = num_heads, (hidden_size // num_heads) ** -0.5
        self.attn_implementation = attn_implementation
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_norm = Qwen2RMSNorm(hidden_size, eps=RMS_NORM_EPS)
        self.k_norm = Qwen2RMSNorm(hidden_size, eps=RMS_NORM_EPS)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, N, C)` -> `(B, N, C)`."""
        batch_size, seq_len, hidden_size = hidden_states.shape
        query, key, value = run_linear(self.qkv, hidden_states).reshape(batch_size, seq_len, 3, hidden_size).unbind(2)
        attn_output = multi_head_attention(self.q_norm(query), self.k_norm(key), value, self.num_heads, self.scale,
                                           self.attn_implementation)
        return run_linear(self.proj, attn_output)


class InternVideo2Block(GradientCheckpointingLayer):
    """Pre-norm block: `x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))` (no dropout or drop-path at
    inference)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attn_implementation: str = "sdpa"):
        super().__init__()
        self.norm1 = Qwen2RMSNorm(hidden_size, eps=RMS_NORM_EPS)
        self.attn = InternVideo2Attention(hidden_size, num_heads, attn_implementation)
        self.ls1 = LayerScale(hidden_size)
        self.norm2 = Qwen2RMSNorm(hidden_size, eps=RMS_NORM_EPS)
        self.mlp = UMTMLP(hidden_size, int(hidden_size * mlp_ratio))
        self.ls2 = LayerScale(hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.ls1(self.attn(self.norm1(hidden_states)))
        return hidden_states + self.ls2(self.mlp(self.norm2(hidden_states)))


class InternVideo2ViT(nn.Module):
    """Patches + CLS token + the learned position table of the input (clip or image) + the built blocks."""

    def __init__(self, hidden_size: int, num_blocks: int, num_attention_heads: int, patch_size: int, image_size: int,
                 num_frames: int, mlp_ratio: float, attn_implementation: str):
        super().__init__()
        patches = (image_size // patch_size) ** 2
        self.patch_embed = UMTPatchEmbedding(hidden_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_frames * patches + 1, hidden_size))
        self.img_pos_embed = nn.Parameter(torch.zeros(1, patches + 1, hidden_size))
        self.blocks = nn.ModuleList([InternVideo2Block(hidden_size, num_attention_heads, mlp_ratio, attn_implementation)
                                     for _ in range(num_blocks)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, T, 3, S, S)` -> `(B, 1 + T * (S/p)^2, C)`, the CLS token first. T == 1 uses `img_pos_embed` (shapes
        checked by the tower: `VisionTower.check_pixels`)."""
        patches = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        hidden_states = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        hidden_states = hidden_states + (self.img_pos_embed if pixel_values.shape[1] == 1 else self.pos_embed)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class InternVideo2VisionTower(VisionTower):
    """InternVideo2 feature extractor of VideoChat-Flash (InternVideo2-1B: width 1408, 40 layers, 16 heads, patch 14,
    224 px; only the blocks up to `select_layer` are built: 39 of 40 with -2); see :class:`VisionTower`. `mlp_ratio`
    is 48/11 (1408 -> 6144)."""

    attention_class = InternVideo2Attention

    def __init__(self, hidden_size: int, num_hidden_layers: int, num_attention_heads: int, patch_size: int = 14,
                 image_size: int = 224, num_frames: int = 4, select_layer: int = -2,
                 mlp_ratio: float = INTERNVIDEO2_MLP_RATIO, attn_implementation: str = "sdpa"):
        super().__init__(hidden_size, num_hidden_layers, num_attention_heads, patch_size, image_size, num_frames,
                         select_layer, mlp_ratio, attn_implementation)

    def build_encoder(self, **encoder_kwargs) -> nn.Module:
        return InternVideo2ViT(**encoder_kwargs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, T, 3, S, S)` normalised pixels -> `(B, T * (S/p)^2, C)` patch features (the CLS token dropped)."""
        self.check_pixels(pixel_values)
        return self.vision_tower(pixel_values)[:, 1:]
