"""The ``videochat-flash`` command line: make-tiny, chat (tiny, folders, default model offline), export, convert,
train dispatch, packaging."""

import io
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
import tomllib
from conftest import REPO_ROOT
from media import encode, free_port

from videochat_flash import videochat_flash_cli
from videochat_flash.hub_export import AUTO_MAP, DEFAULT_MODEL_ID

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("cli_video") / "clip.mp4", 16, fps=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_tiny") / "tiny"
    assert videochat_flash_cli.main(["make-tiny", str(folder)]) == 0
    return folder


def test_make_tiny_writes_a_hub_folder(tiny_dir, capsys):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["vision_config"]["image_size"] == 128
    assert "random" in (tiny_dir / "README.md").read_text()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_chat_with_a_folder_prints_the_answer_and_a_bar_on_terminals_only(tiny_dir, video, capsys, monkeypatch):
    args = ["chat", video, QUESTION, "--model", str(tiny_dir), "--max-frames", "16", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", "8"]
    assert videochat_flash_cli.main(args) == 0
    out, err = capsys.readouterr()
    answer = out.strip()
    assert answer and "\n" not in answer
    assert "Encoding video" not in err and "\r" not in err and "\x1b" not in err  # stderr is no terminal: no bar
    assert "RANDOM" not in err
    print(f"\nCLI answer from the tiny folder: {answer!r}")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert videochat_flash_cli.main(args) == 0
    assert "Encoding video" in terminal.getvalue() and "\r" in terminal.getvalue()  # the tqdm bar on a terminal


def _unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}/clip.mp4"  # a loopback port nothing listens on: no network is touched


def test_chat_names_an_unreachable_url(tiny_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_dir, trust_remote_code=True)
    url = _unreachable_url()
    with pytest.raises(ValueError, match=f"cannot fetch '{url}': .*refused"):
        model.chat(url, AutoTokenizer.from_pretrained(tiny_dir), QUESTION)


def test_chat_log_to_a_pipe_has_no_control_characters(tiny_dir, video):
    env = {key: value for key, value in os.environ.items() if key not in ("VIDEOCHAT_FLASH_DEBUG",
                                                                          "HF_HUB_DISABLE_PROGRESS_BARS")}
    result = subprocess.run([*CLI, "chat", video, QUESTION, "--model", str(tiny_dir), "--max-frames", "16",
                             "--device", "cpu", "--max-new-tokens", "4"], cwd=REPO_ROOT, env=env,
                            capture_output=True, timeout=300, check=False)  # bytes: text mode turns \r into \n
    err = result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    print(f"\nstderr to a pipe: {err!r}")
    assert "\r" not in err and "\x1b" not in err and "Encoding video" not in err and "Loading weights" not in err


def test_chat_model_tiny_is_built_once_and_flagged_random(video, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["chat", video, QUESTION, "--model", "tiny", "--cache-dir", str(cache), "--max-new-tokens", "4"]
    assert videochat_flash_cli.main(args) == 0
    first_out, err = capsys.readouterr()
    assert "RANDOM" in err and "random text" in err
    (built,) = [p for p in cache.iterdir() if p.name.startswith("tiny-")]
    stamp = (built / ".complete").stat().st_mtime_ns
    assert videochat_flash_cli.main(args) == 0
    assert capsys.readouterr()[0] == first_out  # same random model, same answer
    assert (built / ".complete").stat().st_mtime_ns == stamp  # reused, not rebuilt


_SCRIPT = Path(sys.executable).with_name("videochat-flash")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "videochat_flash.videochat_flash_cli"]


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_bad")
    (root / "notes.mp4").write_text("not a video\n" * 50)
    (root / "folder.mp4").mkdir()
    return {"missing": (str(root / "missing.mp4"), "video file not found"),
            "directory": (str(root / "folder.mp4"), "a folder of frames needs"),  # no frames in it
            "text named .mp4": (str(root / "notes.mp4"), "not a readable media file"),
            "http URL": (_unreachable_url(), "Connection refused"),
            "https URL": (_unreachable_url().replace("http:", "https:"), "cannot fetch"),
            "--max-frames 0": (str(root / "notes.mp4"), "positive integer")}


@pytest.mark.parametrize("case", ["unknown option", "missing", "directory", "text named .mp4", "http URL",
                                  "https URL", "--max-frames 0"])
