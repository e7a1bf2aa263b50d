"""Fine-tuning VideoChat-Flash with ``transformers.Trainer``: data, label masking, stage presets, LoRA, saving.

Entry points: :func:`run_training` (``videochat-flash train CONFIG.yaml``) and :func:`main`
(``python training_videochat_flash.py CONFIG.yaml``; ``accelerate launch`` / ``torchrun`` / ``deepspeed`` work the
same way, since distribution is left to accelerate, DeepSpeed or FSDP through the Trainer).

Data
----
LLaVA-style records, in a JSON list, a JSONL file, or a dataset-list YAML like the original's ``data/*.yaml``
(``datasets: [{json_path, sampling_strategy: "first:25%" | "end:N" | "all", data_root}]``)::

    {"video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"},
                                              {"from": "gpt", "value": "A cat jumps."}, ...]}

``"image"`` (a path or a list of paths) instead of ``"video"`` for still images; records with neither are text only.
A leading ``{"from": "system", ...}`` turn replaces the default system prompt.

* Frames are sampled as the original TRAINING path does (``LazySupervisedDataset.process_video``): ``dynamic_fps1``
  = one frame per second in groups of ``local_num_frames`` (4), clipped to ``[frames_lowbound, frames_upbound]``
  (:func:`video_loading.sample_frame_indices_training`), or ``middle`` = exactly ``frames_upbound`` frames (stage 1).
* ``<image>`` in a user turn is normalised like the original ``preprocess_multimodal`` (a single marker not at the
  start is moved to the front followed by ``"\\n"``) and then expanded through the processor: a video becomes
  ``16 * T`` ``<|video_pad|>`` tokens followed by the time message (``time_msg: short``, the setting of every
  published stage: ``"\\nThe video lasts for D seconds, and T frames are uniformly sampled from it. "``); so the
  training prompt reads ``<video tokens>\\nThe video lasts ... from it. \\n<question>`` exactly as in the original
  (the chat() prompt has no ``"\\n"`` before the question); an image becomes 64 ``<|image_pad|>`` tokens.
* ``prompt_format: qwen_2`` (stages 2-4) is the original ``preprocess_qwen``: a system turn, then every turn as
  ``<|im_start|>{role}\\n{text}<|im_end|>\\n``, each tokenized on its own. ``plain`` (stage 1) is the original
  ``preprocess_plain``: ``<visual tokens>{answer}\\n`` with no system prompt, question or time message.

Labels (``label_mode``)
-----------------------
* ``answers`` (default): -100 everywhere (system, user turns, visual placeholders, the ``<|im_start|>assistant\\n``
  header, padding) except each assistant answer, its ``<|im_end|>`` and the ``"\\n"`` after it. The original trains
  that ``"\\n"`` too (it is part of the assistant turn's target); ``train_on_turn_newline: false`` leaves it out.
* ``original``: bit-for-bit ``preprocess_qwen``: whole assistant turns INCLUDING the ``<|im_start|>assistant\\n``
  header, plus every ``<|im_start|>``, ``<|im_end|>`` and single-``"\\n"`` token anywhere in the sequence, system and
  user turns included (the original unmasks ids ``[198, im_start, im_end]`` after building the targets).

Stages (``stage: stage1..stage4``; see :data:`STAGE_PRESETS`, from the original ``scripts/train/*`` and their
``--mm_tunable_parts``): stage 1 trains the projector (``mm_mlp_adapter``), stages 2 and 3 the vision tower,
projector and LLM (``mm_vision_tower,mm_mlp_adapter,mm_language_model``, vision tower at lr 2e-6), stage 4 the
vision tower and projector with the LLM frozen (``mm_vision_tower,mm_mlp_adapter``, 448 px in the original).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from .processing_videochat_flash import VideoChatFlashProcessor
from .video_loading import load_video, time_message

__all__ = [
    "IGNORE_INDEX",
    "LLM_LORA_TARGET_MODULES",
    "MODEL_PARTS",
    "STAGE_PRESETS",
    "VideoChatFlashDataCollator",
    "VideoChatFlashTrainer",
    "VideoChatFlashTrainingDataset",
    "build_training_config",
    "count_parameters",
    "encode_conversation",
    "load_records",
    "load_training_config",
    "main",
    "merge_lora_adapter",
    "parameter_part",
    "run_training",
    "set_trainable_parts",
]

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# The three parts of the model, named by where their parameters live (the original's key names).
MODEL_PARTS = ("vision_tower", "projector", "llm")
# LoRA on the Qwen2 attention and MLP projections only. A full-match regex over module names, anchored on
# `model.layers.N.`, so the vision tower's qkv / proj / fc1 / fc2 (under `model.vision_tower.`) never match.
LLM_LORA_TARGET_MODULES = r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"

# Defaults of the paper's four stages, taken from the original scripts/train/stage*/..._umt_* scripts. The YAML's own
# values override them. Per-device batch sizes are those of the original runs (stage 1: 8 GPUs, stages 2-4: 32 GPUs).
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    "stage1": {  # stage1-init_connector: --mm_tunable_parts=mm_mlp_adapter, PROMPT_VERSION=plain
        "tune_parts": ["projector"],
        "data": {"prompt_format": "plain", "sample_type": "middle", "frames_upbound": 4, "frames_lowbound": 1,
                 "time_msg": "short", "model_max_length": 8192},
        "training": {"learning_rate": 1e-3, "weight_decay": 0.0, "warmup_steps": 0.03, "lr_scheduler_type": "cosine",
                     "per_device_train_batch_size": 16, "gradient_accumulation_steps": 4, "num_train_epochs": 1,
                     "activation_checkpointing": True},
    },
    "stage2": {  # stage2-visual_pretraining: mm_vision_tower,mm_mlp_adapter,mm_language_model; frames_upbound 8
        "tune_parts": ["vision_tower", "projector", "llm"],
        "vision_tower_lr": 2e-6,
        "data": {"prompt_format": "qwen_2", "sample_type": "dynamic_fps1", "frames_upbound": 8, "frames_lowbound": 1,
                 "time_msg": "short", "model_max_length": 32768},
        "training": {"learning_rate": 1e-5, "weight_decay": 0.0, "warmup_steps": 0.03, "lr_scheduler_type": "cosine",
                     "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "num_train_epochs": 1,
                     "activation_checkpointing": True},
    },
    "stage3": {  # stage3-video_sft: same parts, long videos (64..512 frames at 1 fps)
        "tune_parts": ["vision_tower", "projector", "llm"],
        "vision_tower_lr": 2e-6,
        "data": {"prompt_format": "qwen_2", "sample_type": "dynamic_fps1", "frames_upbound": 512, "frames_lowbound": 64,
                 "time_msg": "short", "model_max_length": 32768},
        "training": {"learning_rate": 1e-5, "weight_decay": 0.0, "warmup_steps": 0.03, "lr_scheduler_type": "cosine",
                     "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "num_train_epochs": 1,
                     "activation_checkpointing": True},
    },
    "stage4": {  # stage4_highres_postft: --mm_tunable_parts=mm_vision_tower,mm_mlp_adapter (LLM frozen), umt-hd-large
        "tune_parts": ["vision_tower", "projector"],
        "vision_tower_lr": 2e-6,
        "data": {"prompt_format": "qwen_2", "sample_type": "dynamic_fps1", "frames_upbound": 512, "frames_lowbound": 64,
                 "time_msg": "short", "model_max_length": 32768},
        "training": {"learning_rate": 1e-5, "weight_decay": 0.0, "warmup_steps": 0.03, "lr_scheduler_type": "cosine",
                     "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "num_train_epochs": 1,
                     "activation_checkpointing": True},
    },
}

DATA_DEFAULTS = {
    "train": None,
    "data_root": None,
    "prompt_format": "qwen_2",
    "sample_type": "dynamic_fps1",
    "frames_upbound": 512,
    "frames_lowbound": 64,
    "local_num_frames": 4,
    "time_msg": "short",
    "system_message": DEFAULT_SYSTEM_MESSAGE,
    "label_mode": "answers",
    "train_on_turn_newline": True,
    "model_max_length": 32768,
    "video_backend": None,
    "skip_bad_samples": False,
    "seed": 42,
}
LORA_DEFAULTS = {
    "enabled": False,
    "r": 64,
    "alpha": 16,  # the original's lora_r / lora_alpha / lora_dropout defaults
    "dropout": 0.05,
    "target_modules": LLM_LORA_TARGET_MODULES,
    "modules_to_save": [],  # e.g. ["mm_projector"] to also train (and save in full) the projector
    "bias": "none",
}
MODEL_DEFAULTS = {
    "name_or_path": None,  # folder, Hub id, original checkpoint, or "tiny"
    "dtype": "float32",  # master weights; bf16 autocast comes from training.bf16
    "attn_implementation": None,
    "image_size": None,  # e.g. 448 for stage 4 (umt-hd-large); the processor follows
    "config_overrides": {},
    "seed": 0,  # the tiny model's weights
}
SAVE_DEFAULTS = {"final_model": True, "merge_lora": True}


def _log(message: str) -> None:
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0:
        print(f"[videochat-flash train] {message}", flush=True)


# ==================================================================================================== data: records
def _read_json_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return data


def _apply_sampling_strategy(records: list, strategy: str, seed: int) -> list:
    """The original dataset-list ``sampling_strategy``: ``all``, ``first:N``, ``end:N``, ``random:N`` (N or N%)."""
    if not strategy or strategy == "all":
        return records
    name, _, number = strategy.partition(":")
    if not number:
        raise ValueError(f"sampling_strategy {strategy!r}: expected 'all' or 'first|end|random:N[%]'")
    count = math.ceil(int(number[:-1]) * len(records) / 100) if number.endswith("%") else int(number)
    if name == "first":
        return records[:count]
    if name == "end":
        return records[-count:]
    if name == "random":
        shuffled = list(records)
        random.Random(seed).shuffle(shuffled)
        return shuffled[:count]
    raise ValueError(f"unknown sampling_strategy {strategy!r}")


def load_records(spec, data_root: str | None = None, seed: int = 42, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Training records from ``spec``: a JSON / JSONL file, an original-style dataset-list YAML, a dict
    ``{json_path, sampling_strategy, data_root}``, an already-loaded list of records, or a list of any of these.
    Media paths are resolved against ``data_root`` (per dataset, else the global one); each record gets it as
    ``"_data_root"``."""

    def resolve(path) -> Path:
        path = Path(os.path.expanduser(str(path)))
        if not path.is_absolute() and base_dir is not None and not path.exists() and (Path(base_dir) / path).exists():
            path = Path(base_dir) / path
        return path

    if spec is None:
        raise ValueError("data.train is missing: give a JSON/JSONL file, a dataset-list YAML or a list of them")
    if isinstance(spec, (list, tuple)):
        if spec and all(isinstance(item, dict) and "conversations" in item for item in spec):
            return [dict(item, _data_root=item.get("_data_root", data_root)) for item in spec]
        records = []
        for item in spec:
            records.extend(load_records(item, data_root, seed, base_dir))
        return records
    if isinstance(spec, dict):
        path = resolve(spec.get("json_path") or spec.get("path"))
        root = spec.get("data_root", data_root)
        records = load_records(str(path), root, seed, base_dir)
        return _apply_sampling_strategy(records, spec.get("sampling_strategy", "all"), seed)
    path = resolve(spec)
    if not path.is_file():
        raise FileNotFoundError(f"training data file not found: {path}")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        with open(path, encoding="utf-8") as file:
            listing = yaml.safe_load(file) or {}
        datasets = listing.get("datasets") if isinstance(listing, dict) else None
        if not datasets:
            raise ValueError(f"{path}: a dataset-list YAML needs a 'datasets:' list of {{json_path: ...}} entries")
        return load_records(datasets, data_root, seed, base_dir=path.parent)
    records = _read_json_records(path)
    root = data_root if data_root is not None else None
    return [dict(record, _data_root=record.get("_data_root", root)) for record in records]


