"""handler.py, the Inference Endpoints handler every Hub folder carries: imported from an exported tiny folder in a
fresh process where this package is blocked (as the Endpoint toolkit imports it), it answers base64, data-URL and
chat-message requests as the folder's pipeline does, and bad requests get an error message, not a traceback."""

from __future__ import annotations

import base64
import json
import tomllib

from media import encode, image, pattern
from test_hub_export import original_folder, run_isolated  # noqa: F401 - original_folder is a fixture

from videochat_flash.hub_export import DEPLOY_FILES, REPO_ROOT, convert_original_checkpoint, make_tiny_folder

QUESTION = "What is moving in the video?"


def test_exported_and_converted_folders_carry_the_deploy_files(tmp_path, original_folder):  # noqa: F811
    converted = convert_original_checkpoint(original_folder[0], tmp_path / "converted")
    exported = make_tiny_folder(tmp_path / "tiny")
    for folder in (exported, converted):
        assert {*DEPLOY_FILES.values(), "requirements.txt"} <= {path.name for path in folder.iterdir()}
        requirements = (folder / "requirements.txt").read_text().splitlines()
        assert "transformers>=5.20,<6" in requirements and "av>=14" in requirements
        assert not any(line.startswith("torchvision") for line in requirements)
    # the same pins as the package's own requirements (one bump, both places)
    package = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(requirements) <= {line.split(";")[0].strip() for line in package}, (requirements, package)


def test_handler_answers_requests_in_a_fresh_process(tmp_path):
    folder = make_tiny_folder(tmp_path / "tiny")
    clip = encode(tmp_path / "clip.mp4", 16, fps=8)
    photo = image(tmp_path / "photo.png", pattern(2, 80, 60))
    video_b64 = base64.b64encode(open(clip, "rb").read()).decode()
    photo_url = "data:image/png;base64," + base64.b64encode(open(photo, "rb").read()).decode()
    parameters = {"max_new_tokens": 6, "max_num_frames": 16}
    requests = {
        "base64 video": {"inputs": {"video": video_b64, "text": QUESTION}, "parameters": parameters},
        "data-URL image": {"inputs": {"image": photo_url, "text": "What is in the image?"}, "parameters": parameters},
        "follow-up": {"inputs": {"messages": [
            {"role": "user", "content": [{"type": "video", "base64": video_b64}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "A pattern."}], "text": "And then?"}, "parameters": parameters},
        "server path": {"inputs": {"video": clip, "text": QUESTION}},
        "unknown key": {"inputs": {"vidoe": video_b64, "text": QUESTION}},
        "no question": {"inputs": {"messages": [{"role": "assistant", "content": "Ask me."}]}},
        "no inputs": {"parameters": parameters},
        "not a video": {"inputs": {"video": base64.b64encode(b"junk" * 100).decode(), "text": QUESTION}},
        "unknown parameter": {"inputs": {"video": video_b64, "text": QUESTION}, "parameters": {"bogus": 1}},
    }
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    result = run_isolated(
        f"""
        import json
        sys.path.insert(0, {str(folder)!r})  # as the Endpoint toolkit imports it: a top-level module of the folder
        from handler import EndpointHandler
        from transformers import pipeline

        handler = EndpointHandler({str(folder)!r})
        answers = {{name: handler(request) for name, request in json.load(open("requests.json")).items()}}
        pipe = pipeline("video-text-to-text", model={str(folder)!r}, trust_remote_code=True)
        answers["pipeline"] = pipe({clip!r}, {QUESTION!r}, max_new_tokens=6, max_num_frames=16)
        answers["package_modules"] = sorted(set(sys.modules) & set(PACKAGE))
        json.dump(answers, open("answers.json", "w"))
        """,
        cwd=tmp_path,
    )
    answers = json.loads((tmp_path / "answers.json").read_text())
    for name, answer in answers.items():
        print(f"\n{name}: {answer}", end="")
    assert answers.pop("package_modules") == []
    assert answers["base64 video"] == [{"generated_text": answers["pipeline"][0]["generated_text"]}]
    for name in ("data-URL image", "follow-up"):
        assert isinstance(answers[name], list) and isinstance(answers[name][0]["generated_text"], str), name
    errors = {name: answer["error"] for name, answer in answers.items() if isinstance(answer, dict)}
    assert set(errors) == {"server path", "unknown key", "no question", "no inputs", "not a video", "unknown parameter"}
    assert "paths on the server are not read" in errors["server path"] and "'vidoe'" in errors["unknown key"]
    assert "needs a question" in errors["no question"] and "'inputs'" in errors["no inputs"]
    assert "not a readable media file" in errors["not a video"] and "bogus" in errors["unknown parameter"]
    assert all("\n" not in error and "Traceback" not in error for error in errors.values())
    assert "Traceback" not in result.stderr
