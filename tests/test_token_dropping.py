"""In-LLM visual token dropping (token_dropping.py): the pieces on hand-made inputs, then the tiny model."""

from functools import partial

import pytest
import torch

from test_modeling import VIDEO_ID, assert_batch_equals_single_runs, make_sample
from videochat_flash.tiny_model import build_tiny_model
from videochat_flash.token_dropping import (
    DROP_STATE_ATTRIBUTE,
    DropBookkeeping,
    VisualTokenDropState,
    decoding_stage,
    drop_visual_tokens,
    labels_at_kept_positions,
    record_stage,
    score_queries,
    select_visual_tokens,
    stage_drop_type,
    start_bookkeeping,
    top_visual_tokens,
    uniform_choice,
    visual_token_scores,
)


# ------------------------------------------------------------------------------------------------ pieces
def two_rows():
    """Row 0: text, 6 visual, text. Row 1: 2 padding, text, 3 visual, 2 text (positions count real tokens)."""
    visual = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    hidden_states = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8, 1) + 1  # each slot says where it was
    return visual, valid, positions, hidden_states


def test_bookkeeping_query_is_the_last_real_token_or_the_given_position():
    visual, valid, _, _ = two_rows()
    valid = valid.clone()
    valid[0, 6:] = False  # row 0 right-padded over its last visual slot: its last real token is 5
    drop = start_bookkeeping(visual, valid)
    assert drop.query.nonzero().tolist() == [[0, 5], [1, 7]]
    assert drop.num_visual.tolist() == [5, 3]  # a padded slot is not a visual token
    assert (drop.real_counts, drop.visual_counts, drop.first_visual_counts) == ((6, 6), (5, 3), (5, 3))  # on the host
    assert start_bookkeeping(visual, valid, drop_query_position=2).query.nonzero().tolist() == [[0, 2], [1, 2]]


def test_no_visual_tokens_no_bookkeeping_whatever_the_query_position():
    """A decoding step (one token) or a text-only forward: nothing to drop, even with a `drop_query_position` past
    its end (generate passes it to every step)."""
    step = torch.zeros(2, 1, dtype=torch.bool)
    assert start_bookkeeping(step, torch.ones_like(step), drop_query_position=40) is None


def test_training_queries_are_the_tokens_before_each_answer_span():
    visual, valid, _, _ = two_rows()
    assert score_queries(start_bookkeeping(visual, valid))[0].tolist() == [[7], [7]]  # inference: the last token
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100, 7, -100], [-100] * 8])
    query_index, query_valid, has_query = score_queries(start_bookkeeping(visual, valid, labels))
    assert query_index[0].tolist() == [1, 5] and query_valid.tolist() == [[True, True], [False, False]]
    assert has_query == (True, False)  # no answer: nothing to rank from


def test_stage_types():
    assert [stage_drop_type("uniform0_attention", s) for s in (1, 2, 3)] == ["uniform", "attention", "attention"]
    assert [stage_drop_type("uniform1_attention", s) for s in (1, 2, 3)] == ["uniform", "uniform", "attention"]
    assert stage_drop_type("attention", 1) == "attention" and stage_drop_type("uniform", 3) == "uniform"


def test_uniform_drop_keeps_linspace_right_aligns_and_renumbers():
    visual, valid, positions, hidden_states = two_rows()
    labels = torch.arange(16).reshape(2, 8) + 100
    drop = start_bookkeeping(visual, valid, labels)
    hidden_states, positions, kept = drop_visual_tokens(drop, hidden_states, positions, ratio=0.5)
    # int(6 * 0.5) = 3 of row 0's visual tokens at linspace(0, 5, 3) = [0, 2, 5]; int(3 * 0.5) = 1 of row 1's.
    assert uniform_choice(6, 3).tolist() == [0, 2, 5] and uniform_choice(3, 1).tolist() == [0]
    assert kept.keep.tolist() == [3, 1] and kept.num_visual.tolist() == [6, 3]
    assert kept.kept_index.tolist() == [[0, 1, 3, 6, 7], [-1, 2, 3, 6, 7]]  # row 1 is shorter: padded on the left
    assert kept.valid.tolist() == [[True] * 5, [False] + [True] * 4]
    assert hidden_states[..., 0].tolist() == [[1, 2, 4, 7, 8], [0, 11, 12, 15, 16]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]  # no holes
    assert kept.visual.tolist() == [[False, True, True, True, False], [False, False, True, False, False]]
    assert kept.query.nonzero().tolist() == [[0, 4], [1, 4]]
    assert kept.labels.tolist() == [[100, 101, 103, 106, 107], [-100, 110, 111, 114, 115]]
    assert torch.equal(labels_at_kept_positions(labels, kept.kept_index), kept.labels)


