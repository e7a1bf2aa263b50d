"""Still images the way the published model saw them in training: the original's goldens through the public path
(chat template -> processor -> model), the tile rule for other shapes, mixing with videos, batching, and training.

One image in a sample is ``anyres_nopad`` (a base image + the tiles of the best pinpoint); several are each padded
to a square of the mean colour (one tile). See processing_videochat_flash.image_tiles / pad_to_square.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import golden_path
from videochat_flash.configuration_videochat_flash import VideoChatFlashConfig
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM
from videochat_flash.processing_videochat_flash import (
    VideoChatFlashImageProcessor,
    VideoChatFlashProcessor,
    VideoChatFlashVideoProcessor,
)
from videochat_flash.tiny_model import TINY_SPECIAL_IDS, build_byte_level_tokenizer, build_tiny_model, tiny_processor

GOLDEN_IMAGE_TOKEN_ID = 260  # the processor's image placeholder in the byte-level tokenizer (video: 259)
IMAGE_GOLDENS = {  # golden -> the question of its prompt
    "image_anyres_synthetic_500x300": "Describe the image.",
    "images_pad_synthetic": "What differs between the two images?",
}


def load_image_golden(name):
    sidecar = json.loads(golden_path(f"images/{name}.json").read_text())
    tensors = load_file(golden_path(f"images/{name}.safetensors"))
    dims = sidecar["vision_dims"]
    config = VideoChatFlashConfig(
        **sidecar["config"], image_token_id=GOLDEN_IMAGE_TOKEN_ID,
        vision_config={"hidden_size": dims["embed_dim"], "num_hidden_layers": dims["depth"],
                       "num_attention_heads": dims["num_heads"], "patch_size": dims["patch_size"], "image_size": 224})
    model = VideoChatFlashForCausalLM(config).eval()
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(("input.", "output."))}, strict=True)
    return sidecar, tensors, model


def golden_processor():
    return VideoChatFlashProcessor(video_processor=VideoChatFlashVideoProcessor(size=224),
                                   tokenizer=build_byte_level_tokenizer())


@pytest.mark.parametrize("name", sorted(IMAGE_GOLDENS))
def test_image_goldens_through_the_chat_template(name):
    """apply_chat_template with image blocks -> the golden ids (each -200 expanded to that image's tokens), pixels
    within one uint8 level, prefill logits within 1e-4 and the 8 greedy ids of the original."""
    sidecar, tensors, model = load_image_golden(name)
    processor = golden_processor()
    images = [{"type": "image", "path": str(golden_path(f"images/{file}"))} for file in sidecar["image_files"]]
    messages = [{"role": "user", "content": [*images, {"type": "text", "text": IMAGE_GOLDENS[name]}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == sidecar["prompt"].replace(
        "<image>", "<|image_pad|>")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")

    ids, slots = tensors["input.input_ids"][0].tolist(), iter(sidecar["tokens_per_image"])
    expected_ids = [t for i in ids for t in ([GOLDEN_IMAGE_TOKEN_ID] * next(slots) if i == -200 else [i])]
    assert inputs["input_ids"][0].tolist() == expected_ids
    grids = [sidecar["grid_wh_tiles"][::-1]] if sidecar["grid_wh_tiles"] else [[0, 0]] * len(images)
    assert inputs["image_grids"].tolist() == grids

    golden_pixels = torch.cat([tensors[f"input.pixels_u8.{i}"] for i in range(len(images))])  # (tiles, S, S, 3)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    ours_u8 = (inputs["pixel_values"].permute(0, 2, 3, 1) * std + mean) * 255
    level = (ours_u8 - golden_pixels.float()).abs().max().item()
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    diff = (logits - tensors["output.prefill_logits"]).abs().max().item()
    print(f"\n{name}: {len(expected_ids)} ids, {golden_pixels.shape[0]} tiles within {level:.3f} uint8 levels, "
          f"prefill logits max diff {diff:.2e}")
    assert level <= 1.0 and diff < 1e-4
    assert generated[:, inputs["input_ids"].shape[1]:].tolist() == tensors["output.generated_ids"].tolist()


# The original's select_best_resolution over (1x1)..(6x6) tiles, written down from the original code run on CPU:
# (width, height) -> (cols, rows) of the tile grid, at 224 and 448 px tiles.
ORIGINAL_GRIDS = {
    (500, 300): {224: (3, 2), 448: (2, 1)}, (200, 260): {224: (1, 2), 448: (1, 1)},
    (1280, 720): {224: (6, 4), 448: (3, 2)}, (720, 1280): {224: (4, 6), 448: (2, 3)},
    (10, 10): {224: (1, 1), 448: (1, 1)}, (32, 1000): {224: (1, 5), 448: (1, 3)},
    (3000, 100): {224: (6, 1), 448: (6, 1)}, (224, 224): {224: (1, 1), 448: (1, 1)},
    (1, 1): {224: (1, 1), 448: (1, 1)}, (600, 600): {224: (3, 3), 448: (2, 2)},
}


@pytest.mark.parametrize("side", [224, 448])
def test_tile_grids_and_token_counts_follow_the_original_rule(side):
    processor = VideoChatFlashProcessor(video_processor=VideoChatFlashVideoProcessor(size=side),
                                        tokenizer=build_byte_level_tokenizer())
    rng = np.random.default_rng(0)
    for (width, height), expected in ORIGINAL_GRIDS.items():
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        inputs = processor(text="<|image_pad|>\nWhat is it?", images=[image], return_tensors="pt")
        cols, rows = expected[side]
        assert inputs["image_grids"].tolist() == [[rows, cols]], (width, height, side)
        assert inputs["pixel_values"].shape == (1 + rows * cols, 3, side, side)
        tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
        assert tokens == 64 * (1 + rows * cols)  # 1280x720 at 224 px: 24 tiles + base = 1,600 tokens


def test_max_image_tiles_caps_the_grid_and_pinpoints_come_from_the_settings():
    image = np.zeros((720, 1280, 3), np.uint8)
    assert VideoChatFlashImageProcessor()(image)["image_grids"].tolist() == [[4, 6]]
    assert VideoChatFlashImageProcessor(max_image_tiles=4)(image)["image_grids"].tolist() == [[2, 2]]
    assert VideoChatFlashImageProcessor()(image, max_image_tiles=1)["image_grids"].tolist() == [[1, 1]]
    two_by_two = VideoChatFlashImageProcessor(image_grid_pinpoints="(1x1),(2x2)")  # the original's string form
    assert two_by_two(image)["image_grids"].tolist() == [[2, 2]]  # (1x1), (1x2), (2x1), (2x2)
    assert VideoChatFlashImageProcessor(image_grid_pinpoints=[[448, 224]])(image)["image_grids"].tolist() == [[1, 2]]
    assert VideoChatFlashImageProcessor(image_aspect_ratio="pad")(image)["image_grids"].tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="multiples of the 224 px tile side"):
        VideoChatFlashImageProcessor(image_grid_pinpoints=[[300, 224]])(image)
    with pytest.raises(ValueError, match="image_aspect_ratio='square'"):
        VideoChatFlashImageProcessor(image_aspect_ratio="square")(image)


def test_several_images_in_one_sample_are_padded_squares():
    """Two images in one prompt: each padded (mean colour, centred) to one tile; one per sample in a batch: tiles."""
    processor = tiny_processor()
    wide, tall = np.full((40, 130, 3), 200, np.uint8), np.full((130, 40, 3), 50, np.uint8)
    both = processor(text="<|image_pad|>\n<|image_pad|>\nSame?", images=[wide, tall], return_tensors="pt")
    assert both["image_grids"].tolist() == [[0, 0], [0, 0]] and both["pixel_values"].shape[0] == 2
    border = (both["pixel_values"][0, :, 0, 0] * torch.tensor([0.229, 0.224, 0.225])[:, None].squeeze()
              + torch.tensor([0.485, 0.456, 0.406])) * 255
    assert torch.allclose(border, torch.tensor([123.0, 116.0, 103.0]), atol=0.5)  # the mean colour
    batch = processor(text=["<|image_pad|>\nA?", "<|image_pad|>\nB?"], images=[wide, tall], return_tensors="pt")
    assert batch["image_grids"].tolist() == [[1, 2], [2, 1]]  # at 128 px tiles


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0), tiny_processor()


def image_message(image, text, video=None):
    blocks = [{"type": "image", "image": image}] + ([{"type": "video", "video": video}] if video is not None else [])
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]


def test_mixed_image_and_video_and_batches_of_other_tile_counts_equal_single_runs(tiny):
    model, processor = tiny
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (40, 130, 3), dtype=np.uint8)
    square = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (8, 40, 40, 3), dtype=np.uint8)
    conversations = [image_message(wide, "What and then?", video=frames), image_message(square, "What is it?")]
    settings = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    single = [processor.apply_chat_template(c, **settings) for c in conversations]
    assert [s["image_grids"].tolist() for s in single] == [[[1, 2]], [[1, 1]]]  # 3 and 2 tiles of 128 px
    batch = processor.apply_chat_template(conversations, **settings)
    assert batch["image_grids"].tolist() == [[1, 2], [1, 1]] and batch["pixel_values"].shape[0] == 5
    with torch.no_grad():
        batched = model(**batch).logits[:, -1]
        alone = torch.cat([model(**inputs).logits[:, -1] for inputs in single])
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1]:]
        one_by_one = [model.generate(**s, max_new_tokens=5, do_sample=False)[0, s["input_ids"].shape[1]:].tolist()
                      for s in single]
    diff = (batched - alone).abs().max().item()
    print(f"\nbatch of 3 + 2 tiles (one with a video) vs single runs: last logits max diff {diff:.2e}")
    assert diff < 1e-4 and generated.tolist() == one_by_one


def test_image_tokens_are_the_base_then_the_tile_raster(tiny):
    """64 base tokens, then tile (r, c)'s token k at row r * 8 + k // 8, column c * 8 + k % 8 of the grid."""
    model, processor = tiny
    pixels = processor.image_processor(np.random.default_rng(2).integers(0, 256, (40, 130, 3), dtype=np.uint8),
                                       return_tensors="pt")
    (rows, cols), = pixels["image_grids"].tolist()
    with torch.no_grad():
        (tokens,) = model.get_image_features(**pixels)
        alone = torch.zeros(len(pixels["pixel_values"]), 2, dtype=torch.long)  # every tile as an image: 64 tokens
        each = model.get_image_features(pixels["pixel_values"], alone)
    assert tokens.shape[0] == 64 * (1 + rows * cols) and len(each) == 1 + rows * cols
    assert torch.equal(tokens[:64], each[0])
    grid = tokens[64:].reshape(rows * 8, cols * 8, -1)
    for r in range(rows):
        for c in range(cols):
            tile = grid[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].reshape(64, -1)
            torch.testing.assert_close(tile, each[1 + r * cols + c], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="make 5 tiles"):
        model.get_image_features(pixels["pixel_values"], torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match="need their image_grids"):  # never a silent tiles-as-images default
        model(torch.full((1, 256), TINY_SPECIAL_IDS["image_token_id"]), pixel_values=pixels["pixel_values"])


def test_generate_with_an_image_block_by_path_or_pil_image(tiny, tmp_path):
    model, processor = tiny
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(path)
    by_path = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Q?"}]}]
    by_image = image_message(Image.open(path), "Q?")
    outputs = []
    for messages in (by_path, by_image):
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        assert int((inputs["input_ids"] == TINY_SPECIAL_IDS["image_token_id"]).sum()) == 64 * (1 + 1)  # 100 x 60 at 128 px: one tile
        with torch.no_grad():
            outputs.append(model.generate(**inputs, max_new_tokens=4, do_sample=False).tolist())
    assert outputs[0] == outputs[1]


def test_a_training_image_record_gives_the_inference_pixels_and_tokens(tiny, tmp_path):
    """The same image and question: the training item's pixels, grid and prompt tokens are inference's."""
    from videochat_flash.data_videochat_flash import VideoChatFlashTrainingDataset

    model, processor = tiny
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (90, 300, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    record = {"image": "a.png", "_data_root": str(tmp_path), "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]}
    item = VideoChatFlashTrainingDataset([record], processor)[0]
    inference = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "a.png")},
                                      {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    prompt = inference["input_ids"][0].tolist()
    assert item["input_ids"][: len(prompt)].tolist() == prompt
    assert torch.equal(item["pixel_values"], inference["pixel_values"])
    assert item["image_grids"].tolist() == inference["image_grids"].tolist() == [[1, 3]]
    print(f"\ntraining item = inference: {len(prompt)} prompt ids, {item['pixel_values'].shape[0]} tiles")


def test_chat_with_an_image_path_or_pil_image_uses_the_tiles(tiny, tmp_path):
    model, processor = tiny
    path = tmp_path / "b.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 130, 3), dtype=np.uint8)).save(path)
    settings = {"generation_config": {"max_new_tokens": 4, "do_sample": False}}
    answer, history = model.chat(str(path), processor.tokenizer, "What is it?", **settings)
    assert history[0]["content"] == "<image>\nWhat is it?"  # the original's image prompt, no time message
    assert model.chat(Image.open(path), processor.tokenizer, "What is it?", return_history=False, **settings) == answer
    follow_up, _ = model.chat(str(path), processor.tokenizer, "And?", chat_history=history, **settings)
    inputs = processor.apply_chat_template(image_message(Image.open(path), "What is it?"), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert answer == processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert isinstance(follow_up, str)


def test_image_options_per_call_everywhere(tiny, tmp_path):
    """max_image_tiles / image_aspect_ratio as keyword arguments of one call: the processor (flat or in
    images_kwargs), apply_chat_template's processor_kwargs and the pipeline."""
    from transformers import pipeline

    from videochat_flash.hub_export import make_tiny_folder

    _, processor = tiny
    wide = np.random.default_rng(6).integers(0, 256, (40, 130, 3), dtype=np.uint8)
    text = "<|image_pad|>\nWhat is it?"
    assert processor(text=text, images=[wide])["image_grids"].tolist() == [[1, 2]]
    assert processor(text=text, images=[wide], max_image_tiles=1)["image_grids"].tolist() == [[1, 1]]
    assert processor(text=text, images=[wide], images_kwargs={"image_aspect_ratio": "pad"})[
        "image_grids"].tolist() == [[0, 0]]
    templated = processor.apply_chat_template(image_message(wide, "What is it?"), tokenize=True, return_dict=True,
                                              processor_kwargs={"max_image_tiles": 1})
    assert templated["image_grids"].tolist() == [[1, 1]]
    pipe = pipeline("video-text-to-text", model=str(make_tiny_folder(tmp_path / "model")), trust_remote_code=True)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    capped = pipe(str(tmp_path / "wide.png"), "What is it?", max_new_tokens=3, max_image_tiles=1)  # an image path
    chat = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / "wide.png")},
                                         {"type": "text", "text": "What is it?"}]}]
    assert capped == [{**r, "input_text": "What is it?"} for r in pipe(chat, max_new_tokens=3, max_image_tiles=1)]
    with pytest.raises(ValueError, match="max_image_tiles must be a positive int"):
        VideoChatFlashImageProcessor(max_image_tiles=0)
    with pytest.raises(ValueError, match="image_aspect_ratio='anyres'"):
        VideoChatFlashImageProcessor(image_aspect_ratio="anyres")
    with pytest.raises(ValueError, match="not a list of"):
        VideoChatFlashImageProcessor(image_grid_pinpoints="tiles please")
    literal = VideoChatFlashImageProcessor(size=128, image_grid_pinpoints="[[128, 128], [256, 128]]")  # as configs
    assert literal(wide)["image_grids"].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="no images"):
        processor.image_processor([])


