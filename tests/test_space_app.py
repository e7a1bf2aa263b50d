"""app.py, the Gradio demo every Hub folder carries: imported from an exported tiny folder, launched on 127.0.0.1 and
driven with gradio_client (an uploaded video and a question, then a follow-up; a link with token dropping on): the
answers stream, are chat()'s answers, and follow-ups reuse the encoded video; headless Chromium screenshots the page,
which must not be blank. Nothing leaves 127.0.0.1 (Chromium resolves no other host)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import numpy as np
import pytest
from conftest import REPO_ROOT
from media import QuietHandler, band, encode, free_port, serve_folder
from PIL import Image

from videochat_flash.hub_export import make_tiny_folder

QUESTION, FOLLOW_UP = "What is moving in the video?", "And what happens at the end?"
# The README's screenshot command (headless Chromium; --no-sandbox as root; other hosts unresolvable: offline)
CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
            "--virtual-time-budget=20000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


class CountingHandler(QuietHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        CountingHandler.requests.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The app of an exported tiny folder, served on 127.0.0.1, with a counter of video encodings; a clip and a
    loopback HTTP server that serves it."""
    root = tmp_path_factory.mktemp("space")
    folder = make_tiny_folder(root / "tiny")
    clip = encode(root / "clip.mp4", 24, 96, 64, fps=8, frames=band((30, 60, 220)))
    spec = importlib.util.spec_from_file_location("videochat_flash_space_app", folder / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)  # as a Space runs it: a file of the folder, plain imports
    model, tokenizer, fetch = app.load_model(str(folder))
    encodings = []
    encode_video = model.model.get_video_features  # (the causal LM's get_video_features is a property: this)
    model.model.get_video_features = lambda *args, **kwargs: encodings.append(1) or encode_video(*args, **kwargs)
    demo = app.build_demo(model, tokenizer, fetch)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    from gradio_client import Client

    with serve_folder(root, CountingHandler) as files:
        yield {"url": f"http://127.0.0.1:{port}/", "client": Client(f"http://127.0.0.1:{port}/", verbose=False),
               "model": model, "tokenizer": tokenizer, "clip": clip, "encodings": encodings,
               "link": f"{files}/clip.mp4"}
    demo.close()


def _ask(space, question, messages, video=None, link="", dropping=False):
    """One question through the app's API: (intermediate outputs, final conversation)."""
    from gradio_client import handle_file

    job = space["client"].submit(handle_file(video) if video else None, None, link, question, 16, dropping,
                                 messages, api_name="/ask")
    conversation, cleared_question = job.result(timeout=240)
    assert cleared_question == ""
    return job.outputs(), conversation


def _text(message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(block.get("text", "") for block in content)


def _chat_answers(space, video, dropping=False):
    """The answers of chat() itself to the same two questions (a fresh conversation, the model's caches cleared)."""
    model, tokenizer = space["model"], space["tokenizer"]
    model.clear_chat_cache()
    model.config.mm_llm_compress = dropping
    first, history = model.chat(video, tokenizer, QUESTION, max_num_frames=16)
    second, _ = model.chat(video, tokenizer, FOLLOW_UP, chat_history=history, max_num_frames=16)
    model.config.mm_llm_compress = False
    return [first, second]


def test_upload_question_and_follow_up_stream_and_reuse_the_video(space):
    before = len(space["encodings"])
    outputs, conversation = _ask(space, QUESTION, [], video=space["clip"])
    encoded = len(space["encodings"]) - before
    follow_outputs, conversation = _ask(space, FOLLOW_UP, conversation, video=space["clip"])
    print(f"\nupload: {len(outputs)} + {len(follow_outputs)} streamed updates; the video encoded in {encoded} "
          f"chunk(s), then {len(space['encodings']) - before - encoded} more for the follow-up; "
          f"conversation: {[_text(m) for m in conversation]}")
    assert encoded > 0 and len(space["encodings"]) - before == encoded  # the follow-up reused the encoded video
    assert len(outputs) > 2 and len(follow_outputs) > 2  # the answers streamed
    assert [m["role"] for m in conversation] == ["user", "assistant"] * 2
    assert [_text(m) for m in conversation[::2]] == [QUESTION, FOLLOW_UP]
    assert [_text(m) for m in conversation[1::2]] == _chat_answers(space, space["clip"])


def test_link_with_token_dropping_is_fetched_once(space):
    space["model"].clear_chat_cache()
    before, fetched = len(space["encodings"]), len(CountingHandler.requests)
    _, conversation = _ask(space, QUESTION, [], link=space["link"], dropping=True)
    assert space["model"].config.mm_llm_compress is True  # the switch reached the model
    encoded = len(space["encodings"]) - before
    _, conversation = _ask(space, FOLLOW_UP, conversation, link=space["link"], dropping=True)
    print(f"\nlink: {len(CountingHandler.requests) - fetched} download(s), {encoded} encoding chunk(s); "
          f"answers {[_text(m) for m in conversation[1::2]]}")
    assert len(CountingHandler.requests) - fetched == 1 and len(space["encodings"]) - before == encoded
    assert [_text(m) for m in conversation[1::2]] == _chat_answers(space, space["clip"], dropping=True)


def test_bad_asks_are_error_messages(space):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Upload a video or an image, or paste a link"):
        _ask(space, QUESTION, [])
    with pytest.raises(AppError, match="cannot fetch '/etc/hostname': only http\\(s\\) and data: URLs are fetched"):
        _ask(space, QUESTION, [], link="/etc/hostname")  # a link never reads a file of the server


def test_headless_chromium_screenshot_is_not_blank(space, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (Debian's package; .ci/run installs it)")
    readme = (REPO_ROOT / "README.md").read_text()
    assert " ".join(["chromium", *CHROMIUM[:3]]) in readme, "README must show the screenshot command"
    shot = tmp_path / "space.png"
    result = subprocess.run([chromium, *CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                             space["url"]], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    print(f"\nscreenshot {shot}: {pixels.shape[1]}x{pixels.shape[0]}, pixel std {pixels.std():.1f}, {colours} colours")
    assert pixels.shape[:2] == (900, 1280) and pixels.std() > 10 and colours > 100  # a rendered page, not blank
