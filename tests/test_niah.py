"""Needle in a haystack (niah_videochat_flash): the spliced forward equals the processor + model / generate path, a
3 x 3 grid writes its JSONL, JSON and PNG and resumes, a 1,000-frame haystack is encoded once, the original's
placement and answer rules, the needles formats, the CLI."""

import json
import sys

import numpy as np
import pytest
import torch
from media import encode, image
from videochat_flash import niah_videochat_flash as niah
from videochat_flash import videochat_flash_cli
from videochat_flash.processing_videochat_flash import pad_to_square
from videochat_flash.tiny_model import build_tiny_model, tiny_processor
from videochat_flash.video_loading import load_video, resize_frame

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220)]


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 64 s haystack at 1 frame/s (64 x 48), three needle images (40 x 60), single- and multi-hop needles files."""
    root = tmp_path_factory.mktemp("niah")
    (root / "needles").mkdir()
    images = [image(root / "needles" / f"needle{i}.png", np.full((40, 60, 3), c, np.uint8))
              for i, c in enumerate(COLOURS)]
    single = [{"question": f"Find the frame of colour {i}. Best option: (", "answer": "A",
               "image": f"needles/needle{i}.png"} for i in range(2)]
    multi = [{"images": [f"needles/needle{i}.png" for i in (2, 0, 1)], "question1": "Which caption? Best option: (",
              "answer1": "B", "question2": "Which colour? Best option: (", "answer2": "C"}]
    (root / "single.json").write_text(json.dumps(single))
    (root / "multi.json").write_text(json.dumps(multi))
    return {"root": root, "video": encode(root / "haystack.mp4", 64, fps=1), "images": images,
            "single": root / "single.json", "multi": root / "multi.json"}


def _settings(media, **overrides):
    return niah.NIAHSettings(**{"frames": (16, 32, 64), "depths": (0.0, 0.5, 1.0),
                                "cache_dir": str(media["root"] / "cache"), **overrides})


# ------------------------------------------------------------------------------------------ the normal path
@pytest.mark.parametrize("dropping", [False, True], ids=["plain", "token-dropping"])
def test_spliced_forward_equals_processor_and_generate(model, processor, media, dropping):
    """The harness's spliced embeddings (cached haystack tokens + a needle clip) give the logits of the processor +
    model path for the same video (the haystack's frames with the needle image 4 times at a clip boundary), and the
    harness's argmax over a teacher-forced answer is what generate() answers."""
    settings = _settings(media, frames=(32,), token_dropping=dropping)
    size = model.config.image_size
    haystack = niah.haystack_tokens(model, processor, media["video"], settings)
    needle = niah.encode_needle(model, processor, media["images"][0])
    assert haystack.shape == (32 * 16, 64) and needle.shape == (64, 64)
    question, depth = "Find the red frame. Best option: (", 0.5
    at = niah.insertion_frames(32, 1, depth)
    assert at == [16]

    frames, _ = load_video(media["video"], size=size, fps=1, max_num_frames=32, min_num_frames=0, frames_multiple=4)
    from PIL import Image

    fill = tuple(int(m * 255) for m in processor.image_processor.image_mean)
    needle_frame = resize_frame(pad_to_square(np.asarray(Image.open(media["images"][0]).convert("RGB")), fill), size)
    video = np.concatenate([frames[:16], np.repeat(needle_frame[None], 4, 0), frames[16:]])
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, videos=[video], videos_kwargs={"time_message": None}, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]

    model.config.mm_llm_compress = dropping
    try:
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, prompt_length:].tolist()
        answer = generated  # teacher-force the model's own greedy answer
        full = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
        with torch.no_grad():
            output = model(input_ids=full, attention_mask=torch.ones_like(full),
                           pixel_values_videos=inputs["pixel_values_videos"],
                           video_frame_counts=inputs["video_frame_counts"], drop_query_position=prompt_length - 1,
                           use_cache=False)
        assert (output.kept_token_index is not None) == dropping  # dropping really is on (or off)
        reference = output.logits[0, -len(answer) - 1 : -1]
        before, after = niah.prompt_ids(processor, question)
        pieces = niah.splice(haystack, [needle], at, 32)
        logits = niah.answer_logits(model, before, pieces, after, answer)
    finally:
        model.config.mm_llm_compress = False
    assert len(before) + 36 * 16 + len(after) == prompt_length
    difference = (logits - reference).abs().max().item()
    print(f"\nspliced vs processor path (dropping {dropping}): max |logit difference| {difference:.2e}")
    assert difference < 1e-4
    assert logits.argmax(-1).tolist() == generated
    assert niah.is_correct(processor.tokenizer, logits.argmax(-1).tolist(), answer)[1]


