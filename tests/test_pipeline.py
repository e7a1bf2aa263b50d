"""pipeline_videochat_flash: the video-text-to-text pipeline of a Hub folder (tiny model, a generated clip)."""

import pytest
from media import encode
from transformers import pipeline

from videochat_flash.hub_export import make_tiny_folder

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def folder_and_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return str(make_tiny_folder(root / "model")), encode(root / "clip.mp4", 16, fps=8)


def test_video_text_to_text_pipeline_inputs(folder_and_video):
    folder, video = folder_and_video
    pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True)
    assert pipeline(model=folder, trust_remote_code=True).task == "video-text-to-text"
    single = pipe(video, QUESTION, max_new_tokens=6)
    assert single == pipe({"video": video, "text": QUESTION}, max_new_tokens=6)
    chat = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": QUESTION}]}]
    full = pipe(chat, max_new_tokens=6, return_full_text=True)[0]["generated_text"]
    assert full[:-1] == chat and full[-1] == {"role": "assistant", "content": single[0]["generated_text"]}
    several = pipe([video, video], [QUESTION, "Another question?"], max_new_tokens=6, max_num_frames=8)
    # a batch answers each video as it is answered alone
    assert several == [pipe(video, q, max_new_tokens=6, max_num_frames=8) for q in (QUESTION, "Another question?")]
    with pytest.raises(TypeError, match="unexpected"):
        pipe(video, QUESTION, not_an_option=1)
    with pytest.raises(ValueError, match="one question per video"):
        pipe([video, video], [QUESTION])


def test_batched_pipelines_equal_single_runs_with_different_frame_counts(folder_and_video, tmp_path):
    """batch_size=2: the pipelines' collation pads the prompts on the tokenizer's side (the processor's left) and the
    frames with zeros; the answers are those of single runs, for videos of 8 and 16 frames."""
    folder, video = folder_and_video
    short = encode(tmp_path / "short.mp4", 8, fps=8, w=48, h=32)
    questions = [QUESTION, "And what colour is it, in this other clip?"]
    pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True)
    single = [pipe(v, q, max_new_tokens=8)[0]["generated_text"] for v, q in zip([video, short], questions)]
    batched = pipe([video, short], questions, max_new_tokens=8, batch_size=2)
    assert [r[0]["generated_text"] for r in batched] == single
    stock = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    chats = [[{"role": "user", "content": [{"type": "video", "path": v}, {"type": "text", "text": q}]}]
             for v, q in zip([video, short], questions)]
    alone = [stock(text=chat, max_new_tokens=8)[0]["generated_text"][-1]["content"] for chat in chats]
    together = stock(text=chats, max_new_tokens=8, batch_size=2)
    assert [r[0]["generated_text"][-1]["content"] for r in together] == alone
    assert [a.strip() for a in alone] == single


def test_a_save_pretrained_folder_serves_pipeline(folder_and_video, tmp_path):
    """model.save_pretrained / push_to_hub / Trainer.save_model of a loaded model (remote code) write the pipeline
    file config.json points to; generate(max_length=...) beats the folder's max_new_tokens."""
    from transformers import AutoModel, AutoProcessor

    folder, video = folder_and_video
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    model.save_pretrained(tmp_path / "saved")
    AutoProcessor.from_pretrained(folder, trust_remote_code=True).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "pipeline_videochat_flash.py").is_file()
    pipe = pipeline(model=str(tmp_path / "saved"), trust_remote_code=True)
    assert pipe.task == "video-text-to-text"
    assert pipe(video, QUESTION, max_new_tokens=4) == pipeline("video-text-to-text", model=folder,
                                                                trust_remote_code=True)(video, QUESTION, max_new_tokens=4)
    ids = pipe.processor(text="Hi", return_tensors="pt")["input_ids"]
    assert model.generate(input_ids=ids, max_length=ids.shape[1] + 3, do_sample=False).shape[1] <= ids.shape[1] + 3


def test_pipeline_options_mixed_batches_continuations_and_datasets(folder_and_video):
    """Options given when the pipeline is built hold for every call; a batch mixing a video row, an image row and a
    text row equals single runs; a final assistant message is continued; a generator of inputs streams answers;
    stop_sequence and streamer are accepted."""
    from PIL import Image
    from transformers import TextIteratorStreamer

    from media import pattern

    folder, video = folder_and_video
    pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True, num_frames=8, max_new_tokens=4)
    captured = []
    generate = pipe.model.generate
    pipe.model.generate = lambda **kw: captured.append(kw) or generate(**kw)
    pipe(video, QUESTION)
    assert [t.shape[0] for t in captured[-1]["pixel_values_videos"]] == [8]  # num_frames=8 from the build
    image = Image.fromarray(pattern(2, 80, 60))
    rows = [{"video": video, "text": QUESTION},
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}],
            [{"role": "user", "content": "Just text?"}]]
    assert [r[0]["generated_text"] for r in pipe(rows, batch_size=3)] == [pipe(r)[0]["generated_text"] for r in rows]
    started = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi th"}]
    prompt = pipe.processor.decode(pipe.preprocess(started)["input_ids"][0])
    assert prompt.endswith("<|im_start|>assistant\nHi th")
    answers = [out[0]["generated_text"] for out in pipe(row for row in rows[:2])]
    assert len(answers) == 2
    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True)
    assert pipe(video, QUESTION, streamer=streamer, stop_sequence="x")[0]["generated_text"] is not None


def test_batched_image_pipelines_with_different_tile_counts_equal_single_runs(folder_and_video, tmp_path):
    """Image blocks: a 3-tile and a 2-tile image (and an image beside a video) batched equal single runs, through our
    pipeline and the stock image-text-to-text one (PIL images in the messages)."""
    import numpy as np
    from PIL import Image

    folder, video = folder_and_video
    rng = np.random.default_rng(0)
    paths = [tmp_path / "wide.png", tmp_path / "square.png"]
    for path, shape in zip(paths, [(40, 130, 3), (50, 50, 3)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    chats = [[{"role": "user", "content": [{"type": "image", "path": str(path)}, *extra,
                                           {"type": "text", "text": "What is it?"}]}]
             for path, extra in zip(paths, [[{"type": "video", "path": video}], []])]
    pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True)
    single = [pipe(chat, max_new_tokens=8)[0]["generated_text"] for chat in chats]
    assert [r[0]["generated_text"] for r in pipe(chats, max_new_tokens=8, batch_size=2)] == single
    stock = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    images_only = [[{"role": "user", "content": [{"type": "image", "image": Image.open(path)},
                                                 {"type": "text", "text": "What is it?"}]}] for path in paths]
    alone = [stock(text=chat, max_new_tokens=8)[0]["generated_text"][-1]["content"] for chat in images_only]
    together = stock(text=images_only, max_new_tokens=8, batch_size=2)
    assert [r[0]["generated_text"][-1]["content"] for r in together] == alone
    assert alone[1].strip() == single[1]  # the same answer from the stock pipeline and ours
