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
    hidden states (`len` shrinks at each drop)."""

    query: torch.Tensor  # (batch, len) bool: the token whose attention ranks the visual tokens at inference
    valid: torch.Tensor  # (batch, len) bool: real tokens (False for padding)
    visual: torch.Tensor  # (batch, len) bool: real visual tokens still alive
    num_visual: torch.Tensor  # (batch,) visual tokens before the first drop (the ratios apply to this count)
    kept_index: torch.Tensor  # (batch, len) long: the input position each slot comes from (-1 for padding)
    labels: torch.Tensor | None = None  # (batch, len) training labels (answer spans give the queries), else None
    keep: torch.Tensor | None = None  # (batch,) visual tokens kept by the latest drop (None before the first)


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
    if visual is None or not bool(visual.any()):
        return None, state  # decoding (or text only): positions follow the cache's earlier drops, if any
    if cache is not None and cache.get_seq_length() > 0:  # a drop renumbers the whole sequence: the prefix went in
        raise ValueError("in-LLM visual token dropping needs the visual tokens in the first forward pass of a "
                         "sequence; this call has a non-empty cache. Disable config.mm_llm_compress to continue from a "
                         "cached prefix.")
    if use_cache:
        state = VisualTokenDropState()
        setattr(cache, DROP_STATE_ATTRIBUTE, state)
    valid = key_mask[:, -visual.shape[1] :] if key_mask is not None else torch.ones_like(visual)
    return start_bookkeeping(visual, valid, labels, drop_query_position), state


def start_bookkeeping(visual, valid, labels=None, drop_query_position=None) -> DropBookkeeping:
    """Bookkeeping of the input: `(batch, seq)` visual and valid masks, labels only when training. The query is
    `drop_query_position` (an index, or `(batch,)` indices) or else each row's last real token."""
    (batch, length), device = visual.shape, visual.device
    query_index = (length - 1 - valid.flip(-1).long().argmax(-1) if drop_query_position is None
                   else torch.as_tensor(drop_query_position, device=device).expand(batch))
    query = torch.zeros_like(valid)
    query[torch.arange(batch, device=device), query_index] = True
    visual = visual & valid
    return DropBookkeeping(query=query, valid=valid, visual=visual, num_visual=visual.sum(-1),
                           kept_index=torch.arange(length, device=device).expand(batch, -1), labels=labels)


def stage_drop_type(compress_type: str, stage: int) -> str:
    """'uniform' or 'attention' for the drop that opens `stage` (1-based)."""
    uniform_stages = _UNIFORM_STAGES.get(compress_type)
    return compress_type if uniform_stages is None else ("uniform" if stage <= uniform_stages else "attention")


def query_indices(query, labels=None):
    """`(queries,)` positions of one sample whose attention ranks its visual tokens: `query` `(len,)` bool marks the
    inference query; with training `labels` `(len,)`, the tokens right before each answer span (labels != -100)
    instead; None when the sample has no answer."""
    if labels is None:
        return torch.nonzero(query).flatten()
    answer = labels != -100
    starts = answer[1:] & ~answer[:-1]  # position t predicts token t + 1, the first of a span
    queries = torch.nonzero(starts).flatten()
    return queries if queries.numel() else None


@torch.no_grad()  # a ranking only: topk is not differentiable, and the original scores detached states
def visual_token_scores(next_layer, rotary_emb, hidden_states, positions, valid, queries):
    """Attention that the `(queries,)` indices pay to each key of one sample, as the `Qwen2DecoderLayer` `next_layer`
    computes it (its input norm and q/k projections, the model's `rotary_emb`): `(len,)` softmax over the causally
    visible real keys, averaged over heads, then over queries. `hidden_states` `(len, hidden)`; `positions` and bool
    `valid` `(len,)`."""
    attention = next_layer.self_attn
    normed = next_layer.input_layernorm(hidden_states)
    length, head_dim = hidden_states.shape[0], attention.head_dim
    query = attention.q_proj(normed[queries]).view(len(queries), -1, head_dim).transpose(0, 1)
    key = attention.k_proj(normed).view(length, -1, head_dim).transpose(0, 1)
    cos, sin = (t[0] for t in rotary_emb(hidden_states, positions[None]))
    query = query * cos[queries] + rotate_half(query) * sin[queries]
    key = key * cos + rotate_half(key) * sin
    key = key.repeat_interleave(attention.num_key_value_groups, dim=0)
    weights = torch.matmul(query, key.transpose(1, 2)) * attention.scaling  # (heads, queries, len)
    key_index = torch.arange(length, device=hidden_states.device)
    allowed = (key_index[None, :] <= queries[:, None]) & valid[None, :]
    weights = weights.masked_fill(~allowed[None], torch.finfo(weights.dtype).min)
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(hidden_states.dtype)
    return weights.mean(0).mean(0)


