"""Hub folders of VideoChat-Flash: export, conversion of original checkpoints, the tiny offline model, model lookup.

A Hub folder holds everything ``from_pretrained(..., trust_remote_code=True)`` needs, flat:

* ``config.json`` with ``auto_map`` (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText ->
  ``VideoChatFlashForCausalLM``; AutoProcessor, AutoImageProcessor, AutoVideoProcessor) and
  ``custom_pipelines["video-text-to-text"]``;
* ``generation_config.json`` (eos = ``<|im_end|>``, pad), sharded ``*.safetensors`` (+ index);
* the processor files (``processor_config.json``, tokenizer files, ``chat_template.jinja``);
* the code files, flat (see :data:`CODE_FILES`), and a model card ``README.md``;
* the deploy files (:data:`DEPLOY_FILES`, not remote code): ``handler.py`` (an Inference Endpoints handler),
  ``app.py`` (a Gradio demo, for Spaces) and the ``requirements.txt`` both need beyond those images.

transformers' dynamic-module loader copies only files that the entry file reaches through single-dot relative
imports of sibling files (``from .name import X`` -> ``name.py``), so the ``vision_tower/`` package is flattened into
``vision_tower_<module>.py`` files, their imports rewritten to match (:func:`flat_source`).

Functions: :func:`export_hub_folder`, :func:`convert_original_checkpoint`, :func:`make_tiny_folder`,
:func:`resolve_model` (a folder, a Hub id or ``"tiny"`` -> a loadable folder), :func:`copy_code_files` and
:func:`write_deploy_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent

# source path in this repo -> file name in a Hub folder
CODE_FILES = {
    "configuration_videochat_flash.py": "configuration_videochat_flash.py",
    "modeling_videochat_flash.py": "modeling_videochat_flash.py",
    "token_dropping.py": "token_dropping.py",
    "chat_videochat_flash.py": "chat_videochat_flash.py",
    "streaming_videochat_flash.py": "streaming_videochat_flash.py",
    "vision_tower/umt.py": "vision_tower_umt.py",
    "vision_tower/token_merging.py": "vision_tower_token_merging.py",
    "vision_tower/internvideo2.py": "vision_tower_internvideo2.py",
    "vision_tower/visual_tokens.py": "vision_tower_visual_tokens.py",
    "processing_videochat_flash.py": "processing_videochat_flash.py",
    "video_loading.py": "video_loading.py",
    "frame_sampling.py": "frame_sampling.py",
    "pipeline_videochat_flash.py": "pipeline_videochat_flash.py",
}

# Beside the remote code, for running a folder where users do (not loaded by from_pretrained): source -> name
DEPLOY_FILES = {"handler.py": "handler.py", "app.py": "app.py"}
# What the Inference Endpoints image lacks for the remote code (transformers 5, PyAV); torch and Pillow for Spaces
DEPLOY_REQUIREMENTS = """torch>=2.5
transformers>=5.20,<6
av>=14
pillow
"""

DEFAULT_MODEL_ID = "OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448"
# The published checkpoints' model_type and class names (aliases of ours), so that tools which key on them (e.g.
# optimum-intel's OpenVINO export) recognise our folders too.
MODEL_TYPE, ARCHITECTURE = "videochat_flash_qwen", "VideoChatFlashQwenForCausalLM"
MODEL_CLASS = f"modeling_videochat_flash.{ARCHITECTURE}"
AUTO_MAP = {
    "AutoConfig": "configuration_videochat_flash.VideoChatFlashQwenConfig",
    "AutoModel": MODEL_CLASS,
    "AutoModelForCausalLM": MODEL_CLASS,
    "AutoModelForImageTextToText": MODEL_CLASS,
    "AutoProcessor": "processing_videochat_flash.VideoChatFlashProcessor",
    "AutoImageProcessor": "processing_videochat_flash.VideoChatFlashImageProcessor",
    "AutoVideoProcessor": "processing_videochat_flash.VideoChatFlashVideoProcessor",
}
CUSTOM_PIPELINES = {
    "video-text-to-text": {
        "impl": "pipeline_videochat_flash.VideoTextToTextPipeline",
        "pt": ["AutoModelForCausalLM"],
        "type": "multimodal",
    }
}
DEFAULT_MAX_SHARD_SIZE = "4GB"
TINY_MAX_NEW_TOKENS = 48


class ModelUnavailableError(RuntimeError):
    """A model id or folder that cannot be found or fetched (the message is one line, meant for users)."""


def flat_source(source: str) -> str:
    """The text of package file `source` as it stands in a flat Hub folder: imports of ``vision_tower/`` modules
    (``from .vision_tower.umt import``, and inside that package ``from .token_merging`` / ``from ..configuration_x``)
    become imports of their flattened siblings (``from .vision_tower_umt import``)."""
    text = (REPO_ROOT / source).read_text()
    if source.startswith("vision_tower/"):
        text = re.sub(r"^(\s*)from \.\.(\w)", r"\1from .\2", text, flags=re.M)  # the package's parent: a sibling
        text = re.sub(r"^(\s*)from \.(?!vision_tower_)(\w+) import", r"\1from .vision_tower_\2 import", text,
                      flags=re.M)
    return re.sub(r"^(\s*)from \.vision_tower\.(\w+) import", r"\1from .vision_tower_\2 import", text, flags=re.M)


def copy_code_files(destination) -> list[str]:
    """Write the model, processor, chat, pipeline and vision-tower code flat into `destination`; returns the names."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for source, name in CODE_FILES.items():
        (destination / name).write_text(flat_source(source))
    return list(CODE_FILES.values())


