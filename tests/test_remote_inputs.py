"""Videos and images from anywhere (video_loading.fetch_media): http(s) URLs (a loopback server the tests start),
data URLs, bytes and file objects give what the path gives, in load_video, the processor's blocks and chat();
errors are one line naming the source, never its bytes; local copies are removed once unused."""

from __future__ import annotations

import base64
import gc
import glob
import io
import os
import tempfile

import numpy as np
import pytest
import torch
from media import encode, free_port, image, pattern, serve_folder

import videochat_flash.video_loading as vl
from videochat_flash.tiny_model import build_tiny_model, tiny_processor
from videochat_flash import video_loading
from videochat_flash.video_loading import VideoSegment, fetch_media, is_still_image, iter_video_chunks, load_video

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A clip and a photo, their bytes, and a loopback HTTP server serving their folder."""
    root = tmp_path_factory.mktemp("remote")
    clip = encode(root / "clip.mp4", 24, 96, 64, fps=8)
    photo = image(root / "photo.png", pattern(3, 90, 60))
    with serve_folder(root) as base:
        yield {"clip": clip, "photo": photo, "base": base, "root": root,
               "clip_bytes": open(clip, "rb").read(), "photo_bytes": open(photo, "rb").read()}


def sources(media, kind: str) -> dict:
    """The same video (kind "clip") or image ("photo") given every remote way."""
    path, data = media[kind], media[f"{kind}_bytes"]
    media_type = "video/mp4" if kind == "clip" else "image/png"
    return {"http URL": f"{media['base']}/{os.path.basename(path)}",
            "data URL": f"data:{media_type};base64,{base64.b64encode(data).decode()}",
            "bytes": data, "file object": open(path, "rb"), "BytesIO": io.BytesIO(data)}


def local_copies() -> set[str]:
    gc.collect()
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "videochat_flash_*")))


def test_video_sources_give_the_frames_of_the_path(media):
    before = local_copies()
    expected, expected_meta = load_video(media["clip"])
    for name, source in sources(media, "clip").items():
        frames, meta = load_video(source)
        assert np.array_equal(frames, expected), name
        assert (meta.frame_indices, meta.fps, meta.duration) == (
            expected_meta.frame_indices, expected_meta.fps, expected_meta.duration), name
        print(f"\n{name}: {frames.shape[0]} frames equal to the path's; metadata names it {meta.path!r}", end="")
        del frames, meta
    assert local_copies() == before  # every local copy removed once its frames were read


def test_a_lazy_reader_keeps_its_local_copy_until_it_is_done(media):
    before = local_copies()
    meta, chunks = iter_video_chunks(f"{media['base']}/clip.mp4", 4)
    (copy,) = local_copies() - before
    assert os.path.getsize(copy) == len(media["clip_bytes"])
    assert np.array_equal(np.concatenate(list(chunks)), load_video(media["clip"])[0])
    del meta, chunks
    assert local_copies() == before


def test_image_sources_are_images_everywhere(media):
    """is_still_image knows them (chat() and the pipeline tile them), and load_video reads them as the image."""
    assert is_still_image(f"{media['base']}/photo.png?size=large") and not is_still_image(f"{media['base']}/clip.mp4")
    expected, _ = load_video(media["photo"])
    for name, source in sources(media, "photo").items():
        assert is_still_image(source), name
        assert np.array_equal(load_video(source)[0], expected), name
    for name, source in sources(media, "clip").items():
        assert not is_still_image(source), name


def _pixels(processor, kind: str, source):
    block = {"type": kind, "url" if isinstance(source, str) else kind: source}
    messages = [{"role": "user", "content": [block, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    return inputs["input_ids"], inputs["pixel_values_videos" if kind == "video" else "pixel_values"]


@pytest.mark.parametrize("kind", ["video", "image"])
def test_processor_blocks_take_every_source(media, kind):
    processor = tiny_processor()
    path = media["clip" if kind == "video" else "photo"]
    ids, pixels = _pixels(processor, kind, path)
    for name, source in sources(media, "clip" if kind == "video" else "photo").items():
        got_ids, got_pixels = _pixels(processor, kind, source)
        assert torch.equal(got_ids, ids) and torch.equal(got_pixels, pixels), name


def test_chat_takes_every_source(media):
    model = build_tiny_model(seed=1)
    processor = tiny_processor()
    config = {"max_new_tokens": 6}
    for kind in ("clip", "photo"):
        expected = model.chat(media[kind], processor.tokenizer, QUESTION, return_history=False,
                              generation_config=config, processor=processor)
        for name, source in sources(media, kind).items():
            answer = model.chat(source, processor.tokenizer, QUESTION, return_history=False,
                                generation_config=config, processor=processor)
            assert answer == expected, (kind, name)
        print(f"\nchat() about the {kind}: {expected!r} from the path and from each remote source", end="")


def test_chat_follow_ups_about_a_url_fetch_it_once(media):
    """chat() keeps a URL's visual tokens under the URL: a follow-up question neither downloads nor encodes again."""
    model, processor = build_tiny_model(seed=1), tiny_processor()
    url, fetches = f"{media['base']}/clip.mp4", []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(video_loading, "fetch_media", lambda source: fetches.append(source) or fetch_media(source))
        answer, history = model.chat(url, processor.tokenizer, QUESTION, generation_config={"max_new_tokens": 4},
                                     processor=processor)
        model.chat(url, processor.tokenizer, "And then?", chat_history=history, generation_config={"max_new_tokens": 4},
                   processor=processor)
    assert fetches == [url] and len(model._chat_feature_cache) == 1
    # a segment of the same URL is other tokens: cached beside the whole video's, not mistaken for them
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(video_loading, "fetch_media", lambda source: fetches.append(source) or fetch_media(source))
        model.chat(url, processor.tokenizer, QUESTION, generation_config={"max_new_tokens": 4}, processor=processor,
                   media_dict={"start": 0.0, "end": 1.0})
    assert len(fetches) == 2 and len(model._chat_feature_cache) == 2


