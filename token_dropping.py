"""In-LLM visual token dropping of VideoChat-Flash (``mm_llm_compress``).

After each layer listed in ``config.llm_compress_layer_list`` a *drop stage* starts: every sample keeps
``int(n * ratio)`` of its ``n`` visual tokens (``llm_image_token_ratio_list[stage]``), in their original order, and
the layers of that stage never see the others. The tokens are chosen

* by attention (``attention`` stages): the NEXT layer's input norm, q/k projections and rotary embedding score the
  visual keys from the query (the last prompt token at inference, the tokens right before each answer span in
  training); softmax over the keys, averaged over heads and queries; the top ones are kept;
* or uniformly (``uniform`` stages): ``linspace(0, n - 1, keep)``. ``uniform0_attention`` makes stage 1 uniform and
  the later ones attention-based, ``uniform1_attention`` stages 1 and 2.

The kept sequences are right-aligned (left padding, so generation can append to them) and renumbered without holes.
Dropping happens in the prefill only; cached decoding steps follow the `VisualTokenDropState` stored on the cache.

A drop is a handful of batched tensor ops per group of rows of equal sizes (rows of one video share one): at inference
the row counts that set shapes are read to the host once per prefill (`start_bookkeeping`), so on an accelerator the
drops queue behind the layers instead of waiting for them (with per-sample loops, each sample's `nonzero` /
`topk(int(...))` stalled the queue); training reads each drop's answer counts as well.
"""

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import rotate_half
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Attribute of the cache object that holds its `VisualTokenDropState`.
DROP_STATE_ATTRIBUTE = "videochat_flash_drop_state"

# llm_compress_type -> how many leading stages are uniform (the rest use attention).
_UNIFORM_STAGES = {"uniform0_attention": 1, "uniform1_attention": 2}


@dataclass
class VisualTokenDropState:
    """What cached decoding needs after a drop: layers after it cache fewer keys than layer 0, so later tokens'
    positions and masks cannot come from ``cache.get_seq_length()``. Stored on the cache (travels with its copies)."""

    dropped: dict = field(default_factory=dict)  # stage -> (batch,) visual tokens removed: new positions shift by it
    key_masks: dict = field(default_factory=dict)  # stage -> (batch, cached_len) bool: real cached keys of its layers


@dataclass
class DropBookkeeping:
    """Per-sample bookkeeping of one prefill's drops; every `(batch, len)` tensor is aligned with the current stage's
    hidden states (`len` shrinks at each drop). The counts that set tensor shapes are also kept on the host (read
    once, at the start), so the drops of an inference prefill never wait for the device."""

    query: torch.Tensor  # (batch, len) bool: the token whose attention ranks the visual tokens at inference
    valid: torch.Tensor  # (batch, len) bool: real tokens (False for padding)
    visual: torch.Tensor  # (batch, len) bool: real visual tokens still alive
    num_visual: torch.Tensor  # (batch,) visual tokens before the first drop (the ratios apply to this count)
    kept_index: torch.Tensor  # (batch, len) long: the input position each slot comes from (-1 for padding)
    labels: torch.Tensor | None = None  # (batch, len) training labels (answer spans give the queries), else None
    keep: torch.Tensor | None = None  # (batch,) visual tokens kept by the latest drop (None before the first)
    real_counts: tuple[int, ...] = ()  # host: real tokens per row now
    visual_counts: tuple[int, ...] = ()  # host: visual tokens alive per row now
    first_visual_counts: tuple[int, ...] = ()  # host: `num_visual`