def write_deploy_files(destination) -> list[str]:
    """Write ``handler.py``, ``app.py`` and ``requirements.txt`` into `destination`; returns the names."""
    destination = Path(destination)
    for source, name in DEPLOY_FILES.items():
        shutil.copyfile(REPO_ROOT / source, destination / name)
    (destination / "requirements.txt").write_text(DEPLOY_REQUIREMENTS)
    return [*DEPLOY_FILES.values(), "requirements.txt"]


def code_fingerprint() -> str:
    """Short hash of the code and deploy files (cache folders built from this code are keyed on it)."""
    digest = hashlib.sha256()
    for source in sorted(CODE_FILES) + sorted(DEPLOY_FILES) + ["tiny_model.py", "hub_export.py"]:
        path = REPO_ROOT / source
        digest.update(source.encode())
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ pieces
def _update_json(path: Path, **updates) -> dict:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def _special_ids(processor) -> dict[str, int]:
    from .configuration_videochat_flash import IM_END  # imported here: the CLI starts without the model code

    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    if eos is None or eos == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IM_END!r} token: it is not a Qwen2 chat tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"eos_token_id": eos, "pad_token_id": pad, "video_token_id": processor.video_token_id,
            "image_token_id": processor.image_token_id}


def check_placeholder_ids(processor, vocab_size: int) -> dict[str, int]:
    """Placeholder ids of `processor`'s tokenizer; a clear error when they have no embedding row."""
    ids = _special_ids(processor)
    for kind in ("video", "image"):
        token_id = ids[f"{kind}_token_id"]
        if not 0 <= token_id < vocab_size:
            raise ValueError(
                f"the {kind} placeholder {getattr(processor, f'{kind}_token')!r} gets id {token_id} from the tokenizer "
                f"({len(processor.tokenizer)} tokens), outside the model's embedding table (vocab_size={vocab_size}); "
                "the published checkpoints have spare rows for it: use the checkpoint's own tokenizer"
            )
    return ids


def write_generation_config(destination, processor, base=None, **overrides) -> None:
    """generation_config.json: greedy, eos = <|im_end|>, the tokenizer's pad, `overrides` on top of `base`."""
    import copy

    from transformers import GenerationConfig

    from .configuration_videochat_flash import DEFAULT_MAX_NEW_TOKENS

    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    ids = _special_ids(processor)
    config.eos_token_id = ids["eos_token_id"]
    config.pad_token_id = ids["pad_token_id"]
    if config.max_new_tokens is None and "max_length" not in config.to_diff_dict():
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    for key, value in overrides.items():
        setattr(config, key, value)
    config.save_pretrained(destination)