# ------------------------------------------------------------------------------------------ grids
def test_3x3_grid_writes_jsonl_json_png_and_resumes(model, processor, media, monkeypatch):
    out, settings = media["root"] / "grid", _settings(media)
    results = niah.run_niah(model, processor, media["video"], media["single"], out, settings)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["run"]["mode"] == "single-hop" and len(lines) == 1 + 3 * 3 * 2
    cells = [json.loads(line) for line in lines[1:]]
    assert {(c["frames"], c["depth"]) for c in cells} == {(n, d) for n in (16, 32, 64) for d in (0.0, 0.5, 1.0)}
    assert all(set(c) >= {"needle", "answer", "prediction", "correct"} for c in cells)
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert [(r["Num. Frame"], r["Frame Depth"]) for r in written["results"]] == [
        (n, d) for n in (16, 32, 64) for d in (0.0, 50.0, 100.0)]
    assert written["average_accuracy"] == pytest.approx(sum(c["correct"] for c in cells) / len(cells))
    from PIL import Image

    with Image.open(out / "heatmap.png") as png:
        assert png.format == "PNG" and png.size == (1750, 800)

    # resumed: only the missing answers are computed, and the results are the same
    (out / "results.jsonl").write_text("\n".join(lines[:-5]) + "\n")
    calls = []
    real = niah.answer_logits
    monkeypatch.setattr(niah, "answer_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert niah.run_niah(model, processor, media["video"], media["single"], out, settings) == results
    assert len(calls) == 5 and (out / "results.jsonl").read_text().count("\n") == len(lines)
    with pytest.raises(ValueError, match="another run .*token_dropping"):
        niah.run_niah(model, processor, media["video"], media["single"], out, _settings(media, token_dropping=True))


def test_multi_hop_grid(model, processor, media):
    out = media["root"] / "multi"
    results = niah.run_niah(model, processor, media["video"], media["multi"], out, _settings(media))
    assert results["mode"] == "multi-hop" and [r["Num. Frame"] for r in results["results"]] == [16, 32, 64]
    row = results["results"][0]
    assert row["Total question pair"] == 1
    assert row["Both correct"] + row["Only cap correct"] + row["Only qa correct"] + row["Both wrong"] == 1
    assert row["Score"] == (row["Caption Score"] + row["QA Score"]) / 2
    lines = (out / "results.jsonl").read_text().splitlines()[1:]
    assert [json.loads(line)["name"] for line in lines[:2]] == ["caption", "qa"] and len(lines) == 3 * 2
    assert (out / "heatmap.png").is_file()


def test_a_1000_frame_haystack_is_encoded_once(model, processor, tmp_path):
    """Vision-tower clips: the 1,000-frame haystack's 250 once for a 2 x 2 grid (plus the needle's 1), then only the
    needle's for another grid over the cached haystack; each cell's forward sees 16 tokens per frame + 64."""
    video = encode(tmp_path / "long.mp4", 1000, w=32, h=24, fps=1)
    image(tmp_path / "needle.png", np.full((30, 30, 3), 200, np.uint8))
    (tmp_path / "needles.json").write_text(json.dumps([{"question": "Q? (", "answer": "A", "image": "needle.png"}]))
    clips, lengths = [], []
    tower = model.model.vision_tower.register_forward_hook(lambda module, args, output: clips.append(len(args[0])))
    llm = model.model.layers[0].register_forward_hook(lambda module, args, output: lengths.append(args[0].shape[1]))
    settings = niah.NIAHSettings(frames=(100, 1000), depths=(0.0, 1.0), cache_dir=str(tmp_path / "cache"))
    try:
        niah.run_niah(model, processor, video, tmp_path / "needles.json", tmp_path / "a", settings)
        first = list(clips)
        clips.clear()
        other_depth = niah.NIAHSettings(**{**vars(settings), "depths": (0.5,)})
        niah.run_niah(model, processor, video, tmp_path / "needles.json", tmp_path / "b", other_depth)
    finally:
        tower.remove()
        llm.remove()
    assert sum(first) == 250 + 1 and sum(clips) == 1
    prompt = sum(map(len, niah.prompt_ids(processor, "Q? ("))) + 1  # + the answer
    assert sorted(lengths) == [prompt + 16 * 100 + 64] * 3 + [prompt + 16 * 1000 + 64] * 3
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".safetensors"]


