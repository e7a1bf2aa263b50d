"""data_videochat_flash: LLaVA-style records -> chat-template messages -> input ids with the original's labels
(masking modes, prompt formats, time messages, images), the training frame sampling, record files."""

import json

import pytest
import yaml
from conftest import golden_path
from media import COLOR_QUESTION, colour_dataset

from videochat_flash.data_videochat_flash import (
    IGNORE_INDEX,
    VideoChatFlashDataCollator,
    VideoChatFlashTrainingDataset,
    check_records,
    load_records,
    record_messages,
)
from videochat_flash.frame_sampling import FrameSampling
from videochat_flash.tiny_model import tiny_processor

QUESTION = COLOR_QUESTION
SIZE = 128  # the tiny vision tower's frame size


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return colour_dataset(tmp_path_factory.mktemp("data_media"))


def decode_trained(tokenizer, item) -> str:
    pairs = zip(item["input_ids"].tolist(), item["labels"].tolist())
    return tokenizer.decode([t for t, l in pairs if l != IGNORE_INDEX])


def record(video, *turns, key="video"):
    return {key: video, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": text}
                                          for i, text in enumerate(turns)]}


def dataset(media, records, **kwargs):
    return VideoChatFlashTrainingDataset(load_records(records, data_root=str(media["root"])), tiny_processor(),
                                         FrameSampling.training(frames_upbound=8), **kwargs)


def segments(tokenizer, ids):
    """Positions of each chat turn (start, end, role) found from <|im_start|> tokens."""
    starts = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|im_start|>")] + [len(ids)]
    roles = [tokenizer.decode(ids[s + 1 : s + 5]) for s in starts[:-1]]
    return [(s, e, "assistant" if r.startswith("assi") else "user" if r.startswith("user") else "system")
            for s, e, r in zip(starts, starts[1:], roles)]


def test_masking_single_and_multi_turn_with_padding(media):
    tokenizer = tiny_processor().tokenizer
    data = dataset(media, [record("clip0.mp4", f"<image>\n{QUESTION}", "It is red."),
                           record("twelve.mp4", f"{QUESTION}\n<image>", "Red.", "And the band?", "It moves down.")])
    batch = VideoChatFlashDataCollator(tokenizer.pad_token_id)([data[0], data[1]])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 2 and batch["video_frame_counts"].tolist() == [8, 12]
    assert batch["pixel_values_videos"].shape == (20, 3, SIZE, SIZE)
    expected_answers = [["It is red."], ["Red.", "It moves down."]]
    for row in range(2):
        length = int(mask[row].sum())
        assert bool(mask[row, :length].all()) and not bool(mask[row, length:].any())  # right padding
        assert bool((labels[row, length:] == IGNORE_INDEX).all())  # padding
        assert bool((ids[row, length:] == tokenizer.pad_token_id).all())
        row_ids, row_labels = ids[row, :length].tolist(), labels[row, :length].tolist()
        visual = [i for i, t in enumerate(row_ids) if t == 259]
        assert len(visual) == 16 * (8 if row == 0 else 12)
        assert all(row_labels[i] == IGNORE_INDEX for i in visual)
        trained = [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX]
        assert all(row_labels[i] == row_ids[i] for i in trained)
        answers = []
        for start, end, role in segments(tokenizer, row_ids):
            turn_labels = row_labels[start:end]
            if role in ("system", "user"):
                assert all(label == IGNORE_INDEX for label in turn_labels), role
                continue
            # assistant: header masked, then answer + <|im_end|> + "\n" trained
            header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
            assert all(label == IGNORE_INDEX for label in turn_labels[:header])
            body = turn_labels[header:]
            assert all(label != IGNORE_INDEX for label in body)
            assert tokenizer.decode(body).endswith("<|im_end|>\n")
            answers.append(tokenizer.decode(body)[: -len("<|im_end|>\n")])
        assert answers == expected_answers[row]