def model_card(base_model: str | None = None, title: str = "VideoChat-Flash (transformers v5)",
               note: str | None = None) -> str:
    """A model card with Hub metadata (YAML front matter) and usage."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        base_model=base_model,
        tags=["video", "video-understanding", "videochat-flash", "custom_code"],
    )
    model_ref = "MODEL_ID_OR_FOLDER"
    body = f"""
# {title}

VideoChat-Flash ([arXiv 2501.00574](https://arxiv.org/abs/2501.00574)) answers questions about long videos: a UMT
video encoder, a token-merging projector that keeps 16 tokens per frame, and a Qwen2 language model that can drop
visual tokens inside its layers. This folder holds the weights with clean, transformers-5 remote code that runs on
CPU or GPU without flash-attn.
{note or ""}
## Usage

```python
import torch
from transformers import AutoModel, AutoProcessor

model_id = "{model_ref}"
model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=torch.bfloat16).eval()
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

messages = [{{"role": "user", "content": [{{"type": "video", "path": "video.mp4"}},
                                         {{"type": "text", "text": "Describe the video."}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=256)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The original conversation API works too:

```python
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
answer, history = model.chat("video.mp4", tokenizer, "Describe the video.", return_history=True,
                             max_num_frames=512, generation_config={{"max_new_tokens": 256}})
answer, history = model.chat("video.mp4", tokenizer, "What happens next?", chat_history=history)
```

and a pipeline:

```python
from transformers import pipeline

pipe = pipeline("video-text-to-text", model=model_id, trust_remote_code=True)
print(pipe("video.mp4", "Describe the video.", max_new_tokens=256)[0]["generated_text"])
```

Videos and images may be paths, http(s) URLs, `data:` URLs, bytes or file objects everywhere.

## Deploy

`handler.py` is an Inference Endpoints custom handler: it answers `{{"inputs": {{"video": URL | data URL | base64,
"text": "..."}}, "parameters": {{"max_new_tokens": 128}}}}` with `[{{"generated_text": "..."}}]`. `app.py` is a Gradio
demo (`pip install gradio && python app.py` here, or a Gradio Space with `app.py`, `requirements.txt` and the
variable `MODEL_ID` set to this repository). `requirements.txt` holds what both need beyond those images.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def make_hub_loadable(folder, processor, generation_overrides: dict | None = None) -> None:
    """Turn a ``save_pretrained`` model folder into a Hub folder of this package: the processor files, the code
    and deploy files, ``config.json``'s ``auto_map`` / ``custom_pipelines`` / placeholder ids, and
    ``generation_config.json`` (greedy, eos ``<|im_end|>``, on top of the folder's own). Used by export, convert and
    every training save."""
    from transformers import GenerationConfig

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    ids = check_placeholder_ids(processor, config["vocab_size"])
    processor.save_pretrained(folder)
    copy_code_files(folder)  # after the processor, whose save copies (possibly other) module files
    write_deploy_files(folder)
    _update_json(folder / "config.json", auto_map=dict(AUTO_MAP),
                 custom_pipelines=json.loads(json.dumps(CUSTOM_PIPELINES)),
                 architectures=[ARCHITECTURE], model_type=MODEL_TYPE, use_cache=True,
                 video_token_id=ids["video_token_id"], image_token_id=ids["image_token_id"])
    base = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
    write_generation_config(folder, processor, base, **(generation_overrides or {}))


# ------------------------------------------------------------------------------------------------ export
def export_hub_folder(model, processor, destination, *, base_model: str | None = None,
                      max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, generation_overrides: dict | None = None,
                      card_note: str | None = None, write_card: bool = True) -> Path:
    """Write `model` + `processor` as a self-contained Hub folder (see the module docstring).

    Args:
        model: a ``VideoChatFlashForCausalLM`` (from this package or loaded from a Hub folder).
        processor: its ``VideoChatFlashProcessor`` (tokenizer with the placeholder tokens, frame size of the tower).
        destination: folder to write (created; existing files of the same names are replaced).
        base_model: Hub id recorded as ``base_model`` in the model card.
        max_shard_size: largest safetensors shard (``save_pretrained``'s argument).
        generation_overrides: extra ``generation_config.json`` settings.
    Returns:
        The destination path.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    size = processor.video_processor.size
    if (size["height"], size["width"]) != (model.config.image_size, model.config.image_size):
        raise ValueError(
            f"the processor makes {size['height']}x{size['width']} frames but the vision tower takes "
            f"{model.config.image_size} px: build VideoChatFlashVideoProcessor(size={model.config.image_size})"
        )
    ids = check_placeholder_ids(processor, model.config.vocab_size)
    model.config.video_token_id = ids["video_token_id"]
    model.config.image_token_id = ids["image_token_id"]
    model.save_pretrained(destination, max_shard_size=max_shard_size)
    make_hub_loadable(destination, processor, generation_overrides)
    if write_card:
        (destination / "README.md").write_text(model_card(base_model, note=card_note))
    return destination


# ------------------------------------------------------------------------------------------------ tiny
TINY_NOTE = """
> **This is the tiny random test model** (4-layer Qwen2 of width 64, 2-block UMT on 128 px frames, byte-level
> tokenizer). Its weights are random, so its answers are random text. It exists to run the code offline in seconds.
"""


def make_tiny_folder(destination, seed: int = 0, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """The tiny random model (``tiny_model.build_tiny_model``) with its byte-level tokenizer as a Hub folder.

    Its generation config only lets ASCII letters, digits, spaces and ``<|im_end|>`` out, so random answers stay
    readable (and stream token by token).
    """
    from .tiny_model import build_tiny_model, tiny_processor

    model = build_tiny_model(seed)
    processor = tiny_processor()
    eos = _special_ids(processor)["eos_token_id"]
    allowed = {ord(c) for c in " 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"} | {eos}
    suppress = [i for i in range(model.config.vocab_size) if i not in allowed]
    return export_hub_folder(
        model, processor, destination, max_shard_size=max_shard_size, card_note=TINY_NOTE,
        generation_overrides={"max_new_tokens": TINY_MAX_NEW_TOKENS, "suppress_tokens": suppress},
    )


# ------------------------------------------------------------------------------------------------ convert
def is_original_checkpoint(folder) -> bool:
    """True for a folder in the original remote-code format (not written by this package)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    # The published folders share our model_type and auto_map (we keep theirs): our code and pipeline tell them apart.
    return "custom_pipelines" not in config or "chat_videochat_flash.py" not in os.listdir(folder)


def _load_original_tokenizer(source: Path):
    """The checkpoint's tokenizer, read without its config.json (whose model_type transformers does not know)."""
    from transformers import AutoTokenizer

    skip = (".safetensors", ".bin", ".py", ".pt", ".pth", ".index.json")
    with tempfile.TemporaryDirectory(prefix="vcf_tokenizer_") as staging:
        for path in source.iterdir():
            if path.is_file() and path.name != "config.json" and not path.name.endswith(skip):
                os.symlink(path.resolve(), Path(staging) / path.name)
        try:
            return AutoTokenizer.from_pretrained(staging, trust_remote_code=False)
        except Exception as error:
            raise ValueError(f"could not load the tokenizer of {source}: {error}") from error


def _weight_files(source: Path) -> list[Path]:
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {source}: convert needs the checkpoint's safetensors weights (pytorch_model.bin "
            "checkpoints must be re-saved as safetensors first)"
        )
    return files + sorted(source.glob("*.safetensors.index.json"))


def convert_original_checkpoint(source, destination, *, base_model: str | None = None,
                                link_weights: bool = False) -> Path:
    """Turn an original VideoChat-Flash checkpoint folder into a Hub folder of this package.

    The weights keep their names and bytes: the ``*.safetensors`` files (and index) are copied unchanged, or
    symlinked with `link_weights` (used for on-the-fly conversion into a cache). ``config.json`` keeps every original
    field, the original ``model_type`` and ``architectures`` (our classes under the original names), and gains this
    package's ``auto_map``, ``custom_pipelines`` and the placeholder ids of the tokenizer (after adding ``<|video_pad|>``/``<|image_pad|>`` when missing; they must fall
    inside the embedding table). The tokenizer, processor, chat template, generation config, code and model card
    are written beside them.
    """
    from .configuration_videochat_flash import VideoChatFlashQwenConfig
    from .processing_videochat_flash import (
        VideoChatFlashImageProcessor,
        VideoChatFlashProcessor,
        VideoChatFlashVideoProcessor,
    )

    source, destination = Path(source), Path(destination)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json: not a checkpoint folder")
    weights = _weight_files(source)
    original = json.loads((source / "config.json").read_text())
    for key in ("auto_map", "architectures", "model_type", "custom_pipelines", "transformers_version"):
        original.pop(key, None)
    config = VideoChatFlashQwenConfig.from_dict(original)

    tokenizer = _load_original_tokenizer(source)
    processor = VideoChatFlashProcessor(VideoChatFlashImageProcessor.from_model_config(config),
                                        VideoChatFlashVideoProcessor(size=config.image_size), tokenizer)
    ids = check_placeholder_ids(processor, config.vocab_size)
    config.video_token_id, config.image_token_id = ids["video_token_id"], ids["image_token_id"]

    destination.mkdir(parents=True, exist_ok=True)
    for path in weights:
        target = destination / path.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if link_weights:
            os.symlink(path.resolve(), target)
        else:
            shutil.copyfile(path, target)
    config.architectures = [ARCHITECTURE]
    config.save_pretrained(destination)

    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", destination / "generation_config.json")
    if base_model is None:
        base_model = original.get("_name_or_path") if _looks_like_hub_id(original.get("_name_or_path")) else None
    make_hub_loadable(destination, processor)
    (destination / "README.md").write_text(model_card(base_model))
    return destination


# ------------------------------------------------------------------------------------------------ lookup
def default_cache_dir() -> Path:
    """``$VIDEOCHAT_FLASH_CACHE``, else ``$XDG_CACHE_HOME/videochat-flash`` (``~/.cache/videochat-flash``)."""
    if os.environ.get("VIDEOCHAT_FLASH_CACHE"):
        return Path(os.environ["VIDEOCHAT_FLASH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "videochat-flash"


def _looks_like_hub_id(value) -> bool:
    """An ``owner/name`` that huggingface_hub accepts as a repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except (HFValidationError, TypeError):
        return False
    return value.count("/") == 1


def _build_once(target: Path, build) -> Path:
    """Build a cache folder in a temporary sibling and move it into place (safe against interrupted builds)."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        (staging / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_model_folder(cache_dir=None) -> Path:
    """The tiny random model's Hub folder, built on first use in the cache (keyed on this package's code)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _build_once(cache_dir / f"tiny-{code_fingerprint()}", make_tiny_folder)


def converted_folder(source, cache_dir=None) -> Path:
    """An original-format checkpoint converted on the fly into the cache (weights symlinked, not copied)."""
    source = Path(source).resolve()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(str(source).encode() + (source / "config.json").read_bytes()).hexdigest()[:10]
    name = re.sub(r"[^\w.-]", "_", source.name)
    target = cache_dir / "converted" / f"{name}-{digest}-{code_fingerprint()}"
    return _build_once(target, lambda staging: convert_original_checkpoint(source, staging, link_weights=True))


def resolve_model(spec: str | os.PathLike = DEFAULT_MODEL_ID, cache_dir=None) -> Path:
    """A local Hub folder of this package for `spec`.

    Args:
        spec: ``"tiny"`` (the tiny random model, built offline), a local folder (this package's format, or an original
            checkpoint, converted on the fly into the cache), or a Hub id (downloaded with ``huggingface_hub``; an
            original-format repository is converted on the fly as well).
    Raises:
        ModelUnavailableError: a one-line explanation when the model can be neither found nor fetched.
    """
    if str(spec) == "tiny":
        return tiny_model_folder(cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"{path} is not a model folder (no config.json)")
        return converted_folder(path, cache_dir) if is_original_checkpoint(path) else path
    if not _looks_like_hub_id(str(spec)):
        raise ModelUnavailableError(f"model {str(spec)!r} is neither a folder nor a Hub id (use --model tiny to try "
                                    "the offline tiny model)")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(spec)))
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, gated, network...
        reason = " ".join(str(error).split()).split(". ")[0][:200] or type(error).__name__
        raise ModelUnavailableError(
            f"could not fetch {spec!r} from the Hugging Face Hub ({type(error).__name__}: {reason}); "
            "run with --model tiny for the offline tiny model, or pass a local checkpoint folder"
        ) from None
    return converted_folder(folder, cache_dir) if is_original_checkpoint(folder) else folder
