"""Common model tests in the spirit of transformers' `ModelTesterMixin`, on the tiny model with a video: save/load,
batching, attention and cache implementations, offloading, gradient checkpointing, dtypes, output options, VLM
conventions and torch.compile. Each prints the figure it checks."""

import copy
import importlib.util
import time

import pytest
import torch
from transformers import StaticCache

from test_modeling import VIDEO_ID, _loss_and_grads, left_pad, make_sample
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM
from videochat_flash.tiny_model import build_tiny_model


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=21)


@pytest.fixture(scope="module")
def sample():
    """One prompt with an 8-frame video (2 clips): 6 text tokens, 128 placeholders, 7 text tokens."""
    return make_sample(8, 6, 7, seed=22)


def run(model, sample, **kwargs):
    ids, frames = sample
    with torch.no_grad():
        return model(ids[None], pixel_values_videos=frames[None], use_cache=False, **kwargs)


def greedy(model, ids, frames=None, **kwargs):
    video = {} if frames is None else {"pixel_values_videos": frames[None]}
    with torch.no_grad():
        out = model.generate(ids[None], **video, max_new_tokens=6, do_sample=False, **kwargs)
    return out[0, len(ids) :].tolist()


def padded_video_batch(samples, side):
    """A left-padded text batch with its videos as a pipeline batches them: `(videos, T, 3, S, S)` zero-padded along
    frames (on `side`) plus `video_frame_counts`."""
    ids, mask = left_pad([s[0] for s in samples])
    longest = max(len(s[1]) for s in samples)
    pixels = torch.zeros(len(samples), longest, *samples[0][1].shape[1:])
    for row, (_, frames) in enumerate(samples):
        target = pixels[row, longest - len(frames) :] if side == "left" else pixels[row, : len(frames)]
        target.copy_(frames)
    return ids, mask, pixels, torch.tensor([len(s[1]) for s in samples])


# ------------------------------------------------------------------------------------------------ save and load
def test_save_pretrained_round_trip(model, sample, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = VideoChatFlashForCausalLM.from_pretrained(tmp_path).eval()
    diff = max_diff(run(loaded, sample).logits, run(model, sample).logits)
    print(f"\nround trip logits max abs diff: {diff:.1e}")
    assert diff == 0.0
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}


# ------------------------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("dropping", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_video_batch_equals_single_runs(dropping, side):
    """Videos of 4 and 12 frames, zero-padded to 12 along frames, with their counts: each row's logits and greedy ids
    are its single run's (left-padded text; with dropping the kept positions are compared)."""
    model = build_tiny_model(seed=23, mm_llm_compress=dropping)
    samples = [make_sample(4, 5, 9, seed=24), make_sample(12, 3, 6, seed=25)]
    ids, mask, pixels, counts = padded_video_batch(samples, side)
    inputs = {"attention_mask": mask, "pixel_values_videos": pixels, "video_frame_counts": counts}
    with torch.no_grad():
        batched = model(ids, **inputs).logits
        batch_ids = model.generate(ids, **inputs, max_new_tokens=6, do_sample=False)[:, ids.shape[1] :].tolist()
        diffs = []
        for row, (single_ids, frames) in enumerate(samples):
            single = model(single_ids[None], pixel_values_videos=[frames]).logits[0]
            diffs.append(max_diff(batched[row, -single.shape[0] :], single))
            assert batch_ids[row] == greedy(model, single_ids, frames), row
    print(f"\npadded 5-D batch ({side} frame padding, dropping={dropping}) vs single runs: {max(diffs):.1e}, "
          f"greedy ids equal {batch_ids}")
    assert max(diffs) < 1e-4


# ------------------------------------------------------------------------------------------------ attention
def test_eager_equals_sdpa(sample):
    model = build_tiny_model(seed=21)
    sdpa = run(model, sample).logits
    model.set_attn_implementation("eager")
    eager = run(model, sample).logits
    diff = max_diff(sdpa, eager)
    print(f"\neager vs sdpa logits max abs diff: {diff:.1e}")
    assert diff < 1e-4