def _media_path(path: str, data_root: str | None) -> str:
    if data_root and not os.path.isabs(path) and "://" not in path:
        return os.path.join(data_root, path)
    return path


# ==================================================================================================== data: dataset
class VideoChatFlashTrainingDataset(torch.utils.data.Dataset):
    """Records -> conversations + pixels. Frames are sampled as the original training path does.

    Args:
        records: list of LLaVA-style dicts (see :func:`load_records`).
        processor: a :class:`VideoChatFlashProcessor`; its video processor gives the frame size and normalisation.
        sample_type: ``"dynamic_fps1"`` (1 frame/s in groups of ``local_num_frames``, clipped to
            ``[frames_lowbound, frames_upbound]``; a video shorter than ``frames_lowbound`` frames gives
            ``local_num_frames * (L // local_num_frames)`` frames) or ``"middle"`` (exactly ``frames_upbound``).
        video_backend: ``load_video`` backend (``None``: PyAV, else decord).
        skip_bad_samples: on a loading error, warn and use the next record instead of raising (the original retries
            other samples).

    Items: ``{"conversations", "videos": [(T,3,S,S) float32], "video_metadata": [dict], "images": [(3,S,S)], "id"}``.
    """

    def __init__(self, records: Sequence[dict], processor, sample_type: str = "dynamic_fps1", frames_upbound: int = 512,
                 frames_lowbound: int = 64, local_num_frames: int = 4, video_backend: str | None = None,
                 skip_bad_samples: bool = False):
        if sample_type not in ("dynamic_fps1", "middle"):
            raise ValueError(f"sample_type must be 'dynamic_fps1' or 'middle', got {sample_type!r}")
        if local_num_frames % 4:
            raise ValueError(f"local_num_frames must be a multiple of 4 (the model's clip length), got {local_num_frames}")
        self.records = list(records)
        self.processor = processor
        self.sample_type = sample_type
        self.frames_upbound = int(frames_upbound)
        self.frames_lowbound = int(frames_lowbound)
        self.local_num_frames = int(local_num_frames)
        self.video_backend = video_backend
        self.skip_bad_samples = skip_bad_samples

    def __len__(self) -> int:
        return len(self.records)

    @property
    def frame_size(self) -> int:
        size = self.processor.video_processor.size
        return size["height"] if size["height"] == size["width"] else (size["height"], size["width"])

    def load_video_frames(self, path: str):
        """uint8 ``(T, S, S, 3)`` frames and load_video metadata, sampled like the original training path."""
        if self.sample_type == "middle":
            return load_video(path, num_frames=max(self.frames_upbound, self.frames_lowbound), size=self.frame_size,
                              backend=self.video_backend)
        return load_video(path, max_num_frames=self.frames_upbound, min_num_frames=self.frames_lowbound,
                          frames_multiple=self.local_num_frames, size=self.frame_size, backend=self.video_backend)

    def _load(self, index: int) -> dict:
        record = self.records[index]
        if "conversations" not in record:
            raise ValueError(f"record {index} has no 'conversations'")
        root = record.get("_data_root")
        item = {"conversations": record["conversations"], "videos": [], "video_metadata": [], "images": [],
                "id": record.get("id", index)}
        if "start" in record or "end" in record:
            raise NotImplementedError(
                f"record {index}: 'start'/'end' clip bounds are not supported; cut the clip into its own file")
        if record.get("video") is not None:
            videos = record["video"] if isinstance(record["video"], list) else [record["video"]]
            video_processor = self.processor.video_processor
            for video in videos:
                frames, meta = self.load_video_frames(_media_path(video, root))
                arrays, _ = video_processor.videos_to_arrays([frames], video_metadata=[None])
                item["videos"].append(torch.from_numpy(arrays[0]))
                item["video_metadata"].append({"duration": meta.duration, "fps": meta.fps,
                                               "frame_indices": list(meta.frame_indices), "path": meta.path})
        elif record.get("image") is not None:
            from PIL import Image

            images = record["image"] if isinstance(record["image"], list) else [record["image"]]
            loaded = []
            for image in images:
                with Image.open(_media_path(image, root)) as handle:
                    loaded.append(handle.convert("RGB"))
            arrays = self.processor.video_processor.images_to_arrays(loaded)
            item["images"] = [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays]
        return item

    def __getitem__(self, index: int) -> dict:
        if not self.skip_bad_samples:
            return self._load(index)
        for attempt in range(len(self.records)):
            current = (index + attempt) % len(self.records)
            try:
                return self._load(current)
            except Exception as error:  # noqa: BLE001 - bad media must not stop a long run when asked so
                warnings.warn(f"skipping training record {current}: {type(error).__name__}: {error}", stacklevel=2)
        raise RuntimeError("no training record could be loaded")


