"""A ``video-text-to-text`` pipeline (transformers has none), registered in a Hub folder's ``config.json`` under
``custom_pipelines``; only transformers is imported, the model and processor come from the same folder::

    pipe = pipeline("video-text-to-text", model="path/or/hub-id", trust_remote_code=True)
    pipe("clip.mp4", "What happens in the video?")             # [{"input_text": ..., "generated_text": "..."}]
    pipe({"video": "clip.mp4", "text": "What happens?"}, max_new_tokens=64, max_num_frames=128)
    pipe([{"role": "user", "content": [{"type": "video", "path": "clip.mp4"},
                                       {"type": "text", "text": "What happens?"}]}])        # chat messages
    pipe(["a.mp4", "b.mp4"], ["Question about a?", "Question about b?"])                  # several inputs
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from transformers import GenerationConfig, Pipeline

__all__ = ["VideoTextToTextPipeline"]


@dataclass
class _Conversation:
    """One chat, kept whole through the pipeline's batching; `question` is what ``input_text`` reports."""

    messages: list[dict]
    question: str | None = None


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _question(video: Any, text: Any) -> _Conversation:
    if not isinstance(text, str):
        raise ValueError(f"the question must be a string, got {type(text).__name__}")
    block = {"type": "video", "path": os.fspath(video)} if isinstance(video, (str, os.PathLike)) else {
        "type": "video", "video": video}  # decoded frames
    return _Conversation([{"role": "user", "content": [block, {"type": "text", "text": text}]}], text)


def _conversation(item: Any) -> _Conversation:
    if isinstance(item, _Conversation):
        return item
    if _is_chat(item):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in item):
            raise ValueError("chat messages must be dicts with 'role' and 'content' keys")
        return _Conversation(list(item))
    if isinstance(item, dict) and "video" in item and "text" in item:
        return _question(item["video"], item["text"])
    raise ValueError("pass a video and a question (pipe(video, text)), a dict {'video': ..., 'text': ...}, or chat "
                     "messages with a {'type': 'video', 'path': ...} block")


class VideoTextToTextPipeline(Pipeline):
    """Video question answering: the processor's chat template (``{"type": "video"}`` blocks) and ``generate``.

    Inputs: ``videos`` (a path, decoded frames, a dict ``{"video", "text"}``, chat messages, or a list of those) and
    ``text`` (the question, or one per video). Options: ``max_new_tokens``, ``generate_kwargs``, any generation
    parameter, ``max_num_frames`` / ``num_frames`` / ``fps`` / ``video_backend``, ``return_full_text`` (the
    conversation with the answer appended), ``skip_special_tokens``. Returns ``[{"input_text", "generated_text"}]``.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False  # the processor brings its own; AutoVideoProcessor's stock path needs torchvision
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def _sanitize_parameters(self, max_new_tokens=None, generate_kwargs=None, return_full_text=None,
                             skip_special_tokens=None, processor_kwargs=None, **kwargs):
        processor_kwargs = dict(processor_kwargs or {})
        # what the video processor takes (frame sampling: max_num_frames, num_frames, fps, video_backend, ...)
        video_kwargs = getattr(getattr(self.processor, "video_processor", None), "valid_kwargs", None)
        processor_kwargs.update({key: kwargs.pop(key) for key in getattr(video_kwargs, "__annotations__", {})
                                 if key in kwargs})
        generation_keys = {key for key in vars(GenerationConfig()) if not key.startswith("_")}
        generate_kwargs = {**{key: kwargs.pop(key) for key in list(kwargs) if key in generation_keys},
                           **dict(generate_kwargs or {})}
        if kwargs:
            raise TypeError(f"VideoTextToTextPipeline got unexpected keyword arguments {sorted(kwargs)}")
        if max_new_tokens is not None:
            if "max_new_tokens" in generate_kwargs:
                raise ValueError("max_new_tokens is given twice: directly and in generate_kwargs")
            generate_kwargs["max_new_tokens"] = max_new_tokens
        postprocess = {"return_full_text": return_full_text, "skip_special_tokens": skip_special_tokens}
        return ({"processor_kwargs": processor_kwargs}, {"generate_kwargs": generate_kwargs},
                {key: value for key, value in postprocess.items() if value is not None})

    def __call__(self, videos=None, text=None, **kwargs):
        """Answer questions about videos; see the class docstring for the accepted inputs."""
        if text is not None and (_is_chat(text) or (isinstance(text, (list, tuple)) and text and _is_chat(text[0]))):
            if videos is not None:
                raise ValueError("with chat messages, put the video inside the messages, not in `videos`")
            videos, text = text, None
        if videos is None:
            raise ValueError("pass a video and a question, or chat messages")
        if text is None:
            if _is_chat(videos) or isinstance(videos, dict):
                return super().__call__(_conversation(videos), **kwargs)
            if isinstance(videos, (list, tuple)) and videos and all(_is_chat(v) or isinstance(v, dict) for v in videos):
                return super().__call__([_conversation(v) for v in videos], **kwargs)
            raise ValueError("a question (`text`) is needed with a video")
        if isinstance(text, str):
            return super().__call__(_question(videos, text), **kwargs)
        if isinstance(text, (list, tuple)) and isinstance(videos, (list, tuple)) and len(text) == len(videos):
            return super().__call__([_question(v, t) for v, t in zip(videos, text)], **kwargs)
        raise ValueError("pass one question per video (lists of the same length)")

    def preprocess(self, inputs, processor_kwargs=None):
        conversation = _conversation(inputs)
        model_inputs = self.processor.apply_chat_template(
            conversation.messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs=processor_kwargs or {},
        )
        return {**model_inputs, "conversation": conversation}

    def _forward(self, model_inputs, generate_kwargs=None):
        conversation = model_inputs.pop("conversation")
        generated = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(dict(generate_kwargs or {})))
        return {"new_tokens": generated[:, model_inputs["input_ids"].shape[1] :], "conversation": conversation}

    def postprocess(self, model_outputs, return_full_text=False, skip_special_tokens=True):
        conversation = model_outputs["conversation"]
        records = []
        for row in model_outputs["new_tokens"]:
            answer = self.processor.tokenizer.decode(row, skip_special_tokens=skip_special_tokens).strip()
            full = [*conversation.messages, {"role": "assistant", "content": answer}]
            input_text = conversation.question if conversation.question is not None else conversation.messages
            records.append({"input_text": input_text, "generated_text": full if return_full_text else answer})
        return records
