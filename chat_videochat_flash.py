"""``model.chat(...)``: the original VideoChat-Flash conversation API on top of the transformers-native model.

Code written for the original remote code keeps working::

    output, chat_history = model.chat(video_path, tokenizer, "Describe the video.", return_history=True,
                                      max_num_frames=512, generation_config={"max_new_tokens": 256})
    output, chat_history = model.chat(video_path, tokenizer, "And then?", chat_history=chat_history)

Same arguments, same return values (the stripped answer, plus the history when ``return_history``), same prompt:
the first user turn is ``"<image>\\n" + time message + " " + question`` in the ``qwen_2`` ChatML template, which is
exactly what ``processor.apply_chat_template`` renders for a ``{"type": "video"}`` block. Differences from the
original:

* the visual tokens of a video are computed once and reused by later turns on the same video (keyed on the file's
  path, modification time and size and on the sampling settings), so follow-up questions skip decoding and the
  vision tower;
* video files are encoded by ``encode_video_streaming`` (decode -> preprocess -> encode chunk by chunk), so memory
  holds the 16 tokens per frame, never all frames: ``max_num_frames`` can be 10,000;
* the LLM's KV cache of the previous turn (system prompt, video, earlier turns) is kept and reused by a follow-up
  on the same video: only the tokens after the longest common prefix are run (not with in-LLM token dropping);
* history roles may be ``"user"``/``"assistant"`` or the original's ``"<|im_start|>user"``/``"<|im_start|>assistant"``;
  new entries use the style of the history passed in (``"user"``/``"assistant"`` for a new conversation);
* runs on CPU or GPU, in any dtype, without flash-attn; ``progress=True`` shows decode/encode progress bars.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

IMAGE_PLACEHOLDER = "<image>"  # how the original history marks the video slot
ORIGINAL_ROLE_PREFIX = "<|im_start|>"
DEFAULT_MAX_NEW_TOKENS = 1024  # the original model card's setting; used when nothing else sets a length
SAMPLING_ONLY_KWARGS = ("temperature", "top_p", "top_k", "min_p", "typical_p")
# media_dict["video_read_type"] of the original -> load_video backend (None = PyAV, decord fallback)
READ_TYPES = {"decord": "decord", "pyav": "pyav", "av": "pyav", None: None}

__all__ = ["VideoChatFlashChatMixin", "normalize_role"]


class _Processing:
    """The processor classes, imported on first use (the model itself does not need Pillow or the decoders)."""

    def __init__(self):
        from .processing_videochat_flash import (
            VideoChatFlashProcessor,
            VideoChatFlashVideoProcessor,
            time_message_from_metadata,
        )
        self.VideoChatFlashProcessor = VideoChatFlashProcessor
        self.VideoChatFlashVideoProcessor = VideoChatFlashVideoProcessor
        self.time_message_from_metadata = time_message_from_metadata


def _processing_module() -> _Processing:
    return _Processing()


def _encode_video_streaming(*args, **kwargs):
    from .streaming_videochat_flash import encode_video_streaming
    return encode_video_streaming(*args, **kwargs)


def _cache_kwarg() -> str:
    """``generate``'s name for a cache (``cache`` in transformers >= 5.24, ``past_key_values`` before)."""
    from .modeling_videochat_flash import CACHE_KWARG
    return CACHE_KWARG


def normalize_role(role: str) -> str:
    """``"<|im_start|>user"`` -> ``"user"``; other names unchanged."""
    if role.startswith(ORIGINAL_ROLE_PREFIX):
        return role[len(ORIGINAL_ROLE_PREFIX) :]
    return role


def _backend_from_media_dict(media_dict: dict | None) -> str | None:
    if not media_dict:
        return None
    unsupported = sorted(set(media_dict) - {"video_read_type"})
    if unsupported:
        raise ValueError(
            f"media_dict keys {unsupported} are not supported (clip segments with start/end are not implemented): "
            "cut the segment out of the video first; only {'video_read_type': 'decord' | 'pyav'} is accepted"
        )
    read_type = media_dict.get("video_read_type")
    if read_type not in READ_TYPES:
        raise ValueError(f"media_dict['video_read_type']={read_type!r}: expected one of 'decord', 'pyav', 'av'")
    backend = READ_TYPES[read_type]
    if backend == "decord":
        try:
            import decord  # noqa: F401
        except ImportError:  # the default reader gives the same frames for 8-bit video
            backend = None
    return backend