# ==================================================================================================== data: text
def _normalise_turns(conversations: Sequence[dict], system_message: str) -> tuple[str, list[tuple[str, str]]]:
    """(system prompt, [(role, text)]) from ``{"from", "value"}`` or ``{"role", "content"}`` turns."""
    turns = []
    for turn in conversations:
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in ROLES or not isinstance(text, str):
            raise ValueError(f"bad conversation turn {turn!r}: expected from=human|gpt|system and a string value")
        turns.append((ROLES[role], text))
    system = system_message
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    if turns and turns[0][0] != "user":  # the original drops a leading non-human turn
        turns = turns[1:]
    if any(role == "system" for role, _ in turns):
        raise ValueError("a system turn is only allowed first")
    return system, turns


def _move_marker_to_front(text: str) -> str:
    """The original ``preprocess_multimodal``: a single ``<image>`` not at the start goes first, followed by "\\n"."""
    if text.count(IMAGE_MARKER) == 1 and not text.startswith(IMAGE_MARKER):
        text = IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()
        text = text.strip()
    return text


def video_time_message(metadata: dict | None, num_frames: int, time_msg: str | None) -> str:
    """The original training time message (``--time_msg short``, or the per-frame-seconds variant otherwise)."""
    if not time_msg or metadata is None or metadata.get("duration") is None:
        return ""
    duration = float(metadata["duration"])
    if time_msg == "short":
        return time_message(duration, num_frames)
    indices, fps = metadata.get("frame_indices"), metadata.get("fps")
    if not indices or not fps:
        return time_message(duration, num_frames)
    seconds = ", ".join(str(round(index / fps, 1)) for index in indices)
    return f"\nThe video lasts for {duration:.2f} seconds, and {num_frames} frames are uniformly sampled at {seconds} seconds. "