def prepare_dropping(config, visual, key_mask, cache, use_cache, labels, drop_query_position):
    """`(bookkeeping, state)` of one forward, from the `(batch, seq)` placeholder mask `visual` (None without input_ids)
    and the `(batch, past + seq)` `key_mask` (None: all real): bookkeeping for a prefill with visual tokens (else
    None), and the cache's `VisualTokenDropState` (new for such a prefill with `use_cache`; None with dropping off).
    Raises ValueError for bad dropping settings or visual tokens after a cached prefix.
    """
    if not config.mm_llm_compress:
        return None, None
    config.validate_token_dropping(cache)
    state = getattr(cache, DROP_STATE_ATTRIBUTE, None) if cache is not None else None
    if visual is None and (cache is None or cache.get_seq_length() == 0):
        logger.warning_once("in-LLM token dropping finds the visual tokens by their placeholders in input_ids: with "
                            "inputs_embeds alone, none is dropped")
    if visual is None:
        return None, state
    valid = key_mask[:, -visual.shape[1] :] if key_mask is not None else torch.ones_like(visual)
    drop = start_bookkeeping(visual, valid, labels, drop_query_position)
    if drop is None:
        return None, state  # decoding (or text only): positions follow the cache's earlier drops, if any
    if cache is not None and cache.get_seq_length() > 0:  # a drop renumbers the whole sequence: the prefix went in
        raise ValueError("in-LLM visual token dropping needs the visual tokens in the first forward pass of a "
                         "sequence; this call has a non-empty cache. Disable config.mm_llm_compress to continue from a "
                         "cached prefix.")
    if use_cache:
        state = VisualTokenDropState()
        setattr(cache, DROP_STATE_ATTRIBUTE, state)
    return drop, state


def start_bookkeeping(visual, valid, labels=None, drop_query_position=None) -> DropBookkeeping | None:
    """Bookkeeping of the input: `(batch, seq)` visual and valid masks, labels only when training. The query is
    `drop_query_position` (an index, or `(batch,)` indices) or else each row's last real token. Reads the row counts
    to the host: the one wait for the device of a prefill's drops at inference. None when there are no visual
    tokens (a decoding step, or text only), whatever `drop_query_position` says."""
    (batch, length), device = visual.shape, visual.device
    visual = visual & valid
    num_visual = visual.sum(-1)
    real_counts, visual_counts = (tuple(row) for row in torch.stack([valid.sum(-1), num_visual]).tolist())
    if not any(visual_counts):
        return None
    query_index = (length - 1 - valid.flip(-1).long().argmax(-1) if drop_query_position is None
                   else torch.as_tensor(drop_query_position, device=device).expand(batch))
    query = torch.zeros_like(valid)
    query[torch.arange(batch, device=device), query_index] = True
    return DropBookkeeping(query=query, valid=valid, visual=visual, num_visual=num_visual,
                           kept_index=torch.arange(length, device=device).expand(batch, -1), labels=labels,
                           real_counts=real_counts, visual_counts=visual_counts, first_visual_counts=visual_counts)


def stage_drop_type(compress_type: str, stage: int) -> str:
    """'uniform' or 'attention' for the drop that opens `stage` (1-based)."""
    uniform_stages = _UNIFORM_STAGES.get(compress_type)
    return compress_type if uniform_stages is None else ("uniform" if stage <= uniform_stages else "attention")


def first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """`(batch, count)` positions of the first `count` True entries of each `(batch, len)` row, in order (rows with
    fewer continue with positions of False entries: mask those out by rank)."""
    return torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :count]


def score_queries(drop: DropBookkeeping):
    """`(query_index, query_valid, has_query)`: the `(batch, Q)` positions whose attention ranks the visual tokens,
    `(batch, Q)` bool marking the real ones (None: all are), and per row (host) whether it has any. At inference the
    one query of each row; with training labels, the tokens right before each answer span (labels != -100: position
    t predicts token t + 1, the first of a span), which a row without an answer lacks."""
    if drop.labels is None:
        return drop.query.to(torch.int8).argmax(-1, keepdim=True), None, (True,) * drop.query.shape[0]
    answer = drop.labels != -100
    starts = nn.functional.pad(answer[:, 1:] & ~answer[:, :-1], (0, 1))
    counts = starts.sum(-1)
    count_list = counts.tolist()  # training only: the query count sets a shape
    most = max(1, max(count_list))
    query_valid = torch.arange(most, device=counts.device)[None] < counts[:, None]
    return first_true(starts, most), query_valid, tuple(count > 0 for count in count_list)