def test_chat_reads_the_checkpoints_image_settings_and_takes_any_image_form(tiny, tmp_path):
    from pathlib import Path

    model, processor = tiny
    image = np.random.default_rng(7).integers(0, 256, (40, 130, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "c.png")
    settings = {"return_history": False, "generation_config": {"max_new_tokens": 3, "do_sample": False}}
    answers = {model.chat(form, processor.tokenizer, "What is it?", **settings)
               for form in (str(tmp_path / "c.png"), Path(tmp_path / "c.png"), image, Image.fromarray(image))}
    assert len(answers) == 1  # a path, a Path, an (H, W, 3) array, a PIL image: the same image
    model.config.image_aspect_ratio = "pad"  # an original config.json field, read by chat() as by the original
    try:
        assert model._chat_processor(processor.tokenizer).image_processor.image_aspect_ratio == "pad"
    finally:
        del model.config.image_aspect_ratio
    assert model._chat_processor(processor.tokenizer).image_processor.image_aspect_ratio == "anyres_nopad"


def test_training_markers_without_a_newline_stay_without_one(tiny, tmp_path):
    """The original's preprocess_multimodal: "<image>\\n" keeps its newline; "<image>What" and several inline markers
    get none (only a single marker not at the start moves first, with "\\n")."""
    from videochat_flash.data_videochat_flash import record_messages

    _, processor = tiny
    cases = {"<image>What is it?": "<I>What is it?", "Compare <image> with <image>.": "Compare <I> with <I>.",
             "What is <image> here?": "<I>\nWhat is  here?", "<image>\nWhat is it?": "<I>\nWhat is it?"}
    for value, expected in cases.items():
        images = ["a.png"] * value.count("<image>")
        record = {"image": images if len(images) > 1 else images[0], "conversations": [
            {"from": "human", "value": value}, {"from": "gpt", "value": "Fine."}]}
        text = processor.apply_chat_template(record_messages(record))
        user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert user.replace("<|image_pad|>", "<I>") == expected, value