def test_haystack_cache_key_and_the_originals_halving(model, processor, media):
    settings = _settings(media, frames=(16, 64))
    path = niah.haystack_cache_path(model, media["video"], settings)
    assert path == niah.haystack_cache_path(model, media["video"], settings)
    assert path != niah.haystack_cache_path(model, media["video"], _settings(media, frames=(16, 32)))
    assert path != niah.haystack_cache_path(build_tiny_model(seed=1), media["video"], settings)
    halved = niah.haystack_tokens(model, processor, media["video"], _settings(media, frames=(64,), repeat_above=40))
    assert halved.shape[0] == 64 * 16 and torch.equal(halved[: 32 * 16], halved[32 * 16 :])
    full = niah.haystack_tokens(model, processor, media["video"], _settings(media, frames=(64,)))
    assert not torch.equal(full[: 32 * 16], full[32 * 16 :])
    with pytest.raises(ValueError, match="gives 64 frames .* needs 128"):
        niah.haystack_tokens(model, processor, media["video"], _settings(media, frames=(128,)))
    assert niah.check_haystack(media["video"], _settings(media, frames=(64,))) == 64  # metadata only, no decoding
    with pytest.raises(ValueError, match="gives 64 frames .* needs 128"):
        niah.check_haystack(media["video"], _settings(media, frames=(128,)))
    assert niah.check_haystack(media["video"], _settings(media, frames=(128,), fps=2.0)) == 128


def test_run_options_are_restored(model, processor, media, monkeypatch):
    before = dict(model.config.rope_parameters)
    settings = _settings(media, frames=(16,), depths=(0.5,), rope_scaling=niah.YARN_X4, token_dropping=True)
    seen = []
    real = niah.answer_logits

    def spy(model_, *args, **kwargs):
        seen.append((model_.config.rope_parameters["rope_type"], model_.config.mm_llm_compress))
        return real(model_, *args, **kwargs)

    monkeypatch.setattr(niah, "answer_logits", spy)
    niah.run_niah(model, processor, media["video"], media["single"], media["root"] / "yarn", settings)
    assert set(seen) == {("yarn", True)}
    assert dict(model.config.rope_parameters) == before and model.config.mm_llm_compress is False