@torch.no_grad()  # a ranking only: topk is not differentiable, and the original scores detached states
def visual_token_scores(next_layer, rotary_emb, hidden_states, positions, valid, query_index, query_valid=None,
                        position_embeddings=None):
    """`(batch, len)` attention that the `(batch, Q)` `query_index` positions pay to each key, as the
    `Qwen2DecoderLayer` `next_layer` computes it (its input norm and q/k projections, the model's `rotary_emb`, or
    the stage's `(cos, sin)` `position_embeddings` when given): softmax over the causally visible real keys, averaged
    over heads, then over the queries (those `query_valid` marks; None: all). `hidden_states` `(batch, len, hidden)`;
    `positions` and bool `valid` `(batch, len)`. One pass for the whole batch: the queries of a key-value head are
    the rows of one matmul (no repeated keys)."""
    attention = next_layer.self_attn
    (batch, length, _), head_dim = hidden_states.shape, attention.head_dim
    num_queries, groups = query_index.shape[1], attention.num_key_value_groups
    rows = torch.arange(batch, device=hidden_states.device)[:, None]
    normed = next_layer.input_layernorm(hidden_states)
    cos, sin = position_embeddings if position_embeddings is not None else rotary_emb(hidden_states, positions)
    query = attention.q_proj(normed[rows, query_index]).view(batch, num_queries, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)  # (batch, kv, len, d)
    query_cos, query_sin = cos[rows, query_index][:, None], sin[rows, query_index][:, None]
    query = query * query_cos + rotate_half(query) * query_sin  # (batch, heads, Q, d)
    key = key * cos[:, None] + rotate_half(key) * sin[:, None]
    query = query.reshape(batch, key.shape[1], groups * num_queries, head_dim)  # head h -> kv head h // groups
    weights = torch.matmul(query, key.transpose(-1, -2)) * attention.scaling  # (batch, kv, groups * Q, len)
    weights = weights.view(batch, -1, num_queries, length)  # (batch, heads, Q, len)
    key_index = torch.arange(length, device=hidden_states.device)
    allowed = (key_index[None, None, :] <= query_index[:, :, None]) & valid[:, None, :]  # (batch, Q, len)
    weights = weights.masked_fill(~allowed[:, None], torch.finfo(weights.dtype).min)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(hidden_states.dtype)
    per_query = weights.mean(1)  # over heads: (batch, Q, len)
    if query_valid is None:
        return per_query.mean(1)
    # the mean over each row's own queries, rounded once as `mean` rounds
    total = (per_query.float() * query_valid[..., None]).sum(1)
    return (total / query_valid.sum(1, keepdim=True).clamp(min=1)).to(per_query.dtype)


def uniform_choice(count: int, keep: int) -> torch.Tensor:
    """`keep` evenly spaced indices among `count` (first and last included), as the original's linspace."""
    return torch.linspace(0, count - 1, keep, dtype=torch.long)


def rows_by_size(*per_row) -> dict[tuple, list[int]]:
    """Row indices grouped by their host values (e.g. `(count, keep)`): rows of one video share a group."""
    groups: dict[tuple, list[int]] = {}
    for row, key in enumerate(zip(*per_row)):
        groups.setdefault(key, []).append(row)
    return groups


def host_to_device(values, device, dtype=None) -> torch.Tensor:
    """A tensor of host `values` on `device`, copied without waiting for the device's queue."""
    return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)


def row_index(rows: list[int], batch: int, device):
    """Index of `rows` of a batch: a slice when they are all of it (no copy to the device)."""
    return slice(None) if len(rows) == batch else host_to_device(rows, device)


