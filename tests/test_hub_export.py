"""hub_export: Hub folders (exported and loaded in a fresh process where this package is not importable; their size
and shape), conversion of original-format checkpoints (golden logits), model lookup; the package's sources (no
CUDA-only device call, flash_attn imported only under try:)."""

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT
from media import encode
from test_modeling import expand_golden_ids, write_original_format_folder

from videochat_flash.hub_export import (
    AUTO_MAP,
    CODE_FILES,
    CUSTOM_PIPELINES,
    DEPLOY_FILES,
    ModelUnavailableError,
    convert_original_checkpoint,
    export_hub_folder,
    is_original_checkpoint,
    resolve_model,
)
from videochat_flash.tiny_model import build_byte_level_tokenizer, build_tiny_model, tiny_processor

QUESTION = "What is moving in the video?"
# top-level modules of this package (blocked in the isolated process)
PACKAGE_MODULES = {"videochat_flash"}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_isolated(code: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Python in a fresh process: cwd elsewhere, repo off sys.path, fresh HF_HOME, offline."""
    home = tempfile.mkdtemp(prefix="vcf_export_hf_home_")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=home, HF_MODULES_CACHE=os.path.join(home, "modules"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    # Off sys.path, and blocked outright: an editable install (as .ci/run makes) would import them from anywhere.
    prelude = textwrap.dedent(f"""
        import importlib.abc, sys
        sys.path[:] = [p for p in sys.path if p not in ('', '.', {str(REPO_ROOT)!r})]
        PACKAGE = {sorted(PACKAGE_MODULES)!r}

        class BlockPackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in PACKAGE:
                    raise ImportError(name + " (this package) is blocked here")
                return None

        sys.meta_path.insert(0, BlockPackage())
        """)
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], check=False, cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model (seed 3) exported with small shards, plus a video and the model's own logits on it."""
    root = tmp_path_factory.mktemp("export")
    model = build_tiny_model(seed=3)
    processor = tiny_processor()
    folder = export_hub_folder(model, processor, root / "hub", max_shard_size="300KB",
                               base_model="OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448")
    video = encode(root / "clip.mp4", 16, fps=8)
    messages = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    return {"root": root, "folder": folder, "video": video, "inputs": dict(inputs), "logits": logits,
            "model": model, "processor": processor}


def test_export_folder_layout_and_metadata(exported):
    folder = exported["folder"]
    names = set(os.listdir(folder))
    assert set(CODE_FILES.values()) <= names
    assert {"config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "README.md", "model.safetensors.index.json"} <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and all(n.startswith("model-0") for n in shards)
    assert {*DEPLOY_FILES.values(), "requirements.txt"} <= names  # handler.py, app.py: deploy files, not remote code
    assert not [n for n in names if n.endswith(".py") and n not in {*CODE_FILES.values(), *DEPLOY_FILES.values()}]

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for key in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
        assert key in config["auto_map"]
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert config["custom_pipelines"]["video-text-to-text"]["impl"] == "pipeline_videochat_flash.VideoTextToTextPipeline"
    # every remote-code reference names a class defined in a code file of the folder
    for reference in [*config["auto_map"].values(), config["custom_pipelines"]["video-text-to-text"]["impl"]]:
        module, name = reference.split(".")
        assert re.search(rf"^class {name}\b", (folder / f"{module}.py").read_text(), re.MULTILINE), reference
    # the published checkpoints' model_type and architectures (our classes under their names), for tools keyed on them
    assert config["model_type"] == "videochat_flash_qwen" and config["architectures"] == ["VideoChatFlashQwenForCausalLM"]
    assert (config["video_token_id"], config["image_token_id"]) == (259, 260)

    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 258 and generation["pad_token_id"] == 256  # <|im_end|>, <|endoftext|>

    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_videochat_flash.VideoChatFlashProcessor"
    assert processor_config["video_processor"]["auto_map"]["AutoVideoProcessor"] == (
        "processing_videochat_flash.VideoChatFlashVideoProcessor"
    )
    assert processor_config["video_processor"]["size"] == {"height": 128, "width": 128}

    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "video-text-to-text" and meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448"
    assert "trust_remote_code=True" in card and ".chat(" in card


def test_exported_folder_loads_in_a_fresh_process(exported, tmp_path):
    """Where this package is not importable: remote-code classes, same logits, chat(), both pipelines."""
    torch.save(exported["inputs"], tmp_path / "inputs.pt")
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline
        folder, video = {str(exported["folder"])!r}, {str(exported["video"])!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        inputs = torch.load("inputs.pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits, "logits.pt")
        card_model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        answer, history = card_model.chat(video, tokenizer, {QUESTION!r}, return_history=True,
                                          generation_config={{"max_new_tokens": 8}})
        pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True)
        piped = pipe(video, {QUESTION!r}, max_new_tokens=8)
        stock = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        messages = [{{"role": "user", "content": [{{"type": "video", "path": video}},
                                                 {{"type": "text", "text": {QUESTION!r}}}]}}]
        stocked = stock(text=messages, max_new_tokens=8)
        json.dump({{"module": type(model).__module__, "card_module": type(card_model).__module__,
                   "pipeline": type(pipe).__module__ + "." + type(pipe).__name__, "answer": answer,
                   "history_roles": [m["role"] for m in history], "piped": piped,
                   "stock": stocked[0]["generated_text"][-1]["content"],
                   "package_modules": sorted(set(sys.modules) & set(PACKAGE))}}, open("result.json", "w"))
        """,
        cwd=tmp_path,
    )
    got = json.loads((tmp_path / "result.json").read_text())
    assert got["module"].startswith("transformers_modules") and got["card_module"].startswith("transformers_modules")
    assert got["package_modules"] == []
    logits = torch.load(tmp_path / "logits.pt")
    difference = (logits - exported["logits"]).abs().max().item()
    print(f"\nfresh-process logits vs in-process: max |diff| = {difference:.3g}; pipeline: {got['pipeline']}")
    assert difference == 0.0
    assert got["pipeline"].startswith("transformers_modules") and got["pipeline"].endswith("VideoTextToTextPipeline")
    assert got["history_roles"] == ["user", "assistant"]
    # the same greedy answer three ways: chat(), our pipeline, the stock image-text-to-text pipeline
    assert got["piped"] == [{"input_text": QUESTION, "generated_text": got["answer"]}]
    assert got["stock"].strip() == got["answer"]
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ convert
@pytest.fixture(scope="module")
def original_folder(tmp_path_factory):
    """An original-format checkpoint folder (golden weights, original config/auto_map) with its tokenizer."""
    folder = tmp_path_factory.mktemp("orig") / "VideoChat-Flash-golden"
    tensors = write_original_format_folder(folder)
    for name in os.listdir(folder):  # the published folders carry the original code, not ours
        if name.endswith(".py"):
            os.remove(folder / name)
    config = json.loads((folder / "config.json").read_text())
    config.pop("video_token_id")  # the original config has no placeholder id
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    build_byte_level_tokenizer().save_pretrained(folder)
    return folder, tensors


def test_convert_reproduces_golden_logits_with_unchanged_weights(original_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    source, tensors = original_folder
    assert is_original_checkpoint(source)
    destination = convert_original_checkpoint(source, tmp_path / "converted")
    assert not is_original_checkpoint(destination)
    assert sha256(source / "model.safetensors") == sha256(destination / "model.safetensors")
    config = json.loads((destination / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["custom_pipelines"] == CUSTOM_PIPELINES
    assert config["model_type"] == original["model_type"] == "videochat_flash_qwen"
    assert config["architectures"] == original["architectures"] == ["VideoChatFlashQwenForCausalLM"]
    assert (config["video_token_id"], config["image_token_id"]) == (
        259, 260)
    for key in ("mm_vision_tower", "mm_projector_type", "mm_local_num_frames", "hidden_size", "vocab_size"):
        assert config[key] == original[key]
    assert json.loads((destination / "generation_config.json").read_text())["eos_token_id"] == 258
    from transformers import AutoProcessor  # images are tiled the checkpoint's way

    image_processor = AutoProcessor.from_pretrained(destination, trust_remote_code=True).image_processor
    assert image_processor.image_aspect_ratio == original["image_aspect_ratio"] == "anyres_nopad"
    assert image_processor.image_grid_pinpoints == original["image_grid_pinpoints"]

    model = AutoModelForCausalLM.from_pretrained(destination, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules")
    pixels = tensors["input.pixel_values"]
    input_ids = expand_golden_ids(tensors["input.input_ids"], 16 * pixels.shape[0])
    with torch.no_grad():
        logits = model(input_ids, pixel_values_videos=pixels[None], use_cache=False).logits
        generated = model.generate(input_ids, pixel_values_videos=pixels[None], max_new_tokens=8, min_new_tokens=8)
    difference = (logits - tensors["output.prefill_logits"]).abs().max().item()
    print(f"\nconverted original checkpoint: max |logits - golden| = {difference:.3g}")
    assert difference < 1e-4
    assert generated[0, input_ids.shape[1]:].tolist() == tensors["output.generated_ids"][0].tolist()


def test_original_folder_is_converted_on_the_fly(original_folder, tmp_path):
    source, _ = original_folder
    folder = resolve_model(source, cache_dir=tmp_path / "cache")
    assert folder != source and (folder / "model.safetensors").is_symlink()
    assert (folder / "model.safetensors").resolve() == (source / "model.safetensors").resolve()
    assert resolve_model(source, cache_dir=tmp_path / "cache") == folder  # reused
    assert resolve_model(folder) == folder  # already in this package's format


def test_convert_rejects_placeholders_outside_the_vocabulary(original_folder, tmp_path):
    source, _ = original_folder
    small = tmp_path / "small"
    small.mkdir()
    for name in os.listdir(source):
        os.symlink(source / name, small / name)
    config = json.loads((source / "config.json").read_text())
    config["vocab_size"] = 259  # 259 tokens, so <|video_pad|> gets id 259
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"id 259 .*vocab_size=259"):
        convert_original_checkpoint(small, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_models_give_one_line_errors(tmp_path):
    with pytest.raises(ModelUnavailableError, match="--model tiny") as error:
        resolve_model("OpenGVLab/no-such-model-offline", cache_dir=tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(ModelUnavailableError, match="no config.json"):
        resolve_model(tmp_path, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        (tmp_path / "config.json").write_text("{}")
        convert_original_checkpoint(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------------------ the shipped code
def test_hub_code_is_small_flat_and_acyclic(exported):
    """The remote code of a Hub folder (not its deploy files): at most 4,050 lines (3,000 when one path per concept was
    set up; image tiles, the InternVideo2 tower, placeholder ids from the tokenizer, segments / frame folders / GIFs
    added ~550, decoder layers in pieces for long sequences ~65, inputs from URLs, data URLs, bytes and files ~120,
    ATen's int8 kernel for torchao decode steps ~50, batched token dropping without device waits ~100, pixels made on
    an accelerator, bit-exact with Pillow, ~120, the visual side's builders shared with the vLLM plugin ~35, which
    leaves the plugin as much shorter), no
    function over 80 lines, flat single-dot relative imports of sibling files only; and no import cycle among this
    package's modules."""
    import ast

    files = sorted(path for path in exported["folder"].glob("*.py") if path.name not in DEPLOY_FILES.values())
    assert {path.name for path in files} == set(CODE_FILES.values())
    lengths = {path.name: len(path.read_text().splitlines()) for path in files}
    longest = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and (exported["folder"] / f"{node.module}.py").is_file(), (path.name, node.module)
    print(f"\nHub code: {sum(lengths.values())} lines in {len(files)} files; longest function {max(longest)}")
    assert sum(lengths.values()) <= 4050, lengths
    assert max(longest)[0] <= 80, sorted(longest)[-5:]

    graph = {}  # each module of the package (dotted, relative to the repo root) -> the package modules it imports
    for path in [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("vision_tower/*.py")]:
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                package = module.split(".")[: len(module.split(".")) - node.level]
                graph[module].add(".".join([*package, node.module]))
    state = {}

    def visit(module, stack):
        assert state.get(module) != "open", "import cycle: " + " -> ".join([*stack, module])
        if state.get(module) is None and module in graph:
            state[module] = "open"
            for target in sorted(graph[module]):
                visit(target, [*stack, module])
            state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert {"chat_videochat_flash", "configuration_videochat_flash"} <= graph["modeling_videochat_flash"]


CUDA_CALL = ".cuda" + "()"  # spelled in two parts so this file does not contain the call it forbids


def test_no_cuda_calls_and_guarded_flash_attn():
    """No source of this package calls the CUDA-only device method (any device goes through .to()); flash_attn is
    imported only inside a try: (transformers' remote-code loader requires every unguarded import to be installed)."""
    sources = [p for p in REPO_ROOT.rglob("*.py") if not any(part.startswith(".venv") for part in p.parts)
               and "tests" not in p.parts]
    for path in sources:
        text = path.read_text()
        assert CUDA_CALL not in text, path
        for match in re.finditer(r"^(\s*)(import flash_attn|from flash_attn)", text, flags=re.MULTILINE):
            preceding = text[: match.start()].splitlines()[-3:]
            assert match.group(1) and any(line.strip().startswith("try:") for line in preceding), path