def test_flash_attention_2_runs_or_fails_clearly(sample):
    model = build_tiny_model(seed=21)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2"):
            model.set_attn_implementation("flash_attention_2")
        assert model.config._attn_implementation == "sdpa"  # the failed switch leaves the model working
        assert torch.isfinite(run(model, sample).logits).all()
        print("\nflash_attn not installed: set_attn_implementation('flash_attention_2') raises ImportError")
        return
    model = model.to("cuda", torch.bfloat16)  # flash-attn kernels need a GPU and half precision
    inputs = (sample[0].to(model.device), sample[1].to(model.device, model.dtype))  # follow the model
    reference = run(model, inputs).logits
    model.set_attn_implementation("flash_attention_2")
    diff = max_diff(run(model, inputs).logits, reference)
    print(f"\nflash_attention_2 vs sdpa (bf16) logits max abs diff: {diff:.1e}")
    assert diff < 5e-2


# ------------------------------------------------------------------------------------------------ caches
def test_static_cache_equals_dynamic_cache(model, sample):
    ids, frames = sample
    text = ids[:6]
    for name, args in (("text", (text,)), ("video", (ids, frames))):
        dynamic, static = greedy(model, *args), greedy(model, *args, cache_implementation="static")
        print(f"\n{name}: dynamic {dynamic} static {static}")
        assert static == dynamic
    batch, mask = left_pad([text, ids[:3]])
    with torch.no_grad():
        dynamic = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
        static = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


def test_static_cache_with_token_dropping_fails_before_encoding(sample):
    model = build_tiny_model(seed=21, mm_llm_compress=True)
    ids, frames = sample
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"cache of fixed length \(cache_implementation='static'\)") as error:
        greedy(model, ids, frames, cache_implementation="static")
    static = StaticCache(config=model.config, max_cache_len=256)
    with pytest.raises(ValueError, match=r"cache of fixed length \(StaticCache\)"):
        model(ids[None], pixel_values_videos=frames[None], cache=static, use_cache=True)
    with pytest.raises(ValueError, match=r"cache of fixed length \(StaticCache\)"):
        greedy(model, ids, frames, cache=StaticCache(config=model.config, max_cache_len=256))
    hook.remove()
    print(f"\n{error.value}")
    assert not calls  # refused before the vision tower ran


# ------------------------------------------------------------------------------------------------ offloading
@pytest.mark.parametrize("dropping", [False, True])
def test_offloaded_generation_equals_on_device(sample, tmp_path, dropping):
    """device_map="auto" with 600 kB of CPU memory: the tower, the projector and layers 1-3 go to disk (weights on
    `meta`, loaded by accelerate's hooks in each call); with dropping, the scoring layer's q/k projections too."""
    model = build_tiny_model(seed=21, mm_llm_compress=dropping, llm_compress_type="attention")
    model.save_pretrained(tmp_path / "model")
    offloaded = VideoChatFlashForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": 600_000}, offload_folder=tmp_path / "offload"
    ).eval()
    devices = offloaded.hf_device_map
    assert devices["model.vision_tower"] == "disk" and "cpu" in devices.values(), devices
    tower = offloaded.model
    assert next(tower.vision_tower.parameters()).device.type == "meta"
    assert tower.vision_tower_device == torch.device("cpu") and tower.vision_tower_dtype == torch.float32
    ids, frames = sample
    expected, got = greedy(model, ids, frames), greedy(offloaded, ids, frames)
    print(f"\noffloaded (dropping={dropping}) {devices}: greedy {got} (on device {expected})")
    assert got == expected
    assert max_diff(run(offloaded, sample).logits, run(model, sample).logits) < 1e-5


# ------------------------------------------------------------------------------------------------ training
def test_gradient_checkpointing_same_loss_and_grads(sample):
    model = build_tiny_model(seed=26).train()
    ids, frames = sample
    labels = ids.masked_fill(torch.arange(len(ids)) < len(ids) - 5, -100)
    loss, grads = _loss_and_grads(model, ids, frames, labels)
    model.activation_checkpointing_enable()
    assert model.model.gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids, frames, labels)
    diff = max(max_diff(grads[name], grads_ckpt[name]) for name in grads)
    print(f"\ncheckpointed loss diff {abs(loss - loss_ckpt).item():.1e}, grads max abs diff {diff:.1e}")
    assert grads.keys() == grads_ckpt.keys() and abs(loss - loss_ckpt).item() < 1e-6 and diff < 1e-6


