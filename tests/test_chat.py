"""model.chat() (the original conversation API): answers and histories, the cached visual tokens and KV prefix of
follow-ups, and agreement with generate() through the chat template; on the tiny random model and short generated
videos. Streaming and batched generate() are tested in test_modeling.py."""

import os

import pytest
import torch
from media import encode, pattern

from test_modeling import new_tokens, video_messages, videos  # noqa: F401 (videos: a fixture)

from videochat_flash.hub_export import make_tiny_folder
from videochat_flash.tiny_model import tiny_processor
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM

QUESTION = "What is moving in the video?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def model(tiny_dir):
    """Fresh per test: chat() caches visual tokens on the model."""
    return VideoChatFlashForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture()
def processor():
    return tiny_processor()


def count_tower_calls(model):
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_chat_answers_and_follow_up_does_not_rerun_the_vision_tower(model, processor, videos):
    calls = count_tower_calls(model)
    tokenizer = processor.tokenizer
    answer, history = model.chat(videos["main"], tokenizer, QUESTION, return_history=True, max_num_frames=512,
                                 generation_config={"max_new_tokens": 16})
    assert isinstance(answer, str) and answer == answer.strip() and answer
    assert len(calls) == 1
    assert history[0] == {
        "role": "user",
        "content": "<image>\nThe video lasts for 2.00 seconds, and 16 frames are uniformly sampled from it. " + QUESTION,
    }
    assert history[1] == {"role": "assistant", "content": answer}

    second, history2 = model.chat(videos["main"], tokenizer, "And then?", chat_history=history,
                                  generation_config={"max_new_tokens": 16})
    assert history2 is history and len(history) == 4  # extended in place, like the original
    assert history[2:] == [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": second}]
    only_answer = model.chat(videos["main"], tokenizer, "Once more?", chat_history=list(history),
                             return_history=False, generation_config={"max_new_tokens": 4})
    assert isinstance(only_answer, str)
    print(f"\nvision tower forward calls after 3 turns on one video: {len(calls)}")
    assert len(calls) == 1

    # another video, or the same file rewritten, is encoded again
    model.chat(videos["a"], tokenizer, QUESTION, generation_config={"max_new_tokens": 2})
    assert len(calls) == 2
    stat = os.stat(videos["main"])
    os.utime(videos["main"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    model.chat(videos["main"], tokenizer, QUESTION, generation_config={"max_new_tokens": 2})
    assert len(calls) == 3
    model.chat(videos["main"], tokenizer, QUESTION, max_num_frames=8, generation_config={"max_new_tokens": 2})
    assert len(calls) == 4  # other sampling settings, other visual tokens


def test_follow_up_equals_a_fresh_prompt_with_the_whole_history(model, processor, videos):
    """The cached visual tokens give the same answer as rebuilding the conversation from scratch."""
    tokenizer = processor.tokenizer
    settings = {"max_new_tokens": 12}
    first, history = model.chat(videos["main"], tokenizer, QUESTION, generation_config=settings)
    second, _ = model.chat(videos["main"], tokenizer, "And then?", chat_history=history, generation_config=settings)
    messages = video_messages(videos["main"])
    messages += [{"role": "assistant", "content": [{"type": "text", "text": first}]},
                 {"role": "user", "content": [{"type": "text", "text": "And then?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, **settings)
    assert tokenizer.decode(new_tokens(output, inputs)[0], skip_special_tokens=True).strip() == second


def test_generate_through_chat_template_matches_chat(model, processor, videos):
    tokenizer = processor.tokenizer
    seen = {}
    original_generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        out = original_generate(**kwargs)
        seen["output"] = out
        return out

    model.generate = spy
    answer = model.chat(videos["main"], tokenizer, QUESTION, return_history=False,
                        generation_config={"max_new_tokens": 24})
    del model.generate
    chat_new = new_tokens(seen["output"], {"input_ids": seen["input_ids"]})

    inputs = processor.apply_chat_template(video_messages(videos["main"]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24)
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # prompt + new tokens
    assert torch.equal(seen["input_ids"], inputs["input_ids"])  # the same prompt, token for token
    assert torch.equal(chat_new, new_tokens(output, inputs))
    assert tokenizer.decode(new_tokens(output, inputs)[0], skip_special_tokens=True).strip() == answer
    print(f"\nchat() and generate() agree on {chat_new.shape[1]} new tokens: {answer!r}")


def test_original_style_history_and_generation_config(model, processor, videos):
    """The original's role names and its lmms-eval generation settings (temperature 0 without sampling)."""
    tokenizer = processor.tokenizer
    settings = {"max_new_tokens": 8, "temperature": 0.0, "do_sample": False, "top_p": 0.1, "num_beams": 1}
    _, history = model.chat(videos["main"], tokenizer, QUESTION, generation_config=settings,
                                media_dict={"video_read_type": "decord"})
    original = [{"role": "<|im_start|>" + m["role"], "content": m["content"]} for m in history]
    reply, original = model.chat(videos["main"], tokenizer, "And then?", chat_history=original,
                                 generation_config=settings)
    assert [m["role"] for m in original] == ["<|im_start|>user", "<|im_start|>assistant"] * 2
    same, _ = model.chat(videos["main"], tokenizer, "And then?", chat_history=history[:2], generation_config=settings)
    assert reply == same
    with pytest.raises(ValueError, match="the keys are 'start' / 'end'"):
        model.chat(videos["main"], tokenizer, QUESTION, media_dict={"video_read_type": "decord", "begin": 0})
    with pytest.raises(ValueError, match="<image>"):
        model.chat(videos["main"], tokenizer, QUESTION, chat_history=[{"role": "user", "content": "no video"}])


# ----------------------------------------------------------------------------------------------------------------
# chat(): the previous turn's KV cache is reused by a follow-up
# ----------------------------------------------------------------------------------------------------------------
def _chat_model(tiny_dir, **config):
    model = VideoChatFlashForCausalLM.from_pretrained(tiny_dir).eval()
    for key, value in config.items():
        setattr(model.config, key, value)
    lengths, outputs = [], []
    model.model.embed_tokens.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    generate = model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        outputs.append((kwargs["input_ids"][0], out[0]))
        return out

    model.generate = spy
    return model, lengths, outputs


def _common_prefix(a, b):
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


SETTINGS = {"max_new_tokens": 12}


def test_follow_up_runs_only_its_new_tokens_and_answers_like_a_fresh_chat(tiny_dir, videos):
    """Acceptance 3: turn 2 feeds the LLM only the tokens after the longest common prefix with turn 1's prompt +
    answer (counted by a pre-hook on embed_tokens at the first forward), and answers like a new chat with the same
    history and no cache."""
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    model, lengths, outputs = _chat_model(tiny_dir)
    first, history = model.chat(videos["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    prompt1, output1 = outputs[-1]
    assert lengths[0] == prompt1.shape[0]  # turn 1: the whole prompt (16 frames -> 256 visual tokens)

    lengths.clear()
    second, history = model.chat(videos["main"], tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    prompt2, _ = outputs[-1]
    cached = output1[: output1.shape[0] - 1]  # the last generated token is never fed to the model
    expected = prompt2.shape[0] - _common_prefix(cached, prompt2)
    assert lengths[0] == expected
    assert expected < 40 < prompt2.shape[0] / 10  # "<|im_end|>\n<|im_start|>user\nAnd then?..." and a token or so
    third, history = model.chat(videos["main"], tokenizer, "Once more?", chat_history=history, generation_config=SETTINGS)

    fresh, fresh_lengths, _ = _chat_model(tiny_dir)
    same_second, _ = fresh.chat(videos["main"], tokenizer, "And then?", chat_history=[dict(m) for m in history[:2]],
                                generation_config=SETTINGS)
    assert fresh_lengths[0] == prompt2.shape[0]  # no cache: the whole prompt
    assert same_second == second
    fresh.clear_chat_cache()
    same_third, _ = fresh.chat(videos["main"], tokenizer, "Once more?", chat_history=[dict(m) for m in history[:4]],
                               generation_config=SETTINGS)
    assert same_third == third
    print(f"\nturn 2 ran {lengths[0]} of {prompt2.shape[0]} prompt tokens; answers equal fresh runs: "
          f"{second!r}, {third!r}")


def test_prefix_is_not_reused_for_other_visual_tokens_or_with_token_dropping(tiny_dir, videos, tmp_path):
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    model, lengths, outputs = _chat_model(tiny_dir)
    _, history = model.chat(videos["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    # another file with the same frame count and duration: the same prompt ids, other visual tokens
    other = encode(tmp_path / "other.mp4", 16, fps=8, w=48, h=64)
    lengths.clear()
    model.chat(other, tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    assert lengths[0] == outputs[-1][0].shape[0]

    # in-LLM token dropping: drop decisions depend on the question, so every turn is a fresh run, same answers
    model, lengths, outputs = _chat_model(tiny_dir, mm_llm_compress=True)
    _, history = model.chat(videos["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    lengths.clear()
    second, _ = model.chat(videos["main"], tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    assert lengths[0] == outputs[-1][0].shape[0]
    fresh, _, _ = _chat_model(tiny_dir, mm_llm_compress=True)
    assert fresh.chat(videos["main"], tokenizer, "And then?", chat_history=history[:2], generation_config=SETTINGS)[0] == second

    # switched off: no cache kept
    model, lengths, outputs = _chat_model(tiny_dir)
    model.chat_reuse_prefix = False
    _, history = model.chat(videos["main"], tokenizer, QUESTION, generation_config=SETTINGS)
    lengths.clear()
    model.chat(videos["main"], tokenizer, "And then?", chat_history=history, generation_config=SETTINGS)
    assert lengths[0] == outputs[-1][0].shape[0]


def test_chat_on_decoded_frames_uses_the_processors_frame_count(tiny_dir, processor):
    """100 decoded frames: chat() puts 16 x 100 visual tokens in the prompt, as the processor does (frames used as
    given), and answers like generate() on the processor's inputs."""
    model, _, outputs = _chat_model(tiny_dir)
    frames = [pattern(i, 128, 128) for i in range(100)]
    answer = model.chat(frames, processor.tokenizer, QUESTION, return_history=False, generation_config=SETTINGS)
    prompt, _ = outputs[-1]
    assert int((prompt == model.config.video_token_id).sum()) == 16 * 100
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert torch.equal(inputs["input_ids"][0], prompt)  # no duration known: no time message on either path
    output = model.generate(**inputs, **SETTINGS)
    assert processor.decode(new_tokens(output, inputs)[0], skip_special_tokens=True).strip() == answer


def test_chat_after_a_dtype_change_and_bounded_caches(tiny_dir, videos, processor):
    """A model moved to bfloat16 between turns answers the follow-up from a fresh bfloat16 run (no float32 KV cache or
    tokens reused); the token cache keeps at most chat_cache_size videos and none at 0."""
    model, lengths, outputs = _chat_model(tiny_dir)
    _, history = model.chat(videos["main"], processor.tokenizer, QUESTION, generation_config=SETTINGS)
    model.to(torch.bfloat16)
    lengths.clear()
    follow_up, _ = model.chat(videos["main"], processor.tokenizer, "And then?", chat_history=history,
                              generation_config=SETTINGS)
    assert lengths[0] == outputs[-1][0].shape[0]  # the whole prompt: the float32 prefix was not reused
    fresh = VideoChatFlashForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    assert fresh.chat(videos["main"], processor.tokenizer, "And then?", chat_history=history[:2],
                      generation_config=SETTINGS)[0] == follow_up
    model = VideoChatFlashForCausalLM.from_pretrained(tiny_dir).eval()
    model.chat_cache_size = 1
    for key in ("a", "b"):
        model.chat(videos[key], processor.tokenizer, QUESTION, generation_config=SETTINGS)
    assert len(model._chat_feature_cache) == 1 and videos["b"] in next(iter(model._chat_feature_cache))[0]
    model.chat_cache_size = 0
    model.clear_chat_cache()
    model.chat(videos["a"], processor.tokenizer, QUESTION, generation_config=SETTINGS)
    assert len(model._chat_feature_cache) == 0


def test_chat_takes_a_generation_config_object_and_refuses_what_it_cannot_return(model, processor, videos):
    from transformers import GenerationConfig

    as_dict = model.chat(videos["a"], processor.tokenizer, QUESTION, return_history=False,
                         generation_config={"max_new_tokens": 5})
    as_object = model.chat(videos["a"], processor.tokenizer, QUESTION, return_history=False,
                           generation_config=GenerationConfig(max_new_tokens=5))
    assert as_object == as_dict
    for settings in ({"num_return_sequences": 2, "do_sample": True}, {"return_dict_in_generate": True}):
        with pytest.raises(ValueError, match="chat\\(\\) returns one answer"):
            model.chat(videos["a"], processor.tokenizer, QUESTION, generation_config=settings)