def uniform_choice(count: int, keep: int) -> torch.Tensor:
    """`keep` evenly spaced indices among `count` (first and last included), as the original's linspace."""
    return torch.linspace(0, count - 1, keep, dtype=torch.long)


def select_visual_tokens(drop, hidden_states, positions, ratio, scorer=None):
    """`(batch, len)` bool mask of the visual tokens that survive, `int(n * ratio)` per sample (n = `drop.num_visual`),
    and the `(batch,)` kept counts. `scorer` is None for a uniform stage, else `scorer(hidden_states, positions,
    valid, queries)` giving one sample's `(len,)` scores. A training sample without an answer keeps them all, as in
    the original."""
    keep = (drop.num_visual.double() * ratio).long()  # int(n * ratio), as the original
    selected = torch.zeros_like(drop.visual)
    for i in range(drop.visual.shape[0]):
        candidates = torch.nonzero(drop.visual[i]).flatten()
        if (count := candidates.numel()) == 0:
            continue
        if scorer is None:
            chosen = uniform_choice(count, int(keep[i]))
        else:
            queries = query_indices(drop.query[i], drop.labels[i] if drop.labels is not None else None)
            if queries is None:
                chosen, keep[i] = torch.arange(count), count
            else:
                scores = scorer(hidden_states[i], positions[i], drop.valid[i], queries)
                chosen = scores[candidates].topk(int(keep[i])).indices
        selected[i, candidates[chosen.to(candidates.device)]] = True
    return selected, keep


def drop_visual_tokens(drop, hidden_states, positions, ratio, scorer=None):
    """Keep `int(n * ratio)` visual tokens per sample (see `select_visual_tokens`); text and padding stay. Returns
    hidden_states `(batch, new_len, hidden)`, positions `(batch, new_len)` (closing the gaps, so each sample is
    numbered without holes, as in the original) and the bookkeeping of the kept slots."""
    selected, keep = select_visual_tokens(drop, hidden_states, positions, ratio, scorer)
    kept = drop.valid & (~drop.visual | selected)
    new_positions = positions - torch.cumsum(drop.visual & ~selected, dim=-1)
    # Kept tokens in order, right-aligned: slot j of row i holds its (j - (new_length - kept_i))-th kept token.
    kept_lengths = kept.sum(-1)
    new_length = int(kept_lengths.max())
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)[:, :new_length]  # kept first, in order
    source_slot = torch.arange(new_length, device=kept.device)[None, :] - (new_length - kept_lengths)[:, None]
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
        labels=take(drop.labels, -100) if drop.labels is not None else None, keep=keep)
    return take(hidden_states, None), take(new_positions, 0), kept_drop


def drop_stage(config, layers, rotary_emb, stage, drop, hidden_states, positions):
    """The drop that opens `stage` (1-based) of a model with decoder `layers`: `drop_visual_tokens` with the
    stage's ratio, scored (for attention stages) by the layer that comes next."""
    scorer = None
    if stage_drop_type(config.llm_compress_type, stage) == "attention":
        next_layer = layers[config.llm_compress_layer_list[stage - 1]]  # layer n's successor scores the drop after n
        scorer = partial(visual_token_scores, next_layer, rotary_emb)
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
    "drop_visual_tokens", "labels_at_kept_positions", "prepare_dropping", "query_indices", "record_stage",
    "select_visual_tokens", "stage_drop_type", "start_bookkeeping", "uniform_choice", "visual_token_scores",
]