# ------------------------------------------------------------------------------------------------ dtypes
def test_dtype_moves(sample):
    model = build_tiny_model(seed=27)
    with torch.no_grad():  # weights that bfloat16 holds exactly, so float32 -> bfloat16 -> float32 is lossless
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    reference = run(model, sample).logits
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.model.vision_tower_dtype == torch.bfloat16
    ids, frames = sample
    logits = run(half, (ids, frames.to(torch.bfloat16))).logits
    with torch.no_grad():
        tower = model.model.vision_tower(frames[None, :4])
        tower_diff = max_diff(half.model.vision_tower(frames[None, :4].bfloat16()), tower) / tower.abs().max().item()
    # ToMe's merge choices can flip on bfloat16 features (sort margins of an ulp), moving a few visual tokens a lot.
    diff, scale = (logits.float() - reference).abs().mean().item(), reference.abs().mean().item()
    print(f"\nbfloat16 vs float32: tower max abs diff {tower_diff:.1%} of its range, logits mean abs diff {diff:.3f} "
          f"(mean abs logit {scale:.3f})")
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert tower_diff < 0.03 and diff < 0.1 * scale
    back = run(half.to(torch.float32), sample).logits
    assert back.dtype == torch.float32 and torch.equal(back, reference)


# ------------------------------------------------------------------------------------------------ outputs
def test_return_dict_false_gives_tuples(model, sample):
    out = run(model, sample)
    as_tuple = run(model, sample, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    ids, frames = sample
    with torch.no_grad():
        base = model.model(ids[None], pixel_values_videos=[frames], use_cache=True, return_dict=False)
    assert isinstance(base, tuple) and base[0].shape == (1, len(ids), model.config.hidden_size)


@pytest.mark.parametrize("dropping", [False, True])
def test_output_hidden_states_shapes(sample, dropping):
    model = build_tiny_model(seed=21, mm_llm_compress=dropping)
    out = run(model, sample, output_hidden_states=True)
    shapes = [tuple(h.shape) for h in out.hidden_states]
    print(f"\nhidden states (dropping={dropping}): {shapes}")
    assert len(shapes) == model.config.num_hidden_layers + 1
    assert all(s[0] == 1 and s[2] == model.config.hidden_size for s in shapes)
    assert shapes[-1][1] == out.logits.shape[1] and torch.equal(out.hidden_states[-1], run(model.model, sample)[0])
    assert (shapes[0][1] > shapes[-1][1]) == dropping


@pytest.mark.parametrize("dropping", [False, True])
def test_output_attentions(sample, dropping):
    model = build_tiny_model(seed=21, mm_llm_compress=dropping)
    with pytest.raises(ValueError, match="output_attentions=True needs attn_implementation='eager'"):
        run(model, sample, output_attentions=True)
    model.set_attn_implementation("eager")
    out = run(model, sample, output_attentions=True, output_hidden_states=True)
    config = model.config
    assert len(out.attentions) == config.num_hidden_layers
    for weights, states in zip(out.attentions, out.hidden_states):
        length = states.shape[1]
        assert weights.shape == (1, config.num_attention_heads, length, length)
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)  # softmax rows
        assert bool((weights.triu(1) == 0).all())  # causal
    print(f"\nattentions (dropping={dropping}): {[tuple(w.shape) for w in out.attentions]}")


# ------------------------------------------------------------------------------------------------ conventions
def test_vlm_conventions(model, sample):
    for wrapper in (model, model.model):
        assert wrapper.language_model.layers is model.model.layers and wrapper.language_model.norm is model.model.norm
        assert wrapper.vision_tower is model.model.vision_tower
    assert model.get_decoder() is model.model
    ids, frames = sample
    embeds = model.model.embed_tokens(ids[None])
    features = model.get_video_features(frames[None])[0]
    image_mask, video_mask = model.model.get_placeholder_mask(ids[None], embeds, video_features=features)
    assert video_mask.shape == (1, len(ids), 1) and torch.equal(video_mask[0, :, 0], ids == VIDEO_ID)
    assert not image_mask.any()
    by_embeds = model.model.get_placeholder_mask(None, embeds, video_features=features)[1]
    assert torch.equal(by_embeds, video_mask)  # located from the placeholder embeddings without input_ids
    with pytest.raises(ValueError, match="input_ids hold 128 video tokens .* give 64 visual tokens"):
        model.model.get_placeholder_mask(ids[None], embeds, video_features=features[:64])


