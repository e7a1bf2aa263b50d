"""Core model: goldens of the original implementation, checkpoint layouts, batching, training, generate (streamed
text, batches of videos).

In-LLM token dropping is tested in test_token_dropping.py (with the helpers of this file)."""

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_path
from media import encode
from transformers import TextIteratorStreamer

from videochat_flash.configuration_videochat_flash import VideoChatFlashConfig
from videochat_flash.hub_export import make_tiny_folder
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM, VideoChatFlashModel
from videochat_flash.tiny_model import TINY_SPECIAL_IDS, build_tiny_model, tiny_processor

GOLDEN_VIDEO_TOKEN_ID = 259  # the id the processor gives its video placeholder in the byte-level tokenizer


# ------------------------------------------------------------------------------------------------ goldens
def golden_full_model(name="full_model_video8_nocompress"):
    sidecar = json.loads(golden_path(f"{name}.json").read_text())
    tensors = load_file(golden_path(f"{name}.safetensors"))
    dims = sidecar["vision_dims"]
    original = dict(sidecar["config"])
    config = VideoChatFlashConfig(
        **original,
        vision_config={
            "hidden_size": dims["embed_dim"],
            "num_hidden_layers": dims["depth"],
            "num_attention_heads": dims["num_heads"],
            "patch_size": dims["patch_size"],
            "image_size": 224,
        },
        video_token_id=GOLDEN_VIDEO_TOKEN_ID,
    )
    model = VideoChatFlashForCausalLM(config).eval()
    weights = {k: v for k, v in tensors.items() if not k.startswith(("input.", "output.", "aux."))}
    model.load_state_dict(weights, strict=True)  # raises on any missing or unexpected key
    return model, tensors


def expand_golden_ids(input_ids, num_visual_tokens):
    """The golden marks the video slot with one -200; our convention is one placeholder per visual token."""
    ids = input_ids[0].tolist()
    slot = ids.index(-200)
    expanded = ids[:slot] + [GOLDEN_VIDEO_TOKEN_ID] * num_visual_tokens + ids[slot + 1 :]
    return torch.tensor([expanded])


@pytest.fixture(scope="module")
def golden_model():
    return golden_full_model()


@pytest.fixture(scope="module", params=["full_model_video8_nocompress", "full_model_internvideo2_video8"])
def any_golden_model(request):
    """The UMT golden model and the InternVideo2 one (the fourth published checkpoint's tower, small dims)."""
    return golden_full_model(request.param)


def test_golden_prefill_logits_and_greedy_ids(any_golden_model):
    model, tensors = any_golden_model
    pixels = tensors["input.pixel_values"]  # (8, 3, 224, 224)
    input_ids = expand_golden_ids(tensors["input.input_ids"], 16 * pixels.shape[0])
    with torch.no_grad():
        if "aux.visual_features" in tensors:
            features = model.get_video_features(pixels[None])
            assert torch.allclose(features[0], tensors["aux.visual_features"].reshape(-1, 64), atol=2e-5)
        logits = model(input_ids, pixel_values_videos=pixels[None], use_cache=False).logits
    expected = tensors["output.prefill_logits"]
    assert logits.shape == expected.shape
    diff = (logits - expected).abs().max().item()
    print(f"\n{model.config.mm_vision_tower} golden prefill logits {tuple(logits.shape)} max abs diff: {diff:.2e}")
    assert diff < 1e-4

    with torch.no_grad():
        generated = model.generate(
            input_ids, pixel_values_videos=pixels[None], max_new_tokens=8, min_new_tokens=8, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )
    new_tokens = generated.sequences[:, input_ids.shape[1] :]
    assert new_tokens.tolist() == tensors["output.generated_ids"].tolist()
    step_logits = torch.cat(generated.scores)
    assert (step_logits - tensors["output.generate_step_logits"]).abs().max().item() < 1e-4