def uniform_rank_mask(counts, keeps, device) -> torch.Tensor:
    """`(batch, max(counts))` bool: which ranks among each row's visual tokens a uniform stage keeps (host counts).
    Built on the host (CPU linspace, as the original's indices), one copy to the device."""
    mask = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for (count, keep), rows in rows_by_size(counts, keeps).items():
        mask[rows, uniform_choice(count, keep)[:, None]] = True
    return host_to_device(mask, device)


def top_visual_tokens(scores, visual, counts, keeps) -> torch.Tensor:
    """`(batch, len)` bool: the `keeps[i]` best-scored of the `counts[i]` visual tokens of each row. ``topk`` runs over
    exactly a row's own visual tokens, as for that sample alone (ties too: a batch picks what single runs pick), once
    per group of rows of equal sizes."""
    candidates = first_true(visual, max(counts))  # (batch, most): each row's visual positions, in order
    candidate_scores = scores.gather(1, candidates)
    selected = torch.zeros_like(visual)
    for (count, keep), rows in rows_by_size(counts, keeps).items():
        if count == 0:
            continue
        index = row_index(rows, len(counts), visual.device)
        row_candidates = candidates[index, :count]
        winners = row_candidates if keep == count else row_candidates.gather(
            1, candidate_scores[index, :count].topk(keep, dim=-1).indices)
        selected[index] = selected[index].scatter(1, winners, True)
    return selected


def select_visual_tokens(drop, hidden_states, positions, ratio, scorer=None):
    """`(selected, keep, keep_counts)`: the `(batch, len)` bool mask of the visual tokens that survive, `int(n * ratio)`
    per sample (n = `drop.num_visual`), their `(batch,)` counts, and the same counts on the host. `scorer` is None for
    a uniform stage, else `scorer(hidden_states, positions, valid, query_index, query_valid)` giving `(batch, len)`
    scores (see `score_queries`) whose top ones win. A training sample without an answer keeps them all, as in the
    original. Batched: no per-sample device work, and at inference no wait for the device."""
    counts, device = drop.visual_counts, drop.visual.device
    keep_counts = tuple(int(n * ratio) for n in drop.first_visual_counts)  # int(n * ratio), as the original
    if not any(counts):  # an earlier drop kept none
        selected = torch.zeros_like(drop.visual)
    elif scorer is None:
        by_rank = uniform_rank_mask(counts, keep_counts, device)
        rank = (drop.visual.long().cumsum(-1) - 1).clamp(0, by_rank.shape[1] - 1)  # among the row's visual tokens
        selected = drop.visual & by_rank.gather(1, rank)
    else:
        query_index, query_valid, has_query = score_queries(drop)
        # training rows without an answer keep every visual token
        keep_counts = tuple(k if ranked else n for k, n, ranked in zip(keep_counts, counts, has_query))
        scores = scorer(hidden_states, positions, drop.valid, query_index, query_valid)
        selected = top_visual_tokens(scores, drop.visual, counts, keep_counts)
    return selected, host_to_device(keep_counts, device, torch.long), keep_counts