def test_without_matplotlib_json_is_written_and_the_png_is_not(model, processor, media, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.colors", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    out = media["root"] / "no_png"
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        results = niah.run_niah(model, processor, media["video"], media["single"], out, _settings(media, frames=(16,)))
    assert results["heatmap"] is None and (out / "results.json").is_file() and not (out / "heatmap.png").exists()


# ------------------------------------------------------------------------------------------ the original's rules
def test_placement_and_splice_layout():
    assert niah.insertion_frames(1000, 1, 0.0) == [0] and niah.insertion_frames(1000, 1, 1.0) == [1000]
    assert niah.insertion_frames(1000, 1, 0.25) == [250]
    assert niah.insertion_frames(1000, 7) == [0, 166, 333, 500, 666, 833, 1000]  # int(i * 1000 / 6)
    haystack = torch.arange(10 * 2, dtype=torch.float32)[:, None]  # 10 frames of 2 tokens
    needles = [torch.full((3, 1), -1.0), torch.full((3, 1), -2.0)]
    pieces = torch.cat(niah.splice(haystack, needles, [0, 4], 6, tokens_per_frame=2))[:, 0].tolist()
    assert pieces == [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7, -2, -2, -2, 8, 9, 10, 11]


def test_answer_rule(processor):
    tokenizer = processor.tokenizer
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)
    assert niah.is_correct(tokenizer, ids("a"), ids("A")) == ("a", True)
    assert niah.is_correct(tokenizer, ids("(B)"), ids("B"))[1]
    assert not niah.is_correct(tokenizer, ids("C"), ids("B"))[1]


def test_needles_files_are_checked(media, tmp_path):
    mode, needles = niah.load_needles(media["single"])
    assert mode == "single-hop" and needles[1].images == (str(media["root"] / "needles" / "needle1.png"),)
    assert needles[0].questions[0][2] == "A"
    mode, chains = niah.load_needles(media["multi"])
    assert mode == "multi-hop" and len(chains[0].images) == 3
    assert [q[0] for q in chains[0].questions] == ["caption", "qa"]
    cases = {"[]": "non-empty list", '[{"question": "q", "image": "x.png"}]': "lacks answer",
             '[{"question": "q", "answer": "A", "image": "missing.png"}]': "missing.png not found",
             '[{"images": ["needle.png"], "question1": "q", "answer1": "A", "question2": "q", "answer2": "B"}]':
                 "at least 2",
             "{": "not JSON"}
    for text, message in cases.items():
        (tmp_path / "n.json").write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            niah.load_needles(tmp_path / "n.json")
    for bad in ({"frames": (0,)}, {"depths": (1.5,)}, {"fps": 0}, {"repeat_above": 0}):
        with pytest.raises(ValueError):
            niah.NIAHSettings(**bad)


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_niah_with_the_tiny_model(media, tmp_path, capsys):
    args = ["niah", "--model", "tiny", "--haystack", media["video"], "--needles", str(media["single"]),
            "--frames", "16,32", "--depths", "0,1", "--out", str(tmp_path / "out"), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", "--yarn", "4"]
    assert videochat_flash_cli.main(args) == 0
    assert "average accuracy" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["results"]) == 4 and results["settings"]["rope_scaling"]["factor"] == 4.0
    assert (tmp_path / "out" / "heatmap.png").is_file() and list((tmp_path / "cache" / "niah").iterdir())


def test_cli_niah_errors_are_one_line_before_any_model(media, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(niah, "load_model", no_model)
    (tmp_path / "bad.json").write_text('[{"question": "q", "answer": "A", "image": "gone.png"}]')
    base = ["niah", "--model", "tiny", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    cases = [
        (["--haystack", media["video"], "--needles", str(tmp_path / "bad.json")], 1, "gone.png not found"),
        (["--haystack", str(tmp_path / "none.mp4"), "--needles", str(media["single"])], 1, "none.mp4"),
        (["--haystack", media["video"], "--needles", str(media["single"]), "--depths", "0,2"], 1, "depths"),
        (["--haystack", media["video"], "--needles", str(media["single"]), "--frames", "a,b"], 2, "comma-separated"),
        (["--haystack", media["video"], "--needles", str(media["single"]), "--yarn", "0.5"], 1, "--yarn"),
        (["--haystack", media["video"], "--needles", str(media["single"]), "--frames", "100"], 1, "gives 64 frames"),
        (["--haystack", media["video"], "--needles", str(tmp_path / "none.json")], 1, "needles file not found"),
    ]
    for extra, code, message in cases:
        with pytest.raises(SystemExit) if code == 2 else _no_raise() as exit_info:
            assert videochat_flash_cli.main(base + extra) == code
        if code == 2:
            assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    assert not (tmp_path / "cache").exists()  # nothing built, not even the tiny model


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