def test_golden_eager_matches_sdpa(golden_model):
    model, tensors = golden_model
    pixels = tensors["input.pixel_values"][None]
    input_ids = expand_golden_ids(tensors["input.input_ids"], 16 * pixels.shape[1])
    with torch.no_grad():
        sdpa = model(input_ids, pixel_values_videos=pixels, use_cache=False).logits
        model.config._attn_implementation = "eager"
        try:
            eager = model(input_ids, pixel_values_videos=pixels, use_cache=False).logits
        finally:
            model.config._attn_implementation = "sdpa"
    assert (sdpa - eager).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------------ layouts
MANIFESTS = sorted(p.name for p in golden_path("README.md").parent.glob("keys_*.json"))  # the published checkpoints


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_checkpoint_manifest_keys_and_shapes(manifest):
    """The model of each manifest's config (its real dims: the InternVideo2-1B one has 855 keys), built on the meta
    device, has exactly the checkpoint's keys and shapes."""
    import time

    spec = json.loads(golden_path(manifest).read_text())
    start = time.perf_counter()
    config = VideoChatFlashConfig(**spec["config_used"])
    with torch.device("meta"):
        model = VideoChatFlashForCausalLM(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - start
    expected = {k: tuple(v["shape"]) for k, v in spec["keys"].items()}
    print(f"\n{manifest}: {len(ours)} keys ({spec['num_keys']} in the manifest), built in {seconds:.2f} s")
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:5], sorted(set(expected) - set(ours))[:5])
    assert ours == expected and len(ours) == spec["num_keys"] and seconds < 10
    if config.tie_word_embeddings:  # the 2B checkpoint ties lm_head to the embedding
        assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------------------------------------ tiny model
VIDEO_ID = TINY_SPECIAL_IDS["video_token_id"]
PAD_ID = TINY_SPECIAL_IDS["pad_token_id"]


def make_sample(num_frames, before, after, seed):
    """Random text around a video placeholder run, and random frames (tiny model: 128 px)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.cat([
        torch.randint(0, 256, (before,), generator=generator),
        torch.full((16 * num_frames,), VIDEO_ID),
        torch.randint(0, 256, (after,), generator=generator),
    ])
    frames = torch.randn(num_frames, 3, 128, 128, generator=generator)
    return ids, frames


def left_pad(sequences):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD_ID)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


def assert_batch_equals_single_runs(model):
    """A left-padded batch of two videos gives each sample's logits and greedy ids as run alone."""
    samples = [make_sample(8, 5, 9, seed=1), make_sample(12, 3, 14, seed=2)]
    with torch.no_grad():
        singles = [model(ids[None], pixel_values_videos=[frames], use_cache=False).logits[0] for ids, frames in samples]
        ids, mask = left_pad([s[0] for s in samples])
        batched = model(ids, attention_mask=mask, pixel_values_videos=[s[1] for s in samples], use_cache=False)
        for row, single in enumerate(singles):
            real = batched.logits[row, -single.shape[0] :]
            assert (real - single).abs().max().item() < 1e-4
        single_ids = [
            model.generate(ids_[None], pixel_values_videos=[frames], max_new_tokens=6, do_sample=False)[0, len(ids_) :]
            for ids_, frames in samples
        ]
        batch_ids = model.generate(
            ids, attention_mask=mask, pixel_values_videos=[s[1] for s in samples], max_new_tokens=6, do_sample=False
        )[:, ids.shape[1] :]
    for row, expected in enumerate(single_ids):
        assert batch_ids[row].tolist() == expected.tolist()


def test_left_padded_batch_equals_single_runs(tiny):
    assert_batch_equals_single_runs(tiny)


