"""README.md: every Python block runs (tiny model, generated video), the test command is the one .ci/run runs, the
CLI lines parse, and the demo script works (without installing anything)."""

import os
import re
import shlex
import subprocess
import time

import pytest
from conftest import REPO_ROOT
from media import encode
from test_modeling import write_original_format_folder

from videochat_flash import videochat_flash_cli
from videochat_flash.tiny_model import build_byte_level_tokenizer

README = (REPO_ROOT / "README.md").read_text()
CI_RUN = (REPO_ROOT / ".ci" / "run").read_text()
# Lines of README code marked "# <- NAME" hold the values a reader replaces; the test replaces them too.
MARKED_LINE = re.compile(r"^(?P<indent>\s*)(?P<name>\w+) = .*# <- (?P<marker>[A-Z]+)\b.*$", re.MULTILINE)


def code_blocks(language: str) -> list[str]:
    pattern = re.compile(r"^(?P<indent> *)```" + language + r"\n(?P<body>.*?)^(?P=indent)```", re.DOTALL | re.MULTILINE)
    blocks = []
    for match in pattern.finditer(README):
        indent = len(match.group("indent"))
        blocks.append("\n".join(line[indent:] for line in match.group("body").splitlines()))
    return blocks


def substitute(code: str, values: dict[str, str]) -> str:
    def replace(match):
        marker = match.group("marker")
        assert marker in values, f"README marks {marker!r}, which the test does not know"
        return f"{match.group('indent')}{match.group('name')} = {values[marker]!r}"

    return MARKED_LINE.sub(replace, code)


def ci_test_command() -> str:
    commands = [line.strip() for line in CI_RUN.splitlines() if "pytest" in line and not line.strip().startswith("#")]
    assert len(commands) == 1, commands
    return commands[0]


def test_readme_test_command_is_what_ci_runs():
    command = ci_test_command()
    assert command == ".venv/bin/python -m pytest -q tests"
    assert any(block.strip() == command for block in code_blocks("bash")), "README must show the CI test command"


def test_demo_script_installs_like_ci():
    demo = (REPO_ROOT / "scripts" / "demo.sh").read_text()
    # The package's install line (CI adds test-only installs, e.g. DeepSpeed, after it)
    ci_install = [line.strip() for line in CI_RUN.splitlines() if "pip install" in line and " -e " in line]
    demo_install = [line.strip() for line in demo.splitlines() if "pip install" in line and " -e " in line]
    assert len(ci_install) == 1 and ci_install == demo_install  # torch pinned in the same pip call as the package
    assert "bash scripts/demo.sh" in code_blocks("bash")[0]


def test_readme_sections():
    for header in ("## Quick start", "## Install", "## Python usage", "## Published checkpoints", "## Command line",
                   "## Options", "## Performance", "## Fine-tuning", "## Limitations"):
        assert re.search(rf"^{re.escape(header)}\s*$", README, re.MULTILINE), header
    assert "videochat-flash train" in README.split("## Fine-tuning")[1]


def test_readme_cli_lines_parse():
    parser = videochat_flash_cli._parser()
    lines = [line.split("  #")[0].strip() for block in code_blocks("bash") for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("videochat-flash ")]
    assert {c[0] for c in commands} == set(videochat_flash_cli.COMMANDS)  # every subcommand is documented
    for command in commands:
        parser.parse_args(command)


def test_every_python_block_runs(tmp_path, monkeypatch, capsys):
    blocks = code_blocks("python")
    assert len(blocks) >= 6
    video = encode(tmp_path / "clip.mp4", 24, fps=8)
    original = tmp_path / "original"
    write_original_format_folder(original)
    build_byte_level_tokenizer().save_pretrained(original)
    monkeypatch.setenv("VIDEOCHAT_FLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    values = {"MODEL": "tiny", "VIDEO": video, "ORIGINAL": str(original)}
    namespace = {"__name__": "__readme__"}
    timings = []
    for index, block in enumerate(blocks):
        code = substitute(block, values)
        start = time.perf_counter()
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102
        timings.append(time.perf_counter() - start)
    out = capsys.readouterr().out
    assert namespace["answer"] is not None and namespace["output"]
    assert len(namespace["chat_history"]) == 4
    assert (tmp_path / "VideoChat-Flash-Qwen2_5-2B_res448-hf" / "config.json").exists()
    assert (tmp_path / "my-videochat-flash" / "model.safetensors.index.json").exists() or (
        tmp_path / "my-videochat-flash" / "model.safetensors"
    ).exists()
    with capsys.disabled():
        print(f"\nREADME: {len(blocks)} python blocks ran in {sum(timings):.1f} s "
              f"({', '.join(f'{t:.1f}' for t in timings)}); {len(out.splitlines())} lines printed")


@pytest.mark.skipif(not os.access(REPO_ROOT / "scripts" / "demo.sh", os.R_OK), reason="demo script missing")
def test_demo_script_answers_with_the_tiny_model(tmp_path):
    """The demo's video + chat steps, in this environment (DEMO_PYTHON: nothing is installed)."""
    import sys

    env = {**os.environ, "DEMO_PYTHON": sys.executable, "DEMO_DIR": str(tmp_path / "demo"),
           "VIDEOCHAT_FLASH_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "demo.sh")], check=False, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "demo" / "sample.mp4").exists()
    # Third-party libraries may log to stdout (DeepSpeed, when installed, announces its accelerator on import).
    lines = [line for line in result.stdout.strip().splitlines() if not line.startswith("[20")]
    assert lines[0].startswith("sample video:") and len(lines) == 2 and lines[1].strip(), result.stdout
    assert "RANDOM" in result.stderr
    print(f"\ndemo (no install) answered {lines[1]!r} in {time.perf_counter() - start:.1f} s")
