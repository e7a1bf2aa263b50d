"""Requests per second: 8 concurrent short-video chat requests to ``vllm serve`` (the plugin) vs the same 8 requests
answered one after another by this package's processor + ``generate``, on this machine, with the tiny model (a
128-wide LLM: vLLM's CPU attention needs head size >= 32).

    python bench/bench_vllm.py          # any python3; uses .venv (the package) and .venv-vllm (scripts/check_vllm.sh)

Each request: a 4-second clip (32 frames at 8 fps -> 32 sampled frames, 512 visual tokens) and a question, 16 greedy
new tokens (eos masked). Both sides decode the video per request; vLLM's startup and one warm-up request are not
timed, nor the package's model loading and its warm-up request. Each side runs 3 rounds and its best counts (the
machine may be shared). Prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import check_vllm  # the check's fixtures and server helpers

REQUESTS, NEW_TOKENS = 8, 16
ROUNDS = 3  # each side's best round is reported: the machine is shared, a slow round says little
CLIP = (32, 8, 160, 120)  # frames, fps, width, height
QUESTION = "What is moving in the video?"


def make_fixtures(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from media import band, encode

    check_vllm.make_tiny_vllm_folder(work / "tiny-vllm")
    frames, fps, width, height = CLIP
    for i in range(REQUESTS + 1):  # + the warm-up clip
        encode(work / f"clip{i}.mp4", frames, width, height, fps, frames=band((20 * i, 200 - 20 * i, 90)))


def clips(work: Path) -> list[Path]:
    return [work / f"clip{i}.mp4" for i in range(REQUESTS + 1)]


def package_side(work: Path) -> float:
    """Requests per second of the package answering the requests one after another."""
    import torch

    model, processor = check_vllm.load_package_model(work / "tiny-vllm")

    def answer(video: Path) -> None:
        messages = check_vllm.first_video_messages({"video": str(video), "question": QUESTION})
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    warm_up, *videos = clips(work)
    answer(warm_up)

    def one_round() -> float:
        start = time.perf_counter()
        for video in videos:
            answer(video)
        return len(videos) / (time.perf_counter() - start)

    return max(one_round() for _ in range(ROUNDS))


def vllm_side(work: Path) -> float:
    """Requests per second of ``vllm serve`` with the requests sent at once."""
    port, folder = check_vllm.free_port(), str(work / "tiny-vllm")
    with open(work / "serve.log", "w") as log_file:
        server = check_vllm.start_server(folder, port, work, log_file)
        try:
            check_vllm.wait_until_ready(server, port)
            warm_up, *videos = clips(work)
            check_vllm.chat_completion(port, folder, warm_up, QUESTION, NEW_TOKENS)
            return max(concurrent_round(port, folder, videos) for _ in range(ROUNDS))
        finally:
            check_vllm.stop_server(server)


def concurrent_round(port: int, folder: str, videos: list[Path]) -> float:
    """Requests per second of one round: every request sent at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(videos)) as pool:
        replies = list(pool.map(lambda v: check_vllm.chat_completion(port, folder, v, QUESTION, NEW_TOKENS), videos))
    elapsed = time.perf_counter() - start
    if any(len(reply["choices"][0]["token_ids"]) != NEW_TOKENS for reply in replies):
        raise SystemExit("a vLLM reply does not have the expected number of tokens")
    return len(videos) / elapsed


def run_side(python: Path, side: str, work: Path) -> float | None:
    if not python.exists():
        print(f"{python} is missing (scripts/check_vllm.sh makes .venv-vllm; .ci/run makes .venv)")
        return None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    result = work / f"{side}.json"
    subprocess.run([str(python), __file__, "--side", side, str(work)], check=True, env=env)
    return json.loads(result.read_text())["requests_per_second"] if result.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["fixtures", "package", "vllm"], help="(internal) one side of the bench")
    parser.add_argument("work", type=Path, nargs="?")
    arguments = parser.parse_args()
    if arguments.side == "fixtures":
        return make_fixtures(arguments.work)
    if arguments.side:
        rate = {"package": package_side, "vllm": vllm_side}[arguments.side](arguments.work)
        (arguments.work / f"{arguments.side}.json").write_text(json.dumps({"requests_per_second": rate}))
        return None
    main_python, vllm_python = ROOT / ".venv" / "bin" / "python", ROOT / ".venv-vllm" / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as folder:
        work = Path(folder)
        run_side(main_python, "fixtures", work)
        package = run_side(main_python, "package", work)
        served = run_side(vllm_python, "vllm", work)
    frames, fps, width, height = CLIP
    print(f"\n{REQUESTS} requests, each a {frames / fps:.0f} s {width}x{height} clip ({frames} frames) + a question, "
          f"{NEW_TOKENS} new tokens, tiny model, float32, {os.cpu_count()} CPUs")
    print(f"package generate, one request after another: {package:.2f} requests/s (best of {ROUNDS} rounds)")
    print(f"vLLM (plugin), {REQUESTS} concurrent requests:    {served:.2f} requests/s (best of {ROUNDS} rounds)")
    print(f"ratio vLLM / package: {served / package:.2f}x")


if __name__ == "__main__":
    main()