def test_flat_video_layout_with_frame_counts(tiny):
    (_, frames_a), (_, frames_b) = make_sample(4, 2, 3, seed=3), make_sample(8, 2, 3, seed=4)
    with torch.no_grad():
        as_list = tiny.get_video_features([frames_a, frames_b])
        flat = tiny.get_video_features(torch.cat([frames_a, frames_b]), video_frame_counts=torch.tensor([4, 8]))
    assert [t.shape[0] for t in as_list] == [64, 128]
    for a, b in zip(as_list, flat):
        assert torch.equal(a, b)


def test_zero_padded_video_batch_with_frame_counts(tiny):
    """(videos, T, 3, S, S) zero-padded along frames (as pipelines batch per-sample outputs) with video_frame_counts:
    each row's real frames, found on either side of the padding, give the features of the unpadded video."""
    (_, frames_a), (_, frames_b) = make_sample(4, 2, 3, seed=3), make_sample(12, 2, 3, seed=4)
    counts = torch.tensor([4, 12])
    with torch.no_grad():
        expected = tiny.get_video_features([frames_a, frames_b])
        for side in ("left", "right"):
            padded = torch.zeros(2, 12, *frames_a.shape[1:])
            (padded[0, 8:] if side == "left" else padded[0, :4]).copy_(frames_a)
            padded[1] = frames_b
            got = tiny.get_video_features(padded, video_frame_counts=counts)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), side
        # 8 of 12 frames with zero frames at both ends (only synthetic frames are all zero): both sides qualify, so
        # the text's padding side decides (the start without one)
        ambiguous = torch.zeros(1, 12, *frames_a.shape[1:])
        ambiguous[0, 4:8] = frames_a
        start = tiny.get_video_features(ambiguous, video_frame_counts=[8])[0]
        end = tiny.get_video_features(ambiguous, video_frame_counts=[8], padding_side="left")[0]
        assert torch.equal(start, tiny.get_video_features([ambiguous[0, :8]])[0])
        assert torch.equal(end, tiny.get_video_features([ambiguous[0, 4:]])[0]) and not torch.equal(start, end)
    with pytest.raises(ValueError, match="video_frame_counts gives 4 real frames of 12, but neither"):
        tiny.get_video_features(torch.ones(1, 12, 3, 128, 128), video_frame_counts=[4])
    with pytest.raises(ValueError, match="1 video_frame_counts for 2 padded videos"):
        tiny.get_video_features(padded, video_frame_counts=[12])


def test_errors_name_the_numbers(tiny):
    ids, frames = make_sample(8, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"128 video tokens.*64 visual tokens"):
        tiny(ids[None], pixel_values_videos=[frames[:4]])
    with pytest.raises(ValueError, match="6 frames.*multiple of 4"):
        tiny(ids[None, :100], pixel_values_videos=[frames[:6]])


def test_text_only_and_images(tiny):
    with torch.no_grad():
        text = tiny(torch.randint(0, 256, (2, 7))).logits
        assert text.shape == (2, 7, 512)
        image_id = TINY_SPECIAL_IDS["image_token_id"]
        ids = torch.cat([torch.tensor([1, 2]), torch.full((64,), image_id), torch.tensor([3]),
                         torch.full((64,), image_id), torch.tensor([4])])
        out = tiny(ids[None], pixel_values=torch.randn(2, 3, 128, 128), image_grids=torch.zeros(2, 2, dtype=torch.long))
    assert torch.isfinite(out.logits).all() and out.logits.shape[1] == len(ids)


