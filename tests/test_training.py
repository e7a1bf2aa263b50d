"""training_videochat_flash: config parsing and stage presets, Trainer runs on the tiny model (the loss falls, saves
reload), per-part learning rates, LoRA, activation checkpointing, resuming, gradient accumulation.

Everything runs on CPU in well under a minute: the tiny random model (4-layer Qwen2 of width 64, UMT on 128 px
frames), four 8-frame 128 px clips written with PyAV into a temporary folder, a few dozen optimizer steps.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from conftest import REPO_ROOT, golden_path
from media import COLOR_QUESTION, colour_dataset
from safetensors import safe_open

import videochat_flash.training_videochat_flash as tvf
from test_data import dataset, record

from videochat_flash.data_videochat_flash import IGNORE_INDEX, VideoChatFlashDataCollator

from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM
from videochat_flash.tiny_model import build_tiny_model, tiny_processor
from videochat_flash.training_videochat_flash import (
    STAGE_PRESETS,
    ModelArguments,
    count_parameters,
    parse_config,
    run_training,
    set_trainable_parts,
)

QUESTION = COLOR_QUESTION


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return colour_dataset(tmp_path_factory.mktemp("train_media"))


def tiny_config(media, output_dir, steps=30, **fields):
    """A run_training config for the tiny model on the four clips."""
    return {"model_name_or_path": "tiny", "train_data": str(media["root"] / "train.json"),
            "data_root": str(media["root"]), "frames_upbound": 8, "output_dir": str(output_dir), "max_steps": steps,
            "per_device_train_batch_size": 4, "learning_rate": 2e-3, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "seed": 0, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
            "dataloader_num_workers": 0, **fields}


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
    return tiny_processor().tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


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


# ============================================================================================ 3. stages, LoRA
DOCUMENTED_PARTS = {"stage1": {"projector"}, "stage2": {"vision_tower", "projector", "llm"},
                    "stage3": {"vision_tower", "projector", "llm"}, "stage4": {"vision_tower", "projector"}}


@pytest.mark.parametrize("stage", sorted(STAGE_PRESETS))
def test_stage_presets_train_exactly_the_documented_parts(stage):
    model_args, data_args, training_args = parse_config(REPO_ROOT / "configs" / f"train_{stage}.yaml")
    assert model_args.stage == stage and set(model_args.tune_parts) == DOCUMENTED_PARTS[stage]
    model = build_tiny_model(0)
    set_trainable_parts(model, model_args.tune_parts)
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
                                            learning_rate=training_args.learning_rate),
        vision_tower_lr=model_args.vision_tower_lr)
    optimizer = trainer.create_optimizer()
    rates = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            rates.setdefault(tvf.parameter_part(names[id(param)]), set()).add(group["lr"])
    expected = {part: {training_args.learning_rate} for part in DOCUMENTED_PARTS[stage]}
    if "vision_tower" in expected:
        expected["vision_tower"] = {2e-6}
    assert rates == expected


def test_lora_adapters_train_save_load_and_merge(media, tmp_path):
    trainer = run_training(tiny_config(media, tmp_path, steps=8, learning_rate=5e-3, save_strategy="steps",
                                       save_steps=4, tune_parts=[], use_lora=True, lora_r=8, lora_alpha=16,
                                       lora_dropout=0.0, lora_modules_to_save=["mm_projector"]))
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
    pairs = zip(base.model.vision_tower.named_parameters(), merged.model.vision_tower.named_parameters())
    for (name, p), (_, q) in pairs:
        assert torch.equal(p, q), name
    # the projector (modules_to_save) trained in full and was saved under its original key names
    assert not torch.equal(base.model.mm_projector.mlp[0].weight, merged.model.mm_projector.mlp[0].weight)


def test_lora_trainable_parameters_and_target_regex():
    model = tvf.apply_lora(build_tiny_model(0), ModelArguments(model_name_or_path="tiny", tune_parts=["llm"],
                                                               lora_r=4, lora_modules_to_save=["mm_projector"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".mm_projector.modules_to_save." in n for n in trainable)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n in trainable if ".lora_A" in n}
    assert len(lora_modules) == 4 * 7  # q k v o gate up down in each of the 4 layers
    assert not any("vision_tower" in n for n in lora_modules)
    vision_linear = [n for n, m in build_tiny_model(0).named_modules() if isinstance(m, torch.nn.Linear)
                     and "vision_tower" in n]
    assert vision_linear and not any(re.fullmatch(tvf.LLM_LORA_TARGET_MODULES, n) for n in vision_linear)


# ============================================================================================ 4. checkpointing
def test_gradient_checkpointing_same_loss_and_gradients(media):
    data = dataset(media, [record("clip0.mp4", f"<image>\n{QUESTION}", "It is red."),
                           record("twelve.mp4", f"<image>\n{QUESTION}", "Grey, with a band.")])
    batch = VideoChatFlashDataCollator(256)([data[0], data[1]])

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
    assert {"VideoChatFlashDecoderLayer", "UMTBlock"} <= set(calls)  # both the LLM and the vision tower recompute
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
    config = tiny_config(media, tmp_path / "out", steps=2, stage="stage4",  # LLM frozen: vision tower + projector
                         model_name_or_path=str(trained["output"]), image_size=160, learning_rate="1e-3")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    from videochat_flash.videochat_flash_cli import main as cli_main

    assert cli_main(["train", str(path)]) == 0
    result = VideoChatFlashForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert result.config.image_size == 160
    assert result.config.mm_vision_tower == trained["trainer"].model.config.mm_vision_tower
    processor_config = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert processor_config["video_processor"]["size"] == {"height": 160, "width": 160}
    start = VideoChatFlashForCausalLM.from_pretrained(trained["output"], dtype=torch.float32)
    changed = {tvf.parameter_part(n) for (n, p), q in zip(start.named_parameters(), result.parameters())
               if not torch.equal(p, q)}
    assert changed == {"vision_tower", "projector"}
    assert tvf.main([str(path)]) == 0  # python -m videochat_flash.training_videochat_flash CONFIG.yaml


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

    lora, data_args, training_args = parse_config(REPO_ROOT / "configs" / "train_lora.yaml")
    assert lora.use_lora and lora.lora_modules_to_save == ["mm_projector"] and lora.tune_parts == []
    # its (default) targets: the 7 projections of every LLM layer, no other linear layer (the vision tower's neither)
    linear = [n for n, m in build_tiny_model(0).named_modules() if isinstance(m, torch.nn.Linear)]
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")
    assert {n for n in linear if re.fullmatch(lora.lora_target_modules, n)} == {
        f"model.layers.{layer}.{projection}" for layer in range(4) for projection in projections}
    assert (training_args.learning_rate, data_args.frames_upbound) == (2e-4, 128)


def test_config_errors_are_clear(media, tmp_path):
    good = tiny_config(media, tmp_path)
    with pytest.raises(ValueError, match="unknown stage"):
        parse_config({**good, "stage": "stage5"})
    with pytest.raises(ValueError, match="needs output_dir"):
        parse_config({key: value for key, value in good.items() if key != "output_dir"})
    with pytest.raises(ValueError, match=r"unknown config fields \['learning_rte'\]"):
        parse_config({**good, "learning_rte": 1.0})
    with pytest.raises(ValueError, match="learning_rate: 'fast' is not a float"):
        parse_config({**good, "learning_rate": "fast"})
    assert parse_config({**good, "learning_rate": "1e-3"})[2].learning_rate == 1e-3  # PyYAML reads 1e-3 as a string


@pytest.mark.parametrize("typo, section, meant", [("lora_rr", "ModelArguments", "lora_r"),
                                                  ("frames_upbond", "DataArguments", "frames_upbound"),
                                                  ("learning_rte", "TrainingArguments", "learning_rate")])
def test_config_typos_in_every_section_are_rejected(media, tmp_path, typo, section, meant):
    with pytest.raises(ValueError, match=rf"unknown config fields \['{typo}'\].*did you mean: {typo} -> {meant}\?"):
        parse_config({**tiny_config(media, tmp_path), typo: 1})
    assert section in {type(args).__name__ for args in parse_config({**tiny_config(media, tmp_path), meant: 2})}


def test_config_strings_for_int_and_bool_fields_are_converted(media, tmp_path):
    """Quoted YAML values stay strings: "8" for an int field, "true" / "false" for a bool field (where "false"
    would otherwise be true)."""
    model_args, data_args, training_args = parse_config(tiny_config(
        media, tmp_path, lora_r="8", frames_upbound="16", max_steps="3", use_lora="false", skip_bad_samples="true",
        bf16="false", activation_checkpointing="True", include_num_input_tokens_seen="all"))
    assert (model_args.lora_r, data_args.frames_upbound, training_args.max_steps) == (8, 16, 3)
    assert model_args.use_lora is False and data_args.skip_bad_samples is True
    assert training_args.bf16 is False and training_args.activation_checkpointing is True
    assert training_args.include_num_input_tokens_seen == "all"  # a field that also takes strings keeps them
    with pytest.raises(ValueError, match=r"use_lora: 'maybe' is not a bool \(true or false\)"):
        parse_config(tiny_config(media, tmp_path, use_lora="maybe"))
    with pytest.raises(ValueError, match="frames_upbound: 'eight' is not an int"):
        parse_config(tiny_config(media, tmp_path, frames_upbound="eight"))


@pytest.mark.parametrize("field, value, message", [
    ("sample_type", "uniform", "sample_type must be 'dynamic_fps1' or 'middle'"),
    ("time_msg", "longer", r"time_msg: 'longer' is not one of \['short', 'long', None\]"),
    ("label_mode", "all", "label_mode: 'all' is not one of"),
    ("prompt_format", "chatml", "prompt_format: 'chatml' is not one of"),
    ("frames_upbound", 0, "max_num_frames must be >= 1"),
    ("local_num_frames", 6, "frames_multiple must be a positive multiple of 4"),
    ("lora_bias", "some", "lora_bias: 'some' is not one of"),
    ("dtype", "float33", "dtype: 'float33' is not a torch dtype"),
    ("tune_parts", "projector,tower", r"tune_parts: 'tower' is not one of"),
    ("config_overrides", "{mm_llm_compress: true}", "config_overrides: .* is not a JSON mapping"),
    ("config_overrides", "[1, 2]", "config_overrides must be a mapping"),
    ("config_overrides", {"mm_llm_compres": True}, "'mm_llm_compres' is not a model config field; did you mean "
                                                   "mm_llm_compress"),
    ("config_overrides", {"mm_llm_compress": "maybe"}, r"config_overrides.mm_llm_compress: 'maybe' is not a bool"),
    ("config_overrides", {"tokens_per_frame": 1.5}, "config_overrides.tokens_per_frame: 1.5 is not int"),
    ("config_overrides", {"mm_vision_tower": "clip"}, "unknown mm_vision_tower 'clip'"),
])
def test_config_values_are_checked_before_anything_loads(media, tmp_path, monkeypatch, field, value, message):
    """Every choice, count and override of the config is checked by parse_config itself (the argument dataclasses'
    __post_init__): one ValueError naming the field, before the data or the model is read."""
    monkeypatch.setattr(tvf, "load_model_and_processor", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(tvf, "load_records", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(ValueError, match=message):
        tvf.run_training(tiny_config(media, tmp_path, **{field: value}))


def test_config_values_in_their_loose_forms_are_normalised(media, tmp_path):
    model_args, _, _ = parse_config(tiny_config(media, tmp_path, tune_parts="projector, vision_tower", config_overrides={
        "mm_llm_compress": "true", "llm_compress_layer_list": "1,2", "llm_image_token_ratio_list": "1,0.5,0.25"}))
    assert model_args.tune_parts == ["projector", "vision_tower"]
    assert model_args.config_overrides == {"mm_llm_compress": True, "llm_compress_layer_list": [1, 2],
                                           "llm_image_token_ratio_list": [1.0, 0.5, 0.25]}
    model, _ = tvf.load_model_and_processor(model_args)
    assert model.config.llm_compress_layer_list == [1, 2] and model.config.mm_llm_compress is True
    with pytest.raises(ValueError, match="llm_compress_layer_list=.* must be increasing and within"):
        tvf.load_model_and_processor(parse_config(tiny_config(media, tmp_path, config_overrides={
            "mm_llm_compress": True, "llm_compress_layer_list": [1, 99], "llm_image_token_ratio_list": [1, .5, .25]}))[0])


def test_data_errors_come_before_the_model_loads(media, tmp_path, monkeypatch, capsys):
    """A missing data file, or a record whose video is missing, fails at once: no model is loaded, no step runs."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(tvf, "load_model_and_processor", no_model)
    with pytest.raises(FileNotFoundError, match="training data file not found"):
        run_training(tiny_config(media, tmp_path / "out", train_data=str(tmp_path / "nope.json")))
    data = tmp_path / "train.json"
    data.write_text(json.dumps([*media["records"], record("lost.mp4", "<image>\nQ", "A")]))
    with pytest.raises(ValueError, match=r"1 of 5 training records are bad: record 4: media file not found: .*lost"):
        run_training(tiny_config(media, tmp_path / "out", train_data=str(data)))
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_config(media, tmp_path / "out", train_data=str(data))))
    from videochat_flash.videochat_flash_cli import main as cli_main

    assert cli_main(["train", str(config)]) == 1
    err = capsys.readouterr()[1].strip()
    print(f"\n{err}")
    assert err.count("\n") == 0 and err.startswith("videochat-flash: error: 1 of 5 training records are bad")
    assert not (tmp_path / "out").exists()


def test_config_overrides_and_model_arguments_reach_the_model(media, tmp_path):
    model_args, _, _ = parse_config(tiny_config(media, tmp_path, image_size=160, tiny_seed=2,
                                                config_overrides={"mm_llm_compress": True}))
    model, processor = tvf.load_model_and_processor(model_args)
    assert model.config.mm_llm_compress is True and model.config.image_size == 160
    assert processor.video_processor.size == processor.image_processor.size == {"height": 160, "width": 160}
    assert torch.equal(model.lm_head.weight, build_tiny_model(2).lm_head.weight)  # tiny_seed: the base weights
    as_json = parse_config(tiny_config(media, tmp_path, config_overrides='{"mm_llm_compress": true}'))[0]
    assert tvf.load_model_and_processor(as_json)[0].config.mm_llm_compress is True