# ------------------------------------------------------------------------------------------------ torch.compile
def test_torch_compile_matches_eager(model, sample):
    """The vision tower (which runs oneDNN linears in eager float32 CPU inference) through inductor, and the whole
    model with a video through aot_eager (inductor compiles the layer loop's graph pieces for ~35 s on this CPU)."""
    tower, pixels = model.model.vision_tower, sample[1][None, :4]
    start = time.perf_counter()
    with torch.no_grad():
        compiled_tower = torch.compile(tower, backend="inductor")(pixels)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(sample[0][None], pixel_values_videos=sample[1][None],
                                                               use_cache=False).logits
        torch._dynamo.reset()
    tower_diff, model_diff = max_diff(compiled_tower, tower(pixels)), max_diff(compiled, run(model, sample).logits)
    print(f"\ncompiled ({time.perf_counter() - start:.1f} s): tower (inductor) {tower_diff:.1e}, "
          f"model (aot_eager) {model_diff:.1e}")
    assert tower_diff < 1e-4 and model_diff < 1e-4


# ------------------------------------------------------------------------------------------------ generation modes
@pytest.mark.parametrize("dropping", [False, True])
def test_other_generation_modes_with_a_video(dropping):
    """Prompt-lookup decoding equals greedy; beam search over a left-padded batch equals each prompt alone (and, without
    dropping, the uncached beam search: dropping ranks by the last token, which an uncached run moves every step);
    sampling under a seed is reproducible and batched sampling runs."""
    model = build_tiny_model(seed=21, mm_llm_compress=dropping)
    (ids, frames), (ids2, frames2) = make_sample(8, 6, 7, seed=22), make_sample(4, 3, 9, seed=23)
    batch_ids, batch_mask = left_pad([ids, ids2])
    settings = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        video = {"pixel_values_videos": frames[None]}
        assert greedy(model, ids, frames) == greedy(model, ids, frames, prompt_lookup_num_tokens=2)
        beams = model.generate(ids[None], **video, num_beams=3, **settings)[0, len(ids) :]
        alone = model.generate(ids2[None], pixel_values_videos=frames2[None], num_beams=3, **settings)[0, len(ids2) :]
        batch = model.generate(batch_ids, attention_mask=batch_mask, pixel_values_videos=[frames, frames2], num_beams=3,
                               num_return_sequences=1, **settings)[:, batch_ids.shape[1] :]
        assert torch.equal(batch[0], beams) and torch.equal(batch[1], alone)
        if not dropping:
            assert torch.equal(model.generate(ids[None], **video, num_beams=3, use_cache=False, **settings)[0, len(ids) :],
                               beams)
        sampled = []
        for _ in range(2):
            torch.manual_seed(5)
            sampled.append(model.generate(ids[None], **video, max_new_tokens=6, do_sample=True, top_k=20))
        assert torch.equal(*sampled)
        two = model.generate(batch_ids, attention_mask=batch_mask, pixel_values_videos=[frames, frames2],
                             max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert two.shape == (4, batch_ids.shape[1] + 4)
    print(f"\ndropping={dropping}: prompt lookup == greedy, batched beams == single beams, seeded sampling reproducible")


def test_inputs_embeds_stand_in_for_input_ids(model, sample):
    """generate(inputs_embeds=...) of the spliced embeddings (text + video) answers like generate(input_ids=...)."""
    ids, frames = sample
    with torch.no_grad():
        embeds = model.model.embed_multimodal(ids[None], pixel_values_videos=frames[None])
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False)
    assert from_embeds[0].tolist() == greedy(model, ids, frames)


def test_inputs_embeds_with_token_dropping_say_nothing_is_dropped(sample, caplog):
    import logging

    model = build_tiny_model(seed=21, mm_llm_compress=True)
    ids, frames = sample
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        model(inputs_embeds=model.model.embed_multimodal(ids[None], pixel_values_videos=frames[None]))
    assert "with inputs_embeds alone, none is dropped" in caplog.text
