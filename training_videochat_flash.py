"""Fine-tune VideoChat-Flash with transformers' ``Trainer``.

    videochat-flash train configs/train_lora.yaml
    python -m videochat_flash.training_videochat_flash configs/train_stage3.yaml
    torchrun --nproc_per_node 2 -m videochat_flash.training_videochat_flash CONFIG.yaml          # DDP
    accelerate launch --config_file configs/fsdp.yaml -m videochat_flash.training_videochat_flash CONFIG.yaml

A config is one flat YAML (or JSON) mapping of the fields of :class:`ModelArguments`, :class:`DataArguments` and
transformers' ``TrainingArguments``, parsed with ``HfArgumentParser``. ``stage: stage1..stage4`` fills in the
original recipe of that stage (:data:`STAGE_PRESETS`, from the original ``scripts/train/*``); the file's own values
win. Unknown fields are refused (with the nearest field name); quoted numbers and true/false strings are converted.
Data, prompts and labels: :mod:`data_videochat_flash`; the data file, every record and its media files are checked
before the model loads (``check_data``). Saves (checkpoints included) load with
``AutoModel.from_pretrained(..., trust_remote_code=True)`` under the original key names.

Several processes (torchrun, accelerate launch): DDP by default, FSDP2 with ``fsdp: true`` + ``fsdp_config`` in the
config or with an accelerate FSDP config; on CPU processes too (gloo), where accelerate by itself would silently fall
back to DDP (:meth:`VideoChatFlashTrainer.create_accelerator_and_postprocess`). Only the main process logs, draws
progress bars and saves. What FSDP cannot run is refused before the first step (:func:`check_fsdp_support`).
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .data_videochat_flash import VideoChatFlashDataCollator, VideoChatFlashTrainingDataset, check_records, load_records
from .frame_sampling import CLIP_FRAMES, FrameSampling
from .hub_export import make_hub_loadable, resolve_model
from .processing_videochat_flash import DEFAULT_SYSTEM_PROMPT
from .token_dropping import stage_drop_type

MODEL_PARTS = ("vision_tower", "projector", "llm")
# LoRA on the Qwen2 attention and MLP projections only: a full-match regex anchored on `model.layers.N.`, so the
# vision tower's qkv / proj / fc1 / fc2 (under `model.vision_tower.`) never match.
LLM_LORA_TARGET_MODULES = (r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                           r"|mlp\.(gate_proj|up_proj|down_proj))")
_RECIPE = {"weight_decay": 0.0, "warmup_steps": 0.03, "lr_scheduler_type": "cosine", "num_train_epochs": 1,
           "activation_checkpointing": True, "prompt_format": "qwen_2", "sample_type": "dynamic_fps1",
           "frames_lowbound": 64, "frames_upbound": 512, "model_max_length": 32768, "learning_rate": 1e-5,
           "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "vision_tower_lr": 2e-6}
# The original's four stages (scripts/train/stage*/..._umt_*, their --mm_tunable_parts and per-device batch sizes).
STAGE_PRESETS = {
    "stage1": {**_RECIPE, "tune_parts": ["projector"], "prompt_format": "plain", "sample_type": "middle",  # connector
               "frames_upbound": 4, "frames_lowbound": 1, "model_max_length": 8192, "learning_rate": 1e-3,
               "per_device_train_batch_size": 16, "gradient_accumulation_steps": 4, "vision_tower_lr": None},
    "stage2": {**_RECIPE, "tune_parts": list(MODEL_PARTS), "frames_upbound": 8, "frames_lowbound": 1},  # pretraining
    "stage3": {**_RECIPE, "tune_parts": list(MODEL_PARTS)},  # short + long video SFT, 64..512 frames
    "stage4": {**_RECIPE, "tune_parts": ["vision_tower", "projector"]},  # high-resolution post-FT, LLM frozen
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a folder, a Hub id, an original checkpoint, or 'tiny'"})
    stage: str | None = field(default=None, metadata={"help": "stage1..stage4: the original recipe's defaults"})
    dtype: str = field(default="float32", metadata={"help": "master weights (bf16 autocast: TrainingArguments.bf16)"})
    attn_implementation: str | None = None
    image_size: int | None = field(default=None, metadata={"help": "e.g. 448 for stage 4; the processor follows"})
    tiny_seed: int = field(default=0, metadata={"help": "weights of the 'tiny' random model"})
    tune_parts: list[str] = field(default_factory=lambda: list(MODEL_PARTS), metadata={"help": str(MODEL_PARTS)})
    vision_tower_lr: float | None = None
    projector_lr: float | None = None
    use_lora: bool = False
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: str = LLM_LORA_TARGET_MODULES
    lora_modules_to_save: list[str] = field(default_factory=list, metadata={"help": "e.g. mm_projector, in full"})
    lora_bias: str = "none"
    merge_lora: bool = field(default=True, metadata={"help": "save the merged model in output_dir too"})
    config_overrides: dict | str | None = field(default=None, metadata={
        "help": "model config fields to set, a mapping (or JSON), e.g. {mm_llm_compress: true}"})

    def __post_init__(self):  # every value checked here, before the data and the model load
        if isinstance(self.tune_parts, str):  # "projector,vision_tower"
            self.tune_parts = [part.strip() for part in self.tune_parts.split(",") if part.strip()]
        _choose("tune_parts", self.tune_parts, MODEL_PARTS)
        _choose("lora_bias", [self.lora_bias], ("none", "all", "lora_only"))
        if not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"dtype: {self.dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        self.config_overrides = _config_overrides(self.config_overrides)


@dataclass
class DataArguments:
    train_data: str = field(metadata={"help": "a JSON/JSONL file of records or a dataset-list YAML"})
    data_root: str | None = None
    prompt_format: str = "qwen_2"
    sample_type: str = field(default="dynamic_fps1", metadata={"help": "dynamic_fps1 or middle"})
    frames_upbound: int = FrameSampling.max_num_frames
    frames_lowbound: int = FrameSampling.min_num_frames
    local_num_frames: int = CLIP_FRAMES
    time_msg: str | None = "short"
    system_message: str = DEFAULT_SYSTEM_PROMPT
    label_mode: str = field(default="answers", metadata={"help": "answers or original (preprocess_qwen)"})
    train_on_turn_newline: bool = True
    model_max_length: int | None = 32768
    video_backend: str | None = None
    skip_bad_samples: bool = field(default=False, metadata={"help": "leave out records that fail to load"})
    check_data: bool = field(default=True, metadata={
        "help": "check every record and that its media files exist before the model loads (a stat each)"})

    def __post_init__(self):
        _choose("prompt_format", [self.prompt_format], ("qwen_2", "plain"))
        _choose("label_mode", [self.label_mode], ("answers", "original"))
        _choose("time_msg", [self.time_msg], ("short", "long", None))
        self.frame_sampling()  # frames_upbound / frames_lowbound / local_num_frames / sample_type

    def frame_sampling(self) -> FrameSampling:
        return FrameSampling.training(self.frames_upbound, self.frames_lowbound, self.local_num_frames,
                                      self.sample_type)


def _choose(name: str, values: list, choices) -> None:
    bad = [value for value in values if value not in choices]
    if bad:
        raise ValueError(f"{name}: {bad[0]!r} is not one of {list(choices)}")


def _config_overrides(overrides) -> dict:
    """`config_overrides` as a mapping of model config fields, each a field of the config and of its type."""
    from .configuration_videochat_flash import VideoChatFlashConfig

    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"config_overrides: {overrides!r} is not a JSON mapping ({e})") from None
    if not isinstance(overrides, (dict, type(None))):
        raise ValueError(f"config_overrides must be a mapping of model config fields, got {overrides!r}")
    defaults = VideoChatFlashConfig().to_dict()
    for key, value in (overrides or {}).items():
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, 1)
            raise ValueError(f"config_overrides: {key!r} is not a model config field"
                             + (f"; did you mean {close[0]}?" if close else ""))
        kind = type(defaults[key])
        if kind in (bool, int, float, str) and value is not None:  # lists and mappings: the config checks them
            value = overrides[key] = _coerce(f"config_overrides.{key}", kind, value)
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise ValueError(f"config_overrides.{key}: {value!r} is not {kind.__name__} like its default "
                                 f"{defaults[key]!r}")
    checked = VideoChatFlashConfig(**(overrides or {}))  # the config's own checks and parsing ("8,16,24" lists)
    return {key: getattr(checked, key) for key in overrides or {}}


def parse_config(config, **overrides) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """The three argument dataclasses from a YAML/JSON file or a mapping, with the stage preset under it."""
    base_dir = Path.cwd()
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        import yaml

        config, base_dir = yaml.safe_load(path.read_text(encoding="utf-8")), path.resolve().parent
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a training config is a mapping of fields")
    values = {**dict(config), **overrides}
    missing = [name for name in ("model_name_or_path", "train_data", "output_dir") if not values.get(name)]
    if missing:
        raise ValueError(f"the training config needs {', '.join(missing)}")
    if values.get("stage") is not None and values["stage"] not in STAGE_PRESETS:
        raise ValueError(f"unknown stage {values['stage']!r}: choose from {sorted(STAGE_PRESETS)}")
    # Replicas log errors only: the main process shows every warning they would repeat.
    values = {"report_to": "none", "logging_steps": 1, "log_level_replica": "error",
              **STAGE_PRESETS.get(values.get("stage"), {}), **values}
    values["remove_unused_columns"] = False  # the collator, not the Trainer, decides what the model gets
    for key in ("bf16", "tf32"):  # "auto": on where the hardware has it
        if values.get(key) == "auto":
            values[key] = bool(torch.cuda.is_available() and (key == "tf32" or torch.cuda.is_bf16_supported()))
    for key in ("train_data", "deepspeed"):  # relative to the config file, when they exist there
        if isinstance(values.get(key), str) and not os.path.isabs(values[key]) and (base_dir / values[key]).exists():
            values[key] = str(base_dir / values[key])
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    hints = {name: hint for kind in parser.dataclass_types for name, hint in typing.get_type_hints(kind).items()
             if not name.startswith("_")}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        close = {name: difflib.get_close_matches(name, hints, 1) for name in unknown}
        hint = ", ".join(f"{name} -> {match[0]}?" for name, match in close.items() if match)
        raise ValueError(f"unknown config fields {unknown} (of ModelArguments, DataArguments, TrainingArguments)"
                         + (f"; did you mean: {hint}" if hint else ""))
    return parser.parse_dict({key: _coerce(key, hints[key], value) for key, value in values.items()})


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(name: str, hint, value):
    """Strings given to bool and numeric fields converted (YAML reads `1e-3` as a string, quoted values stay strings;
    "false" would be true), naming the field when that fails. Fields that also take strings keep other strings."""
    kinds = {hint, *typing.get_args(hint)}
    if not isinstance(value, str):
        return value
    if bool in kinds:
        if value.strip().lower() not in _BOOLS and str not in kinds:
            raise ValueError(f"{name}: {value!r} is not a bool (true or false)")
        return _BOOLS.get(value.strip().lower(), value)
    kind = float if float in kinds else int if int in kinds else None
    if kind is None or str in kinds:
        return value
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}: {value!r} is not {'a float' if kind is float else 'an int'}") from None


# ---------------------------------------------------------------------------------------------------- the model
def parameter_part(name: str) -> str:
    """``"vision_tower"``, ``"projector"`` or ``"llm"`` (everything else: embeddings, layers, norm, lm_head) for a
    parameter name, also under PEFT / DDP / FSDP prefixes."""
    pieces = name.split(".")
    return "vision_tower" if "vision_tower" in pieces else "projector" if "mm_projector" in pieces else "llm"


def set_trainable_parts(model: torch.nn.Module, parts) -> None:
    """Freeze everything but the named parts (the original's ``mm_tunable_parts``)."""
    if not set(parts) <= set(MODEL_PARTS):
        raise ValueError(f"unknown model parts {sorted(set(parts) - set(MODEL_PARTS))}: choose from {MODEL_PARTS}")
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_part(name) in parts)