def test_bfloat16_forward_on_cpu():
    model = build_tiny_model(seed=9).to(torch.bfloat16)
    ids, frames = make_sample(4, 3, 3, seed=10)
    with torch.no_grad():
        logits = model(ids[None], pixel_values_videos=[frames.to(torch.bfloat16)]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("dropping", [False, True])
def test_long_sequences_run_decoder_layers_in_pieces_with_the_same_results(dropping, monkeypatch):
    """Decoder layers over sequences longer than `decoder_chunk_tokens` run in pieces (norms, projections, rotary,
    MLP) around one whole-sequence attention: the same logits (uncached, and generate's cached prefill) and greedy
    ids as whole layers, with and without token dropping; padded batches and eager attention keep the whole path."""
    from videochat_flash.modeling_videochat_flash import VideoChatFlashDecoderLayer

    model = build_tiny_model(seed=3, mm_llm_compress=dropping)
    ids, frames = make_sample(16, 5, 9, seed=4)  # 270 tokens
    pieces, real = [], VideoChatFlashDecoderLayer._forward_in_pieces
    monkeypatch.setattr(VideoChatFlashDecoderLayer, "_forward_in_pieces",
                        lambda self, x, *args: pieces.append(x.shape[1]) or real(self, x, *args))

    def run(chunk_tokens):
        model.model.decoder_chunk_tokens = chunk_tokens
        with torch.no_grad():
            logits = model(ids[None], pixel_values_videos=[frames], use_cache=False).logits[0]
            greedy = model.generate(ids[None], pixel_values_videos=[frames], max_new_tokens=8, do_sample=False)
        return logits, greedy[0, len(ids):].tolist()

    whole_logits, whole_ids = run(None)
    assert not pieces
    chunked_logits, chunked_ids = run(37)
    worst = (chunked_logits - whole_logits).abs().max().item()
    print(f"\nlayers in 37-row pieces (dropping {dropping}): logits max |diff| {worst:.2g}; piece-run layers "
          f"{len(pieces)} over {sorted(set(pieces))} rows")
    assert worst < 1e-5 and chunked_ids == whole_ids
    assert len(pieces) == 2 * model.config.num_hidden_layers  # every layer, uncached and in generate's prefill
    pieces.clear()
    ids_batch, mask = left_pad([ids, ids[3:]])
    with torch.no_grad():
        model(ids_batch, attention_mask=mask, pixel_values_videos=[frames, frames], use_cache=False)
        model.config._attn_implementation = "eager"
        try:
            model(ids[None], pixel_values_videos=[frames], use_cache=False)
        finally:
            model.config._attn_implementation = "sdpa"
    assert not pieces


def _loss_and_grads(model, ids, frames, labels):
    model.zero_grad()
    loss = model(ids[None], pixel_values_videos=[frames], labels=labels[None]).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropping", [False, True])
def test_loss_backward_and_gradient_checkpointing(dropping):
    model = build_tiny_model(seed=11, mm_llm_compress=dropping, llm_compress_type="attention").train()
    ids, frames = make_sample(4, 4, 12, seed=12)
    labels = ids.clone()
    labels[: len(ids) - 8] = -100  # the answer is the last 8 tokens
    loss, grads = _loss_and_grads(model, ids, frames, labels)
    assert torch.isfinite(loss)
    for part in ("model.vision_tower.", "model.mm_projector.", "model.layers.0.", "lm_head."):
        assert any(name.startswith(part) and g.abs().sum() > 0 for name, g in grads.items()), part
    model.activation_checkpointing_enable()
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids, frames, labels)
    assert abs(loss.item() - loss_ckpt.item()) < 1e-5
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert (grads[name] - grads_ckpt[name]).abs().max().item() < 1e-5, name


def test_labels_ignore_visual_and_padding_positions(tiny):
    ids, frames = make_sample(4, 3, 5, seed=13)
    padded, mask = left_pad([ids, ids[:3]])  # second row: text only, short, left-padded
    labels = padded.clone()  # the caller forgot to mask placeholders and padding
    with torch.no_grad():
        out = tiny(padded, attention_mask=mask, pixel_values_videos=[frames], labels=labels)
    manual = labels.masked_fill((padded == VIDEO_ID) | (mask == 0), -100)
    shifted_logits, shifted_labels = out.logits[:, :-1].flatten(0, 1), manual[:, 1:].flatten()
    expected = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
    unmasked = torch.nn.functional.cross_entropy(shifted_logits, labels[:, 1:].flatten())
    assert abs(out.loss.item() - expected.item()) < 1e-5
    assert abs(out.loss.item() - unmasked.item()) > 1e-3  # the masking changed the loss


