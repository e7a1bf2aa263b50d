"""A ``video-text-to-text`` pipeline (transformers has none): answer questions about video files.

Registered in a Hub folder's ``config.json`` under ``custom_pipelines["video-text-to-text"]``, so that::

    from transformers import pipeline
    pipe = pipeline("video-text-to-text", model="path/or/hub-id", trust_remote_code=True)
    pipe("clip.mp4", "What happens in the video?")             # [{"input_text": ..., "generated_text": "..."}]
    pipe({"video": "clip.mp4", "text": "What happens?"}, max_new_tokens=64, max_num_frames=128)
    pipe([{"role": "user", "content": [{"type": "video", "path": "clip.mp4"},
                                       {"type": "text", "text": "What happens?"}]}])        # chat format
    pipe(["a.mp4", "b.mp4"], ["Question about a?", "Question about b?"])                  # several inputs

The processor (``AutoProcessor``) renders the chat template and loads the videos; the model's ``generate`` answers.
``generated_text`` is the answer only; ``return_full_text=True`` returns the conversation with the answer appended.
Only transformers is imported here: the model and processor classes come from the same Hub folder.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import GenerationConfig, Pipeline

__all__ = ["VideoTextToTextPipeline"]

PREPROCESS_KWARGS = ("max_num_frames", "num_frames", "fps", "video_backend")


class _Conversation:
    """One chat (a list of messages), kept together through the pipeline's batching."""

    def __init__(self, messages: list[dict], question: Any = None):
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError("chat messages must be dicts with 'role' and 'content' keys")
        self.messages = messages
        self.question = question


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _is_chat_batch(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_chat(item) for item in value)


def _video_block(video: Any) -> dict:
    if isinstance(video, (str, os.PathLike)):
        return {"type": "video", "path": os.fspath(video)}
    return {"type": "video", "video": video}  # decoded frames


def _question_to_conversation(video: Any, text: str) -> _Conversation:
    if not isinstance(text, str):
        raise ValueError(f"the question must be a string, got {type(text).__name__}")
    messages = [{"role": "user", "content": [_video_block(video), {"type": "text", "text": text}]}]
    return _Conversation(messages, question=text)


def _to_conversation(item: Any) -> _Conversation:
    if isinstance(item, _Conversation):
        return item
    if _is_chat(item):
        return _Conversation(list(item))
    if isinstance(item, dict) and "video" in item and "text" in item:
        return _question_to_conversation(item["video"], item["text"])
    raise ValueError(
        "pass a video and a question (pipe(video, text)), a dict {'video': ..., 'text': ...}, or chat messages with "
        "a {'type': 'video', 'path': ...} block"
    )


class VideoTextToTextPipeline(Pipeline):
    """Video question answering with VideoChat-Flash (or any model whose processor takes ``{"type": "video"}``
    blocks in ``apply_chat_template`` and whose ``generate`` returns prompt + new tokens).

    Call arguments: ``videos`` (a path, decoded frames, a dict ``{"video", "text"}``, chat messages, or a list of
    those) and ``text`` (the question, or a list of questions). Keyword options: ``max_new_tokens``,
    ``generate_kwargs`` (dict), any generation parameter given at construction, ``max_num_frames`` / ``num_frames`` /
    ``fps`` / ``video_backend`` (frame sampling), ``return_full_text`` and ``skip_special_tokens``.

    Returns, per input, ``[{"input_text": question or messages, "generated_text": answer}]``.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_video_processor = False  # the processor brings its own; AutoVideoProcessor's stock path needs torchvision
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def _sanitize_parameters(
        self,
        max_new_tokens=None,
        generate_kwargs=None,
        return_full_text=None,
        skip_special_tokens=None,
        processor_kwargs=None,
        **kwargs,
    ):
        preprocess_params = {"processor_kwargs": dict(processor_kwargs or {})}
        for key in PREPROCESS_KWARGS:
            if key in kwargs:
                preprocess_params["processor_kwargs"][key] = kwargs.pop(key)
        generation_keys = {key for key in vars(GenerationConfig()) if not key.startswith("_")}
        call_generation = {key: kwargs.pop(key) for key in list(kwargs) if key in generation_keys}
        if kwargs:
            raise TypeError(f"VideoTextToTextPipeline got unexpected keyword arguments {sorted(kwargs)}")

        forward_params = {}
        if generate_kwargs is not None or call_generation:
            forward_params["generate_kwargs"] = {**call_generation, **dict(generate_kwargs or {})}
        if max_new_tokens is not None:
            forward_params.setdefault("generate_kwargs", {})
            if "max_new_tokens" in forward_params["generate_kwargs"]:
                raise ValueError("max_new_tokens is given twice: directly and in generate_kwargs")
            forward_params["generate_kwargs"]["max_new_tokens"] = max_new_tokens

        postprocess_params = {}
        if return_full_text is not None:
            postprocess_params["return_full_text"] = return_full_text
        if skip_special_tokens is not None:
            postprocess_params["skip_special_tokens"] = skip_special_tokens
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, videos=None, text=None, **kwargs):
        """Answer questions about videos; see the class docstring for the accepted inputs."""
        if videos is None and text is None:
            raise ValueError("pass a video and a question, or chat messages")
        if text is not None and (_is_chat(text) or _is_chat_batch(text)):
            if videos is not None:
                raise ValueError("with chat messages, put the video inside the messages, not in `videos`")
            videos, text = text, None
        if text is None:
            if _is_chat(videos):
                return super().__call__(_Conversation(list(videos)), **kwargs)
            if _is_chat_batch(videos):
                return super().__call__([_Conversation(list(chat)) for chat in videos], **kwargs)
            if isinstance(videos, dict):
                return super().__call__(_to_conversation(videos), **kwargs)
            if isinstance(videos, (list, tuple)) and videos and all(isinstance(v, dict) for v in videos):
                return super().__call__([_to_conversation(v) for v in videos], **kwargs)
            raise ValueError("a question (`text`) is needed with a video")
        if isinstance(text, str):
            return super().__call__(_question_to_conversation(videos, text), **kwargs)
        if isinstance(text, (list, tuple)) and isinstance(videos, (list, tuple)) and len(text) == len(videos):
            return super().__call__([_question_to_conversation(v, t) for v, t in zip(videos, text)], **kwargs)
        raise ValueError("pass one question per video (lists of the same length)")

    def preprocess(self, inputs, processor_kwargs=None):
        conversation = _to_conversation(inputs)
        model_inputs = self.processor.apply_chat_template(
            conversation.messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **(processor_kwargs or {}),
        )
        model_inputs["conversation"] = conversation
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        conversation = model_inputs.pop("conversation")
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        input_ids = model_inputs["input_ids"]
        generated = self.model.generate(**model_inputs, **generate_kwargs)
        return {"new_tokens": generated[:, input_ids.shape[1] :], "conversation": conversation}

    def postprocess(self, model_outputs, return_full_text=False, skip_special_tokens=True):
        conversation = model_outputs["conversation"]
        tokenizer = self.processor.tokenizer
        records = []
        for row in model_outputs["new_tokens"]:
            answer = tokenizer.decode(row, skip_special_tokens=skip_special_tokens).strip()
            input_text = conversation.question if conversation.question is not None else conversation.messages
            generated = answer
            if return_full_text:
                generated = list(conversation.messages) + [{"role": "assistant", "content": answer}]
            records.append({"input_text": input_text, "generated_text": generated})
        return records
