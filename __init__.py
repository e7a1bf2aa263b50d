"""VideoChat-Flash for transformers v5: the repository root is this package (``videochat_flash``).

The main classes are importable from here; they are loaded on first access, so ``import videochat_flash`` (and the
CLI) stay fast.
"""

import importlib

_EXPORTS = {
    "VideoChatFlashConfig": "configuration_videochat_flash",
    "VideoChatFlashForCausalLM": "modeling_videochat_flash",
    "VideoChatFlashModel": "modeling_videochat_flash",
    "VideoChatFlashProcessor": "processing_videochat_flash",
    "VideoChatFlashVideoProcessor": "processing_videochat_flash",
    "load_video": "video_loading",
    "encode_video_streaming": "streaming_videochat_flash",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