# ------------------------------------------------------------------------------------------------ original folder
ORIGINAL_AUTO_MAP = {
    "AutoConfig": "configuration_videochat_flash.VideoChatFlashQwenConfig",
    "AutoModel": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
    "AutoModelForCausalLM": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM",
}


def write_original_format_folder(folder: Path):
    """A checkpoint folder as the original publishes it: original config fields, model_type, architectures and
    auto_map, and one model.safetensors with the original key names (from the golden weights)."""
    from safetensors.torch import save_file

    from videochat_flash.hub_export import copy_code_files

    sidecar = json.loads(golden_path("full_model_video8_nocompress.json").read_text())
    tensors = load_file(golden_path("full_model_video8_nocompress.safetensors"))
    config = dict(sidecar["config"])
    dims = sidecar["vision_dims"]
    config.update(
        model_type="videochat_flash_qwen",
        architectures=["VideoChatFlashQwenForCausalLM"],
        auto_map=ORIGINAL_AUTO_MAP,
        # the published folders have no explicit tower dims; the small golden tower needs them
        vision_config={"hidden_size": dims["embed_dim"], "num_hidden_layers": dims["depth"],
                       "num_attention_heads": dims["num_heads"], "patch_size": dims["patch_size"], "image_size": 224},
        video_token_id=GOLDEN_VIDEO_TOKEN_ID,
    )
    config.pop("_attn_implementation", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = {k: v.contiguous() for k, v in tensors.items() if not k.startswith(("input.", "output.", "aux."))}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    copy_code_files(folder)
    return tensors


def test_original_format_folder_loads_with_auto_class(tmp_path):
    from transformers import AutoModelForCausalLM

    tensors = write_original_format_folder(tmp_path / "original")
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "original", trust_remote_code=True, output_loading_info=True
    )
    assert type(model).__module__.startswith("transformers_modules")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pixels = tensors["input.pixel_values"]
    input_ids = expand_golden_ids(tensors["input.input_ids"], 16 * pixels.shape[0])
    with torch.no_grad():
        logits = model.eval()(input_ids, pixel_values_videos=pixels[None], use_cache=False).logits
    assert (logits - tensors["output.prefill_logits"]).abs().max().item() < 1e-4


def test_eager_reaches_the_vision_tower_and_device_map_auto_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from videochat_flash.hub_export import copy_code_files

    model = build_tiny_model(seed=14)
    model.config.auto_map = {"AutoConfig": "configuration_videochat_flash.VideoChatFlashConfig",
                             "AutoModelForCausalLM": "modeling_videochat_flash.VideoChatFlashForCausalLM"}
    model.save_pretrained(tmp_path)
    copy_code_files(tmp_path)
    ids, frames = make_sample(4, 3, 3, seed=15)
    with torch.no_grad():
        expected = model(ids[None], pixel_values_videos=[frames]).logits
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, attn_implementation="eager")
    spread = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, device_map="auto")
    with torch.no_grad():
        eager_logits = eager.eval()(ids[None], pixel_values_videos=[frames]).logits
        spread_logits = spread.eval()(ids[None], pixel_values_videos=[frames]).logits
    assert {m.attn_implementation for m in eager.model.vision_tower.modules() if hasattr(m, "attn_implementation")} \
        == {"eager"}
    assert (eager_logits - expected).abs().max().item() < 1e-4
    assert (spread_logits - expected).abs().max().item() < 1e-5


