"""CI check of the lmms-eval plugin: the offline tasks through the ``lmms-eval`` CLI with the tiny model.

    python3 scripts/ci_lmms_eval.py            # from the repository root; exits non-zero on any failure

1. Sets up its own virtual environment (``$LMMS_EVAL_VENV``, default ``.venv-eval``; the main ``.venv`` stays
   without lmms-eval): CPU torch 2.13.0, lmms-eval 0.7.3 with ``filelock<4``, this package with its ``[eval]``
   extra, and removes the CUDA build of torchvision that lmms-eval pulls from PyPI (it breaks imports on CPU).
2. Runs ``lmms-eval --model videochat_flash_hf --model_args pretrained=tiny --tasks videochat_flash_offline``
   (generated clips, ``--batch_size 2``: batched ``generate``, ``loglikelihood`` with the video encoded once per
   question, two-round ``generate_until_multi_round``).
3. Fails unless the results file holds the three tasks' metrics and they equal what this script computes on its
   own, one question at a time with the package's processor and model (no lmms-eval, no adapter), as do every
   answer, option loss and round of the samples files. (The CLI exits 0 even when an evaluation fails.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("LMMS_EVAL_VENV", ROOT / ".venv-eval"))
TASKS = ROOT / "eval" / "lmms_eval_tasks"
REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "lmms-eval==0.7.3", "filelock<4", "-e", ".[eval]"]
GROUP, MC, PPL, ROUNDS = ("videochat_flash_offline", "videochat_flash_offline_mc", "videochat_flash_offline_mcppl",
                          "videochat_flash_offline_multi_round")
MC_KWARGS = {"question_prefix": "Question: ", "post_prompt": "\nOnly give the best option."}  # the mc task's YAML


def log(message: str) -> None:
    print(f"[ci_lmms_eval] {message}", flush=True)


def pip(python: Path, *arguments: str) -> None:
    """A quiet pip call; its stderr is shown without the notes about unusable local index folders."""
    command = [str(python), "-m", "pip", *arguments, "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, text=True, check=False)
    noise = "is ignored: it is neither a file nor a directory"
    sys.stderr.write("".join(line for line in done.stderr.splitlines(keepends=True) if noise not in line))
    if done.returncode:
        raise SystemExit(f"FAIL: pip {' '.join(arguments)} exited with {done.returncode}")


def ensure_venv() -> Path:
    """The evaluation environment's Python (created on the first run; an up-to-date one is kept)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip(python, "install", *REQUIREMENTS)  # torch pinned in the same call: pip takes its CPU wheel (as .ci/run)
    pip(python, "uninstall", "-y", "torchvision")  # PyPI's build needs CUDA; nothing here uses it
    return python