def _tokenize(tokenizer, text: str, offsets: bool = False):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return encoded["input_ids"], (encoded["offset_mapping"] if offsets else None)


def encode_conversation(processor, conversations: Sequence[dict], video_frame_counts: Sequence[int] = (),
                        video_metadata: Sequence[dict | None] | None = None, num_images: int = 0,
                        prompt_format: str = "qwen_2", system_message: str = DEFAULT_SYSTEM_MESSAGE,
                        time_msg: str | None = "short", label_mode: str = "answers",
                        train_on_turn_newline: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record, as the original ``preprocess_multimodal`` + ``preprocess_qwen`` /
    ``preprocess_plain`` build them, with the visual placeholders expanded through the processor.

    Args:
        processor: the :class:`VideoChatFlashProcessor` (tokenizer, placeholder tokens, tokens per frame/image).
        conversations: the record's turns.
        video_frame_counts / video_metadata: frames of each video of the record and their load metadata
            (``duration``, ``fps``, ``frame_indices``) for the time message.
        num_images: still images of the record (used when it has no video).
    Returns:
        ``(input_ids, labels)`` lists of equal length; labels are ``-100`` where nothing is trained.
    """
    if prompt_format not in ("qwen_2", "plain"):
        raise ValueError(f"prompt_format must be 'qwen_2' or 'plain', got {prompt_format!r}")
    if label_mode not in ("answers", "original"):
        raise ValueError(f"label_mode must be 'answers' or 'original', got {label_mode!r}")
    tokenizer = processor.tokenizer
    video_metadata = list(video_metadata) if video_metadata is not None else [None] * len(video_frame_counts)
    system, turns = _normalise_turns(conversations, system_message)
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("a training record needs at least one assistant (gpt) turn")

    # -- visual placeholders
    if video_frame_counts:
        replacements = []
        for frames, meta in zip(video_frame_counts, video_metadata):
            frames = int(frames)
            if prompt_format == "qwen_2" and time_msg == "short" and meta and meta.get("duration") is not None:
                # the processor's own expansion: 16 * T placeholders + the time message
                replacements.append(processor.video_replacement(frames, {"duration": float(meta["duration"])}))
                continue
            message = video_time_message(meta, frames, time_msg) if prompt_format == "qwen_2" else ""
            replacements.append(processor.video_token * (processor.tokens_per_frame * frames) + message)
    else:
        replacements = [processor.image_token * processor.num_image_tokens for _ in range(num_images)]
    if replacements:
        turns = [(role, _move_marker_to_front(text) if role == "user" else text) for role, text in turns]
        markers = sum(text.count(IMAGE_MARKER) for role, text in turns if role == "user")
        if any(IMAGE_MARKER in text for role, text in turns if role != "user"):
            raise ValueError(f"{IMAGE_MARKER} may only appear in human turns")
        if markers == 0:  # no marker at all: the visual input goes first in the first human turn
            turns[0] = (turns[0][0], IMAGE_MARKER + "\n" + turns[0][1])
            markers = 1
        if markers != len(replacements):
            kind = "videos" if video_frame_counts else "images"
            raise ValueError(f"the conversation has {markers} {IMAGE_MARKER} markers for {len(replacements)} {kind}")
        queue = iter(replacements)
        expanded = []
        for role, text in turns:
            if role == "user":
                pieces = text.split(IMAGE_MARKER)
                text = pieces[0] + "".join(next(queue) + piece for piece in pieces[1:])
            expanded.append((role, text))
        turns = expanded
    elif any(IMAGE_MARKER in text for _, text in turns):
        raise ValueError(f"the conversation has {IMAGE_MARKER} markers but the record has no video or image")

    input_ids: list[int] = []
    labels: list[int] = []
    if prompt_format == "plain":
        # preprocess_plain: the first human turn is reduced to the visual input; answer + "\n" is trained.
        if len(turns) < 2 or turns[0][0] != "user" or turns[1][0] != "assistant" or not replacements:
            raise ValueError("prompt_format 'plain' needs a visual input and a human turn followed by a gpt turn")
        prompt_ids, _ = _tokenize(tokenizer, replacements[0])
        answer_ids, _ = _tokenize(tokenizer, turns[1][1] + "\n")
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    segments = [("system", system)] + turns
    header = {role: f"{IM_START}{role}\n" for role in ("system", "user", "assistant")}
    for role, text in segments:
        segment = f"{header[role]}{text}{IM_END}\n"
        ids, offsets = _tokenize(tokenizer, segment, offsets=role == "assistant")
        input_ids.extend(ids)
        if role != "assistant":
            labels.extend([IGNORE_INDEX] * len(ids))
            continue
        if label_mode == "original":
            labels.extend(ids)
            continue
        start, newline_start = len(header[role]), len(segment) - 1
        for token, (begin, end) in zip(ids, offsets):
            trained = begin >= start and (train_on_turn_newline or end <= newline_start)
            labels.append(token if trained else IGNORE_INDEX)
    if label_mode == "original":
        newline = _tokenize(tokenizer, "\n")[0]
        unmask = {tokenizer.convert_tokens_to_ids(IM_START), tokenizer.convert_tokens_to_ids(IM_END)}
        if len(newline) == 1:
            unmask.add(newline[0])
        labels = [token if token in unmask else label for token, label in zip(input_ids, labels)]
    return input_ids, labels


@dataclass
class VideoChatFlashDataCollator:
    """Pads a list of dataset items into a model batch (right padding for training by default).

    Output: ``input_ids``, ``attention_mask``, ``labels`` ``(batch, length)``; ``pixel_values_videos``
    ``(sum T, 3, S, S)`` with ``video_frame_counts`` ``(videos,)`` when the batch has videos; ``pixel_values``
    ``(images, 3, S, S)`` when it has images. Labels are -100 on padding, visual placeholders, system and user turns.

    ``model_max_length`` truncates like the original collator, but never silently inside the visual tokens.
    """

    processor: Any
    prompt_format: str = "qwen_2"
    system_message: str = DEFAULT_SYSTEM_MESSAGE
    time_msg: str | None = "short"
    label_mode: str = "answers"
    train_on_turn_newline: bool = True
    model_max_length: int | None = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def encode(self, item: dict) -> tuple[list[int], list[int]]:
        return encode_conversation(
            self.processor, item["conversations"],
            video_frame_counts=[video.shape[0] for video in item.get("videos", [])],
            video_metadata=item.get("video_metadata"), num_images=len(item.get("images", [])),
            prompt_format=self.prompt_format, system_message=self.system_message, time_msg=self.time_msg,
            label_mode=self.label_mode, train_on_turn_newline=self.train_on_turn_newline,
        )

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(IM_END)
        visual_ids = {self.processor.video_token_id, self.processor.image_token_id}
        sequences = []
        for item in items:
            ids, labels = self.encode(item)
            if self.model_max_length and len(ids) > self.model_max_length:
                visual = sum(token in visual_ids for token in ids)
                ids, labels = ids[: self.model_max_length], labels[: self.model_max_length]
                if sum(token in visual_ids for token in ids) != visual:
                    raise ValueError(
                        f"record {item.get('id')}: model_max_length={self.model_max_length} cuts into its visual tokens "
                        f"({visual} of them); raise model_max_length or sample fewer frames (frames_upbound)")
            sequences.append((ids, labels))
        length = max(len(ids) for ids, _ in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        batch_labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, (ids, labels) in enumerate(sequences):
            span = slice(0, len(ids)) if self.padding_side == "right" else slice(length - len(ids), length)
            batch_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            batch_labels[row, span] = torch.tensor(labels, dtype=torch.long)
            mask[row, span] = 1
        batch = {"input_ids": batch_ids, "attention_mask": mask, "labels": batch_labels}
        videos = [video for item in items for video in item.get("videos", [])]
        if videos:
            batch["pixel_values_videos"] = torch.cat(videos)
            batch["video_frame_counts"] = torch.tensor([video.shape[0] for video in videos], dtype=torch.long)
        images = [image for item in items for image in item.get("images", [])]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


# ==================================================================================================== model parts
def parameter_part(name: str) -> str:
    """``"vision_tower"``, ``"projector"`` or ``"llm"`` for a parameter name (also under PEFT / DDP / FSDP prefixes).
    The LLM is everything else, as the original ``mm_language_model``: embeddings, decoder layers, norm, lm_head."""
    pieces = name.split(".")
    if "vision_tower" in pieces:
        return "vision_tower"
    if "mm_projector" in pieces:
        return "projector"
    return "llm"


def set_trainable_parts(model: torch.nn.Module, parts: Sequence[str]) -> None:
    """Freeze everything, then unfreeze the named parts (the original's ``mm_tunable_parts``)."""
    unknown = set(parts) - set(MODEL_PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}: choose from {MODEL_PARTS}")
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_part(name) in parts)


def count_parameters(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """``{part: {"trainable": n, "total": n}}`` for vision_tower / projector / llm (+ ``"lora"`` when present)."""
    counts = {part: {"trainable": 0, "total": 0} for part in MODEL_PARTS}
    for name, param in model.named_parameters():
        numel = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        part = "lora" if "lora_" in name else parameter_part(name)
        entry = counts.setdefault(part, {"trainable": 0, "total": 0})
        entry["total"] += numel
        if param.requires_grad:
            entry["trainable"] += numel
    return counts


# ==================================================================================================== trainer
class VideoChatFlashTrainer(Trainer):
    """``Trainer`` with the original per-part learning rates (``vision_tower_lr``, ``projector_lr``: parameter groups
    like the original ``LLaVATrainer``) and checkpoints that load with ``AutoModel.from_pretrained(...,
    trust_remote_code=True)`` (code files, ``auto_map`` and the generation config are added to every save)."""

    def __init__(self, *args, vision_tower_lr: float | None = None, projector_lr: float | None = None, **kwargs):
        self.part_learning_rates = {"vision_tower": vision_tower_lr, "projector": projector_lr}
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        special = {part: lr for part, lr in self.part_learning_rates.items() if lr is not None}
        if self.optimizer is not None or not special:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple, list] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((special.get(parameter_part(name)), name in decay), []).append(param)
        param_groups = []
        for (lr, decayed), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0}
            if lr is not None:
                group["lr"] = lr
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and not _is_peft_model(self.model):
            _make_hub_loadable(output_dir, self.processing_class)


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _make_hub_loadable(folder, processor) -> None:
    """Add what AutoModel/pipeline need to a ``save_pretrained`` folder: code files, auto_map, generation config."""
    from .hub_export import (
        AUTO_MAP,
        CUSTOM_PIPELINES,
        check_placeholder_ids,
        copy_code_files,
        write_generation_config,
    )
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    copy_code_files(folder)
    config.update(auto_map=dict(AUTO_MAP), custom_pipelines=json.loads(json.dumps(CUSTOM_PIPELINES)),
                  architectures=["VideoChatFlashForCausalLM"], model_type="videochat_flash", use_cache=True)
    if processor is not None:
        ids = check_placeholder_ids(processor, config["vocab_size"])
        config.update(video_token_id=ids["video_token_id"], image_token_id=ids["image_token_id"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        from transformers import GenerationConfig

        base = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
        write_generation_config(folder, processor, base)


# ==================================================================================================== config
def _deep_update(base: dict, update: dict) -> dict:
    result = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(result.get(key), dict) and key != "config_overrides":
            result[key] = _deep_update(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def load_training_config(config) -> tuple[dict, Path]:
    """A config dict from a YAML/JSON path (or a dict), and the folder relative paths are resolved against."""
    if isinstance(config, dict):
        return copy.deepcopy(config), Path.cwd()
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the training config must be a mapping")
    return data, path.resolve().parent


def build_training_config(raw: dict) -> dict:
    """Resolve the stage preset and fill defaults: ``{stage, model, tune_parts, vision_tower_lr, projector_lr, lora,
    data, training, save, resume_from_checkpoint}``."""
    known = {"stage", "model", "tune_parts", "vision_tower_lr", "projector_lr", "lora", "data", "training", "save",
             "resume_from_checkpoint"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown top-level config keys {sorted(unknown)}; expected some of {sorted(known)}")
    stage = raw.get("stage")
    preset = {}
    if stage is not None:
        if stage not in STAGE_PRESETS:
            raise ValueError(f"unknown stage {stage!r}: choose from {sorted(STAGE_PRESETS)}")
        preset = STAGE_PRESETS[stage]
    config = {
        "stage": stage,
        "model": _deep_update(MODEL_DEFAULTS, raw.get("model") or {}),
        "tune_parts": list(raw.get("tune_parts", preset.get("tune_parts", MODEL_PARTS))),
        "vision_tower_lr": raw.get("vision_tower_lr", preset.get("vision_tower_lr")),
        "projector_lr": raw.get("projector_lr", preset.get("projector_lr")),
        "lora": _deep_update(LORA_DEFAULTS, raw.get("lora") or {}),
        "data": _deep_update(_deep_update(DATA_DEFAULTS, preset.get("data", {})), raw.get("data") or {}),
        "training": _deep_update(preset.get("training", {}), raw.get("training") or {}),
        "save": _deep_update(SAVE_DEFAULTS, raw.get("save") or {}),
        "resume_from_checkpoint": raw.get("resume_from_checkpoint"),
    }
    if not isinstance(config["model"].get("name_or_path"), str):
        raise ValueError("model.name_or_path is required (a model folder, a Hub id, an original checkpoint or 'tiny')")
    if not config["training"].get("output_dir"):
        raise ValueError("training.output_dir is required")
    for key in ("vision_tower_lr", "projector_lr"):
        if config[key] is not None:
            config[key] = float(config[key])
    if not set(config["tune_parts"]) <= set(MODEL_PARTS):
        raise ValueError(f"tune_parts must be a subset of {MODEL_PARTS}, got {config['tune_parts']}")
    return config


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _training_arguments(training: dict, base_dir: Path):
    from transformers import TrainingArguments

    kwargs = dict(training)
    fields = set(TrainingArguments.__dataclass_fields__)
    # transformers 5.24 renamed gradient_checkpointing* to activation_checkpointing*; accept both spellings.
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in kwargs and new in fields:
            kwargs.setdefault(new, kwargs.pop(old))
        elif new in kwargs and new not in fields:
            kwargs.setdefault(old, kwargs.pop(new))
    if "warmup_ratio" in kwargs and "warmup_ratio" not in fields:  # transformers 5: warmup_steps < 1 is a ratio
        kwargs.setdefault("warmup_steps", float(kwargs.pop("warmup_ratio")))
    if kwargs.get("bf16", "auto") == "auto":
        kwargs["bf16"] = _bf16_available()
    if kwargs.get("tf32") == "auto":
        kwargs["tf32"] = torch.cuda.is_available() or None
    ds = kwargs.get("deepspeed")
    if isinstance(ds, str) and not os.path.isabs(ds) and not os.path.exists(ds) and (base_dir / ds).exists():
        kwargs["deepspeed"] = str(base_dir / ds)
    kwargs["remove_unused_columns"] = False  # the collator, not the Trainer, decides what the model gets
    kwargs.setdefault("report_to", "none")
    kwargs.setdefault("save_strategy", "steps")
    kwargs.setdefault("logging_steps", 1)
    kwargs.setdefault("dataloader_drop_last", False)
    kwargs.setdefault("dataloader_pin_memory", torch.cuda.is_available())
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)} (the training: section takes TrainingArguments fields)")
    return TrainingArguments(**kwargs)


def _load_model_and_processor(model_cfg: dict, dtype=None):
    """The model to train (float32 master weights by default) and its processor."""
    from .modeling_videochat_flash import VideoChatFlashForCausalLM
    spec = str(model_cfg["name_or_path"])
    dtype = dtype if dtype is not None else getattr(torch, str(model_cfg.get("dtype") or "float32"))
    overrides = dict(model_cfg.get("config_overrides") or {})
    if model_cfg.get("attn_implementation"):
        overrides["attn_implementation"] = model_cfg["attn_implementation"]
    if spec == "tiny":
        from .hub_export import tiny_processor
        from .tiny_model import build_tiny_model, tiny_config
        attn = overrides.pop("attn_implementation", None)
        if model_cfg.get("image_size"):
            vision = dict(tiny_config().vision_config, image_size=int(model_cfg["image_size"]))
            overrides["vision_config"] = vision
        model = build_tiny_model(int(model_cfg.get("seed", 0)), **overrides).to(dtype)
        if attn:
            model.set_attn_implementation(attn)
        processor = tiny_processor()
    else:
        from .configuration_videochat_flash import VideoChatFlashConfig
        from .hub_export import resolve_model
        folder = resolve_model(spec)
        attn = overrides.pop("attn_implementation", None)
        config = VideoChatFlashConfig.from_pretrained(folder)
        for key, value in overrides.items():
            setattr(config, key, value)
        if model_cfg.get("image_size"):
            size = int(model_cfg["image_size"])
            config.vision_config = dict(config.vision_config, image_size=size)
            config.mm_vision_tower = {224: "umt-large", 448: "umt-hd-large"}.get(size, config.mm_vision_tower)
        kwargs = {"config": config, "dtype": dtype}
        if attn:
            kwargs["attn_implementation"] = attn
        model = VideoChatFlashForCausalLM.from_pretrained(folder, **kwargs)
        processor = VideoChatFlashProcessor.from_pretrained(folder)
    size = model.config.image_size
    processor.video_processor.size = {"height": size, "width": size}
    return model, processor


def _apply_lora(model, lora_cfg: dict, tune_parts: Sequence[str]):
    from peft import LoraConfig, get_peft_model

    # LoRA replaces full training of the LLM; parts listed in tune_parts other than the LLM stay fully trainable.
    set_trainable_parts(model, [part for part in tune_parts if part != "llm"])
    modules_to_save = list(lora_cfg.get("modules_to_save") or [])
    peft_config = LoraConfig(
        r=int(lora_cfg["r"]), lora_alpha=float(lora_cfg["alpha"]), lora_dropout=float(lora_cfg["dropout"]),
        target_modules=lora_cfg.get("target_modules") or LLM_LORA_TARGET_MODULES, bias=lora_cfg.get("bias", "none"),
        modules_to_save=modules_to_save or None, task_type="CAUSAL_LM",
    )
    frozen_but_wanted = {name for name, param in model.named_parameters() if param.requires_grad}
    peft_model = get_peft_model(model, peft_config)
    # get_peft_model freezes every non-LoRA parameter; restore the fully trained parts (e.g. the vision tower).
    for name, param in peft_model.named_parameters():
        base_name = name.removeprefix("base_model.model.")
        if base_name in frozen_but_wanted:
            param.requires_grad_(True)
    matched = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    if any(parameter_part(name) != "llm" for name in matched):
        raise ValueError("the LoRA target_modules matched modules outside the LLM; use a regex anchored on model.layers")
    return peft_model


@contextlib.contextmanager
def _single_process_loading(args=None):
    """Load a model on this process alone: DeepSpeed ZeRO-3's partitioned init (zero.Init) switched off meanwhile."""
    try:
        from transformers.integrations.deepspeed import (
            set_hf_deepspeed_config,
            unset_hf_deepspeed_config,
        )
    except ImportError:  # pragma: no cover
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if args is not None and getattr(args, "hf_deepspeed_config", None) is not None:
            set_hf_deepspeed_config(args.hf_deepspeed_config)


def merge_lora_adapter(model_cfg: dict | str, adapter_dir, output_dir, processor=None, dtype=None):
    """Load the base model on this process, apply the adapter in ``adapter_dir``, merge it and save a full model
    folder (original key names, loadable with ``from_pretrained`` and ``AutoModel``) to ``output_dir``.

    ``model_cfg`` is the training config's ``model`` section (or just the base model path / ``"tiny"``).
    Returns the merged model. Also usable on its own, e.g. after a sharded run::

        python -c "from training_videochat_flash import merge_lora_adapter as m; m('BASE', 'out/adapter', 'out')"
    """
    from peft import PeftModel

    if isinstance(model_cfg, str):
        model_cfg = _deep_update(MODEL_DEFAULTS, {"name_or_path": model_cfg})
    base, base_processor = _load_model_and_processor(model_cfg, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    _save_full_model(merged, processor or base_processor, output_dir)
    return merged


def _save_full_model(model, processor, output_dir) -> None:
    model.config.use_cache = True
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    _make_hub_loadable(output_dir, processor)


def _resume_argument(value, output_dir: str):
    if value in (None, False, "", "false", "False"):
        return None
    if value in (True, "true", "True", "latest"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            _log(f"resume_from_checkpoint: no checkpoint in {output_dir}; starting from scratch")
        return last
    return str(value)


# ==================================================================================================== entry points
def run_training(config, **overrides):
    """Train from a YAML/JSON config file (or an equivalent dict). See the README's fine-tuning section and the
    shipped ``configs/train_*.yaml``. Keyword ``overrides`` are merged into the config (e.g. ``training={...}``).

    Returns:
        The ``VideoChatFlashTrainer`` after training; ``trainer.train_result`` holds ``Trainer.train``'s output,
        ``trainer.videochat_flash_config`` the resolved config.
    """
    raw, base_dir = load_training_config(config)
    raw = _deep_update(raw, overrides)
    cfg = build_training_config(raw)
    data_cfg, lora_cfg = cfg["data"], cfg["lora"]
    seed = int(cfg["training"].get("seed", 42))

    from transformers import set_seed

    set_seed(seed)
    # TrainingArguments first: with DeepSpeed ZeRO-3 it must exist before the model is loaded (zero.Init).
    args = _training_arguments(cfg["training"], base_dir)
    model, processor = _load_model_and_processor(cfg["model"])
    model.config.use_cache = False
    if lora_cfg.get("enabled"):
        model = _apply_lora(model, lora_cfg, cfg["tune_parts"])
    else:
        set_trainable_parts(model, cfg["tune_parts"])
    counts = count_parameters(model)
    _log("trainable parameters: " + ", ".join(
        f"{part} {entry['trainable']:,}/{entry['total']:,}" for part, entry in counts.items()))

    records = load_records(data_cfg["train"], data_cfg.get("data_root"), int(data_cfg.get("seed", 42)), base_dir)
    dataset = VideoChatFlashTrainingDataset(
        records, processor, sample_type=data_cfg["sample_type"], frames_upbound=data_cfg["frames_upbound"],
        frames_lowbound=data_cfg["frames_lowbound"], local_num_frames=data_cfg["local_num_frames"],
        video_backend=data_cfg.get("video_backend"), skip_bad_samples=bool(data_cfg.get("skip_bad_samples")),
    )
    collator = VideoChatFlashDataCollator(
        processor, prompt_format=data_cfg["prompt_format"], system_message=data_cfg["system_message"],
        time_msg=data_cfg["time_msg"], label_mode=data_cfg["label_mode"],
        train_on_turn_newline=bool(data_cfg["train_on_turn_newline"]), model_max_length=data_cfg["model_max_length"],
    )
    trainer = VideoChatFlashTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=processor,
        vision_tower_lr=cfg["vision_tower_lr"], projector_lr=cfg["projector_lr"],
    )
    trainer.videochat_flash_config = cfg
    resume = _resume_argument(cfg["resume_from_checkpoint"], args.output_dir)
    trainer.train_result = trainer.train(resume_from_checkpoint=resume)

    if cfg["save"].get("final_model"):
        output_dir = args.output_dir
        if lora_cfg.get("enabled"):
            adapter_dir = os.path.join(output_dir, "adapter")
            trainer.save_model(adapter_dir)  # adapters (+ modules_to_save), gathered under ZeRO-3 / FSDP
            if cfg["save"].get("merge_lora") and args.should_save:
                sharded = bool(args.deepspeed) or getattr(trainer, "is_fsdp_enabled", False)
                if sharded:  # weights are partitioned: merge into a fresh copy of the base model, on this rank
                    with _single_process_loading(args):
                        merge_lora_adapter(cfg["model"], adapter_dir, output_dir, processor=processor)
                else:
                    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
                    trainer.model = merged
                    _save_full_model(merged, processor, output_dir)
        else:
            trainer.model.config.use_cache = True
            trainer.save_model(output_dir)
        trainer.save_state()
        trainer.accelerator.wait_for_everyone()
        _log(f"saved to {output_dir}")
    return trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="training_videochat_flash.py",
                                     description="Fine-tune VideoChat-Flash from a YAML/JSON config.")
    parser.add_argument("config", help="training config (see configs/train_*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    run_training(args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