def test_clips_per_tower_call_follow_device_dtype_and_tower_size(monkeypatch):
    """CPU calls keep the MLP activation near a cache's size; accelerators take 16 clips; an explicit setting wins."""

    def umt_large(image_size, dtype):
        config = VideoChatFlashConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      mm_vision_tower="umt-hd-large" if image_size == 448 else "umt-large")
        with torch.device("meta"):
            return VideoChatFlashModel(config).to(dtype)

    on_meta = umt_large(224, torch.float32)
    assert on_meta.clips_per_tower_call == 16  # not a CPU
    monkeypatch.setattr(VideoChatFlashModel, "vision_tower_device", property(lambda self: torch.device("cpu")))
    assert umt_large(224, torch.float32).clips_per_tower_call == 2
    assert umt_large(224, torch.bfloat16).clips_per_tower_call == 5
    assert umt_large(448, torch.float32).clips_per_tower_call == 1
    assert build_tiny_model().model.clips_per_tower_call == 16
    on_meta.vision_clips_per_batch = 3
    assert on_meta.clips_per_tower_call == 3


# ------------------------------------------------------------------------------------------------ generate
@pytest.fixture(scope="module")
def tiny_folder_model(tmp_path_factory):
    """The tiny model as a Hub folder gives it (its generation config included)."""
    return VideoChatFlashForCausalLM.from_pretrained(make_tiny_folder(tmp_path_factory.mktemp("tiny") / "m")).eval()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")  # 8 fps: 8, 16 and 24 frames give 8, 16 and 24 sampled frames
    return {"main": encode(folder / "main.mp4", 16, fps=8), "a": encode(folder / "a.mp4", 8, fps=8, w=48, h=32),
            "b": encode(folder / "b.mp4", 16, fps=8, w=64, h=48), "c": encode(folder / "c.mp4", 24, fps=8, w=80, h=64)}


def video_messages(path, question="What is moving in the video?"):
    return [{"role": "user", "content": [{"type": "video", "path": str(path)}, {"type": "text", "text": question}]}]


def new_tokens(output, inputs):
    return output[:, inputs["input_ids"].shape[1] :]


def test_streaming_yields_text_in_pieces(tiny_folder_model, processor, videos):
    model = tiny_folder_model
    inputs = processor.apply_chat_template(video_messages(videos["main"]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs={**inputs, "streamer": streamer, "max_new_tokens": 24})
    thread.start()
    pieces = [piece for piece in streamer if piece]
    thread.join()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24)
    expected = processor.tokenizer.decode(new_tokens(output, inputs)[0], skip_special_tokens=True)
    print(f"\nstreamed {len(pieces)} pieces: {pieces}")
    assert len(pieces) >= 3
    assert "".join(pieces) == expected


def test_batch_of_three_videos_equals_single_runs(tiny_folder_model, processor, videos):
    model = tiny_folder_model
    questions = ["What is moving?", "Describe the colours of this short clip.", "Why?"]
    conversations = [video_messages(videos[key], q) for key, q in zip("abc", questions)]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert batch["video_frame_counts"].tolist() == [8, 16, 24]
    with torch.no_grad():
        batched = new_tokens(model.generate(**batch, max_new_tokens=12), batch)
    for row, conversation in enumerate(conversations):
        single = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            alone = new_tokens(model.generate(**single, max_new_tokens=12), single)[0]
        got = batched[row][: alone.shape[0]]
        assert torch.equal(got, alone), (row, got.tolist(), alone.tolist())
    print(f"\nbatch of 3 videos ({batch['input_ids'].shape[1]} tokens padded) = 3 single runs")


# ------------------------------------------------------------------------------------------------ long context
QWEN25_TEXT = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6, "tie_word_embeddings": False}
TINY_TOWER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32}
ROPE_SCALINGS = {
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # the original NIAH edit
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}


