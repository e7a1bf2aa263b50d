"""``model.chat(...)``: the original VideoChat-Flash conversation API, on the transformers-native model.

    output, chat_history = model.chat(video_path, tokenizer, "Describe the video.", return_history=True,
                                      max_num_frames=512, generation_config={"max_new_tokens": 256})
    output, chat_history = model.chat(video_path, tokenizer, "And then?", chat_history=chat_history)

Same arguments, return values and prompt as the original (the first user turn is ``"<image>"`` + the time message +
the question), rendered by the processor's chat template. Beyond it: the tokens of a video come from
``encode_video_streaming`` (chunk by chunk: ``max_num_frames`` can be 10,000) and are kept for later turns on the same
file; a follow-up reuses the previous turn's KV cache past the common prefix (not with in-LLM token dropping, which
ranks the visual tokens by each question); roles may be ``"user"`` or the original's ``"<|im_start|>user"``.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
from transformers import DynamicCache

from .configuration_videochat_flash import CACHE_KWARG, DEFAULT_MAX_NEW_TOKENS, IM_END, MEDIA_MARKER
from .frame_sampling import FrameSampling, time_message

# The processor side (processing, streaming: Pillow, the video decoders) is imported where chat() uses it, so that
# the model's own module imports none of it.

__all__ = ["VideoChatFlashChatMixin", "normalize_role"]

ORIGINAL_ROLE_PREFIX = "<|im_start|>"
SAMPLING_ONLY_KWARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
# media_dict["video_read_type"] -> backend. GIFs ("gif") and frame folders ("img", "frame") are known by their path.
READ_TYPES = {"decord": "decord", "pyav": "pyav", "av": "pyav", "gif": None, "img": None, "frame": None, None: None}


def normalize_role(role: str) -> str:
    """``"<|im_start|>user"`` -> ``"user"``; other names unchanged."""
    return role.removeprefix(ORIGINAL_ROLE_PREFIX)


def _media_options(media_dict: dict | None) -> tuple[str | None, tuple]:
    """``(backend, (start, end))`` of the original's ``media_dict``."""
    media_dict = dict(media_dict or {})
    if set(media_dict) - {"video_read_type", "start", "end"} or media_dict.get("video_read_type") not in READ_TYPES:
        raise ValueError(f"media_dict={media_dict}: the keys are 'start' / 'end' (seconds) and 'video_read_type' "
                         f"(one of {[k for k in READ_TYPES if k]})")
    return READ_TYPES[media_dict.get("video_read_type")], (media_dict.get("start"), media_dict.get("end"))