def test_an_unreachable_url_is_a_one_line_error_naming_it():
    url = f"http://127.0.0.1:{free_port()}/clip.mp4"  # nothing listens there
    for load in (load_video, tiny_processor().video_processor):
        with pytest.raises(ValueError) as error:
            load(url)
        message = str(error.value)
        print(f"\n{message}", end="")
        assert message.startswith(f"cannot fetch {url!r}: ") and "\n" not in message and "refused" in message


def test_errors_name_the_source_never_its_bytes(media, monkeypatch):
    missing = f"{media['base']}/missing.mp4"
    with pytest.raises(ValueError, match=rf"cannot fetch '{missing}': HTTP Error 404"):
        load_video(missing)
    junk = b"not a video at all" * 40
    payload = base64.b64encode(junk).decode()
    for source, start in [(f"data:video/mp4;base64,{payload}", "cannot read video <data:video/mp4;base64 URL of 982 "
                                                               "characters>: not a readable media file"),
                          (f"data:video/mp4;base64,{payload[:-1]}", "cannot fetch <data:video/mp4;base64 URL of 981 "
                                                                    "characters>: Incorrect padding"),
                          (junk, "cannot read video <720 bytes>: not a readable media file")]:
        with pytest.raises(ValueError) as error:
            load_video(source)
        message = str(error.value)
        print(f"\n{message}", end="")
        assert message.startswith(start) and "\n" not in message, message
        assert payload[:40] not in message and "not a video at all" not in message
    (media["root"] / "notes.txt").write_text("some notes\n")
    with open(media["root"] / "notes.txt") as text_file, pytest.raises(  # a text-mode file object
            ValueError, match=r"cannot fetch <file object '.*notes.txt'>: a bytes-like object is required"):
        load_video(text_file)
    for local in ("file:///etc/hostname", "/etc/hostname"):  # never a file of the machine, by any name
        with pytest.raises(ValueError, match=f"cannot fetch '{local}': only http\\(s\\) and data: URLs are fetched"):
            fetch_media(local)
    monkeypatch.setattr(vl, "MAX_FETCH_BYTES", 1000)
    before = local_copies()
    for source in (f"{media['base']}/clip.mp4", media["clip_bytes"]):
        with pytest.raises(ValueError, match=r"cannot fetch .*: it is larger than video_loading.MAX_FETCH_BYTES "
                                             r"\(1,000 bytes\)"):
            fetch_media(source)
    assert local_copies() == before  # nothing left behind by failed fetches


def test_urls_of_other_schemes_are_refused():
    with pytest.raises(ValueError, match=r"only http\(s\) and data: URLs are fetched: download .rtsp://cam/live. first"):
        load_video("rtsp://cam/live")


def test_segments_of_remote_sources(media):
    """A segment (start / end seconds) of bytes, a file object or a URL: the path's segment, in load_video and in a
    processor block."""
    processor = tiny_processor()

    def block_pixels(source):
        key = "path" if isinstance(source, str) else "video"
        messages = [{"role": "user", "content": [{"type": "video", key: source, "start": 0.5, "end": 2.0},
                                                 {"type": "text", "text": QUESTION}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt")["pixel_values_videos"]

    expected, meta = load_video(media["clip"], start=0.5, end=2.0)
    expected_pixels = block_pixels(media["clip"])
    for name, source in sources(media, "clip").items():
        frames, got = load_video(source, start=0.5, end=2.0)
        assert np.array_equal(frames, expected) and got.duration == meta.duration == 1.5, name
        if hasattr(source, "seek"):
            source.seek(0)
        assert torch.equal(block_pixels(source), expected_pixels), name
    assert repr(VideoSegment(media["clip_bytes"], 0.5, 2.0)) == "VideoSegment(<13,885 bytes>, start=0.5, end=2.0)"