def count_parameters(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"trainable": n, "total": n}}`` for each part (+ ``"lora"``)."""
    counts = {part: {"trainable": 0, "total": 0} for part in MODEL_PARTS}
    for name, param in model.named_parameters():
        entry = counts.setdefault("lora" if "lora_" in name else parameter_part(name), {"trainable": 0, "total": 0})
        numel = getattr(param, "ds_numel", param.numel())  # DeepSpeed ZeRO-3 partitions hold a slice
        entry["total"] += numel
        entry["trainable"] += numel if param.requires_grad else 0
    return counts


def load_model_and_processor(args: ModelArguments):
    """The model to train (float32 master weights by default) and its processor, at `args.image_size` if given."""
    from .modeling_videochat_flash import VideoChatFlashQwenForCausalLM  # the class our folders name
    from .processing_videochat_flash import VideoChatFlashProcessor

    dtype = getattr(torch, args.dtype)
    overrides = args.config_overrides
    if args.model_name_or_path == "tiny":
        from .tiny_model import TINY_VISION, build_tiny_model, tiny_processor

        vision = dict(TINY_VISION, image_size=args.image_size or TINY_VISION["image_size"])
        model = build_tiny_model(args.tiny_seed, vision_config=vision, **overrides).to(dtype)
        processor = tiny_processor()
        if args.attn_implementation:
            model.set_attn_implementation(args.attn_implementation)
    else:
        folder = resolve_model(args.model_name_or_path)
        config = VideoChatFlashQwenForCausalLM.config_class.from_pretrained(folder)
        for key, value in overrides.items():
            setattr(config, key, value)
        if args.image_size:
            config.vision_config = dict(config.vision_config, image_size=args.image_size)
            if config.mm_vision_tower.startswith("umt"):  # the UMT tower's name says its frame size
                config.mm_vision_tower = {224: "umt-large", 448: "umt-hd-large"}.get(args.image_size,
                                                                                  config.mm_vision_tower)
        kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
        model = VideoChatFlashQwenForCausalLM.from_pretrained(folder, config=config, dtype=dtype, **kwargs)
        processor = VideoChatFlashProcessor.from_pretrained(folder)
    size = {"height": model.config.image_size, "width": model.config.image_size}
    processor.video_processor.size = processor.image_processor.size = size
    return model, processor


def apply_lora(model, args: ModelArguments):
    """LoRA adapters on the LLM projections; parts of `tune_parts` other than the LLM keep training in full."""
    from peft import LoraConfig, get_peft_model

    set_trainable_parts(model, [part for part in args.tune_parts if part != "llm"])
    wanted = {name for name, param in model.named_parameters() if param.requires_grad}
    peft_model = get_peft_model(model, LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
        target_modules=args.lora_target_modules, modules_to_save=args.lora_modules_to_save or None,
        bias=args.lora_bias))
    for name, param in peft_model.named_parameters():  # get_peft_model froze the fully trained parts too
        if name.removeprefix("base_model.model.") in wanted:
            param.requires_grad_(True)
    if any(parameter_part(name) != "llm" for name, _ in peft_model.named_modules() if name.endswith("lora_A")):
        raise ValueError("lora_target_modules matched modules outside the LLM; anchor the regex on model.layers")
    return peft_model


class VideoChatFlashTrainer(Trainer):
    """``Trainer`` with the original's per-part learning rates (parameter groups, like its ``LLaVATrainer``) and
    saves that load with ``AutoModel.from_pretrained(..., trust_remote_code=True)``."""

    def __init__(self, *args, vision_tower_lr: float | None = None, projector_lr: float | None = None, **kwargs):
        self.part_learning_rates = {"vision_tower": vision_tower_lr, "projector": projector_lr}
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        special = {part: lr for part, lr in self.part_learning_rates.items() if lr is not None}
        if self.optimizer is not None or not special:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay, groups = set(self.get_decay_parameter_names(model)), {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((special.get(parameter_part(name)), name in decay), []).append(param)
        param_groups = [{"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
                         **({"lr": lr} if lr is not None else {})} for (lr, decayed), params in groups.items()]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if fsdp_requested(self.args) and not self.is_fsdp_enabled:
            self._enable_fsdp2_on_cpu()

    def _enable_fsdp2_on_cpu(self) -> None:
        """accelerate (1.15) enables FSDP on GPU-like devices only: on CPU processes it keeps its FSDP plugin aside and
        wraps the model in DDP, silently. torch's ``fully_shard`` (FSDP2) does run on CPU with gloo, so the plugin is
        installed where accelerate would have installed it; accelerate's own FSDP2 code then shards, gathers and
        saves as on GPUs."""
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type == DistributedType.NO:
            raise ValueError("FSDP shards over several processes: launch with torchrun or accelerate launch")
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"FSDP was asked for, but accelerate set up {state.distributed_type} without it")
        plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))  # else from accelerate's env
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on CPU processes needs fsdp_version 2 (torch's fully_shard); FSDP1 needs GPUs")
        if plugin.activation_checkpointing and self.args.activation_checkpointing:  # as the Trainer checks on GPUs
            raise ValueError("fsdp_config activation_checkpointing and the activation_checkpointing training "
                             "argument can't both be true: choose one")
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
        # as AcceleratorState.__init__ ends: every later AcceleratorState() copies the PartialState's type back
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save and (Path(output_dir or self.args.output_dir) / "config.json").is_file():
            make_hub_loadable(output_dir or self.args.output_dir, self.processing_class)


def merge_lora_adapter(base: ModelArguments | str, adapter_dir, output_dir, processor=None):
    """Load the base model on this process alone (`base`: the run's ModelArguments, or a ``model_name_or_path``),
    apply and merge the adapter in `adapter_dir` and save a full, Hub-loadable folder to `output_dir`. Also the way
    to merge after a sharded run. Returns the merged model."""
    from peft import PeftModel

    base = base if isinstance(base, ModelArguments) else ModelArguments(model_name_or_path=base)
    model, base_processor = load_model_and_processor(base)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output_dir)
    make_hub_loadable(output_dir, processor or base_processor)
    return merged


@contextlib.contextmanager
def _without_zero3(args: TrainingArguments):
    """DeepSpeed ZeRO-3 switched off meanwhile, so that from_pretrained on one rank loads whole weights instead of
    partitioning them (zero.Init) across ranks that are not loading."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if getattr(args, "hf_deepspeed_config", None) is not None:
            set_hf_deepspeed_config(args.hf_deepspeed_config)


# ---------------------------------------------------------------------------------------------------- processes
def fsdp_requested(args: TrainingArguments) -> bool:
    """FSDP asked for by the config (``fsdp`` / ``fsdp_config``) or by ``accelerate launch`` with an FSDP config."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def text_only_records(records: list) -> int:
    """How many records have no video and no image: their steps leave the vision tower and projector unused."""
    return sum(1 for record in records if record.get("video") is None and record.get("image") is None)


def check_fsdp_support(records: list, model_config) -> None:
    """Refuse, before the first step, what FSDP cannot run (it would fail or hang mid-run). Every rank must run the
    same sharded modules in the same order, so a text-only sample (no vision tower on that rank) cannot be mixed in;
    attention-ranked token dropping calls the next decoder layer's norm and q/k projections outside that layer's
    forward, where FSDP2 holds their weights sharded. Uniform dropping and gradient checkpointing are fine."""
    if text_only := text_only_records(records):
        raise ValueError(f"FSDP: {text_only} of {len(records)} training records have no video or "
                         "image; their steps would skip the vision tower on one rank while the others run it (FSDP "
                         "gathers its shards together). Train them with DDP, or leave them out")
    layers = getattr(model_config, "llm_compress_layer_list", None) or []
    attention_stages = [stage for stage in range(1, len(layers) + 1)
                        if stage_drop_type(model_config.llm_compress_type, stage) == "attention"]
    if getattr(model_config, "mm_llm_compress", False) and attention_stages:
        raise ValueError(f"FSDP: in-LLM token dropping with llm_compress_type={model_config.llm_compress_type!r} "
                         f"ranks tokens by attention (stages {attention_stages}) through the next decoder layer's q/k "
                         "projections outside its forward, where FSDP holds them sharded. Use DDP or DeepSpeed, "
                         "llm_compress_type 'uniform', or mm_llm_compress false")


def _main_process_output_only(args: TrainingArguments) -> None:
    """Logs and progress bars (weight loading, saving) from the main process only; replicas log at
    ``log_level_replica`` (errors, by parse_config's default). The Trainer's progress bar follows the main process."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(args.get_process_log_level())
    if not args.should_log:
        hf_logging.disable_progress_bar()


def _end_process_group_at_exit(started_here: bool) -> None:
    """The process group that this run started (torchrun / accelerate launch, through the TrainingArguments) ends
    when the process exits: a rank that exits with a live gloo group can abort in its teardown."""
    if started_here and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _uses_one_position_table(model) -> bool:
    """Whether a step can leave a trainable tower parameter unused: InternVideo2 adds one of two learned position
    tables (clips or single images) per call."""
    return model.config.mm_vision_tower == "internvideo2" and any(
        p.requires_grad for name, p in model.named_parameters() if name.endswith("pos_embed"))


# ---------------------------------------------------------------------------------------------------- the run
def run_training(config, *, callbacks=None, **overrides) -> VideoChatFlashTrainer:
    """Train from a config file or mapping (`overrides` are extra fields, `callbacks` extra ``TrainerCallback``s);
    returns the trainer after training. Under torchrun / accelerate launch every process calls it."""
    group_existed = torch.distributed.is_available() and torch.distributed.is_initialized()
    model_args, data_args, training_args = parse_config(config, **overrides)
    _end_process_group_at_exit(started_here=not group_existed)
    _main_process_output_only(training_args)
    records = load_records(data_args.train_data, data_args.data_root, training_args.seed)  # data errors come first
    if data_args.check_data:
        records = check_records(records, skip_bad=data_args.skip_bad_samples)
    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args)  # after TrainingArguments: ZeRO-3 needs them first
    if fsdp_requested(training_args):
        check_fsdp_support(records, model.config)
    model.config.use_cache = False
    model = apply_lora(model, model_args) if model_args.use_lora else model
    if not model_args.use_lora:
        set_trainable_parts(model, model_args.tune_parts)
    if training_args.ddp_find_unused_parameters is None:  # DDP: which steps leave trainable parameters unused
        training_args.ddp_find_unused_parameters = text_only_records(records) > 0 or _uses_one_position_table(model)
    if training_args.process_index == 0:
        print("[videochat-flash train] trainable parameters: " + ", ".join(
            f"{part} {c['trainable']:,}/{c['total']:,}" for part, c in count_parameters(model).items()), flush=True)
    dataset = VideoChatFlashTrainingDataset(
        records, processor, data_args.frame_sampling(),
        prompt_format=data_args.prompt_format, system_message=data_args.system_message, time_msg=data_args.time_msg,
        label_mode=data_args.label_mode, train_on_turn_newline=data_args.train_on_turn_newline,
        model_max_length=data_args.model_max_length, video_backend=data_args.video_backend,
        skip_bad_samples=data_args.skip_bad_samples)
    trainer = VideoChatFlashTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=processor,
        data_collator=VideoChatFlashDataCollator(processor.tokenizer.pad_token_id), callbacks=callbacks,
        vision_tower_lr=model_args.vision_tower_lr, projector_lr=model_args.projector_lr)
    resume = training_args.resume_from_checkpoint
    if str(resume).lower() in ("true", "latest"):
        resume = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    trainer.train(resume_from_checkpoint=resume)
    _save_final(trainer, model_args, processor)
    return trainer