class VideoChatFlashChatMixin:
    """Adds :meth:`chat` (the original conversation API) to ``VideoChatFlashForCausalLM``."""

    chat_cache_size = 4  # videos whose tokens stay cached on the model for follow-up questions (0: none)
    chat_reuse_prefix = True  # keep the previous turn's KV cache and reuse its common prefix with the next prompt

    def chat(self, video_path, tokenizer, user_prompt: str, chat_history: list[dict] | None = None,
             return_history: bool = True, max_num_frames: int = FrameSampling.max_num_frames,
             media_dict: dict | None = None, generation_config: dict | None = None, *, processor=None,
             progress: bool = False):
        """Answer `user_prompt` about the video at `video_path` (the original VideoChat-Flash ``chat()``).

        `video_path` is a file, a GIF, a folder of frames, decoded frames (the processor's rule for them; not cached)
        or an image; `chat_history` the turns a previous call returned (extended in place, as the original does;
        ``None`` starts a conversation); `max_num_frames` caps the frame sampling; `media_dict` takes the original's
        ``{"start": s, "end": e}`` (a segment, in seconds) and ``{"video_read_type": "decord" | "pyav" | "gif" |
        "img"}``; `generation_config` holds ``generate`` arguments; `processor` defaults to one built from
        `tokenizer`; `progress` shows a bar while the video is encoded. Returns the stripped answer, and the history
        when `return_history`.
        """
        from .video_loading import VideoSegment, is_still_image

        processor = processor if processor is not None else self._chat_processor(tokenizer)
        kind = "image" if is_still_image(video_path) else "video"
        if kind == "image":  # the image processor's tiles (anyres), as in training
            image = os.fspath(video_path) if isinstance(video_path, os.PathLike) else video_path
            with torch.inference_mode():
                (features,) = self.get_image_features(**processor.image_processor(image, return_tensors="pt"))
            metadata = None
        else:
            backend, segment = _media_options(media_dict)
            video = VideoSegment(video_path, *segment) if segment != (None, None) else video_path
            features, metadata = self._chat_video_tokens(video, processor, max_num_frames, backend, progress)
        history = chat_history if chat_history is not None else []
        original_roles = bool(history) and history[0]["role"].startswith(ORIGINAL_ROLE_PREFIX)
        if history:
            content = user_prompt
        elif kind == "image":
            content = f"{MEDIA_MARKER}\n{user_prompt}"  # the original's image prompt: "<image>\n" + question
        else:
            # "<image>" + "\nThe video lasts ... from it. " + question, as in the processor (no duration: no message)
            message = time_message(metadata.duration, metadata.num_frames) if metadata.duration else ""
            content = f"{MEDIA_MARKER}{message}{user_prompt}"
        turns = [*history, {"role": "user", "content": content}]
        input_ids = self._chat_prompt_ids(processor, turns, kind, len(features))
        answer = self._chat_answer(input_ids, features, kind, generation_config, processor.tokenizer)
        user_role, assistant_role = (f"{ORIGINAL_ROLE_PREFIX}user", f"{ORIGINAL_ROLE_PREFIX}assistant") if (
            original_roles) else ("user", "assistant")
        history += [{"role": user_role, "content": content}, {"role": assistant_role, "content": answer}]
        return (answer, history) if return_history else answer

    def clear_chat_cache(self) -> None:
        """Forget the video tokens and the KV cache kept by :meth:`chat` (e.g. after changing the weights)."""
        self._chat_feature_cache = OrderedDict()
        self._chat_prefix_state = None

    def _chat_processor(self, tokenizer):
        """A processor for `tokenizer` and this model's frame size and image settings, built once for them."""
        from .processing_videochat_flash import (
            VideoChatFlashImageProcessor,
            VideoChatFlashProcessor,
            VideoChatFlashVideoProcessor,
        )

        image_processor = VideoChatFlashImageProcessor.from_model_config(self.config)  # as the original reads them
        key = (tokenizer, image_processor.to_json_string())
        cached = getattr(self, "_chat_processor_cache", None)
        if cached is not None and cached[0][0] is tokenizer and cached[0][1] == key[1]:
            return cached[1]
        processor = VideoChatFlashProcessor(image_processor, VideoChatFlashVideoProcessor(size=self.config.image_size),
                                            tokenizer)
        for kind in ("video", "image"):
            expected, got = getattr(self.config, f"{kind}_token_id"), getattr(processor, f"{kind}_token_id")
            if expected is not None and got != expected:
                raise ValueError(f"the tokenizer gives the {kind} placeholder {getattr(processor, f'{kind}_token')!r} "
                                 f"the id {got}, but the model expects config.{kind}_token_id={expected}: use the "
                                 "tokenizer of this checkpoint")
        self._chat_processor_cache = (key, processor)
        return processor

    def _chat_video_tokens(self, video, processor, max_num_frames, backend, progress):
        """``(tokens (16 * T, hidden), metadata)`` of one video, kept per file for follow-up questions."""
        from .streaming_videochat_flash import encode_video_streaming
        from .video_loading import is_remote

        if getattr(self, "_chat_feature_cache", None) is None:
            self.clear_chat_cache()
        cache, key, source = self._chat_feature_cache, None, None
        if isinstance(video, str) and is_remote(video):
            # a URL as it is (and a segment's seconds): its tokens are kept under it, so follow-ups fetch it no more
            source = (str(video), getattr(video, "start", None), getattr(video, "end", None))
        elif isinstance(video, (str, os.PathLike)) and os.path.exists(video):
            stat = os.stat(video)  # the file as it is now
            source = (os.path.realpath(video), getattr(video, "start", None), getattr(video, "end", None),
                      stat.st_mtime_ns, stat.st_size)
        if source is not None:  # ... with the processor's settings and the model's dtype and device
            weight = self.get_input_embeddings().weight
            key = (*source, max_num_frames, backend, processor.video_processor.to_json_string(), weight.dtype,
                   weight.device)
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        result = encode_video_streaming(self, video, video_processor=processor.video_processor, progress=progress,
                                        max_num_frames=max_num_frames, video_backend=backend)
        if key is not None and self.chat_cache_size > 0:
            cache[key] = result
            while len(cache) > self.chat_cache_size:
                cache.popitem(last=False)
        return result

    def _chat_prompt_ids(self, processor, turns: list[dict], kind: str, num_tokens: int) -> torch.Tensor:
        """`(1, L)` ids of the conversation, rendered by the processor's chat template. The video (or image) of
        `num_tokens` tokens sits where the first user turn has its ``<image>``; a video's time message is already
        in that turn's text, as in the original."""
        from .processing_videochat_flash import media_blocks

        messages, placed = [], False
        for turn in turns:
            role, content = normalize_role(turn["role"]), turn["content"]
            if not placed and role == "user" and MEDIA_MARKER in content:
                content, placed = media_blocks(content, [kind]), True
            messages.append({"role": role, "content": content})
        if not placed:
            raise ValueError(f"chat_history must start with a user turn holding {MEDIA_MARKER!r}, as chat() returns it")
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        placeholder = getattr(processor, f"{kind}_token") * num_tokens
        (text,), _ = processor.get_text_with_replacements([prompt], **{f"{kind}s_replacements": [placeholder]})
        return processor.tokenizer(text, return_tensors="pt")["input_ids"]

    def _chat_answer(self, input_ids, features, kind, generation_config, tokenizer) -> str:
        from .streaming_videochat_flash import as_mm_encoder_outputs

        kwargs = self._chat_generate_kwargs(generation_config, tokenizer)
        cache, reused = self._chat_prefix_cache(input_ids, features, kwargs)
        if cache is not None:
            kwargs[CACHE_KWARG] = cache  # generate runs only the tokens after the cached prefix
        embeddings = self.get_input_embeddings().weight
        if reused == 0:  # with a reused prefix the video is already in the cache
            video = features.to(device=embeddings.device, dtype=embeddings.dtype)
            kwargs["mm_encoder_outputs"] = as_mm_encoder_outputs(video, kind=kind)
        input_ids = input_ids.to(embeddings.device)
        with torch.inference_mode():
            output_ids = self.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        if cache is not None:  # the cache now holds the prompt and the answer but its last token
            self._chat_prefix_state = {"ids": output_ids[0, : cache.get_seq_length()].cpu(), "cache": cache,
                                       "features": features, "weight": (self.dtype, self.device)}
        return tokenizer.decode(output_ids[0, input_ids.shape[1] :], skip_special_tokens=True).strip()

    def _chat_generate_kwargs(self, generation_config, tokenizer) -> dict:
        """generate()'s arguments from chat()'s `generation_config`: a dict or a ``GenerationConfig``."""
        kwargs = dict(getattr(generation_config, "to_diff_dict", lambda: generation_config or {})())
        if kwargs.get("num_return_sequences", 1) != 1 or kwargs.get("return_dict_in_generate"):
            raise ValueError("chat() returns one answer: num_return_sequences, return_dict_in_generate: generate()")
        if not kwargs.get("do_sample"):  # the original passes temperature=0 with do_sample=False
            for name in SAMPLING_ONLY_KWARGS:
                kwargs.pop(name, None)
        defaults = self.generation_config
        if "max_new_tokens" not in kwargs and "max_length" not in kwargs and defaults.max_new_tokens is None:
            kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        if "eos_token_id" not in kwargs and defaults.eos_token_id is None:
            kwargs["eos_token_id"] = tokenizer.convert_tokens_to_ids(IM_END)
        if "pad_token_id" not in kwargs and defaults.pad_token_id is None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        return kwargs

    def _chat_prefix_cache(self, input_ids, features, generate_kwargs):
        """The KV cache to generate `input_ids` `(1, L)` with, and how many of its tokens are already in it.

        The previous turn's cache (prompt + answer) is cropped to its longest common prefix with `input_ids` when it
        was computed with these visual tokens and that prefix covers the whole video; otherwise a new cache (0
        reused). ``(None, 0)`` where no cache is kept: with token dropping (which ranks the visual tokens by each
        question, in the prefill), beam search, several sequences or a cache the caller brings.
        """
        previous, self._chat_prefix_state = getattr(self, "_chat_prefix_state", None), None
        settings = {**self.generation_config.to_dict(), **generate_kwargs}
        if (not self.chat_reuse_prefix or self.config.mm_llm_compress or settings.get("use_cache") is False
                or (settings.get("num_beams") or 1) != 1 or (settings.get("num_return_sequences") or 1) != 1
                or {"cache", "past_key_values", "assistant_model"} & set(generate_kwargs)):
            return None, 0
        ids = input_ids[0].cpu()
        same_model = previous is not None and previous["weight"] == (self.dtype, self.device)  # not moved since
        if same_model and (previous["features"] is features or torch.equal(previous["features"], features)):
            cached_ids = previous["ids"]
            n = min(cached_ids.shape[0], ids.shape[0] - 1)  # at least one new token to run
            differ = (cached_ids[:n] != ids[:n]).nonzero()
            common = int(differ[0]) if differ.numel() else n
            visual = self.model.visual_token_mask(ids[None])[0].nonzero()
            if common > (int(visual[-1]) if visual.numel() else -1) and common > 0:  # all visual tokens in the prefix
                cache = previous["cache"]
                extra = cache.get_seq_length() - common
                if extra > 0:
                    cache.crop(-extra)  # a negative count removes tokens in every transformers 5.x
                return cache, common
        return DynamicCache(config=self.config), 0
