"""Fine-tuning on two processes, on this machine's CPUs: torchrun and accelerate launch (gloo), DDP and FSDP2.

Every launch starts two CPU processes (OMP_NUM_THREADS=1, gloo, a free port on 127.0.0.1) that train the tiny model
on the four colour clips for 4 optimizer steps of a global batch of 2 (1 sample per process), compared with the same
run in this process with a batch of 2. Same data order: the Trainer's shuffled sampler is accelerate's seedable
sampler, the same permutation (seed 0) in every process, and the two ranks take alternate batches of 1, so global step
k holds the single process's k-th batch. Losses are compared per logged step (logging_steps 1, trainer_state.json).

FSDP2 (torch's ``fully_shard``) runs on CPU processes: accelerate alone would fall back to DDP there, and
``VideoChatFlashTrainer`` installs accelerate's FSDP plugin instead. No GPU is needed, none is used.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT
from media import COLOR_QUESTION, colour_dataset, free_port
from safetensors import safe_open

from videochat_flash.data_videochat_flash import VideoChatFlashTrainingDataset, load_records
from videochat_flash.tiny_model import build_tiny_model
from videochat_flash.training_videochat_flash import check_fsdp_support, run_training

TOLERANCE = 1e-5
LAUNCH_TIMEOUT = 300  # seconds; a run takes 10-30 s here
TRAINING_MODULE = ("-m", "videochat_flash.training_videochat_flash")
CLI_TRAIN = ("-m", "videochat_flash.videochat_flash_cli", "train")
ACCELERATE_FSDP = ("--config_file", str(REPO_ROOT / "configs" / "fsdp.yaml"))
ACCELERATE_DDP = ("--multi_gpu",)  # accelerate's torchrun launcher; without GPUs its processes run on CPU (gloo)
LORA = {"tune_parts": [], "use_lora": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_modules_to_save": ["mm_projector"], "learning_rate": 5e-3}
UNIFORM_DROPPING = {"mm_llm_compress": True, "llm_compress_type": "uniform"}
# Killed by SIGKILL at the end of step 3 (every rank): checkpoint-2 is on disk, step 3 is lost.
KILLED_AT_STEP_3 = '''
import os, signal, sys
from transformers import TrainerCallback
from videochat_flash.training_videochat_flash import run_training


class KillAtStep3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)


run_training(sys.argv[1], callbacks=[KillAtStep3()])
'''


def fsdp_fields() -> dict:
    """FSDP2 through the TrainingArguments, sharding the layers that configs/fsdp.yaml names."""
    layers = yaml.safe_load((REPO_ROOT / "configs" / "fsdp.yaml").read_text())["fsdp_config"][
        "fsdp_transformer_layer_cls_to_wrap"]
    return {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": layers.split(","),
                                          "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}}


# ============================================================================================ runs
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return colour_dataset(tmp_path_factory.mktemp("distributed_media"))


def run_config(media, output_dir, **fields) -> dict:
    """4 steps of the tiny model, 1 sample per process per step."""
    return {"model_name_or_path": "tiny", "train_data": str(media["root"] / "train.json"),
            "data_root": str(media["root"]), "frames_upbound": 8, "output_dir": str(output_dir), "max_steps": 4,
            "per_device_train_batch_size": 1, "learning_rate": 2e-3, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "seed": 0, "save_strategy": "no", "logging_steps": 1, "dataloader_num_workers": 0,
            "use_cpu": True, **fields}


def single_process(media, output_dir, **fields):
    """The reference: the same run in this process with a batch of 2 (the two processes' global batch)."""
    return run_training({**run_config(media, output_dir, **fields), "per_device_train_batch_size": 2})


@pytest.fixture(scope="module")
def reference(media, tmp_path_factory):
    return single_process(media, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def reference_dropping(media, tmp_path_factory):
    return single_process(media, tmp_path_factory.mktemp("single_dropping"), config_overrides=UNIFORM_DROPPING)


@pytest.fixture(scope="module")
def reference_lora(media, tmp_path_factory):
    return single_process(media, tmp_path_factory.mktemp("single_lora"), **LORA)


@dataclass
class Launch:
    returncode: int
    output: str  # the launcher's stdout and stderr
    ranks: dict  # rank -> its stdout and stderr (torchrun --redirects), empty for accelerate launch
    seconds: float

    def everything(self) -> str:
        return self.output + "".join(self.ranks.values())

    def tail(self) -> str:
        return self.everything()[-4000:]


def launch(tmp_path, config: dict, entry=TRAINING_MODULE, accelerate: tuple | None = None, name="run") -> Launch:
    """Two CPU processes on `config`: ``torchrun --nproc_per_node 2`` (per-rank logs), or ``accelerate launch
    --num_processes 2`` with the `accelerate` options; `entry` is what they run (a module or a script)."""
    path, logs = tmp_path / f"{name}.yaml", tmp_path / f"{name}_logs"
    path.write_text(yaml.safe_dump(config))
    port = str(free_port())
    if accelerate is None:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", port, "--log-dir", str(logs), "--redirects", "3"]
    else:
        launcher = ["-m", "accelerate.commands.launch", *accelerate, "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                    "--main_process_port", port]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *launcher, *entry, str(path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    ranks = {rank: "".join(log.read_text(errors="replace") for log in sorted(logs.glob(f"*/attempt_0/{rank}/*.log")))
             for rank in (0, 1)} if accelerate is None else {}
    return Launch(done.returncode, done.stdout + done.stderr, ranks, time.perf_counter() - start)


# ============================================================================================ comparisons
def logged_losses(history: list) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def saved_losses(output_dir) -> dict[int, float]:
    return logged_losses(json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"])


def worst_loss_difference(got: dict, want: dict) -> float:
    assert sorted(got) == sorted(want) == [1, 2, 3, 4], (got, want)
    return max(abs(got[step] - want[step]) for step in want)


def model_inputs(media, trainer) -> dict:
    """Two still images with the colour question, as the run's processor and collator encode them. Not the training
    clips: ToMe merges video patches by bipartite matching, and on these flat-colour clips near-tied similarities let
    1e-6 weight differences flip a merge (a logit moves by 1e-3); an image tile keeps all its 64 patches."""
    records = load_records([{"image": f"image{index}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{COLOR_QUESTION}"}, {"from": "gpt", "value": "It is."}]}
        for index in (0, 1)], data_root=str(media["root"]))
    images = VideoChatFlashTrainingDataset(records, trainer.processing_class)
    batch = trainer.data_collator([images[0], images[1]])
    return {key: value for key, value in batch.items() if key != "labels"}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def auto_model(folder):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)


def safetensors_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def assert_main_process_output_only(run: Launch) -> None:
    """Logs, progress bars and the parameter count on rank 0; none of them on rank 1."""
    shown = {"parameter count": "[videochat-flash train] trainable parameters", "loss logs": "{'loss': ",
             "progress bar": re.compile(r"\d/4 \[")}
    for what, text in shown.items():
        found = [bool(text.search(log) if isinstance(text, re.Pattern) else text in log)
                 for log in (run.ranks[0], run.ranks[1])]
        assert found == [True, False], f"{what}: rank 0 / rank 1 show it: {found}"


# ============================================================================================ 1. DDP, FSDP2
def test_ddp_two_processes_give_the_single_process_losses_and_one_loadable_folder(media, reference, tmp_path):
    run = launch(tmp_path, run_config(media, tmp_path / "out"))
    assert run.returncode == 0, run.tail()
    difference = worst_loss_difference(saved_losses(tmp_path / "out"), logged_losses(reference.state.log_history))
    inputs = model_inputs(media, reference)
    logit_difference = (logits(auto_model(tmp_path / "out"), inputs) - logits(reference.model, inputs)).abs().max()
    print(f"\nDDP, torchrun 2 x 1 vs 1 x 2 ({run.seconds:.0f} s): losses {list(saved_losses(tmp_path / 'out').values())}"
          f" max |diff| {difference:.2g}; AutoModel logits of the saved folder max |diff| {logit_difference:.2g}")
    assert difference <= TOLERANCE and logit_difference <= TOLERANCE
    reference_folder = Path(reference.args.output_dir)
    assert safetensors_keys(tmp_path / "out" / "model.safetensors") == safetensors_keys(
        reference_folder / "model.safetensors")  # the original key names, as one process saves them
    assert_main_process_output_only(run)


def test_fsdp2_on_cpu_with_checkpointing_and_token_dropping_gives_the_single_process_losses(
        media, reference, reference_dropping, tmp_path):
    """FSDP2 sharding each decoder layer and vision block, activation checkpointing on, uniform in-LLM token
    dropping on; the reference drops tokens the same way (checkpointing does not change the numbers)."""
    config = run_config(media, tmp_path / "out", **fsdp_fields(), activation_checkpointing=True,
                        config_overrides=UNIFORM_DROPPING, save_strategy="steps", save_steps=4)
    run = launch(tmp_path, config)
    assert run.returncode == 0, run.tail()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    # accelerate's FSDP checkpoint files: the model really was sharded (a DDP run writes optimizer.pt instead)
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
    got, want = saved_losses(tmp_path / "out"), logged_losses(reference_dropping.state.log_history)
    difference = worst_loss_difference(got, want)
    inputs = model_inputs(media, reference_dropping)
    logit_difference = (logits(auto_model(tmp_path / "out"), inputs)
                        - logits(reference_dropping.model, inputs)).abs().max()
    dropping_effect = worst_loss_difference(want, logged_losses(reference.state.log_history))
    print(f"\nFSDP2 on CPU, torchrun ({run.seconds:.0f} s): losses {list(got.values())} max |diff| {difference:.2g}; "
          f"AutoModel logits max |diff| {logit_difference:.2g}; token dropping moves the losses by "
          f"{dropping_effect:.2g}")
    assert difference <= TOLERANCE and logit_difference <= TOLERANCE
    assert dropping_effect > 1e-3  # dropping really ran
    assert safetensors_keys(tmp_path / "out" / "model.safetensors") == safetensors_keys(
        Path(reference_dropping.args.output_dir) / "model.safetensors")
    assert_main_process_output_only(run)


def test_fsdp_refuses_attention_token_dropping_at_start(media, tmp_path):
    """Attention-ranked dropping calls the next layer's q/k projections outside its forward (sharded under FSDP):
    both ranks stop with the reason before the first step, instead of failing mid-step on one of them."""
    run = launch(tmp_path, run_config(media, tmp_path / "out", **fsdp_fields(),
                                      config_overrides={"mm_llm_compress": True}))  # tiny: uniform0_attention
    message = re.search(r"ValueError: (FSDP: in-LLM token dropping.*)", run.everything())
    print(f"\nrefused in {run.seconds:.0f} s, rc {run.returncode}: {message and message.group(1)[:150]}")
    assert run.returncode != 0 and message, run.tail()
    assert all("ValueError: FSDP: in-LLM token dropping" in log for log in run.ranks.values())
    assert "{'loss': " not in run.everything() and not (tmp_path / "out" / "trainer_state.json").exists()


def test_fsdp_support_check_names_what_cannot_be_sharded():
    tiny = build_tiny_model(0).config
    video = {"video": "a.mp4", "conversations": []}
    check_fsdp_support([video], tiny)  # dropping off
    tiny.mm_llm_compress, tiny.llm_compress_type = True, "uniform"
    check_fsdp_support([video], tiny)
    with pytest.raises(ValueError, match=r"1 of 2 training records have no video or image"):
        check_fsdp_support([video, {"conversations": []}], tiny)
    tiny.llm_compress_type = "uniform0_attention"
    with pytest.raises(ValueError, match=r"ranks tokens by attention \(stages \[2\]\)"):
        check_fsdp_support([video], tiny)


# ============================================================================================ 2. LoRA
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_lora_adapters_saved_once_load_and_merge_like_one_process(media, reference_lora, tmp_path, engine):
    """DDP through torchrun, FSDP2 through ``accelerate launch --config_file configs/fsdp.yaml`` (the shipped file,
    on CPU). The Trainer logs its save only where it writes, on rank 0 (log level info on every rank)."""
    config = run_config(media, tmp_path / "out", **LORA, log_level="info", log_level_replica="info")
    run = launch(tmp_path, config, accelerate=ACCELERATE_FSDP if engine == "fsdp" else None)
    assert run.returncode == 0, run.tail()
    difference = worst_loss_difference(saved_losses(tmp_path / "out"),
                                       logged_losses(reference_lora.state.log_history))
    adapter, reference_adapter = tmp_path / "out" / "adapter", Path(reference_lora.args.output_dir) / "adapter"
    assert safetensors_keys(adapter / "adapter_model.safetensors") == safetensors_keys(
        reference_adapter / "adapter_model.safetensors")
    from peft import PeftModel

    inputs = model_inputs(media, reference_lora)
    with_adapter = logits(PeftModel.from_pretrained(build_tiny_model(0), str(adapter)), inputs)
    want_adapter = logits(PeftModel.from_pretrained(build_tiny_model(0), str(reference_adapter)), inputs)
    merged = logits(auto_model(tmp_path / "out"), inputs)
    want_merged = logits(auto_model(reference_lora.args.output_dir), inputs)
    adapter_difference = (with_adapter - want_adapter).abs().max().item()
    merged_difference = (merged - want_merged).abs().max().item()
    print(f"\nLoRA {engine} ({run.seconds:.0f} s): loss max |diff| {difference:.2g}; adapter logits max |diff| "
          f"{adapter_difference:.2g}, merged folder {merged_difference:.2g}, merged vs adapter "
          f"{(merged - with_adapter).abs().max():.2g}")
    assert difference <= TOLERANCE and adapter_difference <= TOLERANCE and merged_difference <= TOLERANCE
    assert (merged - with_adapter).abs().max() <= 1e-4
    if engine == "ddp":
        saved_adapter = f"Saving model checkpoint to {adapter}"
        assert [saved_adapter in run.ranks[rank] for rank in (0, 1)] == [True, False], run.tail()


# ============================================================================================ 3. resuming
def test_killed_two_process_run_resumes_with_the_same_steps_and_losses(media, reference, tmp_path):
    """torchrun run killed (SIGKILL, every rank) after step 3, checkpoint-2 saved; resumed from the latest checkpoint
    by ``accelerate launch --multi_gpu ... videochat_flash_cli train``: steps 3-4 as if never stopped."""
    config = run_config(media, tmp_path / "out", save_strategy="steps", save_steps=2,
                        resume_from_checkpoint="latest", log_level="info")
    script = tmp_path / "killed_at_step_3.py"
    script.write_text(KILLED_AT_STEP_3)
    killed = launch(tmp_path, config, entry=(str(script),), name="killed")
    assert killed.returncode != 0 and "SIGKILL" in killed.everything(), killed.tail()
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (tmp_path / "out" / "trainer_state.json").exists()  # the run never finished

    resumed = launch(tmp_path, config, entry=CLI_TRAIN, accelerate=ACCELERATE_DDP, name="resumed")
    assert resumed.returncode == 0, resumed.tail()
    assert "Resuming training from checkpoint with epoch 1 and global step 2" in resumed.output
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    got = saved_losses(tmp_path / "out")
    difference = worst_loss_difference(got, logged_losses(reference.state.log_history))
    inputs = model_inputs(media, reference)
    logit_difference = (logits(auto_model(tmp_path / "out"), inputs) - logits(reference.model, inputs)).abs().max()
    print(f"\nkilled after step 3 ({killed.seconds:.0f} s), resumed from checkpoint-2 ({resumed.seconds:.0f} s): "
          f"global step {state['global_step']}, losses {list(got.values())} max |diff| {difference:.2g} vs one "
          f"uninterrupted process; final logits max |diff| {logit_difference:.2g}")
    assert state["global_step"] == 4 and difference <= TOLERANCE and logit_difference <= TOLERANCE


# ============================================================================================ DeepSpeed
def test_deepspeed_zero3_config_passes_deepspeeds_own_parser(tmp_path):
    """configs/deepspeed_zero3.json with the Trainer's "auto" values filled in (HfTrainerDeepSpeedConfig), parsed by
    DeepSpeed's DeepSpeedConfig. Not run: ZeRO-3 training needs GPUs here (see README)."""
    pytest.importorskip("deepspeed", reason="pip install deepspeed (it installs on CPU-only machines too)")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    arguments = TrainingArguments(str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                  bf16=True, max_grad_norm=1.0, report_to="none", use_cpu=True)
    try:
        filled = HfTrainerDeepSpeedConfig(str(REPO_ROOT / "configs" / "deepspeed_zero3.json"))
        filled.trainer_config_process(arguments)
        filled.trainer_config_finalize(arguments, build_tiny_model(0), num_training_steps=10)
        parsed = DeepSpeedConfig(filled.config)
    finally:
        unset_hf_deepspeed_config()  # it marks ZeRO-3 on for this whole process otherwise
    assert "auto" not in json.dumps(filled.config)
    assert parsed.zero_optimization_stage == 3 and parsed.zero_config.gather_16bit_weights_on_model_save
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps,
            parsed.train_batch_size) == (1, 8, 8)
    assert parsed.bfloat16_config.enabled and parsed.gradient_clipping == 1.0
