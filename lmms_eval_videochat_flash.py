"""VideoChat-Flash in lmms-eval, as a plugin: ``lmms-eval --model videochat_flash_hf --model_args pretrained=...``.

Registered through the ``lmms_eval.models`` entry point (:data:`MANIFEST`; ``pip install -e ".[eval]"``), so no fork
of lmms-eval is needed. It evaluates like the original VideoChat-Flash adapter of lmms-eval: the ``chat()`` prompt
(``"<image>"`` + the time message + the task's context, as the processor's chat template renders a video block
followed by the text), at most ``max_num_frames`` frames (512; a task's media dict may ask for another cap, as
LVBench's 640), in-LLM token dropping off, greedy decoding with the task's ``max_new_tokens``. Unlike the original it
runs several requests in one left-padded ``generate`` call (``--batch_size N``) on any device, and also implements
``loglikelihood`` (``*_mcppl`` tasks) and ``generate_until_multi_round``.

A task's ``doc_to_visual`` may return video paths (or frame folders), images, decoded frames (a list of PIL images),
or the original fork's ``[path, {"start": s, "end": e, "video_read_type": ...}]``: the segment goes into the video
block as ``{"type": "video", "path": path, "start": s, "end": e}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from functools import partial

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .hub_export import resolve_model
from .video_loading import is_still_image

__all__ = ["MANIFEST", "EvalRequest", "VideoChatFlashLmms", "generation_options", "request_batches", "request_messages",
           "visual_blocks"]

DEFAULT_PRETRAINED = "OpenGVLab/VideoChat-Flash-Qwen2-7B_res448"  # the checkpoint of the original eval scripts
MAX_NUM_FRAMES = 512  # the original eval scripts' frame cap (LVBench: 640, asked by its task)
DEFAULT_MAX_NEW_TOKENS = 1024  # the original adapter's, for tasks that give none
SEGMENT_KEYS = ("start", "end")  # seconds of a clip segment in the original fork's media dicts


def visual_blocks(visuals) -> list[dict]:
    """Content blocks of the chat template for what a task's ``doc_to_visual`` returned.

    Paths become video blocks (image blocks for image files); a list of PIL images becomes one video of decoded
    frames; a single PIL image an image block; a media dict after a path (the original fork's
    ``[path, {"start", "end", "video_read_type"}]``) adds its segment to the block before it. ``None`` or ``[]``:
    no visual (a text-only prompt).
    """
    visuals = [] if visuals is None else list(visuals)
    frames = [v for v in visuals if is_still_image(v) and not isinstance(v, (str, os.PathLike))]
    if frames and len(frames) == len(visuals) and len(frames) > 1:
        return [{"type": "video", "video": frames}]  # a clip as decoded frames (e.g. MVBench's frame tasks)
    blocks = []
    for visual in visuals:
        if isinstance(visual, dict):
            if not blocks or blocks[-1]["type"] != "video":
                raise ValueError(f"a media dict {visual} must follow the video path it describes")
            blocks[-1].update({key: float(visual[key]) for key in SEGMENT_KEYS if visual.get(key) is not None})
        elif isinstance(visual, (str, os.PathLike)):
            kind = "image" if is_still_image(visual) else "video"
            blocks.append({"type": kind, "path": os.fspath(visual)})
        elif is_still_image(visual):
            blocks.append({"type": "image", "image": visual})
        else:
            raise TypeError(f"unsupported visual of type {type(visual).__name__}: expected a path, a PIL image or a "
                            "media dict")
    return blocks


def request_messages(context: str, visuals) -> list[dict]:
    """The one-turn conversation of a request: its visuals, then the task's context (the original ``chat()``
    prompt once the chat template renders it)."""
    return [{"role": "user", "content": [*visual_blocks(visuals), {"type": "text", "text": context}]}]


def generation_options(gen_kwargs: dict | None) -> dict:
    """``generate`` arguments for a task's ``generation_kwargs``, with the original adapter's defaults (1024 new
    tokens, greedy, one beam). ``until`` is dropped, as there; sampling settings count only with
    ``do_sample: true``."""
    gen_kwargs = dict(gen_kwargs or {})
    options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
               "do_sample": bool(gen_kwargs.get("do_sample", False)),
               "num_beams": int(gen_kwargs.get("num_beams") or 1)}
    if options["do_sample"]:
        options.update({key: gen_kwargs[key] for key in ("temperature", "top_p", "top_k") if gen_kwargs.get(key)})
    return options


def request_batches(items: list, batch_size: int, key, length) -> list[list[int]]:
    """Indices of `items` in batches of at most `batch_size`: items of one `key` (e.g. their generation settings)
    together, longest `length` first (padding wasted least; as lmms-eval's Collator), order otherwise kept."""
    groups: dict = {}
    for index, item in enumerate(items):
        groups.setdefault(key(item), []).append(index)
    batches = []
    for indices in groups.values():
        indices = sorted(indices, key=lambda i: -length(items[i]))
        batches += [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    return batches


@dataclasses.dataclass
class EvalRequest:
    """What the model needs of an lmms-eval request; the doc's visuals are loaded only when its batch runs."""

    context: str
    settings: dict | str  # generation kwargs (generate_until) or the continuation (loglikelihood)
    doc: tuple  # (task, split, doc_id)
    load_visuals: Callable[[], list]
    max_num_frames: int  # a media dict's frame cap (a task's own setting, e.g. LVBench's 640), else the model's


class VideoChatFlashLmms(lmms):
    """lmms-eval model ``videochat_flash_hf``: VideoChat-Flash through this package's processor and ``generate``.

    Args (``--model_args``): pretrained (Hub id, local folder, or ``"tiny"``), max_num_frames, dtype
    (``"bfloat16"``, ``"float16"``, ``"float32"``; bfloat16 on accelerators, float32 on CPU by default),
    attn_implementation, mm_llm_compress (in-LLM token dropping, off as in the original evaluation); batch_size and
    device come from lmms-eval's ``--batch_size`` / ``--device`` (default: this process's accelerator, else CPU;
    under ``accelerate launch`` each process takes its own device and lmms-eval shards the requests).
    """

    is_simple = True

    def __init__(self, pretrained: str = DEFAULT_PRETRAINED, max_num_frames: int = MAX_NUM_FRAMES,
                 batch_size: int | str = 1, device: str | None = None, dtype: str | None = None,
                 attn_implementation: str | None = None, mm_llm_compress: bool = False,
                 max_batch_size: int | None = None) -> None:  # max_batch_size: lmms-eval's, for "auto" batch sizes
        super().__init__()
        from accelerate import PartialState
        from transformers import AutoModelForCausalLM, AutoProcessor

        state = PartialState()  # one process per device under accelerate / torchrun
        self._rank, self._world_size = state.process_index, state.num_processes
        self._device = torch.device(device if device is not None and state.num_processes == 1 else state.device)
        self.batch_size_per_gpu = self._positive_int("batch_size", batch_size)
        self.max_num_frames = self._positive_int("max_num_frames", max_num_frames)
        dtype = dtype or ("float32" if self._device.type == "cpu" else "bfloat16")
        if str(dtype) not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must name a torch dtype (bfloat16, float16, float32), got {dtype!r}")
        folder = resolve_model(str(pretrained))
        options = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self._model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=getattr(torch, dtype),
                                                           mm_llm_compress=bool(mm_llm_compress), **options)
        self._model.to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)

    @staticmethod
    def _positive_int(name: str, value) -> int:
        if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return int(value)

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    # ---- requests
    def _request(self, request) -> EvalRequest:
        """A generate_until / loglikelihood request: ``(context, settings, doc_to_visual, doc_id, task, split)``."""
        context, settings, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        if callable(settings):  # loglikelihood tasks pass doc_to_target
            settings = str(settings(doc))
        cap = self._frame_cap(doc_to_visual(doc))
        return EvalRequest(context, settings, (task, split, doc_id), partial(doc_to_visual, doc), cap)

    def _frame_cap(self, visuals) -> int:
        """A media dict's ``max_num_frames``, else the model's."""
        caps = [v["max_num_frames"] for v in visuals or [] if isinstance(v, dict) and "max_num_frames" in v]
        return int(caps[-1]) if caps else self.max_num_frames

    def _inputs(self, conversations: list, max_num_frames: int):
        """The processor's left-padded batch of `conversations`, on the model's device."""
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"max_num_frames": max_num_frames})
        return inputs.to(self._device)

    @torch.inference_mode()
    def _generate(self, conversations: list, max_num_frames: int, options: dict) -> list[str]:
        """Answers to `conversations` from one ``generate`` call, stripped (as the original's)."""
        inputs = self._inputs(conversations, max_num_frames)
        output = self._model.generate(**inputs, **options)
        answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [answer.strip() for answer in answers]

    def generate_until(self, requests) -> list[str]:
        items = [self._request(request) for request in requests]
        results = [None] * len(items)
        batches = request_batches(  # a batch shares its generation settings and frame cap
            items, self.batch_size, key=lambda item: (json.dumps(generation_options(item.settings), sort_keys=True),
                                                      item.max_num_frames), length=lambda item: len(item.context))
        for batch in self._progress(batches, "Model Responding"):
            first = items[batch[0]]
            conversations = [request_messages(items[i].context, items[i].load_visuals()) for i in batch]
            answers = self._generate(conversations, first.max_num_frames, generation_options(first.settings))
            for index, answer in zip(batch, answers):
                results[index] = answer
                self.cache_hook.add_partial("generate_until", (items[index].context, items[index].settings), answer)
        return results

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """``(mean negative log-likelihood of the continuation's tokens, whether greedy decoding gives them)`` per
        request, lmms-eval's convention for video models (its ``multiple_choice`` tasks take the argmin). Requests on
        the same prompt and visuals (the options of one question) share one encoding of the video and one forward."""
        if self._model.config.mm_llm_compress:
            raise ValueError("loglikelihood needs mm_llm_compress=False (token dropping drops positions of logits)")
        items = [self._request(request) for request in requests]
        results = [None] * len(items)
        batches = request_batches(  # a batch: options of one prompt
            items, self.batch_size, key=lambda item: (item.context, item.doc, item.max_num_frames),
            length=lambda item: len(item.settings))
        for batch in self._progress(batches, "Model Scoring"):
            first = items[batch[0]]
            messages = request_messages(first.context, first.load_visuals())
            scores = self._score(messages, [items[i].settings for i in batch], first.max_num_frames)
            for index, score in zip(batch, scores):
                results[index] = score
        return results

    def _score(self, messages: list, continuations: list[str], max_num_frames: int) -> list[tuple[float, bool]]:
        """Scores of `continuations` after the prompt of `messages`: the visuals encoded once, one forward."""
        prompt = self._inputs([messages], max_num_frames)
        encoded = self._visual_tokens(prompt, len(continuations))
        tokens = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in continuations]
        if not all(tokens):
            raise ValueError(f"an empty continuation cannot be scored: {continuations}")
        prompt_ids, width = prompt["input_ids"][0], max(map(len, tokens))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(tokens), len(prompt_ids) + width), pad, dtype=prompt_ids.dtype, device=self._device)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(tokens):  # prompt + continuation, padded on the right
            input_ids[row, : len(prompt_ids) + len(ids)] = torch.cat([prompt_ids, prompt_ids.new_tensor(ids)])
            attention_mask[row, : len(prompt_ids) + len(ids)] = 1
        logits = self._model(input_ids=input_ids, attention_mask=attention_mask, mm_encoder_outputs=encoded).logits
        scores = []
        for row, ids in enumerate(tokens):
            predicted = logits[row, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(ids)].float()
            target = input_ids.new_tensor(ids)
            loss = torch.nn.functional.cross_entropy(predicted, target)
            scores.append((float(loss), bool((predicted.argmax(-1) == target).all())))
        return scores

    def _visual_tokens(self, inputs, copies: int) -> dict:
        """The visual tokens of one prompt's inputs, repeated for `copies` rows (``mm_encoder_outputs``)."""
        encoded = {}
        if inputs.get("pixel_values_videos") is not None:
            encoded["video"] = self._model.get_video_features(inputs["pixel_values_videos"],
                                                              inputs.get("video_frame_counts"), return_dict=True)
        if inputs.get("pixel_values") is not None:
            encoded["image"] = self._model.get_image_features(inputs["pixel_values"], inputs["image_grids"],
                                                              return_dict=True)
        return {kind: BaseModelOutputWithPooling(pooler_output=tuple(output.pooler_output) * copies)
                for kind, output in encoded.items()}

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """lmms-eval's multi-round protocol, one request at a time: round 0 answers the request's context; then the
        task's ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)`` gives the next
        ``(visuals, context, terminal, round_outputs, round_info)`` until it signals the end. Each request's answer is
        the list of its rounds' outputs (what lmms-eval passes on to the task as it is)."""
        results = []
        for request in self._progress(requests, "Model Responding"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            visuals, outputs, info, round_idx = doc_to_visual(doc), [], None, 0
            options = generation_options(gen_kwargs)
            while True:
                outputs.append(self._generate([request_messages(context, visuals)], self._frame_cap(visuals),
                                              options)[0])
                round_idx += 1
                visuals, context, terminal, outputs, info = doc_to_text(
                    doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info)
                outputs = list(outputs)
                if terminal:
                    break
            results.append(outputs)
        return results

    def _progress(self, iterable, description: str):
        from tqdm import tqdm

        return tqdm(iterable, desc=description, disable=self.rank != 0)


MANIFEST = ModelManifest(model_id="videochat_flash_hf",
                         simple_class_path="videochat_flash.lmms_eval_videochat_flash.VideoChatFlashLmms")
