"""UMT ViT video encoder of VideoChat-Flash (Unmasked Teacher ViT-L/16, tubelet 1).

A pre-norm ViT without class token whose sequence covers a whole clip (`T * (S / p)^2` tokens, so attention mixes
space and time), with fixed 1-D sinusoid positions over the (frame, row, column) index. State-dict keys, relative to
`UMTVisionTower`::

    vision_tower.encoder.patch_embed.proj            Conv3d, kernel (1, p, p)
    vision_tower.encoder.blocks.N.{norm1, attn, norm2, mlp}
    vision_tower.encoder.vision_layernorm

Self-contained (torch + transformers utilities): the Hub export copies it as `vision_tower_umt.py`.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import logging

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


logger = logging.get_logger(__name__)

# The released UMT weights were pretrained on 4-frame clips of 224 px frames with 16 px patches; the sinusoid
# table is defined on that grid and resampled for other clip lengths / resolutions, as the original does.
PRETRAIN_NUM_FRAMES = 4
PRETRAIN_GRID_SIZE = 14
PRETRAIN_IMAGE_SIZE = 224

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

# oneDNN's float32 GEMM (the kernel torch.compile's CPU backend uses for linear layers) is an operator of every
# torch CPU build with mkldnn; looked up once, so a build without it simply keeps `F.linear`.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# ----------------------------------------------------------------------------------------- position tables
def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """`(num_positions, dim)` float32 sinusoids: column `j` is `sin` (even j) or `cos` (odd j) of
    `pos / 10000^(2 * (j // 2) / dim)`, computed in float64 and rounded once, like the original's numpy table."""
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponents = torch.tensor([2 * (j // 2) / dim for j in range(dim)], dtype=torch.float64)
    angles = positions / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponents)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32)


def resize_grid(table: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Bicubically resample the spatial grid of a `(frames, g, g, C)` table to `(frames, grid_size, grid_size, C)`."""
    if table.shape[1] == grid_size:
        return table
    resized = F.interpolate(table.permute(0, 3, 1, 2), size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def resize_frames(table: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Linearly resample the time axis of a `(t, g, g, C)` table to `(num_frames, g, g, C)`."""
    t, g, _, c = table.shape
    if t == num_frames:
        return table
    per_position = table.permute(1, 2, 3, 0).reshape(g * g, c, t)  # interpolate along the last axis
    resized = F.interpolate(per_position, size=num_frames, mode="linear", align_corners=False)
    return resized.reshape(g, g, c, num_frames).permute(3, 0, 1, 2)


def build_position_table(num_frames: int, grid_size: int, dim: int, image_size: int) -> torch.Tensor:
    """Fixed `(num_frames * grid_size^2, dim)` float32 table, token order (frame, row, col), built as the original:
    a sinusoid over `PRETRAIN_NUM_FRAMES` frames (one for images, `num_frames=1`: its own table, not a slice of the
    video one) laid out on the tower's grid at 224 px, else on the pretraining 14x14 grid resized bicubically per
    frame (28x28 at 448 px); then the time axis is resized linearly to `num_frames`."""
    base_frames = 1 if num_frames == 1 else PRETRAIN_NUM_FRAMES
    base_grid = grid_size if image_size == PRETRAIN_IMAGE_SIZE else PRETRAIN_GRID_SIZE
    table = sinusoid_table(base_frames * base_grid * base_grid, dim).reshape(base_frames, base_grid, base_grid, dim)
    table = resize_frames(resize_grid(table, grid_size), num_frames)
    return table.reshape(num_frames * grid_size * grid_size, dim)


# ----------------------------------------------------------------------------------------------- layers
def run_linear(layer: nn.Module, hidden_states: torch.Tensor, extra_bias: torch.Tensor | None = None,
               gelu: bool = False) -> torch.Tensor:
    """`layer(hidden_states) + extra_bias`, then exact (erf) GELU if `gelu`.

    The linear layers are ~80% of the tower's time on a CPU. For float32 CPU inference a plain `nn.Linear` runs
    through oneDNN's float32 GEMM with the GELU fused into it: the same float32 arithmetic as `F.linear` (results
    agree to rounding), ~1.2x faster where MKL's sgemm is not at the machine's peak (measured on AMD EPYC,
    `bench/bench_encode.py`). The oneDNN op has no backward and inductor cannot lower it, so with gradients on,
    under torch.compile, on other devices or dtypes, and for wrapped layers (PEFT, quantised subclasses) or offloaded
    ones (weights on `meta` until accelerate's hook loads them in a call), the stock ops run. A quantized weight
    (torchao keeps the `nn.Linear` and swaps its weight for a tensor subclass, which reports the float dtype) has
    kernels of its own: the layer's forward runs it.
    """
    weight = layer.weight if type(layer) is nn.Linear else None
    if weight is not None and type(weight) in (nn.Parameter, torch.Tensor) and not weight.is_meta:
        bias = layer.bias if extra_bias is None else extra_bias if layer.bias is None else layer.bias + extra_bias
        if (_ONEDNN_LINEAR and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and hidden_states.device.type == "cpu" and hidden_states.dtype == weight.dtype == torch.float32):
            post_op, algorithm = ("gelu", "none") if gelu else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(hidden_states, weight, bias, post_op, [], algorithm)
        output = F.linear(hidden_states, weight, bias)
    else:
        output = layer(hidden_states) if extra_bias is None else layer(hidden_states) + extra_bias
    return F.gelu(output) if gelu else output


class UMTPatchEmbedding(nn.Module):
    """Non-overlapping `p x p` patches of every frame, projected to `hidden_size`. The weight is a Conv3d with kernel
    `(1, p, p)` (the checkpoint layout), run as a Conv2d over all frames: the same math without the slower 3-D
    convolution and a `(B, 3, T, S, S)` copy of the input."""

    def __init__(self, hidden_size: int, patch_size: int, num_channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        kernel = (1, patch_size, patch_size)
        self.proj = nn.Conv3d(num_channels, hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, T, 3, S, S)` -> `(B, T * (S/p)^2, C)`, tokens ordered (frame, row, column)."""
        batch_size, num_frames = pixel_values.shape[:2]
        frames = pixel_values.flatten(0, 1)  # (B*T, 3, S, S)
        patches = (self.proj(frames[:, :, None]).squeeze(2) if self.proj.weight.is_meta  # offloaded: hooks load it
                   else F.conv2d(frames, self.proj.weight.squeeze(2), self.proj.bias, stride=self.patch_size))
        patches = patches.flatten(2).transpose(1, 2)  # (B*T, L, C)
        return patches.reshape(batch_size, num_frames * patches.shape[1], patches.shape[2])


class UMTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv weight, learned q and v biases and a fixed zero k bias."""

    def __init__(self, hidden_size: int, num_heads: int, attn_implementation: str = "sdpa"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_implementation = attn_implementation
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(hidden_size))
        self.v_bias = nn.Parameter(torch.zeros(hidden_size))
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, N, C)` -> `(B, N, C)`."""
        batch_size, seq_len, hidden_size = hidden_states.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = run_linear(self.qkv, hidden_states, extra_bias=qkv_bias).reshape(batch_size, seq_len, 3, hidden_size)
        attn_output = multi_head_attention(*qkv.unbind(2), self.num_heads, self.scale, self.attn_implementation)
        return run_linear(self.proj, attn_output)


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, scale: float,
                         attn_implementation: str) -> torch.Tensor:
    """Bidirectional attention of `(B, N, C)` queries, keys and values split into `num_heads` heads -> `(B, N, C)`:
    "eager" (softmax of the scaled scores), "sdpa", or "flash_attention_2" where flash-attn can run (installed,
    fp16/bf16 on CUDA; else sdpa). The vision towers' one attention dispatch."""
    batch_size, seq_len, hidden_size = query.shape
    query, key, value = (t.reshape(batch_size, seq_len, num_heads, hidden_size // num_heads) for t in (query, key, value))
    use_flash = attn_implementation == "flash_attention_2" and flash_attn_func is not None
    if use_flash and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        attn_output = flash_attn_func(query, key, value, softmax_scale=scale, causal=False)  # (B, N, H, D) layout
    else:
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, N, D)
        if attn_implementation == "eager":
            attn_output = torch.softmax((query * scale) @ key.transpose(-2, -1), dim=-1) @ value
        else:
            attn_output = F.scaled_dot_product_attention(query, key, value, scale=scale)
        attn_output = attn_output.transpose(1, 2)
    return attn_output.reshape(batch_size, seq_len, hidden_size)


class UMTMLP(nn.Module):
    """Linear -> GELU (exact erf) -> Linear."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return run_linear(self.fc2, run_linear(self.fc1, hidden_states, gelu=True))


class UMTBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block. The released model has no layer scale (init_values 0) and, at inference, no
    dropout or drop-path, so none are built."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_implementation: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = UMTAttention(hidden_size, num_heads, attn_implementation)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = UMTMLP(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, N, C)` -> `(B, N, C)`. Takes the hidden states positionally (gradient checkpointing needs it)."""
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states))
        return hidden_states + self.mlp(self.norm2(hidden_states))


# ---------------------------------------------------------------------------------------------- encoder
class UMTEncoder(nn.Module):
    """Patch embedding + fixed positions + the built blocks + final LayerNorm."""

    def __init__(self, hidden_size: int, num_blocks: int, num_attention_heads: int, patch_size: int, image_size: int,
                 num_frames: int, mlp_ratio: float, attn_implementation: str):
        super().__init__()
        self.hidden_size, self.image_size, self.num_frames = hidden_size, image_size, num_frames
        self.grid_size = image_size // patch_size
        self.patch_embed = UMTPatchEmbedding(hidden_size, patch_size)
        self.blocks = nn.ModuleList(
            [UMTBlock(hidden_size, num_attention_heads, mlp_ratio, attn_implementation) for _ in range(num_blocks)])
        self.vision_layernorm = nn.LayerNorm(hidden_size, eps=1e-12)
        # Fixed tables are neither parameters nor buffers: transformers builds models on the meta device and would
        # leave non-persistent buffers uninitialised. They are computed on first use, per (kind, device, dtype).
        self._position_tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def position_table(self, kind: str, device=None, dtype=torch.float32) -> torch.Tensor:
        """`(1, N, C)` table for `kind="video"` (N = num_frames * g^2) or `kind="image"` (N = g^2)."""
        if kind not in ("video", "image"):
            raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (kind, device, dtype)
        if key not in self._position_tables:
            master_key = (kind, torch.device("cpu"), torch.float32)
            if master_key not in self._position_tables:
                # Always built on the CPU in float32 (as the original), then moved: same values on every device.
                frames = self.num_frames if kind == "video" else 1
                table = build_position_table(frames, self.grid_size, self.hidden_size, self.image_size)
                self._position_tables[master_key] = table[None]
            self._position_tables[key] = self._position_tables[master_key].to(device=device, dtype=dtype)
        return self._position_tables[key]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, T, 3, S, S)` -> `(B, T * (S/p)^2, C)`. T == 1 uses the image table, T == num_frames the video one
        (shapes checked by the tower: `VisionTower.check_pixels`)."""
        kind = "image" if pixel_values.shape[1] == 1 else "video"
        hidden_states = self.patch_embed(pixel_values)
        hidden_states = hidden_states + self.position_table(kind, hidden_states.device, hidden_states.dtype)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.vision_layernorm(hidden_states)


class UMTVisionTransformer(nn.Module):
    """Holds the encoder under `.encoder` (the checkpoint's key layout)."""

    def __init__(self, **encoder_kwargs):
        super().__init__()
        self.encoder = UMTEncoder(**encoder_kwargs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values)


class VisionTower(nn.Module):
    """What the model needs of a vision tower, shared by UMT and InternVideo2: only the blocks up to `select_layer`
    (Python-style over the nominal `num_hidden_layers`: 24 layers with -2 build 23 blocks), the sizes the model plans
    its calls with, and the attention switch ("sdpa", "eager", "flash_attention_2"). A tower builds its encoder (under
    `.vision_tower`, the checkpoints' key layout) in `build_encoder` and names its attention module class. Raises
    ValueError for a bad `select_layer`, `num_frames` or `attn_implementation`."""

    attention_class: type[nn.Module]

    def __init__(self, hidden_size: int, num_hidden_layers: int, num_attention_heads: int, patch_size: int,
                 image_size: int, num_frames: int, select_layer: int, mlp_ratio: float, attn_implementation: str):
        super().__init__()
        num_blocks = num_hidden_layers + select_layer + 1
        if not (select_layer < 0 and num_blocks > 0):
            raise ValueError(f"select_layer must be in [-{num_hidden_layers}, -1] (-1 = last of the "
                             f"{num_hidden_layers} layers), got {select_layer}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self._check_attn_implementation(attn_implementation)
        self.image_size, self.num_frames = image_size, num_frames
        self.hidden_size, self.num_blocks = hidden_size, num_blocks
        self.intermediate_size = int(hidden_size * mlp_ratio)
        self.num_patches_per_frame = (image_size // patch_size) ** 2
        self.vision_tower = self.build_encoder(
            hidden_size=hidden_size, num_blocks=num_blocks, num_attention_heads=num_attention_heads,
            patch_size=patch_size, image_size=image_size, num_frames=num_frames, mlp_ratio=mlp_ratio,
            attn_implementation=attn_implementation)

    def build_encoder(self, **encoder_kwargs) -> nn.Module:
        raise NotImplementedError

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise ValueError unless `pixel_values` is `(batch, T, 3, S, S)` with T = 1 (images) or `num_frames`
        (clips: the position table is built for that length)."""
        size = self.image_size
        if pixel_values.dim() != 5 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"pixel_values must be (batch, frames, 3, {size}, {size}): {size}x{size} frames, got shape "
                             f"{tuple(pixel_values.shape)}")
        if pixel_values.shape[1] not in (1, self.num_frames):
            raise ValueError(f"got clips of {pixel_values.shape[1]} frames: the position table is built for "
                             f"{self.num_frames}-frame clips (mm_local_num_frames); pass single frames (T=1) or clips "
                             "of exactly that length")

    @staticmethod
    def _check_attn_implementation(attn_implementation: str):
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
        if attn_implementation == "flash_attention_2" and flash_attn_func is None:
            logger.warning_once("flash_attn is not installed: the vision tower falls back to sdpa attention")

    def set_attn_implementation(self, attn_implementation: str):
        """Switch the attention kernel of every block (results agree to float rounding)."""
        self._check_attn_implementation(attn_implementation)
        for module in self.modules():
            if isinstance(module, self.attention_class):
                module.attn_implementation = attn_implementation


class UMTVisionTower(VisionTower):
    """UMT ViT feature extractor of VideoChat-Flash (ViT-L: width 1024, 24 layers, 16 heads; 224 or 448 px frames):
    the built blocks, then `vision_layernorm`. `num_frames` is the clip length of the video position table
    (`mm_local_num_frames`); see :class:`VisionTower` for the rest."""

    attention_class = UMTAttention

    def __init__(self, hidden_size: int, num_hidden_layers: int, num_attention_heads: int, patch_size: int = 16,
                 image_size: int = 224, num_frames: int = 4, select_layer: int = -2, mlp_ratio: float = 4.0,
                 attn_implementation: str = "sdpa"):
        super().__init__(hidden_size, num_hidden_layers, num_attention_heads, patch_size, image_size, num_frames,
                         select_layer, mlp_ratio, attn_implementation)

    def build_encoder(self, **encoder_kwargs) -> nn.Module:
        return UMTVisionTransformer(**encoder_kwargs)

    def position_table(self, kind: str, device=None, dtype=torch.float32) -> torch.Tensor:
        """The fixed `(1, N, C)` position table added for `kind="video"` or `kind="image"` inputs."""
        return self.vision_tower.encoder.position_table(kind, device, dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, T, 3, S, S)` normalised pixels (T = 1: images, T = `num_frames`: clips) -> `(B, T * (S/p)^2, C)`
        features ordered (frame, row, column). Raises ValueError for other shapes."""
        self.check_pixels(pixel_values)
        return self.vision_tower(pixel_values)