def test_attention_drop_keeps_the_top_scores_in_original_order():
    visual, valid, positions, hidden_states = two_rows()
    scores = torch.tensor([9, 1, 8, 2, 7, 3, 6, 9], dtype=torch.float32).expand(2, -1)  # both rows
    drop = start_bookkeeping(visual, valid)
    selected, keep, keep_counts = select_visual_tokens(drop, hidden_states, positions, 0.5, lambda *args: scores)
    assert selected.nonzero().tolist() == [[0, 2], [0, 4], [0, 6], [1, 4]] and keep.tolist() == [3, 1]
    assert keep_counts == (3, 1)
    # training: the sample without an answer keeps every visual token, as in the original
    labels = torch.full((2, 8), -100)
    labels[0, 7] = 1
    drop = start_bookkeeping(visual, valid, labels)
    selected, keep, keep_counts = select_visual_tokens(drop, hidden_states, positions, 0.5, lambda *args: scores)
    assert keep.tolist() == [3, 3] and keep_counts == (3, 3) and selected[1].nonzero().flatten().tolist() == [3, 4, 5]


def test_scores_are_the_next_layers_attention_weights():
    """visual_token_scores equals the head-averaged eager attention of the layer it scores with."""
    model = build_tiny_model(seed=3).model
    layer, rotary = model.layers[2], model.rotary_emb
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(12, model.config.hidden_size, generator=generator)
    valid = torch.ones(12, dtype=torch.bool)
    valid[:2] = False  # left padding
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    queries = torch.tensor([7, 11])
    scores = visual_token_scores(layer, rotary, hidden_states[None], positions[None], valid[None], queries[None])[0]

    allowed = torch.ones(12, 12, dtype=torch.bool).tril() & valid[None, :]
    mask = torch.zeros(1, 1, 12, 12).masked_fill(~allowed, torch.finfo(torch.float32).min)
    normed = layer.input_layernorm(hidden_states)[None]
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            cos_sin = rotary(normed, positions[None])
            _, weights = layer.self_attn(normed, position_embeddings=cos_sin, attention_mask=mask)
    finally:
        model.config._attn_implementation = "sdpa"
    expected = weights[0][:, queries].mean(0).mean(0)
    assert (scores - expected).abs().max().item() < 1e-6


def test_batched_scores_equal_each_row_alone():
    """One pass scores a padded batch as each sample alone would be scored, with one query or several (training)."""
    model = build_tiny_model(seed=3).model
    layer, rotary = model.layers[2], model.rotary_emb
    generator = torch.Generator().manual_seed(1)
    hidden_states = torch.randn(2, 12, model.config.hidden_size, generator=generator)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # row 1: left padding
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    query_index = torch.tensor([[9, 11], [11, 0]])
    query_valid = torch.tensor([[True, True], [True, False]])  # row 1 has one query, padded
    batched = visual_token_scores(layer, rotary, hidden_states, positions, valid, query_index, query_valid)
    for row, count in enumerate((2, 1)):
        alone = visual_token_scores(layer, rotary, hidden_states[row : row + 1], positions[row : row + 1],
                                    valid[row : row + 1], query_index[row : row + 1, :count])
        assert (batched[row] - alone[0]).abs().max().item() < 1e-7
    # the closing stage's rotary embeddings, when passed, stand in for computing them again
    given = visual_token_scores(layer, rotary, hidden_states, positions, valid, query_index, query_valid,
                                position_embeddings=rotary(hidden_states, positions))
    assert torch.equal(given, batched)