def drop_visual_tokens(drop, hidden_states, positions, ratio, scorer=None):
    """Keep `int(n * ratio)` visual tokens per sample (see `select_visual_tokens`); text and padding stay. Returns
    hidden_states `(batch, new_len, hidden)`, positions `(batch, new_len)` (closing the gaps, so each sample is
    numbered without holes, as in the original) and the bookkeeping of the kept slots."""
    selected, keep, keep_counts = select_visual_tokens(drop, hidden_states, positions, ratio, scorer)
    kept = drop.valid & (~drop.visual | selected)
    new_positions = positions - torch.cumsum(drop.visual & ~selected, dim=-1)
    # Kept tokens in order, right-aligned: slot j of row i holds its (j - (new_length - kept_i))-th kept token.
    real_counts = tuple(real - count + k for real, count, k in zip(drop.real_counts, drop.visual_counts, keep_counts))
    new_length = max(real_counts)
    order = first_true(kept, new_length)  # kept first, in order
    source_slot = torch.arange(new_length, device=kept.device)[None, :] - (new_length - kept.sum(-1))[:, None]
    gather_index, new_valid = order.gather(1, source_slot.clamp(min=0)), source_slot >= 0

    def take(tensor, fill):
        """`(batch, len)` or `(batch, len, dim)` -> the kept slots; padding slots get `fill` (zeros when None)."""
        if tensor.dim() == 2:
            picked, mask = tensor.gather(1, gather_index), new_valid
        else:
            picked = tensor.gather(1, gather_index[..., None].expand(-1, -1, tensor.shape[-1]))
            mask = new_valid[..., None]
        return picked.masked_fill(~mask, fill) if fill is not None else picked * mask

    kept_drop = DropBookkeeping(
        query=take(drop.query, False), valid=new_valid, visual=take(drop.visual & selected, False),
        num_visual=drop.num_visual, kept_index=take(drop.kept_index, -1),
        labels=take(drop.labels, -100) if drop.labels is not None else None, keep=keep,
        real_counts=real_counts, visual_counts=keep_counts, first_visual_counts=drop.first_visual_counts)
    return take(hidden_states, None), take(new_positions, 0), kept_drop


def drop_stage(config, layers, stage, drop, hidden_states, positions, position_embeddings):
    """The drop that opens `stage` (1-based) of a model with decoder `layers`: `drop_visual_tokens` with the
    stage's ratio, scored (for attention stages) by the layer that comes next, with the closing stage's rotary
    `(cos, sin)` of `positions`."""
    scorer = None
    if stage_drop_type(config.llm_compress_type, stage) == "attention":
        next_layer = layers[config.llm_compress_layer_list[stage - 1]]  # layer n's successor scores the drop after n
        scorer = partial(visual_token_scores, next_layer, None, position_embeddings=position_embeddings)
    return drop_visual_tokens(drop, hidden_states, positions, config.llm_image_token_ratio_list[stage], scorer)


def record_stage(state: VisualTokenDropState, stage: int, drop: DropBookkeeping) -> None:
    """Prefill: remember what the drop opening `stage` removed, for the decoding steps."""
    state.dropped[stage] = drop.num_visual - drop.keep
    state.key_masks[stage] = drop.valid


def decoding_stage(state: VisualTokenDropState, stage: int, position_ids, new_valid):
    """Cached decoding: `(positions, key_mask)` of the new tokens in the layers of `stage`, from their `(batch, new)`
    layer-0 `position_ids` and bool `new_valid` (None: all real); key_mask `(batch, cached + new)` is also appended
    to the state. None when the prefill dropped nothing before this stage (text only)."""
    if (cached := state.key_masks.get(stage)) is None:
        return None
    if new_valid is None:
        new_valid = torch.ones(cached.shape[0], position_ids.shape[-1], dtype=torch.bool, device=cached.device)
    state.key_masks[stage] = torch.cat([cached, new_valid], dim=1)
    return position_ids - state.dropped[stage][:, None], state.key_masks[stage]


def labels_at_kept_positions(labels, kept_token_index):
    """`(batch, seq)` labels -> `(batch, kept_len)` labels of the kept positions (-100 for padding slots)."""
    return labels.gather(1, kept_token_index.clamp(min=0)).masked_fill(kept_token_index < 0, -100)


__all__ = [
    "DROP_STATE_ATTRIBUTE", "DropBookkeeping", "VisualTokenDropState", "decoding_stage", "drop_stage",
    "drop_visual_tokens", "first_true", "labels_at_kept_positions", "prepare_dropping", "record_stage",
    "rows_by_size", "score_queries", "select_visual_tokens", "stage_drop_type", "start_bookkeeping",
    "top_visual_tokens", "uniform_choice", "uniform_rank_mask", "visual_token_scores",
]
