"""pipeline_videochat_flash: the video-text-to-text pipeline of a Hub folder (tiny model, a generated clip)."""

import pytest
from media import encode
from transformers import pipeline

from videochat_flash.hub_export import make_tiny_folder

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def folder_and_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return str(make_tiny_folder(root / "model")), encode(root / "clip.mp4", 16, fps=8)


def test_video_text_to_text_pipeline_inputs(folder_and_video):
    folder, video = folder_and_video
    pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True)
    assert pipeline(model=folder, trust_remote_code=True).task == "video-text-to-text"
    single = pipe(video, QUESTION, max_new_tokens=6)
    assert single == pipe({"video": video, "text": QUESTION}, max_new_tokens=6)
    chat = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": QUESTION}]}]
    full = pipe(chat, max_new_tokens=6, return_full_text=True)[0]["generated_text"]
    assert full[:-1] == chat and full[-1] == {"role": "assistant", "content": single[0]["generated_text"]}
    several = pipe([video, video], [QUESTION, "Another question?"], max_new_tokens=6, max_num_frames=8)
    # a batch answers each video as it is answered alone
    assert several == [pipe(video, q, max_new_tokens=6, max_num_frames=8) for q in (QUESTION, "Another question?")]
    with pytest.raises(TypeError, match="unexpected"):
        pipe(video, QUESTION, not_an_option=1)
    with pytest.raises(ValueError, match="one question per video"):
        pipe([video, video], [QUESTION])