@pytest.mark.parametrize("kind", [k for k, v in ROPE_SCALINGS.items() if v is not None])
def test_rope_scaling_matches_transformers_qwen2_beyond_32k(kind):
    """A text-only Qwen2.5-shaped model with `rope_scaling` (YaRN x 4 as the original's needle-in-a-haystack runs, and
    transformers' other rope types) gives Qwen2ForCausalLM's logits with the same weights, at positions past 32,768."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = {**QWEN25_TEXT, "max_position_embeddings": 131072}
    reference = Qwen2ForCausalLM(Qwen2Config(**dims, rope_scaling=dict(ROPE_SCALINGS[kind]))).eval()
    ours = VideoChatFlashForCausalLM(VideoChatFlashConfig(**dims, rope_scaling=dict(ROPE_SCALINGS[kind]),
                                                          mm_vision_tower="umt-large", vision_config=TINY_TOWER)).eval()
    loaded = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(k.startswith(("model.vision_tower", "model.mm_projector"))
                                              for k in loaded.missing_keys)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40000, 40024)[None]
    with torch.no_grad():
        diff = (ours(ids, position_ids=positions).logits - reference(ids, position_ids=positions).logits).abs().max()
    print(f"\n{kind} rope at positions 40,000+: max |ours - Qwen2ForCausalLM| = {diff:.2e}")
    assert ours.model.rotary_emb.rope_type == reference.model.rotary_emb.rope_type and diff < 1e-5


def test_set_rope_scaling_switches_yarn_on_a_loaded_model():
    """model.set_rope_scaling(...) on a loaded model equals loading with rope_scaling, and None switches it off."""
    yarn = ROPE_SCALINGS["yarn"]
    base = VideoChatFlashForCausalLM(VideoChatFlashConfig(**QWEN25_TEXT, max_position_embeddings=32768,
                                                          mm_vision_tower="umt-large", vision_config=TINY_TOWER)).eval()
    loaded_with = VideoChatFlashForCausalLM(VideoChatFlashConfig(**QWEN25_TEXT, max_position_embeddings=32768,
                                                                 rope_scaling=dict(yarn), mm_vision_tower="umt-large",
                                                                 vision_config=TINY_TOWER)).eval()
    loaded_with.load_state_dict(base.state_dict())
    ids, positions = torch.randint(0, 256, (1, 8)), torch.arange(60000, 60008)[None]
    with torch.no_grad():
        plain = base(ids, position_ids=positions).logits
        base.set_rope_scaling(dict(yarn))
        switched = base(ids, position_ids=positions).logits
        expected = loaded_with(ids, position_ids=positions).logits
        assert base.config.rope_parameters["rope_type"] == "yarn" and torch.equal(switched, expected)
        base.set_rope_scaling(None)
        assert torch.equal(base(ids, position_ids=positions).logits, plain)


def test_rope_scaling_at_load_time_and_in_an_edited_config_json(tmp_path):
    """from_pretrained(..., rope_scaling=yarn) and the original's NIAH edit of config.json ("rope_scaling" without a
    rope base) keep the model's rope base and equal set_rope_scaling; a bad setting changes nothing; chat()'s caches
    are dropped by a switch."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_folder(tmp_path / "tiny")
    yarn = dict(ROPE_SCALINGS["yarn"])
    by_kwarg = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, rope_scaling=yarn)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": yarn}))
    by_file = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    switched = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, rope_scaling=None)
    ids, positions = torch.tensor([[1, 2, 3]]), torch.tensor([[50000, 50001, 50002]])
    switched.set_rope_scaling(None)
    switched._chat_prefix_state = {"stale": True}
    switched.set_rope_scaling(yarn)
    assert switched._chat_prefix_state is None  # the kept KV cache had the old positions
    with torch.no_grad():
        logits = [model(ids, position_ids=positions).logits for model in (by_kwarg, by_file, switched)]
    theta = [m.config.rope_parameters["rope_theta"] for m in (by_kwarg, by_file, switched)]
    assert theta == [1e6] * 3 and torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    before = dict(switched.config.rope_parameters)
    with pytest.raises(Exception):
        switched.set_rope_scaling({"rope_type": "yarn", "factor": "x", "original_max_position_embeddings": 32768})
    assert switched.config.rope_parameters == before
