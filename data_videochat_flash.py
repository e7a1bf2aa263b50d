"""Fine-tuning data: LLaVA-style records -> chat-template messages -> model inputs with labels.

Records come in a JSON list, a JSONL file, or a dataset-list YAML like the original's ``data/*.yaml``
(``datasets: [{json_path, sampling_strategy: "first:25%" | "end:N" | "random:N" | "all", data_root}]``)::

    {"video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"},
                                              {"from": "gpt", "value": "A cat jumps."}, ...]}

``"image"`` (a path or a list) instead of ``"video"`` for still images; a leading ``{"from": "system"}`` turn
replaces the system prompt. Each record is turned into chat messages (``<image>`` markers become video/image blocks,
a single marker moved to the front as the original ``preprocess_multimodal`` does) and given to the processor, which
renders the chat template, samples the frames with the original training rule (``FrameSampling.training``), expands
the placeholders (16 tokens per frame + the time message) and, with ``return_assistant_tokens_mask``, marks the tokens
the template's ``{% generation %}`` blocks hold: each answer, its ``<|im_end|>`` and the newline after it.

:func:`check_records` vets every record (conversations, media files present) before a run loads its model.

``label_mode="original"`` reproduces the original ``preprocess_qwen`` targets bit for bit: whole assistant turns
including their ``<|im_start|>assistant\\n`` header, plus every ``<|im_start|>``, ``<|im_end|>`` and lone
``"\\n"`` token of the sequence. ``prompt_format="plain"`` (stage 1) is ``preprocess_plain``: the visual tokens, then
the answer and ``"\\n"``, with no system prompt, question or time message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .frame_sampling import FrameSampling
from .configuration_videochat_flash import IM_END, MEDIA_MARKER
from .processing_videochat_flash import DEFAULT_SYSTEM_PROMPT, media_blocks

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# The original `plain` conversation template (stage 1): the first turn's media, then each answer + "\n" (trained).
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['role'] == 'user' and loop.index0 < 2 and message['content'] is not string -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'video' -%}{{- '<|video_pad|>' -}}{%- elif block['type'] == 'image' -%}"
    "{{- '<|image_pad|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif message['role'] == 'assistant' and loop.index0 < 2 -%}"
    "{% generation %}{{- message['content'] + '\\n' -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# ---------------------------------------------------------------------------------------------------- records
def _sampling_strategy(records: list, strategy: str, seed: int) -> list:
    """The original dataset-list ``sampling_strategy``: ``all``, ``first:N``, ``end:N``, ``random:N`` (N or N%)."""
    if not strategy or strategy == "all":
        return records
    name, _, number = strategy.partition(":")
    if name not in ("first", "end", "random") or not number:
        raise ValueError(f"sampling_strategy {strategy!r}: expected 'all' or 'first|end|random:N[%]'")
    count = math.ceil(int(number[:-1]) * len(records) / 100) if number.endswith("%") else int(number)
    if name == "random":
        records = random.Random(seed).sample(records, len(records))
    return records[-count:] if name == "end" else records[:count]


def load_records(spec, data_root: str | None = None, seed: int = 42, base_dir=None) -> list[dict]:
    """Training records from `spec`: a JSON / JSONL file, an original-style dataset-list YAML, a dict
    ``{json_path, sampling_strategy, data_root}``, a list of records, or a list of any of these. Each record gets the
    folder its media paths are relative to as ``"_data_root"``."""
    if spec is None:
        raise ValueError("no training data: give a JSON/JSONL file, a dataset-list YAML or a list of them")
    if isinstance(spec, (list, tuple)):
        if any(isinstance(item, dict) and "conversations" in item for item in spec):  # records (check_records vets)
            return [dict(item, _data_root=item.get("_data_root", data_root)) if isinstance(item, dict) else item
                    for item in spec]
        return [record for item in spec for record in load_records(item, data_root, seed, base_dir)]
    if isinstance(spec, dict):
        records = load_records(spec.get("json_path") or spec.get("path"), spec.get("data_root", data_root), seed,
                               base_dir)
        return _sampling_strategy(records, spec.get("sampling_strategy", "all"), seed)
    path = Path(os.path.expanduser(str(spec)))
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
        path = Path(base_dir) / path
    if not path.is_file():
        raise FileNotFoundError(f"training data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        datasets = (yaml.safe_load(text) or {}).get("datasets")
        if not datasets:
            raise ValueError(f"{path}: a dataset-list YAML needs a 'datasets:' list of {{json_path: ...}} entries")
        return load_records(datasets, data_root, seed, base_dir=path.parent)
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else (
            json.loads(text))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid {'JSON Lines' if path.suffix == '.jsonl' else 'JSON'} ({error})") from None
    records = records["data"] if isinstance(records, dict) and "data" in records else records
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return load_records(records, data_root, seed, base_dir)


def check_records(records: list, skip_bad: bool = False, shown: int = 5) -> list[dict]:
    """`records` vetted before a run loads its model: each one's conversations (:func:`record_messages`) and media
    files (existing, non-empty regular files: a stat, no decoding). Bad records raise one ``ValueError`` that counts
    them and names the first `shown`; with `skip_bad` they are left out with a warning instead."""
    problems = {}
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ValueError(f"a record is a mapping, got {type(record).__name__}")
            messages = record_messages(record)
        except Exception as error:  # noqa: BLE001 - a malformed record (e.g. turns that are no mappings)
            problems[index] = str(error) if isinstance(error, ValueError) else f"malformed record ({error!r})"
            continue
        paths = [block["path"] for message in messages if isinstance(message["content"], list)
                 for block in message["content"] if "path" in block]
        problem = next(filter(None, map(_media_problem, paths)), None)
        if problem:
            problems[index] = problem
    if not records:
        raise ValueError("no training records: the training data is empty")
    if not problems:
        return list(records)
    summary = f"{len(problems)} of {len(records)} training records are bad: {_listing(problems, shown)}"
    if not skip_bad or len(problems) == len(records):
        raise ValueError(summary + (" (none is left to train on)" if skip_bad else
                                    " (fix them, or set skip_bad_samples: true to train without them)"))
    warnings.warn(f"{summary}; training without them (skip_bad_samples)", stacklevel=2)
    return [record for index, record in enumerate(records) if index not in problems]


def _media_problem(path: str) -> str | None:
    if "://" in path:
        return f"{path!r}: URLs are not supported yet (download the file first)"
    if not os.path.isfile(path):
        return f"media file {'not found' if not os.path.exists(path) else 'is not a regular file'}: {path!r}"
    return f"media file is empty: {path!r}" if os.path.getsize(path) == 0 else None


def _listing(problems: dict, shown: int) -> str:
    first = "; ".join(f"record {index}: {problem}" for index, problem in list(problems.items())[:shown])
    return first + (f"; ... ({len(problems) - shown} more)" if len(problems) > shown else "")


def record_messages(record: dict, system_message: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """Chat-template messages of one record: ``<image>`` markers become video/image blocks with their paths."""
    turns = [(ROLES.get(turn.get("from", turn.get("role"))), turn.get("value", turn.get("content")))
             for turn in record.get("conversations") or []]
    if not turns or any(role is None or not isinstance(text, str) for role, text in turns):
        raise ValueError(f"bad conversations {record.get('conversations')!r}: expected from=human|gpt|system turns")
    system = turns.pop(0)[1] if turns[0][0] == "system" else system_message
    if turns and turns[0][0] != "user":  # the original drops a leading non-human turn
        turns = turns[1:]
    if not any(role == "assistant" for role, _ in turns) or any(role == "system" for role, _ in turns):
        raise ValueError("a training record needs an assistant (gpt) turn, and a system turn only first")
    kind = "video" if record.get("video") is not None else "image" if record.get("image") is not None else None
    paths = record.get(kind) if kind else []
    paths = [_media_path(path, record.get("_data_root")) for path in (paths if isinstance(paths, list) else [paths])]
    if paths and not any(MEDIA_MARKER in text for role, text in turns if role == "user"):
        turns[0] = (turns[0][0], f"{MEDIA_MARKER}\n{turns[0][1]}")  # no marker: the media goes first
    turns = [(role, _marker_first(text) if role == "user" else text) for role, text in turns]
    markers = sum(text.count(MEDIA_MARKER) for _, text in turns)
    if markers != len(paths) or any(MEDIA_MARKER in text for role, text in turns if role != "user"):
        raise ValueError(f"the conversation has {markers} {MEDIA_MARKER} markers (human turns only) for the record's "
                         f"{len(paths)} {kind or 'media'} files")
    messages, queue = [{"role": "system", "content": system}] if system is not None else [], iter(paths)
    for role, text in turns:
        if MEDIA_MARKER in text:
            blocks = media_blocks(text, [kind] * text.count(MEDIA_MARKER))
            text = [dict(block, path=next(queue)) if block["type"] == kind else block for block in blocks]
        messages.append({"role": role, "content": text})
    return messages


def _marker_first(text: str) -> str:
    """The original ``preprocess_multimodal``: a single ``<image>`` not at the start moves first, then "\\n"."""
    if text.count(MEDIA_MARKER) == 1 and not text.startswith(MEDIA_MARKER):
        return f"{MEDIA_MARKER}\n{text.replace(MEDIA_MARKER, '').strip()}"
    return text


def _media_path(path: str, data_root: str | None) -> str:
    return os.path.join(data_root, path) if data_root and not os.path.isabs(path) and "://" not in path else path


# ---------------------------------------------------------------------------------------------------- labels
def labels_from_assistant_mask(input_ids: list[int], mask: list[int], tokenizer, label_mode: str = "answers",
                               train_on_turn_newline: bool = True) -> list[int]:
    """Labels of one sequence from the template's assistant mask (answer + ``<|im_end|>`` + newline per turn).

    ``train_on_turn_newline=False`` leaves the newline after each answer's ``<|im_end|>`` out; ``label_mode="original"``
    adds each assistant header and every ``<|im_start|>``, ``<|im_end|>`` and lone newline token (``preprocess_qwen``).
    """
    im_start, im_end = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids(IM_END)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    trained = [bool(flag) for flag in mask]
    if not train_on_turn_newline:
        for i in range(1, len(trained)):
            if trained[i] and input_ids[i - 1] == im_end and input_ids[i] in newline:
                trained[i] = False
    if label_mode == "original":
        for i in range(1, len(trained)):
            if trained[i] and not trained[i - 1]:  # an answer starts: its header back to <|im_start|> is trained
                start = max(j for j in range(i) if input_ids[j] == im_start)
                trained[start:i] = [True] * (i - start)
        unmask = {im_start, im_end, *(newline if len(newline) == 1 else ())}
        trained = [flag or token in unmask for flag, token in zip(trained, input_ids)]
    elif label_mode != "answers":
        raise ValueError(f"label_mode must be 'answers' or 'original', got {label_mode!r}")
    return [token if flag else IGNORE_INDEX for token, flag in zip(input_ids, trained)]


# ---------------------------------------------------------------------------------------------------- dataset
class VideoChatFlashTrainingDataset(torch.utils.data.Dataset):
    """Records -> ``{"input_ids", "labels", "pixel_values_videos" + "video_frame_counts" | "pixel_values" +
    "image_grids"}``, one sample each, through the processor (chat template, training frame sampling, placeholder
    expansion; one image in tiles, several padded).

    Args:
        records: LLaVA-style dicts (see :func:`load_records`).
        processor: a ``VideoChatFlashProcessor`` (its video processor gives the frame size and normalisation).
        sampling: the frames of each video (default: the original training rule, 64..512 frames at 1 fps).
        prompt_format: ``"qwen_2"`` (ChatML) or ``"plain"`` (stage 1).
        time_msg: ``"short"``, ``"long"`` (per-frame seconds) or None.
        model_max_length: longest sequence (an error, never a silent cut, when it would cut visual tokens).
        skip_bad_samples: on a loading error, warn and use the next record instead (the original retries others).
    """

    def __init__(self, records, processor, sampling: FrameSampling | None = None, prompt_format: str = "qwen_2",
                 system_message: str = DEFAULT_SYSTEM_PROMPT, time_msg: str | None = "short",
                 label_mode: str = "answers", train_on_turn_newline: bool = True, model_max_length: int | None = None,
                 video_backend: str | None = None, skip_bad_samples: bool = False):
        if prompt_format not in ("qwen_2", "plain"):
            raise ValueError(f"prompt_format must be 'qwen_2' or 'plain', got {prompt_format!r}")
        self.records, self.processor = list(records), processor
        self.sampling = sampling if sampling is not None else FrameSampling.training()
        self.prompt_format, self.system_message, self.time_msg = prompt_format, system_message, time_msg
        self.label_mode, self.train_on_turn_newline = label_mode, train_on_turn_newline
        self.model_max_length, self.video_backend = model_max_length, video_backend
        self.skip_bad_samples = skip_bad_samples

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records) if self.skip_bad_samples else 1):
            current = (index + attempt) % len(self.records)
            try:
                return self.encode(self.records[current])
            except Exception as error:  # noqa: BLE001 - bad media must not stop a long run when asked so
                if not self.skip_bad_samples:
                    raise
                warnings.warn(f"skipping training record {current}: {type(error).__name__}: {error}", stacklevel=2)
        raise RuntimeError("no training record could be loaded")

    def encode(self, record: dict) -> dict:
        """One record as model inputs with labels."""
        plain = self.prompt_format == "plain"
        videos_kwargs = {**dataclasses.asdict(self.sampling), "video_backend": self.video_backend,
                         "time_message": None if plain else self.time_msg}
        inputs = self.processor.apply_chat_template(
            record_messages(record, None if plain else self.system_message), tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, chat_template=PLAIN_CHAT_TEMPLATE if plain else None,
            processor_kwargs={"videos_kwargs": videos_kwargs, "padding": False}, return_tensors="pt",
        )
        input_ids, mask = inputs["input_ids"][0].tolist(), inputs["assistant_masks"][0].tolist()
        labels = labels_from_assistant_mask(input_ids, mask, self.processor.tokenizer, self.label_mode,
                                            self.train_on_turn_newline)
        if self.model_max_length and len(input_ids) > self.model_max_length:
            visual = {self.processor.video_token_id, self.processor.image_token_id}
            if any(token in visual for token in input_ids[self.model_max_length :]):
                raise ValueError(f"model_max_length={self.model_max_length} cuts into the visual tokens of a record "
                                 f"({len(input_ids)} tokens); raise it or sample fewer frames (frames_upbound)")
            input_ids, labels = input_ids[: self.model_max_length], labels[: self.model_max_length]
        item = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        if "pixel_values_videos" in inputs:
            pixels = inputs["pixel_values_videos"]
            item.update(pixel_values_videos=pixels.reshape(-1, *pixels.shape[-3:]),
                        video_frame_counts=inputs["video_frame_counts"].tolist())
        if "pixel_values" in inputs:  # image tiles and their grids (one image: anyres tiles; several: padded)
            item.update(pixel_values=inputs["pixel_values"], image_grids=inputs["image_grids"])
        return item


@dataclass
class VideoChatFlashDataCollator:
    """Pads dataset items into a batch: ``input_ids``, ``attention_mask``, ``labels`` ``(batch, length)`` (right
    padding by default; labels -100 on padding), ``pixel_values_videos`` ``(sum T, 3, S, S)`` with
    ``video_frame_counts``, ``pixel_values`` ``(tiles, 3, S, S)`` with ``image_grids`` ``(images, 2)``."""

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": torch.full((len(items), length), self.pad_token_id),
                 "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
                 "labels": torch.full((len(items), length), IGNORE_INDEX)}
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            batch["input_ids"][row, span], batch["labels"][row, span] = item["input_ids"], item["labels"]
            batch["attention_mask"][row, span] = 1
        videos = [item for item in items if "pixel_values_videos" in item]
        if videos:
            batch["pixel_values_videos"] = torch.cat([item["pixel_values_videos"] for item in videos])
            batch["video_frame_counts"] = torch.tensor([n for item in videos for n in item["video_frame_counts"]])
        for key in ("pixel_values", "image_grids"):
            parts = [item[key] for item in items if key in item]
            if parts:
                batch[key] = torch.cat(parts)
        return batch
