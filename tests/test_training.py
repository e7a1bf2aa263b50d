"""Fine-tuning: data + label masking, Trainer runs on the tiny model, stage presets, LoRA, checkpointing, resuming.

Everything runs on CPU in well under a minute: the tiny random model (4-layer Qwen2 of width 64, UMT on 128 px
frames), four 8-frame 128 px videos written with PyAV into a temporary folder, a few dozen optimizer steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, golden_path
from safetensors import safe_open

import videochat_flash.training_videochat_flash as tvf
from videochat_flash.hub_export import tiny_processor
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM
from videochat_flash.tiny_model import build_tiny_model
from videochat_flash.training_videochat_flash import (
    IGNORE_INDEX,
    STAGE_PRESETS,
    VideoChatFlashDataCollator,
    VideoChatFlashTrainingDataset,
    build_training_config,
    count_parameters,
    encode_conversation,
    load_records,
    run_training,
    set_trainable_parts,
)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
QUESTION = "What color is the video?"
SIZE = 128  # the tiny vision tower's frame size


def write_video(path: Path, color, frames: int = 8, size: int = SIZE, fps: int = 8) -> str:
    """A solid-colour clip with a moving band in the complementary colour."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(frames):
            frame = np.empty((size, size, 3), np.uint8)
            frame[:] = color
            band = (i * 8) % size
            frame[band : band + 16] = 255 - np.array(color, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_media")
    records = []
    for index, (name, color) in enumerate(COLORS.items()):
        write_video(root / f"clip{index}.mp4", color)
        records.append({"video": f"clip{index}.mp4", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": f"It is {name}."}]})
    (root / "train.json").write_text(json.dumps(records))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return {"root": root, "records": records, "answers": [f"It is {name}." for name in COLORS]}


def tiny_config(media, output_dir, steps=30, **training):
    """A run_training config for the tiny model on the four clips."""
    settings = {"output_dir": str(output_dir), "max_steps": steps, "per_device_train_batch_size": 4,
                "learning_rate": 2e-3, "lr_scheduler_type": "constant", "warmup_steps": 0, "seed": 0,
                "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "dataloader_num_workers": 0}
    settings.update(training)
    return {"model": {"name_or_path": "tiny"},
            "data": {"train": str(media["root"] / "train.json"), "data_root": str(media["root"]),
                     "frames_upbound": 8},
            "training": settings}


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def greedy_answer(model, collator, item) -> str:
    """Greedy decoding from the training prompt (everything before the first trained label)."""
    batch = collator([item])
    start = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    prompt = batch["input_ids"][:, :start]
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             pixel_values_videos=batch["pixel_values_videos"],
                             video_frame_counts=batch["video_frame_counts"], max_new_tokens=16, do_sample=False,
                             eos_token_id=258, pad_token_id=256)
    new = out[0, prompt.shape[1]:] if out.shape[1] > prompt.shape[1] and bool((out[0, :start] == prompt[0]).all()) \
        else out[0]
    return collator.processor.tokenizer.decode(new, skip_special_tokens=True)


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


# ============================================================================================ 1. it learns
@pytest.fixture(scope="module")
def trained(media, tmp_path_factory):
    output = tmp_path_factory.mktemp("run_full")
    trainer = run_training(tiny_config(media, output, steps=30))
    return {"trainer": trainer, "output": output}


def test_training_loss_falls_and_greedy_reproduces_answers(trained, media):
    trainer = trained["trainer"]
    history = losses(trainer)
    assert trainer.state.global_step == 30 and len(history) == 30
    drop = 1 - history[-1] / history[0]
    model = trainer.model.eval()
    answers = [greedy_answer(model, trainer.data_collator, trainer.train_dataset[i]) for i in range(4)]
    matched = sum(got == want for got, want in zip(answers, media["answers"]))
    print(f"\nloss start {history[0]:.3f} -> end {history[-1]:.3f} (-{drop:.0%}); greedy answers {answers} "
          f"({matched}/4 exact)")
    assert drop >= 0.5
    assert matched >= 1
    assert answers[0] == media["answers"][0]


def test_saved_model_reloads_with_identical_logits_and_original_keys(trained):
    trainer, output = trained["trainer"], trained["output"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model = trainer.model.eval()
    with torch.no_grad():
        reference = model(**model_inputs(batch)).logits
        reloaded = VideoChatFlashForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
        direct = reloaded(**model_inputs(batch)).logits
        from transformers import AutoModel, AutoProcessor

        auto = AutoModel.from_pretrained(output, trust_remote_code=True, dtype=torch.float32).eval()
        auto_logits = auto(**model_inputs(batch)).logits
    print(f"\nreload max |diff|: from_pretrained {(direct - reference).abs().max():.3g}, "
          f"AutoModel {(auto_logits - reference).abs().max():.3g}")
    assert torch.equal(direct, reference) and torch.equal(auto_logits, reference)
    assert type(auto).__module__.startswith("transformers_modules")
    assert reloaded.config.use_cache is True
    assert AutoProcessor.from_pretrained(output, trust_remote_code=True).video_token_id == 259

    # Original key names: the same key patterns (layer / block numbers aside) as a published checkpoint.
    with safe_open(str(output / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    manifest = json.loads(golden_path("keys_VideoChat-Flash-Qwen2-7B_res224.json").read_text())["keys"]
    pattern = lambda keys: {re.sub(r"\.\d+\.", ".N.", key) for key in keys}
    assert pattern(saved) == pattern(manifest)


# ============================================================================================ 2. masking
def fake_item(conversations, frames=(8,), duration=1.0, images=0):
    videos = [torch.zeros(n, 3, SIZE, SIZE) for n in frames]
    return {"conversations": conversations, "videos": videos,
            "video_metadata": [{"duration": duration, "fps": 8.0, "frame_indices": list(range(n))} for n in frames],
            "images": [torch.zeros(3, SIZE, SIZE) for _ in range(images)], "id": 0}


def segments(processor, ids):
    """Positions of each chat turn (start, end, role) found from <|im_start|> tokens."""
    tokenizer = processor.tokenizer
    starts = [i for i, t in enumerate(ids) if t == tokenizer.convert_tokens_to_ids("<|im_start|>")] + [len(ids)]
    roles = [tokenizer.decode(ids[s + 1 : s + 5]) for s in starts[:-1]]
    return [(s, e, "assistant" if r.startswith("assi") else "user" if r.startswith("user") else "system")
            for s, e, r in zip(starts, starts[1:], roles)]


def test_masking_single_and_multi_turn_with_padding():
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    collator = VideoChatFlashDataCollator(processor)
    single = fake_item([{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "It is red."}])
    multi = fake_item([{"from": "human", "value": f"{QUESTION}\n<image>"}, {"from": "gpt", "value": "Red."},
                       {"from": "human", "value": "And the band?"}, {"from": "gpt", "value": "It moves down."}],
                      frames=(12,), duration=1.5)
    batch = collator([single, multi])
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
        visual = [i for i, t in enumerate(row_ids) if t == processor.video_token_id]
        assert len(visual) == 16 * (8 if row == 0 else 12)
        assert all(row_labels[i] == IGNORE_INDEX for i in visual)
        trained = [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX]
        assert all(row_labels[i] == row_ids[i] for i in trained)
        answers = []
        for start, end, role in segments(processor, row_ids):
            turn_labels = row_labels[start:end]
            if role in ("system", "user"):
                assert all(label == IGNORE_INDEX for label in turn_labels), role
                continue
            # assistant: header masked, then answer + <|im_end|> + "\n" trained
            header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
            assert all(label == IGNORE_INDEX for label in turn_labels[:header])
            body = turn_labels[header:]
            assert all(label != IGNORE_INDEX for label in body)
            assert tokenizer.decode(body) .endswith("<|im_end|>\n")
            answers.append(tokenizer.decode(body)[: -len("<|im_end|>\n")])
        assert answers == expected_answers[row]


def test_prompt_matches_the_original_training_prompt():
    """preprocess_multimodal + preprocess_qwen: "<image>" moved first, time message, then "\\n" + question."""
    processor = tiny_processor()
    conversation = [{"from": "human", "value": f"{QUESTION} <image>"}, {"from": "gpt", "value": "Red."}]
    ids, _ = encode_conversation(processor, conversation, [8], [{"duration": 12.0}])
    video = "<|video_pad|>" * 128
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + video
                + "\nThe video lasts for 12.00 seconds, and 8 frames are uniformly sampled from it. \n" + QUESTION
                + "<|im_end|>\n<|im_start|>assistant\nRed.<|im_end|>\n")
    assert processor.tokenizer.decode(ids) == expected
    # the original's non-"short" time message lists the frame times
    ids, _ = encode_conversation(processor, conversation, [8], [{"duration": 1.0, "fps": 8.0,
                                                                 "frame_indices": list(range(8))}], time_msg="long")
    assert ("\nThe video lasts for 1.00 seconds, and 8 frames are uniformly sampled at 0.0, 0.1, 0.2, 0.4, 0.5, 0.6, "
            "0.8, 0.9 seconds. \n" + QUESTION) in processor.tokenizer.decode(ids)
    # without a time message (time_msg null) and with a custom system turn
    conversation = [{"from": "system", "value": "Be brief."}] + conversation
    ids, _ = encode_conversation(processor, conversation, [8], [{"duration": 12.0}], time_msg=None)
    assert processor.tokenizer.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                                      + video + "\n" + QUESTION)


def test_masking_options_original_mode_plain_format_and_images():
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    conversation = [{"from": "human", "value": "<image>\nQ1?"}, {"from": "gpt", "value": "A1."},
                    {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2."}]
    decode_trained = lambda ids, labels: tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])

    ids, labels = encode_conversation(processor, conversation, [4], [{"duration": 1.0}], train_on_turn_newline=False)
    assert decode_trained(ids, labels) == "A1.<|im_end|>A2.<|im_end|>"

    # "original": preprocess_qwen bit for bit: whole assistant turns + every <|im_start|>, <|im_end|>, "\n".
    ids, labels = encode_conversation(processor, conversation, [4], [{"duration": 1.0}], label_mode="original")
    unmask = {257, 258, tokenizer("\n", add_special_tokens=False)["input_ids"][0]}
    for start, end, role in segments(processor, ids):
        for i in range(start, end):
            if role == "assistant":
                assert labels[i] == ids[i]
            else:
                assert labels[i] == (ids[i] if ids[i] in unmask else IGNORE_INDEX)

    # stage 1 "plain": visual tokens + answer + "\n", no system prompt, question or time message
    ids, labels = encode_conversation(processor, conversation[:2], [4], [{"duration": 1.0}], prompt_format="plain")
    assert ids == [processor.video_token_id] * 64 + tokenizer("A1.\n", add_special_tokens=False)["input_ids"]
    assert decode_trained(ids, labels) == "A1.\n"

    # images: 64 <|image_pad|> per image, in marker order, masked
    item = fake_item([{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "No."}],
                     frames=(), images=2)
    batch = VideoChatFlashDataCollator(processor)([item])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 128
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE) and "pixel_values_videos" not in batch
    assert decode_trained(batch["input_ids"][0].tolist(), batch["labels"][0].tolist()) == "No.<|im_end|>\n"

    with pytest.raises(ValueError, match="markers"):
        encode_conversation(processor, [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
                            [4], [{"duration": 1.0}])
    with pytest.raises(ValueError, match="cuts into its visual tokens"):
        VideoChatFlashDataCollator(processor, model_max_length=50)([fake_item(conversation)])


def test_dataset_samples_frames_like_the_original_training_path(media):
    """Golden `train.process_video(upbound=512, lowbound=64, local=4)` indices and time messages."""
    golden = json.loads(golden_path("preprocess.json").read_text())["sampling"]
    processor = tiny_processor()
    key = "train.process_video(upbound=512,lowbound=64,local=4)"
    records = [{"video": name, "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
               for name in golden if key in golden[name]]
    assert len(records) == 4
    dataset = VideoChatFlashTrainingDataset(load_records(records, data_root=str(golden_path("README.md").parent)),
                                            processor, frames_upbound=512, frames_lowbound=64)
    for index, record in enumerate(records):
        item = dataset[index]
        want = golden[record["video"]][key]
        assert item["video_metadata"][0]["frame_indices"] == want["frame_indices"], record["video"]
        assert item["videos"][0].shape == (want["num_frames"], 3, SIZE, SIZE)
        ids, _ = encode_conversation(processor, item["conversations"], [want["num_frames"]], item["video_metadata"])
        assert want["time_msg"] + "\nQ<|im_end|>" in processor.tokenizer.decode(ids)
    # JSONL and dataset-list YAML inputs give the same records
    listing = media["root"] / "list.yaml"
    listing.write_text(yaml.safe_dump({"datasets": [{"json_path": "train.jsonl", "sampling_strategy": "first:50%",
                                                     "data_root": str(media["root"])}]}))
    assert [r["video"] for r in load_records(str(listing))] == ["clip0.mp4", "clip1.mp4"]


# ============================================================================================ 3. stages, LoRA
DOCUMENTED_PARTS = {"stage1": {"projector"}, "stage2": {"vision_tower", "projector", "llm"},
                    "stage3": {"vision_tower", "projector", "llm"}, "stage4": {"vision_tower", "projector"}}


@pytest.mark.parametrize("stage", sorted(STAGE_PRESETS))
def test_stage_presets_train_exactly_the_documented_parts(stage):
    shipped = yaml.safe_load((REPO_ROOT / "configs" / f"train_{stage}.yaml").read_text())
    config = build_training_config(shipped)
    assert config["stage"] == stage and set(config["tune_parts"]) == DOCUMENTED_PARTS[stage]
    model = build_tiny_model(0)
    set_trainable_parts(model, config["tune_parts"])
    counts = count_parameters(model)
    print(f"\n{stage}: " + ", ".join(f"{p} {c['trainable']}/{c['total']}" for p, c in counts.items()))
    for part, entry in counts.items():
        assert entry["total"] > 0
        assert entry["trainable"] == (entry["total"] if part in DOCUMENTED_PARTS[stage] else 0), part
    assert sum(e["total"] for e in counts.values()) == sum(p.numel() for p in model.parameters())
    # The original's per-part learning rates reach the optimizer (vision tower at 2e-6 in stages 2-4).
    from transformers import TrainingArguments

    trainer = tvf.VideoChatFlashTrainer(
        model=model, args=TrainingArguments(output_dir="unused", report_to="none", use_cpu=True,
                                            learning_rate=config["training"]["learning_rate"]),
        vision_tower_lr=config["vision_tower_lr"])
    optimizer = trainer.create_optimizer()
    rates = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            rates.setdefault(tvf.parameter_part(names[id(param)]), set()).add(group["lr"])
    expected = {part: {config["training"]["learning_rate"]} for part in DOCUMENTED_PARTS[stage]}
    if "vision_tower" in expected:
        expected["vision_tower"] = {2e-6}
    assert rates == expected


def test_lora_adapters_train_save_load_and_merge(media, tmp_path):
    config = tiny_config(media, tmp_path, steps=8, learning_rate=5e-3, save_strategy="steps", save_steps=4)
    config.update(tune_parts=[], lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0,
                                       "modules_to_save": ["mm_projector"]})
    trainer = run_training(config)
    history = losses(trainer)
    print(f"\nLoRA loss {history[0]:.3f} -> {history[-1]:.3f}")
    assert history[-1] < history[0]
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        adapter_keys = list(handle.keys())
    assert any(".layers.0.self_attn.q_proj.lora_A" in k for k in adapter_keys)
    assert any(".layers.3.mlp.down_proj.lora_B" in k for k in adapter_keys)
    assert not any("vision_tower" in k for k in adapter_keys)  # the regex leaves the vision tower alone
    assert any("mm_projector" in k for k in adapter_keys)  # modules_to_save
    assert adapter_config["modules_to_save"] == ["mm_projector"]
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").is_file()

    # merged model in output_dir == base + adapter (PEFT) == in-memory merged model
    from peft import PeftModel

    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    base = build_tiny_model(0)
    with torch.no_grad():
        base_logits = base(**model_inputs(batch)).logits
        peft_model = PeftModel.from_pretrained(build_tiny_model(0), str(adapter)).eval()
        peft_logits = peft_model(**model_inputs(batch)).logits
        merged = VideoChatFlashForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        merged_logits = merged(**model_inputs(batch)).logits
        in_memory = trainer.model.eval()(**model_inputs(batch)).logits
    lora_effect = (peft_logits - base_logits).abs().max().item()
    merge_error = (merged_logits - peft_logits).abs().max().item()
    print(f"LoRA changes logits by {lora_effect:.3g}; merged vs adapter max |diff| {merge_error:.3g}")
    assert lora_effect > 1e-2
    assert merge_error < 1e-4
    assert torch.equal(merged_logits, in_memory)
    # the stand-alone merge (used after sharded runs) gives the same folder contents
    again = tvf.merge_lora_adapter("tiny", adapter, tmp_path / "merged_again").eval()
    with torch.no_grad():
        assert torch.equal(again(**model_inputs(batch)).logits, merged_logits)
    assert (tmp_path / "merged_again" / "modeling_videochat_flash.py").is_file()
    # frozen base weights untouched: the vision tower of the merged model is the base one
    for (name, p), (_, q) in zip(base.model.vision_tower.named_parameters(), merged.model.vision_tower.named_parameters()):
        assert torch.equal(p, q), name
    # the projector (modules_to_save) trained in full and was saved under its original key names
    assert not torch.equal(base.model.mm_projector.mlp[0].weight, merged.model.mm_projector.mlp[0].weight)


def test_lora_trainable_parameters_and_target_regex():
    model = tvf._apply_lora(build_tiny_model(0), dict(tvf.LORA_DEFAULTS, r=4, modules_to_save=["mm_projector"]),
                            tune_parts=["llm"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".mm_projector.modules_to_save." in n for n in trainable)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n in trainable if ".lora_A" in n}
    assert len(lora_modules) == 4 * 7  # q k v o gate up down in each of the 4 layers
    assert not any("vision_tower" in n for n in lora_modules)
    vision_linear = [n for n, m in build_tiny_model(0).named_modules() if isinstance(m, torch.nn.Linear)
                     and "vision_tower" in n]
    assert vision_linear and not any(re.fullmatch(tvf.LLM_LORA_TARGET_MODULES, n) for n in vision_linear)


# ============================================================================================ 4. checkpointing
def test_gradient_checkpointing_same_loss_and_gradients():
    processor = tiny_processor()
    collator = VideoChatFlashDataCollator(processor)
    torch.manual_seed(0)
    items = []
    for frames, answer in ((8, "It is red."), (4, "Blue, with a band.")):
        item = fake_item([{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}],
                         frames=(frames,))
        item["videos"] = [torch.randn(frames, 3, SIZE, SIZE)]
        items.append(item)
    batch = collator(items)

    def counting(func, name, calls):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return func(*args, **kwargs)

        return wrapped

    def loss_and_grads(checkpointing):
        model = build_tiny_model(0).train()
        calls = []
        if checkpointing:
            model.activation_checkpointing_enable()  # what TrainingArguments(activation_checkpointing=True) calls
            for module in model.modules():
                func = getattr(module, "_gradient_checkpointing_func", None)
                if func is not None and getattr(module, "gradient_checkpointing", False):
                    module._gradient_checkpointing_func = counting(func, type(module).__name__, calls)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls

    loss_off, grads_off, _ = loss_and_grads(False)
    loss_on, grads_on, calls = loss_and_grads(True)
    assert {"Qwen2DecoderLayer", "UMTBlock"} <= set(calls)  # both the LLM and the vision tower recompute
    worst = max((grads_on[n] - grads_off[n]).abs().max().item() for n in grads_off)
    print(f"\ncheckpointing on/off: loss {loss_off.item():.6f} vs {loss_on.item():.6f}, max grad |diff| {worst:.3g} "
          f"over {len(grads_off)} tensors; recomputed blocks: {len(calls)}")
    assert grads_on.keys() == grads_off.keys() and len(grads_off) == sum(1 for _ in build_tiny_model(0).parameters())
    assert abs(loss_on.item() - loss_off.item()) <= 1e-5
    assert worst <= 1e-5


# ============================================================================================ 5. resuming
def test_resume_continues_step_count_and_optimizer_state(media, tmp_path):
    from transformers import TrainerCallback

    common = dict(per_device_train_batch_size=2, save_strategy="steps", save_steps=3, learning_rate=1e-3)
    straight = run_training(tiny_config(media, tmp_path / "a", steps=6, **common))
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json").is_file()
    # a Trainer checkpoint of a full fine-tune is a loadable model folder too
    assert (checkpoint / "config.json").is_file() and (checkpoint / "modeling_videochat_flash.py").is_file()

    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen["step"] = state.global_step
            seen["state"] = {k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
                             for k, s in optimizer.state_dict()["state"].items()}

    import transformers

    original_init = transformers.Trainer.__init__

    def init_with_capture(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Capture())

    transformers.Trainer.__init__ = init_with_capture
    try:
        resumed = run_training(tiny_config(media, tmp_path / "b", steps=6, **common),
                               resume_from_checkpoint=str(checkpoint))
    finally:
        transformers.Trainer.__init__ = original_init

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    assert seen["step"] == 3 and seen["state"].keys() == saved.keys()
    for key, entry in saved.items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                assert torch.equal(seen["state"][key][name], value), (key, name)
    assert resumed.state.global_step == 6
    # steps 1-3 come back from the checkpoint's trainer_state.json, 4-6 are new
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    straight_losses = {e["step"]: e["loss"] for e in straight.state.log_history if "loss" in e}
    resumed_losses = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    worst_param = max((p - q).abs().max().item() for p, q in
                      zip(straight.model.parameters(), resumed.model.parameters()))
    print(f"\nresumed at step {seen['step']}: losses 4-6 {[round(resumed_losses[s], 5) for s in (4, 5, 6)]} vs "
          f"straight {[round(straight_losses[s], 5) for s in (4, 5, 6)]}; final weights max |diff| {worst_param:.3g}")
    for step in (1, 2, 3, 4, 5, 6):
        assert abs(resumed_losses[step] - straight_losses[step]) < 1e-5
    assert worst_param < 1e-5


def test_gradient_accumulation_is_token_normalised(media, tmp_path):
    """Loss through model.loss_function with the Trainer's num_items_in_batch: 4 x 1 accumulated == one batch of 4,
    although the answers have different lengths."""
    whole = run_training(tiny_config(media, tmp_path / "a", steps=2, per_device_train_batch_size=4))
    accumulated = run_training(tiny_config(media, tmp_path / "b", steps=2, per_device_train_batch_size=1,
                                           gradient_accumulation_steps=4))
    assert accumulated.model_accepts_loss_kwargs
    first, second = losses(whole), losses(accumulated)
    print(f"\nbatch 4: {first}; 4 x 1 accumulated: {second}")
    assert max(abs(x - y) for x, y in zip(first, second)) < 1e-5


# ============================================================================================ configs, CLI
def test_main_runs_a_yaml_config_and_the_cli_entry(media, trained, tmp_path):
    """Stage 4 from a saved folder, at a higher frame size (as the original moves to 448 px), via the CLI."""
    config = tiny_config(media, tmp_path / "out", steps=2)
    config["stage"] = "stage4"  # LLM frozen: only the vision tower and projector move
    config["model"] = {"name_or_path": str(trained["output"]), "image_size": 160}
    config["training"].pop("learning_rate")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    from videochat_flash.videochat_flash_cli import main as cli_main

    assert cli_main(["train", str(path)]) == 0
    result = VideoChatFlashForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert result.config.image_size == 160 and result.config.mm_vision_tower == trained["trainer"].model.config.mm_vision_tower
    processor_config = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert processor_config["video_processor"]["size"] == {"height": 160, "width": 160}
    start = VideoChatFlashForCausalLM.from_pretrained(trained["output"], dtype=torch.float32)
    changed = {tvf.parameter_part(n) for (n, p), q in zip(start.named_parameters(), result.parameters())
               if not torch.equal(p, q)}
    assert changed == {"vision_tower", "projector"}
    assert tvf.main([str(path)]) == 0  # python training_videochat_flash.py CONFIG.yaml


def test_shipped_distributed_configs():
    deepspeed = json.loads((REPO_ROOT / "configs" / "deepspeed_zero3.json").read_text())
    assert deepspeed["zero_optimization"]["stage"] == 3
    assert deepspeed["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in deepspeed and "scheduler" not in deepspeed  # the Trainer's (per-part lr) are used

    def auto_keys(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from auto_keys(value, f"{prefix}{key}.")
            elif value == "auto":
                yield prefix + key

    # only the "auto" entries that the Trainer's DeepSpeed integration fills in (HfTrainerDeepSpeedConfig)
    assert set(auto_keys(deepspeed)) <= {
        "bf16.enabled", "fp16.enabled", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
        "train_micro_batch_size_per_gpu", "zero_optimization.reduce_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold"}

    fsdp = yaml.safe_load((REPO_ROOT / "configs" / "fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    classes = {type(m).__name__ for m in build_tiny_model(0).modules()}
    assert set(fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")) <= classes

    lora = build_training_config(yaml.safe_load((REPO_ROOT / "configs" / "train_lora.yaml").read_text()))
    assert lora["lora"]["enabled"] and lora["lora"]["modules_to_save"] == ["mm_projector"]
    assert lora["lora"]["target_modules"] == tvf.LLM_LORA_TARGET_MODULES


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        build_training_config({"stage": "stage5", "model": {"name_or_path": "tiny"}, "training": {"output_dir": "x"}})
    with pytest.raises(ValueError, match="output_dir"):
        build_training_config({"model": {"name_or_path": "tiny"}})
    with pytest.raises(ValueError, match="unknown top-level"):
        build_training_config({"modle": {}, "training": {"output_dir": "x"}})
    with pytest.raises(ValueError, match="unknown training options"):
        tvf._training_arguments({"output_dir": str(tmp_path), "learning_rte": 1.0}, tmp_path)
