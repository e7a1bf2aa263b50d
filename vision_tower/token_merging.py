"""ToMe projector of VideoChat-Flash: token merging to 16 tokens per frame, then a 2-layer MLP into the LLM.

Clips of vision-tower features are merged by repeated ToMe bipartite soft matching (Bolya et al., "Token Merging:
Your ViT but Faster") into size-weighted averages of the patches they absorb, so the MLP sees features on the scale
of single patches. The merge decisions follow the original step by step, down to the order of the floating-point
operations behind the similarity scores: sort margins between candidate merges can be one float32 ulp, so a
mathematically equivalent but differently rounded metric would merge different tokens.

Self-contained (torch only): the Hub export copies it as `vision_tower_token_merging.py`.
"""

import torch
from torch import nn


def merge_schedule(num_tokens: int, target: int) -> list[int]:
    """Tokens removed by each ToMe round to go from `num_tokens` to `target`.

    One round can remove at most half of the tokens (every merged token needs a partner in the other half), so
    rounds halve the sequence until the remaining excess fits in one round: 784 -> 64 is `[392, 196, 98, 34]`.
    """
    if target < 1 or target > num_tokens:
        raise ValueError(f"cannot merge {num_tokens} tokens to {target}")
    schedule = []
    while num_tokens > target:
        removed = min(num_tokens - target, num_tokens // 2)
        schedule.append(removed)
        num_tokens -= removed
    return schedule


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe round on `(B, N, D)` metric: each even ("a") token proposes its most cosine-similar odd ("b") token;
    the `r <= N // 2` a tokens with the most similar partners merge away.

    Returns `kept_idx (B, ceil(N/2) - r, 1)` (the kept a tokens, by decreasing best similarity), `src_idx (B, r, 1)`
    (the a tokens merged away) and `dst_idx (B, r, 1)` (the b token each merges into).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)  # (B, N_a, N_b)

    best_score, best_dst = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)[..., None]  # (B, N_a, 1)
    kept_idx, src_idx = order[..., r:, :], order[..., :r, :]
    dst_idx = best_dst[..., None].gather(dim=-2, index=src_idx)
    return kept_idx, src_idx, dst_idx


def merge_sum(x: torch.Tensor, kept_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> torch.Tensor:
    """Apply one matching to `(B, N, C)` values by summation: `(B, N - r, C)` = kept a tokens, then all b tokens
    (each b token plus the a tokens merged into it)."""
    a, b = x[..., ::2, :], x[..., 1::2, :]
    batch_size, _, channels = a.shape
    kept = a.gather(dim=-2, index=kept_idx.expand(batch_size, kept_idx.shape[1], channels))
    src = a.gather(dim=-2, index=src_idx.expand(batch_size, src_idx.shape[1], channels))
    b = b.scatter_add(-2, dst_idx.expand(batch_size, dst_idx.shape[1], channels), src)
    return torch.cat([kept, b], dim=1)


def merge_tokens(x: torch.Tensor, target: int, num_heads: int) -> torch.Tensor:
    """Merge `(B, N, C)` tokens down to `(B, target, C)`; each round's metric is the mean of the current tokens over
    `num_heads` channel groups (the head-averaged features, as in the original).

    Means and sizes are kept in float32 and rounded to the input dtype once at the end: in bfloat16, summing hundreds
    of patches (sizes up to ~25 at 784 -> 64) and rounding every round would lose several bits. For float32 inputs
    this is exactly the original's arithmetic (sum of `x * size`, sum of sizes, divide).
    """
    batch_size, num_tokens, channels = x.shape
    if channels % num_heads:
        raise ValueError(f"feature width {channels} is not divisible by num_heads {num_heads}")
    dtype = x.dtype
    x = x.float()
    size = torch.ones_like(x[..., :1])  # (B, N, 1): patches covered by each token
    for r in merge_schedule(num_tokens, target):
        with torch.no_grad():  # the matching is a discrete choice; gradients flow through the averages only
            metric = x.reshape(batch_size, x.shape[1], num_heads, channels // num_heads).mean(2)
            indices = bipartite_soft_matching(metric, r)
        x = merge_sum(x * size, *indices)
        size = merge_sum(size, *indices)
        x = x / size
    return x.to(dtype)


class ToMeProjector(nn.Module):
    """Token merging (`tokens_per_frame` per video frame, `tokens_per_image` per image) then Linear -> GELU -> Linear,
    from the vision width `mm_hidden_size` to the LLM's `hidden_size`. The ToMe metric averages features over the
    tower's `num_attention_heads`."""

    def __init__(self, mm_hidden_size: int, hidden_size: int, num_attention_heads: int, image_size: int,
                 patch_size: int, tokens_per_frame: int = 16, tokens_per_image: int = 64):
        super().__init__()
        if mm_hidden_size % num_attention_heads:
            raise ValueError(f"mm_hidden_size {mm_hidden_size} is not divisible by num_attention_heads "
                             f"{num_attention_heads}")
        self.num_attention_heads = num_attention_heads
        self.num_patches_per_frame = (image_size // patch_size) ** 2
        self.tokens_per_frame = tokens_per_frame
        self.tokens_per_image = tokens_per_image
        self.mlp = nn.Sequential(nn.Linear(mm_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def merge_tokens(self, x: torch.Tensor, target: int) -> torch.Tensor:
        """`(B, N, C)` -> `(B, target, C)` merged features (before the MLP)."""
        return merge_tokens(x, target, self.num_attention_heads)

    def group_frames(self, features: torch.Tensor, compress: bool = False, local_num_frames: int = -1):
        """`(num_frames, L, C)` per-frame features -> `(groups, tokens, C)` merge groups and the tokens each group is
        merged to, with the original's call semantics: `compress` merges clips of `local_num_frames` frames (-1: all
        rows are one clip) to `tokens_per_frame` per frame; otherwise every row is an image (`local_num_frames` 1 or
        -1) merged to `tokens_per_image`. Raises ValueError for other shapes or combinations."""
        if features.dim() != 3 or features.shape[1] != self.num_patches_per_frame:
            raise ValueError(f"features must be (frames, {self.num_patches_per_frame}, C) per-frame vision features, "
                             f"got shape {tuple(features.shape)}")
        if local_num_frames not in (-1, 1) and not compress:
            raise ValueError(f"local_num_frames={local_num_frames} merges clips of frames: it requires compress=True")
        if not compress:
            return features, self.tokens_per_image
        num_frames, _, channels = features.shape
        clip_frames = num_frames if local_num_frames == -1 else local_num_frames
        if clip_frames < 1 or num_frames % clip_frames:
            raise ValueError(f"{num_frames} frames cannot be split into clips of local_num_frames={local_num_frames}")
        clips = features.reshape(num_frames // clip_frames, clip_frames * self.num_patches_per_frame, channels)
        return clips, self.tokens_per_frame * clip_frames

    def forward(self, features: torch.Tensor, compress: bool = False, local_num_frames: int = -1) -> torch.Tensor:
        """Video `(num_frames, L, C)` with `compress=True, local_num_frames=4` -> `(num_frames / 4, 64, hidden)`;
        images `(N, L, C)` with `compress=False` -> `(N, 64, hidden)` (see `group_frames`)."""
        groups, target = self.group_frames(features, compress, local_num_frames)
        return self.mlp(self.merge_tokens(groups, target))