def test_prompt_matches_the_original_training_prompt(media):
    """preprocess_multimodal + preprocess_qwen: "<image>" moved first, time message, then "\\n" + question."""
    tokenizer = tiny_processor().tokenizer
    sample = record("clip0.mp4", f"{QUESTION} <image>", "Red.")
    video = "<|video_pad|>" * 128
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + video
                + "\nThe video lasts for 1.00 seconds, and 8 frames are uniformly sampled from it. \n" + QUESTION
                + "<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n")
    assert tokenizer.decode(dataset(media, [sample])[0]["input_ids"]) == expected
    # the original's non-"short" time message lists the frame times
    text = tokenizer.decode(dataset(media, [sample], time_msg="long")[0]["input_ids"])
    assert ("\nThe video lasts for 1.00 seconds, and 8 frames are uniformly sampled at 0.0, 0.1, 0.2, 0.4, 0.5, 0.6, "
            "0.8, 0.9 seconds. \n" + QUESTION) in text
    # without a time message (time_msg null) and with a custom system turn
    sample["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    text = tokenizer.decode(dataset(media, [sample], time_msg=None)[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n" + video + "\n" + QUESTION)


def test_masking_options_original_mode_plain_format_and_images(media):
    tokenizer = tiny_processor().tokenizer
    sample = record("clip0.mp4", "<image>\nQ1?", "A1.", "Q2?", "A2.")

    item = dataset(media, [sample], train_on_turn_newline=False)[0]
    assert decode_trained(tokenizer, item) == "A1.<|im_end|>A2.<|im_end|>"

    # "original": preprocess_qwen bit for bit: whole assistant turns + every <|im_start|>, <|im_end|>, "\n".
    item = dataset(media, [sample], label_mode="original")[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    unmask = {257, 258, tokenizer("\n", add_special_tokens=False)["input_ids"][0]}
    for start, end, role in segments(tokenizer, ids):
        for i in range(start, end):
            assert labels[i] == (ids[i] if role == "assistant" or ids[i] in unmask else IGNORE_INDEX), (role, i)

    # stage 1 "plain": visual tokens + answer + "\n", no system prompt, question or time message
    item = dataset(media, [record("clip0.mp4", "<image>\nQ1?", "A1.")], prompt_format="plain")[0]
    assert item["input_ids"].tolist() == [259] * 128 + tokenizer("A1.\n", add_special_tokens=False)["input_ids"]
    assert decode_trained(tokenizer, item) == "A1.\n"

    # images: 64 <|image_pad|> per image, in marker order, each followed by "\n" as in "<image>\n", masked
    images = record(["image0.png", "image1.png"], "<image>\n<image>\nSame?", "No.", key="image")
    item = dataset(media, [images])[0]
    assert tokenizer.decode(item["input_ids"]).replace("<|image_pad|>" * 64, "<I>").endswith(
        "<|im_start|>user\n<I>\n<I>\nSame?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n")
    assert item["pixel_values"].shape == (2, 3, SIZE, SIZE) and "pixel_values_videos" not in item
    assert decode_trained(tokenizer, item) == "No.<|im_end|>\n"
    assert item["image_grids"].tolist() == [[0, 0], [0, 0]]  # several images: each one padded tile
    plain = dataset(media, [record("image0.png", "<image>\nQ?", "A.", key="image")], prompt_format="plain")[0]
    (rows, cols), = plain["image_grids"].tolist()  # one image: the base and its tiles
    assert plain["pixel_values"].shape == (1 + rows * cols, 3, SIZE, SIZE)
    assert plain["input_ids"].tolist() == [260] * (64 * (1 + rows * cols)) + tokenizer(
        "A.\n", add_special_tokens=False)["input_ids"]

    with pytest.raises(ValueError, match="markers"):
        dataset(media, [record("clip0.mp4", "<image><image>", "x")])[0]
    with pytest.raises(ValueError, match="cuts into the visual tokens"):
        dataset(media, [sample], model_max_length=50)[0]


def test_dataset_samples_frames_like_the_original_training_path(media):
    """Golden `train.process_video(upbound=512, lowbound=64, local=4)` indices and time messages."""
    golden = json.loads(golden_path("preprocess.json").read_text())["sampling"]
    key = "train.process_video(upbound=512,lowbound=64,local=4)"
    records = [record(name, "<image>\nQ", "A") for name in golden if key in golden[name]]
    assert len(records) == 4
    data = VideoChatFlashTrainingDataset(load_records(records, data_root=str(golden_path("README.md").parent)),
                                         tiny_processor(),
                                         FrameSampling.training(frames_upbound=512, frames_lowbound=64))
    tokenizer = data.processor.tokenizer
    for index, sample in enumerate(records):
        item, want = data[index], golden[sample["video"]][key]
        assert item["video_frame_counts"] == [want["num_frames"]], sample["video"]
        assert want["time_msg"] + "\nQ<|im_end|>" in tokenizer.decode(item["input_ids"])
    # JSONL and dataset-list YAML inputs give the same records
    listing = media["root"] / "list.yaml"
    listing.write_text(yaml.safe_dump({"datasets": [{"json_path": "train.jsonl", "sampling_strategy": "first:50%",
                                                     "data_root": str(media["root"])}]}))
    assert [r["video"] for r in load_records(str(listing))] == ["clip0.mp4", "clip1.mp4"]
    # the messages the processor renders: a video block where the (moved) marker was
    messages = record_messages(load_records([record("a.mp4", "Q <image>", "A")], data_root="/data")[0])
    assert messages[1] == {"role": "user", "content": [{"type": "video", "path": "/data/a.mp4"},
                                                        {"type": "text", "text": "\nQ"}]}


def test_check_records_counts_and_names_the_bad_records(media, tmp_path):
    """Conversations and media files are checked up front (a stat each, nothing decoded): one error for all."""
    (tmp_path / "empty.mp4").write_bytes(b"")
    records = load_records([
        record("clip0.mp4", "<image>\nQ", "A"),
        record("missing.mp4", "<image>\nQ", "A"),
        record("clip1.mp4", "<image>\nQ"),  # no answer
        record(["image0.png", "gone.png"], "<image> <image> Q", "A", key="image"),
        record("https://example.com/clip.mp4", "<image>\nQ", "A"),
        record(str(tmp_path / "empty.mp4"), "<image>\nQ", "A"),
        record("clip2.mp4", "<image> <image>\nQ", "A"),  # two markers, one video
        {"video": "clip3.mp4", "conversations": ["not a turn"]},
    ], data_root=str(media["root"]))
    good = [records[0]]
    with pytest.raises(ValueError) as error:
        check_records(records)
    message = str(error.value)
    print(f"\n{message}")
    assert message.startswith("7 of 8 training records are bad: record 1: media file not found:")
    assert "missing.mp4" in message and "record 2: a training record needs an assistant" in message
    assert "gone.png" in message and "record 4: 'https://example.com/clip.mp4': URLs are not supported" in message
    assert "record 5: media file is empty" in message and "record 6" not in message  # the first 5 are named
    assert "... (2 more)" in message and "skip_bad_samples" in message
    with pytest.warns(UserWarning, match="7 of 8 training records are bad"):
        assert check_records(records, skip_bad=True) == good
    assert check_records(good) == good
    with pytest.raises(ValueError, match="none is left"):
        check_records(records[1:], skip_bad=True)
    with pytest.raises(ValueError, match="the training data is empty"):
        check_records([])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"video": "a.mp4", "conversations": []}\n{"video": \n')
    with pytest.raises(ValueError, match="broken.jsonl: not valid JSON Lines"):
        load_records(str(broken))
    mixed = tmp_path / "mixed.json"  # a record without conversations is a bad record, not a dataset spec
    mixed.write_text(json.dumps([record("clip0.mp4", "<image>\nQ", "A"), {"video": "clip1.mp4"}]))
    with pytest.raises(ValueError, match="1 of 2 training records are bad: record 1: bad conversations None"):
        check_records(load_records(str(mixed), data_root=str(media["root"])))