def run_cli(python: Path, output: Path, env: dict) -> None:
    command = [str(VENV / "bin" / "lmms-eval"), "--model", "videochat_flash_hf", "--model_args", "pretrained=tiny",
               "--tasks", GROUP, "--include_path", str(TASKS), "--batch_size", "2", "--log_samples",
               "--output_path", str(output)]
    log(" ".join(command[1:]))
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def task_utils():
    """The tasks' utils.py, loaded from its file as lmms-eval loads it (the clips and the scorers)."""
    spec = importlib.util.spec_from_file_location("videochat_flash_task_utils", TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_scores() -> dict:
    """Answers, option losses and two-round answers of the offline docs, one question per call of the package's
    processor + model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor
    from videochat_flash.hub_export import resolve_model

    utils = task_utils()
    folder = resolve_model("tiny")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    docs = [json.loads(line) for line in (TASKS / "videochat_flash_offline.jsonl").read_text().splitlines()]

    def prompt(doc, text):
        video = {"type": "video", "path": utils.offline_clip(doc)}
        video.update({key: float(doc[key]) for key in ("start", "end") if doc.get(key) is not None})
        messages = [{"role": "user", "content": [video, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt", processor_kwargs={"max_num_frames": 512})

    def answer(doc, text, max_new_tokens):
        inputs = prompt(doc, text)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    answers, losses, rounds = {}, {}, {}
    with torch.inference_mode():
        for doc in docs:
            answers[doc["id"]] = answer(doc, utils.candidates_doc_to_text(doc, MC_KWARGS), 16)
            rounds[doc["id"]] = [answer(doc, doc["question"], 8), answer(doc, utils.OFFLINE_FOLLOW_UP, 8)]
            inputs, doc_losses = prompt(doc, doc["question"]), []
            for option in doc["candidates"]:
                ids = torch.tensor([processor.tokenizer(option, add_special_tokens=False)["input_ids"]])
                full = torch.cat([inputs["input_ids"], ids], 1)
                logits = model(**{**inputs, "input_ids": full, "attention_mask": torch.ones_like(full)}).logits
                n = inputs["input_ids"].shape[1]
                doc_losses.append(float(torch.nn.functional.cross_entropy(logits[0, n - 1 : -1], ids[0])))
            losses[doc["id"]] = doc_losses
    mc = utils.candidates_aggregate_results(
        [utils.offline_process_results(doc, [answers[doc["id"]]])["offline_accuracy"] for doc in docs])
    ppl = utils.accuracy_aggregate_results([utils.offline_process_results_ppl(
        doc, [(loss, False) for loss in losses[doc["id"]]])["accuracy"] for doc in docs])
    two_rounds = sum(utils.offline_process_results_rounds(doc, [rounds[doc["id"]]])["offline_rounds"] for doc in docs)
    return {"docs": docs, "answers": answers, "losses": losses, "rounds": rounds, MC: mc, PPL: ppl,
            ROUNDS: two_rounds / len(docs)}


def read_outputs(output: Path) -> tuple[dict, dict]:
    results_files = sorted(output.rglob("*_results.json"))
    if not results_files:
        raise SystemExit(f"FAIL: lmms-eval wrote no results file under {output} (the evaluation failed)")
    results = json.loads(results_files[-1].read_text())["results"]
    samples = {}
    for task in (MC, PPL, ROUNDS):
        files = sorted(output.rglob(f"*_samples_{task}.jsonl"))
        if not files:
            raise SystemExit(f"FAIL: no samples file for {task} under {output}")
        samples[task] = {row["doc_id"]: row for row in map(json.loads, files[-1].read_text().splitlines())}
    return results, samples


def check(results: dict, samples: dict, expected: dict) -> list[str]:
    """What differs between lmms-eval's outputs and the expected ones (empty: all good)."""
    problems = []
    for task, metric in ((MC, "offline_accuracy,none"), (PPL, "accuracy,none"), (ROUNDS, "offline_rounds,none")):
        value = results.get(task, {}).get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value - expected[task]) > 1e-9:
            problems.append(f"{task} {metric} = {value!r}, expected {expected[task]!r}")
        else:
            log(f"{task} {metric} = {value} (expected {expected[task]})")
    docs = expected["docs"]
    covered = {task: sorted(samples[task]) for task in (MC, PPL, ROUNDS)}
    if any(doc_ids != list(range(len(docs))) for doc_ids in covered.values()):
        problems.append(f"samples cover docs {covered}, expected 0..{len(docs) - 1} for each task")
        return problems
    utils = task_utils()
    for index, doc in enumerate(docs):
        reply = samples[MC][index]["filtered_resps"]
        reply = reply[0] if isinstance(reply, list) else reply
        if reply != expected["answers"][doc["id"]]:
            alone = expected["answers"][doc["id"]]
            problems.append(f"doc {index}: lmms-eval answered {reply!r}, generate alone {alone!r}")
        scores = [loss for loss, _ in utils.loglikelihood_scores(samples[PPL][index]["filtered_resps"])]
        want = expected["losses"][doc["id"]]
        if len(scores) != len(want) or any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in zip(scores, want)):
            problems.append(f"doc {index}: lmms-eval option losses {scores}, one question at a time {want}")
        rounds, alone = samples[ROUNDS][index]["filtered_resps"], expected["rounds"][doc["id"]]
        if rounds != alone:
            problems.append(f"doc {index}: lmms-eval rounds {rounds!r}, generate alone {alone!r}")
    return problems


def main() -> int:
    started = time.time()
    if Path(sys.prefix).resolve() != VENV.resolve():  # set up the environment, then run this script inside it
        python = ensure_venv()
        log(f"environment ready in {time.time() - started:.0f} s")
        return subprocess.run([str(python), __file__, *sys.argv[1:]], cwd=ROOT, check=False).returncode
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="ci_lmms_eval_") as scratch:
        env["HF_HOME"] = os.environ["HF_HOME"] = str(Path(scratch) / "hf_home")  # nothing from ~/.cache
        for name, folder in (("VIDEOCHAT_FLASH_OFFLINE_CLIPS", "clips"), ("VIDEOCHAT_FLASH_CACHE", "models")):
            env[name] = os.environ[name] = str(Path(scratch) / folder)
        run_cli(Path(sys.executable), Path(scratch) / "out", env)
        results, samples = read_outputs(Path(scratch) / "out")
        expected = expected_scores()
        problems = check(results, samples, expected)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    log(f"{'FAILED' if problems else 'passed'} in {time.time() - started:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