class VideoChatFlashChatMixin:
    """Adds :meth:`chat` (the original conversation API) to :class:`VideoChatFlashForCausalLM`."""

    # Most videos whose visual tokens stay cached on the model (for follow-up questions); 0 disables caching.
    chat_cache_size = 4
    # Keep the previous turn's KV cache and reuse its longest common prefix with the next prompt.
    chat_reuse_prefix = True

    # ------------------------------------------------------------------------------------------ helpers
    def _chat_processor(self, tokenizer):
        """A processor for `tokenizer` and this model's frame size (built once per tokenizer)."""
        cached = getattr(self, "_chat_processor_cache", None)
        if cached is not None and cached[0] is tokenizer:
            return cached[1]
        processing = _processing_module()
        processor = processing.VideoChatFlashProcessor(
            video_processor=processing.VideoChatFlashVideoProcessor(size=self.config.image_size),
            tokenizer=tokenizer,
        )
        for kind in ("video", "image"):
            expected = getattr(self.config, f"{kind}_token_id")
            got = getattr(processor, f"{kind}_token_id")
            if expected is not None and got != expected:
                raise ValueError(
                    f"the tokenizer gives the {kind} placeholder {getattr(processor, f'{kind}_token')!r} the id {got}, "
                    f"but the model expects config.{kind}_token_id={expected}: use the tokenizer of this checkpoint"
                )
        self._chat_processor_cache = (tokenizer, processor)
        return processor

    def clear_chat_cache(self) -> None:
        """Forget the visual tokens and the KV cache kept by :meth:`chat` (e.g. after changing the weights)."""
        self._chat_feature_cache = OrderedDict()
        self._chat_prefix_state = None

    @staticmethod
    def _chat_cache_key(video, processor, max_num_frames, backend):
        if not isinstance(video, (str, os.PathLike)):
            return None
        path = os.path.realpath(os.fspath(video))
        try:
            stat = os.stat(path)
        except OSError:
            return None  # load_video reports the problem
        size = processor.video_processor.size
        return (path, stat.st_mtime_ns, stat.st_size, max_num_frames, backend, size["height"], size["width"])

    def _chat_video_features(self, video, processor, max_num_frames=512, backend=None, progress=False):
        """Visual tokens `(16 * T, hidden)`, frame count `T` and load metadata of one video, cached per file."""
        cache = getattr(self, "_chat_feature_cache", None)
        if cache is None:
            self.clear_chat_cache()
            cache = self._chat_feature_cache
        key = self._chat_cache_key(video, processor, max_num_frames, backend)
        if key is not None and key in cache:
            cache.move_to_end(key)
            return cache[key]

        if isinstance(video, (str, os.PathLike)):
            # chunk by chunk: memory holds the tokens, never all frames (the same tokens as the processor's pixels)
            tokens, metadata = _encode_video_streaming(
                self, video, video_processor=processor.video_processor, max_num_frames=max_num_frames,
                backend=backend, progress=progress,
            )
            result = (tokens, len(metadata.frame_indices), metadata)
            if key is not None and self.chat_cache_size > 0:
                cache[key] = result
                while len(cache) > self.chat_cache_size:
                    cache.popitem(last=False)
            return result

        # already-decoded frames (in memory anyway): the processor uses them as given
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=None, desc="Decoding frames", unit="frame", leave=False)
        arrays, metadata = processor.video_processor.videos_to_arrays(
            [video], max_num_frames=max_num_frames, video_backend=backend
        )
        pixels = torch.from_numpy(arrays[0])
        if bar is not None:
            bar.update(pixels.shape[0])
            bar.close()
        base = self.model
        clip = self.config.mm_local_num_frames
        clips = pixels.reshape(-1, clip, *pixels.shape[1:])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=clips.shape[0], desc="Encoding clips", unit="clip", leave=False)
        with torch.no_grad():  # the same tokens as get_video_features, which also encodes through encode_clips
            tokens = base.encode_clips(clips, on_chunk=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        result = (tokens.reshape(-1, tokens.shape[-1]), pixels.shape[0], metadata[0])
        if key is not None and self.chat_cache_size > 0:
            cache[key] = result
            while len(cache) > self.chat_cache_size:
                cache.popitem(last=False)
        return result

    def _chat_generate_kwargs(self, generation_config: dict | None, tokenizer) -> dict[str, Any]:
        kwargs = dict(generation_config or {})
        if not kwargs.get("do_sample"):
            # meaningless without sampling (the original passes temperature=0 with do_sample=False)
            for name in SAMPLING_ONLY_KWARGS:
                kwargs.pop(name, None)
        has_length = "max_new_tokens" in kwargs or "max_length" in kwargs
        if not has_length and getattr(self.generation_config, "max_new_tokens", None) is None:
            kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        if "eos_token_id" not in kwargs and self.generation_config.eos_token_id is None:
            kwargs["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "pad_token_id" not in kwargs and self.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        return kwargs

    def _chat_prefix_cache(self, input_ids, features, generate_kwargs):
        """The KV cache to generate `input_ids` (1, L) with, and how many of its tokens are already in it.

        The previous turn's cache (prompt + answer, video included) is cropped to its longest common prefix with
        `input_ids` when it was computed with these visual tokens and that prefix covers the whole video; otherwise a
        new cache (0 reused). ``(None, 0)`` where no cache is kept.
        """
        previous = getattr(self, "_chat_prefix_state", None)
        self._chat_prefix_state = None  # reused below or replaced after this turn
        if not self.chat_reuse_prefix or self.config.mm_llm_compress:
            # In-LLM token dropping ranks the visual tokens by the attention of the last prompt token (the question)
            # and drops them in the prefill, so a cached prefix from another question holds other tokens (and the
            # model refuses visual tokens over a non-empty cache): every turn is a fresh run there.
            return None, 0
        defaults = self.generation_config
        if (
            generate_kwargs.get("use_cache", getattr(defaults, "use_cache", True)) is False
            or (generate_kwargs.get("num_beams") or getattr(defaults, "num_beams", 1) or 1) != 1
            or (generate_kwargs.get("num_return_sequences") or getattr(defaults, "num_return_sequences", 1) or 1) != 1
            or any(name in generate_kwargs for name in ("cache", "past_key_values", "assistant_model"))
        ):
            return None, 0
        from transformers import DynamicCache

        ids = input_ids[0].detach().cpu()
        if previous is not None and (
            previous["features"] is features
            or (previous["features"].shape == features.shape and torch.equal(previous["features"], features))
        ):
            cached_ids = previous["ids"]
            n = min(cached_ids.shape[0], ids.shape[0] - 1)  # at least one new token to run
            differ = (cached_ids[:n] != ids[:n]).nonzero()
            common = int(differ[0]) if differ.numel() else n
            video = (ids == self.config.video_token_id).nonzero()
            last_video = int(video[-1]) if video.numel() else -1
            if common > last_video and common > 0:  # the whole video is in the kept prefix
                cache = previous["cache"]
                extra = cache.get_seq_length() - common
                if extra > 0:
                    cache.crop(-extra)  # a negative count removes tokens in every transformers 5.x
                return cache, common
        return DynamicCache(config=self.config), 0

    # ------------------------------------------------------------------------------------------ chat
    def chat(
        self,
        video_path,
        tokenizer,
        user_prompt: str,
        chat_history: list[dict] | None = None,
        return_history: bool = True,
        max_num_frames: int = 512,
        media_dict: dict | None = None,
        generation_config: dict | None = None,
        *,
        processor=None,
        progress: bool = False,
    ):
        """Answer `user_prompt` about the video at `video_path` (the original VideoChat-Flash ``chat()``).

        Args:
            video_path: a video file (or decoded frames, which are not cached).
            tokenizer: the checkpoint's tokenizer (the placeholder tokens are added to it when missing).
            user_prompt: the question.
            chat_history: earlier turns as returned by a previous call (``[{"role", "content"}, ...]``, the first
                user content holding ``"<image>"``); ``None`` or ``[]`` starts a conversation about this video.
                A list passed in is extended in place, as the original does.
            return_history: also return the history.
            max_num_frames: cap of the frame sampling (about 1 frame per second, 64 frames at least).
            media_dict: the original's reader options; ``{"video_read_type": "decord" | "pyav"}``.
            generation_config: keyword arguments of ``generate`` (``max_new_tokens``, ``do_sample``, ...).
            processor: a ready :class:`VideoChatFlashProcessor` (default: built from `tokenizer`).
            progress: show progress bars while frames are decoded and encoded.

        Returns:
            The answer (stripped), or ``(answer, chat_history)`` when `return_history`.
        """
        processor = processor if processor is not None else self._chat_processor(tokenizer)
        tokenizer = processor.tokenizer
        backend = _backend_from_media_dict(media_dict)
        features, num_frames, metadata = self._chat_video_features(
            video_path, processor, max_num_frames=max_num_frames, backend=backend, progress=progress
        )

        history = chat_history if chat_history is not None else []
        if history:
            first_user = next((m for m in history if normalize_role(m["role"]) == "user"), None)
            if first_user is None or IMAGE_PLACEHOLDER not in first_user["content"]:
                raise ValueError(
                    f"chat_history must start with the user turn holding {IMAGE_PLACEHOLDER!r} (as returned by chat())"
                )
            original_roles = history[0]["role"].startswith(ORIGINAL_ROLE_PREFIX)
            content = user_prompt
        else:
            original_roles = False
            message = processing_time_message(metadata, num_frames)
            content = f"{IMAGE_PLACEHOLDER}\n{message.strip()} {user_prompt}" if message else (
                f"{IMAGE_PLACEHOLDER}\n{user_prompt}"
            )
        new_turn = {"role": "user", "content": content}

        video_token = processor.video_token
        messages, video_inserted = [], False
        for turn in [*history, new_turn]:
            text = turn["content"]
            if not video_inserted and IMAGE_PLACEHOLDER in text:
                text = text.replace(IMAGE_PLACEHOLDER, video_token, 1)
                video_inserted = True
            messages.append({"role": normalize_role(turn["role"]), "content": text})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = prompt.replace(video_token, video_token * features.shape[0], 1)
        inputs = tokenizer(prompt, return_tensors="pt")

        device = self.get_input_embeddings().weight.device
        dtype = self.get_input_embeddings().weight.dtype
        generate_kwargs = self._chat_generate_kwargs(generation_config, tokenizer)
        cache, reused = self._chat_prefix_cache(inputs["input_ids"], features, generate_kwargs)
        if cache is not None:
            generate_kwargs[_cache_kwarg()] = cache  # generate runs only the tokens after the cached prefix
        if reused == 0:  # with a reused prefix the video is already in the cache
            encoded = BaseModelOutputWithPooling(pooler_output=(features.to(device=device, dtype=dtype),))
            generate_kwargs["mm_encoder_outputs"] = {"video": encoded}
        with torch.inference_mode():
            output_ids = self.generate(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device),
                **generate_kwargs,
            )
        if cache is not None:  # what the cache holds now: the prompt and the answer but its last token
            self._chat_prefix_state = {
                "ids": output_ids[0, : cache.get_seq_length()].detach().cpu(),
                "cache": cache,
                "features": features,
            }
        new_tokens = output_ids[0, inputs["input_ids"].shape[1] :]
        answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

        user_role, assistant_role = ("<|im_start|>user", "<|im_start|>assistant") if original_roles else (
            "user",
            "assistant",
        )
        history.append({"role": user_role, "content": content})
        history.append({"role": assistant_role, "content": answer})
        if return_history:
            return answer, history
        return answer


def processing_time_message(metadata, num_frames: int) -> str:
    """The original time message of a loaded video ("" when its duration is unknown)."""
    message = _processing_module().time_message_from_metadata(metadata, num_frames)
    return message or ""
