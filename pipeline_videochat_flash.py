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

import torch
from transformers import GenerationConfig, Pipeline

__all__ = ["VideoTextToTextPipeline"]


@dataclass
class _Conversation:  # one chat, kept whole through batching (not a tuple, which batching would unpack)
    messages: list[dict]
    question: str | None = None  # what ``input_text`` reports


def _is_chat(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _question(video: Any, text: Any) -> _Conversation:
    if not isinstance(text, str) or video is None:
        raise ValueError(f"pass a video and a question (a string, got {type(text).__name__}), or chat messages")
    from .video_loading import is_still_image

    kind = "image" if is_still_image(video) else "video"
    block = {"type": kind, "path": os.fspath(video)} if isinstance(video, (str, os.PathLike)) else {
        "type": kind, kind: video}  # decoded frames, or an image
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
                             skip_special_tokens=None, processor_kwargs=None, stop_sequence=None, **kwargs):
        processor_kwargs = dict(processor_kwargs or {})
        # what the video and image processors take (max_num_frames, num_frames, fps, video_backend, max_image_tiles, ...)
        for name in ("video_processor", "image_processor"):
            valid = getattr(getattr(self.processor, name, None), "valid_kwargs", None)
            processor_kwargs.update({key: kwargs.pop(key) for key in getattr(valid, "__annotations__", {})
                                     if key in kwargs})
        generation_keys = {key for key in vars(GenerationConfig()) if not key.startswith("_")}
        generation_keys |= {"streamer", "generation_config", "logits_processor", "stopping_criteria"}
        generate_kwargs = {**{key: kwargs.pop(key) for key in list(kwargs) if key in generation_keys},
                           **dict(generate_kwargs or {})}
        if stop_sequence is not None:  # as the stock text pipelines: stop strings need the tokenizer
            generate_kwargs.update(stop_strings=stop_sequence, tokenizer=self.processor.tokenizer)
        if kwargs:
            raise TypeError(f"VideoTextToTextPipeline got unexpected keyword arguments {sorted(kwargs)}")
        if max_new_tokens is not None:
            if "max_new_tokens" in generate_kwargs:
                raise ValueError("max_new_tokens is given twice: directly and in generate_kwargs")
            generate_kwargs["max_new_tokens"] = max_new_tokens
        postprocess = {"return_full_text": return_full_text, "skip_special_tokens": skip_special_tokens}
        # Only what this call sets: an empty dict would replace the options the pipeline was built with.
        return ({"processor_kwargs": processor_kwargs} if processor_kwargs else {},
                {"generate_kwargs": generate_kwargs} if generate_kwargs else {},
                {key: value for key, value in postprocess.items() if value is not None})

    def __call__(self, videos=None, text=None, **kwargs):
        """Answer questions about videos; see the class docstring for the accepted inputs."""
        if text is not None and not isinstance(text, str) and text and (_is_chat(text) or _is_chat(text[0])):
            if videos is not None:
                raise ValueError("with chat messages, put the video inside the messages, not in `videos`")
            videos, text = text, None
        if isinstance(text, str):
            inputs = _question(videos, text)
        elif text is not None:
            if not isinstance(videos, (list, tuple)) or len(text) != len(videos):
                raise ValueError("pass one question per video (lists of the same length)")
            inputs = [_question(video, question) for video, question in zip(videos, text)]
        elif _is_chat(videos) or isinstance(videos, (dict, str, os.PathLike)):
            inputs = _conversation(videos)  # a lone video raises: it needs a question
        else:  # a list of inputs, or a dataset / generator of them (each normalised in preprocess)
            inputs = [_conversation(item) for item in videos] if isinstance(videos, (list, tuple)) else videos
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs, processor_kwargs=None):
        conversation = _conversation(inputs)
        final = conversation.messages[-1]["role"] == "assistant"  # a started answer is continued, as the stock pipeline
        inputs = self.processor.apply_chat_template(
            conversation.messages, add_generation_prompt=not final, continue_final_message=final, tokenize=True,
            return_dict=True, return_tensors="pt", processor_kwargs=processor_kwargs or {},
        )
        # Visual inputs as lists (one tensor per video, the tiles of each image): the batching then keeps them whole,
        # whatever each row holds (other frame counts or tile counts, nothing), where a tensor would be padded or refused.
        counts, pixels = inputs.pop("video_frame_counts", None), inputs.pop("pixel_values_videos", None)
        videos = list(pixels.reshape(-1, *pixels.shape[-3:]).split(counts.tolist())) if pixels is not None else []
        grids, tiles = inputs.pop("image_grids", torch.zeros(0, 2, dtype=torch.long)), inputs.pop("pixel_values", None)
        images = list(tiles.split((1 + grids.prod(-1)).tolist())) if tiles is not None else []
        return {**inputs, "videos": videos, "images": images, "grids": list(grids), "conversation": conversation}

    def _forward(self, model_inputs, generate_kwargs=None):
        conversation = model_inputs.pop("conversation")
        visual = {key: [t for row in model_inputs.pop(key) for t in (row if isinstance(row, list) else [row])]
                  for key in ("videos", "images", "grids")}
        if visual["videos"]:
            model_inputs["pixel_values_videos"] = visual["videos"]
        if visual["images"]:
            model_inputs.update(pixel_values=torch.cat(visual["images"]), image_grids=torch.stack(visual["grids"]))
        generated = self.model.generate(**model_inputs, **self._prepare_generate_kwargs(dict(generate_kwargs or {})))
        return {"new_tokens": generated[:, model_inputs["input_ids"].shape[1] :], "conversation": conversation}

    def postprocess(self, model_outputs, return_full_text=False, skip_special_tokens=True):
        conversation = model_outputs["conversation"]
        input_text = conversation.question if conversation.question is not None else conversation.messages
        answers = [self.processor.tokenizer.decode(row, skip_special_tokens=skip_special_tokens).strip()
                   for row in model_outputs["new_tokens"]]
        return [{"input_text": input_text, "generated_text": [*conversation.messages, {"role": "assistant",
                 "content": answer}] if return_full_text else answer} for answer in answers]
