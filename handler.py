"""Inference Endpoints handler of a VideoChat-Flash Hub folder (a custom handler: ``EndpointHandler``).

Request (JSON)::

    {"inputs": {"video": "https://.../clip.mp4",            # or a data: URL, or base64 (or "image": ...)
                "text": "What happens in the video?",
                "messages": [...]},                          # optional: earlier turns, in chat-template format
     "parameters": {"max_new_tokens": 128, "max_num_frames": 64}}

Response: ``[{"generated_text": "..."}]``; a bad request gets ``{"error": "..."}``. ``parameters`` are what the
folder's ``video-text-to-text`` pipeline takes: generation settings and the processor's (``max_num_frames``,
``num_frames``, ``fps``, ``max_image_tiles``). Media come as http(s) URLs, data URLs or base64, never as paths on
the server. The Endpoint toolkit imports this file as a top-level module of the model folder, so it imports only
torch and transformers; the model and processor load from that folder as its remote code.
"""

import base64
import binascii

import torch
from transformers import pipeline

MEDIA_KINDS = ("video", "image")
SOURCE_KEYS = ("url", "path", "base64")  # where a chat-template block may hold its media, besides its kind's key


class BadRequest(ValueError):
    """A request this handler cannot answer; its message goes back to the caller."""


def media_source(kind: str, value) -> str:
    """What the model reads for a request's video or image: an http(s) or data: URL as it is, base64 as a data URL."""
    if isinstance(value, str) and value[:8].lower().startswith(("http://", "https://", "data:")):
        return value
    try:
        base64.b64decode("".join(value.split()), validate=True)  # (a path is not base64: "/a/clip.mp4", "clip.mp4")
    except (AttributeError, binascii.Error):
        raise BadRequest(f"the {kind} must be an http(s) URL, a data: URL or base64 (paths on the server are not "
                         "read)") from None
    return f"data:application/octet-stream;base64,{value}"  # (the content tells what it is)


def _block(block):
    """A chat-template content block with its video or image, wherever it was given, as ``url``."""
    if not isinstance(block, dict) or block.get("type") not in MEDIA_KINDS:
        return block
    kind = block["type"]
    keys = [key for key in (kind, *SOURCE_KEYS) if key in block]
    if len(keys) != 1:
        raise BadRequest(f"a {kind} block needs one of {', '.join((kind, *SOURCE_KEYS))}, got {sorted(block)}")
    rest = {key: value for key, value in block.items() if key != keys[0]}  # e.g. a video's start / end seconds
    return {**rest, "url": media_source(kind, block[keys[0]])}


def conversation(inputs) -> list[dict]:
    """The chat messages of a request's ``inputs``: its ``messages``, then a user turn of its video / image and
    text (when it has them); a string is the text alone."""
    inputs = {"text": inputs} if isinstance(inputs, str) else inputs
    if not isinstance(inputs, dict) or not inputs or set(inputs) - {*MEDIA_KINDS, "text", "messages"}:
        raise BadRequest("inputs must be a question or a dict of 'video' / 'image', 'text' and 'messages', got "
                         + (f"keys {sorted(inputs)}" if isinstance(inputs, dict) else type(inputs).__name__))
    messages = inputs.get("messages") or []
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                 for m in messages):
        raise BadRequest("messages must be a list of {'role': ..., 'content': ...} dicts")
    messages = [{**m, "content": [_block(b) for b in m["content"]] if isinstance(m["content"], list) else m["content"]}
                for m in messages]
    content = [_block({"type": kind, kind: inputs[kind]}) for kind in MEDIA_KINDS if kind in inputs]
    if "text" in inputs:
        if not isinstance(inputs["text"], str):
            raise BadRequest(f"text must be a string, got {type(inputs['text']).__name__}")
        content.append({"type": "text", "text": inputs["text"]})
    if content:
        messages.append({"role": "user", "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise BadRequest("the request needs a question: inputs.text, or messages that end with a user turn")
    return messages


class EndpointHandler:
    """``EndpointHandler(path)(data)``: the model of the folder at `path` answers a request (see the module)."""

    def __init__(self, path: str = ""):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.pipe = pipeline("video-text-to-text", model=path or ".", trust_remote_code=True, device=device,
                             dtype=dtype)

    def __call__(self, data: dict):
        try:
            if not isinstance(data, dict) or "inputs" not in data:
                raise BadRequest("the request must be a JSON object with 'inputs' (and optional 'parameters')")
            parameters = data.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise BadRequest(f"parameters must be an object, got {type(parameters).__name__}")
            outputs = self.pipe(conversation(data["inputs"]), **parameters)
        except (ValueError, TypeError) as error:  # bad requests: bad media, unknown or bad parameters (server faults
            # such as a full disk propagate: the toolkit answers them as its own errors)
            return {"error": " ".join(str(error).split()) or type(error).__name__}
        return [{"generated_text": output["generated_text"]} for output in outputs]