def test_chat_bad_input_fails_fast_on_one_line(case, bad_videos, tiny_dir):
    """Options and the video are checked before torch is imported or a model is loaded: under 2 s, one line."""
    path, needle = bad_videos.get(case, (str(bad_videos["missing"][0]), "unrecognized arguments: --bogus"))
    extra = {"unknown option": ["--bogus"], "--max-frames 0": ["--max-frames", "0"]}.get(case, [])
    start = time.perf_counter()
    result = subprocess.run([*CLI, "chat", path, QUESTION, "--model", str(tiny_dir), *extra], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    seconds = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    print(f"\n{case}: {seconds:.2f} s, rc {result.returncode}: {lines}")
    assert result.returncode != 0 and result.stdout == "" and len(lines) == 1 and needle in lines[0]
    assert lines[0].startswith("videochat-flash") and seconds < 2.0


def test_chat_input_checks_import_neither_torch_nor_transformers(bad_videos, tiny_dir):
    code = ("import sys; from videochat_flash.videochat_flash_cli import main\n"
            f"for path, _ in {list(bad_videos.values())!r}:\n"
            f"    assert main(['chat', path, 'q', '--model', {str(tiny_dir)!r}]) == 1\n"
            "print(sorted(m for m in ('torch', 'transformers', 'tqdm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_default_model_offline_is_one_clear_line(video, tmp_path):
    home = tempfile.mkdtemp(prefix="vcf_cli_hf_home_")
    env = {**os.environ, "HF_HOME": home, "HF_HUB_OFFLINE": "1", "VIDEOCHAT_FLASH_CACHE": str(tmp_path)}
    env.pop("VIDEOCHAT_FLASH_DEBUG", None)
    result = subprocess.run([*CLI, "chat", video, QUESTION], check=False, cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    print(f"\n{lines}")
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert DEFAULT_MODEL_ID in lines[0] and "--model tiny" in lines[0]


def test_missing_video_and_bad_device_are_one_line_errors(tiny_dir, video, tmp_path, capsys, monkeypatch):
    assert videochat_flash_cli.main(["chat", str(tmp_path / "nope.mp4"), QUESTION, "--model", str(tiny_dir)]) == 1
    err = capsys.readouterr()[1].strip()
    assert err.count("\n") == 0 and "video file not found" in err
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert videochat_flash_cli.main(["chat", video, QUESTION, "--model", str(tiny_dir), "--device", "cuda"]) == 1
    err = capsys.readouterr()[1].strip()
    assert err.count("\n") == 0 and "--device cpu" in err


def test_export_and_convert_commands(tiny_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert videochat_flash_cli.main(["export", str(out), "--model", str(tiny_dir), "--max-shard-size", "200KB",
                                     "--base-model", "OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and "video-text-to-text" in config["custom_pipelines"]
    assert (out / "model.safetensors.index.json").exists()
    assert "base_model: OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448" in (out / "README.md").read_text()

    from test_modeling import write_original_format_folder

    from videochat_flash.tiny_model import build_byte_level_tokenizer

    original = tmp_path / "original"
    write_original_format_folder(original)
    build_byte_level_tokenizer().save_pretrained(original)
    converted = tmp_path / "converted"
    assert videochat_flash_cli.main(["convert", str(original), str(converted)]) == 0
    assert json.loads((converted / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert videochat_flash_cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "no config.json" in capsys.readouterr()[1]


def test_train_calls_run_training_lazily(monkeypatch, tmp_path):
    assert not hasattr(videochat_flash_cli, "run_training")  # imported only when training
    calls = []
    fake = types.ModuleType("videochat_flash.training_videochat_flash")
    fake.run_training = calls.append
    monkeypatch.setitem(sys.modules, "videochat_flash.training_videochat_flash", fake)
    config = str(tmp_path / "train.yaml")
    assert videochat_flash_cli.main(["train", config]) == 0
    assert calls == [config]


def test_console_script_and_modules_are_packaged():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["videochat-flash"] == "videochat_flash.videochat_flash_cli:main"
    assert project["tool"]["setuptools"]["package-dir"] == {"videochat_flash": "."}
    with pytest.raises(SystemExit):
        videochat_flash_cli.main(["--help"])