def test_a_batch_picks_what_each_row_alone_picks_ties_included():
    """topk over each row's own visual tokens, as the per-sample loop did: with tied scores (frequent in bfloat16) a
    row of a batch keeps exactly the tokens it keeps alone."""
    generator = torch.Generator().manual_seed(2)
    visual = torch.rand(3, 40, generator=generator) < torch.tensor([[0.8], [0.5], [0.3]])
    scores = torch.randint(0, 4, (3, 40), generator=generator).to(torch.bfloat16)  # many ties
    counts = tuple(visual.sum(-1).tolist())
    keeps = tuple(count // 3 for count in counts)
    batched = top_visual_tokens(scores, visual, counts, keeps)
    for row in range(3):
        candidates = visual[row].nonzero().flatten()
        expected = torch.zeros(40, dtype=torch.bool)
        expected[candidates[scores[row][candidates].topk(keeps[row]).indices]] = True  # the per-sample rule
        assert torch.equal(batched[row], expected)
        alone = top_visual_tokens(scores[row : row + 1], visual[row : row + 1], counts[row : row + 1],
                                  keeps[row : row + 1])
        assert torch.equal(alone[0], expected)


@pytest.mark.parametrize("kind", ["uniform", "attention"])
def test_drops_never_wait_for_the_device(kind):
    """Shapes come from the host counts read once by start_bookkeeping: two drops run on meta tensors, which cannot
    be read (an .item(), .tolist() or bool() of one raises), so nothing in them waits for an accelerator's queue."""
    model = build_tiny_model(seed=3).model
    layer, rotary = model.layers[2].to("meta"), model.rotary_emb.to("meta")
    visual, valid, positions, hidden_states = two_rows()
    hidden_states = hidden_states.expand(-1, -1, model.config.hidden_size)
    host = start_bookkeeping(visual, valid)
    drop = DropBookkeeping(query=host.query.to("meta"), valid=host.valid.to("meta"), visual=host.visual.to("meta"),
                           num_visual=host.num_visual.to("meta"), kept_index=host.kept_index.to("meta"),
                           real_counts=host.real_counts, visual_counts=host.visual_counts,
                           first_visual_counts=host.first_visual_counts)
    scorer = None if kind == "uniform" else partial(visual_token_scores, layer, rotary)
    hidden_states, positions = hidden_states.to("meta"), positions.to("meta")
    for ratio in (0.5, 0.25):
        hidden_states, positions, drop = drop_visual_tokens(drop, hidden_states, positions, ratio, scorer)
    # row 0: 2 text + int(6 / 4) = 1 visual; row 1: 3 text + int(3 / 4) = 0 visual
    assert hidden_states.shape[:2] == (2, 3) and drop.real_counts == (3, 3) and drop.visual_counts == (1, 0)


def test_decoding_follows_the_recorded_stages():
    visual, valid, positions, hidden_states = two_rows()
    _, _, kept = drop_visual_tokens(start_bookkeeping(visual, valid), hidden_states, positions, ratio=0.5)
    state = VisualTokenDropState()
    record_stage(state, 1, kept)
    assert state.dropped[1].tolist() == [3, 2]
    assert decoding_stage(state, 2, torch.tensor([[8], [6]]), None) is None  # stage 2 never dropped
    new_positions, key_mask = decoding_stage(state, 1, torch.tensor([[8], [6]]), None)
    assert new_positions.tolist() == [[5], [4]]  # right after each row's last kept token
    assert key_mask.tolist() == [[True] * 6, [False] + [True] * 5]
    # the next step's keys are the stored ones plus its own (a padded new token is masked)
    next_positions, next_mask = decoding_stage(state, 1, torch.tensor([[9], [7]]), torch.tensor([[True], [False]]))
    assert next_positions.tolist() == [[6], [5]]
    assert next_mask.tolist() == [[True] * 7, [False] + [True] * 5 + [False]]


# ------------------------------------------------------------------------------------------------ tiny model
def test_token_dropping_stages_positions_and_cached_decoding():
    model = build_tiny_model(seed=5, mm_llm_compress=True, llm_compress_layer_list=[1, 3],
                             llm_image_token_ratio_list=[1, 0.75, 0.25], llm_compress_type="uniform0_attention")
    ids, frames = make_sample(8, 6, 11, seed=6)
    n = 16 * 8
    with torch.no_grad():
        out = model(ids[None], pixel_values_videos=[frames], use_cache=True, output_hidden_states=True)
    lengths = [h.shape[1] for h in out.hidden_states]
    full = len(ids)
    # input of layers 0..3, then the final norm: a drop after layer 1 and after layer 3
    assert lengths == [full, full - (n - int(n * 0.75)), full - (n - int(n * 0.75)), full - (n - int(n * 0.25)),
                       full - (n - int(n * 0.25))]
    # positions are renumbered without holes after each drop (captured at the input of the last layer)
    seen = {}
    hook = model.model.layers[3].register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(positions=kwargs["position_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        model(ids[None], pixel_values_videos=[frames], use_cache=False)
    hook.remove()
    assert seen["positions"][0].tolist() == list(range(full - (n - int(n * 0.25))))
    kept = out.kept_token_index[0]
    assert int((ids[kept] == VIDEO_ID).sum()) == int(n * 0.25)
    assert torch.all(kept[1:] > kept[:-1])  # original order
    state = getattr(out.cache if hasattr(out, "cache") else out.past_key_values, DROP_STATE_ATTRIBUTE)
    assert state.dropped[1].tolist() == [n - int(n * 0.75)] and state.dropped[2].tolist() == [n - int(n * 0.25)]
    # cached decoding (positions shifted by the dropped tokens) = recomputing from scratch with the same ranking
    with torch.no_grad():
        cached = model.generate(ids[None], pixel_values_videos=[frames], max_new_tokens=6, do_sample=False)
        uncached = model.generate(ids[None], pixel_values_videos=[frames], max_new_tokens=6, do_sample=False,
                                  use_cache=False, drop_query_position=len(ids) - 1)
    assert cached.tolist() == uncached.tolist()
    # eager attention equals sdpa with dropping on
    with torch.no_grad():
        sdpa = model(ids[None], pixel_values_videos=[frames], use_cache=False).logits
        model.config._attn_implementation = "eager"
        eager = model(ids[None], pixel_values_videos=[frames], use_cache=False).logits
        model.config._attn_implementation = "sdpa"
    assert (sdpa - eager).abs().max().item() < 1e-4


@pytest.mark.parametrize("compress_type", ["attention", "uniform", "uniform0_attention", "uniform1_attention"])
def test_every_drop_type_keeps_int_n_ratio(compress_type):
    model = build_tiny_model(seed=7, mm_llm_compress=True, llm_compress_layer_list=[1, 2, 3],
                             llm_image_token_ratio_list=[1, 0.6, 0.3, 0.1], llm_compress_type=compress_type)
    ids, frames = make_sample(4, 2, 5, seed=8)
    with torch.no_grad():
        out = model(ids[None], pixel_values_videos=[frames], use_cache=False, output_hidden_states=True)
    n, full = 64, len(ids)
    assert [h.shape[1] for h in out.hidden_states[1:4]] == [full - n + int(n * r) for r in (0.6, 0.3, 0.1)]
    assert torch.isfinite(out.logits).all()


def test_left_padded_batch_equals_single_runs_with_dropping():
    assert_batch_equals_single_runs(build_tiny_model(seed=0, mm_llm_compress=True))


def test_dropping_settings_are_validated():
    """Checked when the model is built with dropping on (before any weights load), and in the forward when it is
    switched on afterwards (the model card's way)."""
    bad = {"llm_compress_layer_list": [4], "llm_image_token_ratio_list": [1, 0.5]}
    with pytest.raises(ValueError, match="llm_compress_layer_list"):
        build_tiny_model(seed=0, mm_llm_compress=True, **bad)
    model = build_tiny_model(seed=0, **bad)
    model.config.mm_llm_compress = True
    ids, frames = make_sample(4, 2, 2, seed=0)
    with pytest.raises(ValueError, match="llm_compress_layer_list"):
        model(ids[None], pixel_values_videos=[frames])


def test_visual_tokens_after_a_cached_prefix_are_refused():
    model = build_tiny_model(seed=0, mm_llm_compress=True)
    ids, frames = make_sample(4, 2, 2, seed=0)
    with torch.no_grad():
        prefix = model(ids[None, :2], use_cache=True)
        cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
        with pytest.raises(ValueError, match="non-empty cache"):
            model(ids[None, 2:], pixel_values_videos=[frames], cache=cache, use_cache=True)