def _save_final(trainer: VideoChatFlashTrainer, model_args: ModelArguments, processor) -> None:
    """The model in output_dir; with LoRA the adapter in output_dir/adapter and the merged model (merge_lora)."""
    output_dir = trainer.args.output_dir
    trainer.model.config.use_cache = True
    if not model_args.use_lora:
        trainer.save_model(output_dir)
    else:
        adapter_dir = os.path.join(output_dir, "adapter")
        trainer.save_model(adapter_dir)  # adapters (+ modules_to_save), gathered under ZeRO-3 / FSDP
        if model_args.merge_lora and trainer.args.should_save:
            if trainer.args.deepspeed or trainer.is_fsdp_enabled:  # partitioned weights: merge into a fresh base copy
                with _without_zero3(trainer.args):
                    merge_lora_adapter(model_args, adapter_dir, output_dir, processor)
            else:
                trainer.model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
                trainer.model.save_pretrained(output_dir)
                make_hub_loadable(output_dir, processor)
    trainer.save_state()
    trainer.accelerator.wait_for_everyone()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configs = [arg for arg in argv if not arg.startswith("--local")]  # deepspeed's launcher adds --local_rank
    if len(configs) != 1:
        print("usage: python -m videochat_flash.training_videochat_flash CONFIG.yaml", file=sys.stderr)
        return 2
    run_training(configs[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
