"""Task functions of the VideoChat-Flash lmms-eval tasks (``--include_path eval/lmms_eval_tasks``).

The prompts are those of the original VideoChat-Flash fork of lmms-eval (``lmms-eval_videochat/lmms_eval/tasks``),
which produced the paper's numbers; data locations and, where they agree with the fork, the scoring functions are
lmms-eval's own (imported when a task calls them, so that lmms-eval's task indexing, which imports this file for
every YAML, stays cheap). ``videochat_flash_offline_*`` run on clips generated here, without any download.
"""

import ast
import json
import os
import re
import string
import tempfile
from pathlib import Path

LETTERS = string.ascii_uppercase
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------- data locations
def hf_cache(*parts: str) -> str:
    """A path under lmms-eval's video cache, ``$HF_HOME`` (``~/.cache/huggingface``), where ``dataset_kwargs:
    {video: True, cache_dir: ...}`` puts a benchmark's videos."""
    return os.path.join(os.path.expanduser(os.getenv("HF_HOME", "~/.cache/huggingface")), *parts)


def first_existing(candidates: list[str]) -> str:
    """The first candidate path that exists, else the first (the decoder then says which file is missing)."""
    return next((path for path in candidates if os.path.exists(path)), candidates[0])


def options_text(options, line: str) -> str:
    """Options lettered A, B, ... with `line` (e.g. ``"({letter}) {option}\\n"``), concatenated."""
    return "".join(line.format(letter=LETTERS[i], option=option) for i, option in enumerate(options))


# ---------------------------------------------------------------------------------- candidates (MVBench, MLVU, LVBench)
def candidates_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The fork's MVBench / MLVU prompt: ``"Question: " + question + "\\nOption:\\n(A) ...\\n" + post_prompt``
    (``question_prefix``: MVBench ``"Question: "``, MLVU ``"Question:"``)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return (kwargs.get("question_prefix", "Question: ") + doc["question"] + "\nOption:\n"
            + options_text(doc["candidates"], "({letter}) {option}\n") + kwargs.get("post_prompt", ""))


def lvbench_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The fork's LVBench prompt: question, ``"A. ...\\n"`` options (its candidates keep their own ``"(A)"``), then
    the post prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    options = options_text(doc["candidates"], "{letter}. {option}\n")
    return doc["question"] + "\n" + options + kwargs.get("post_prompt", "")


def _candidates_result(metric: str, doc, results) -> dict:
    """The fork's (and lmms-eval's MVBench) scoring: the answer's letter among the candidates vs the parsed reply."""
    from lmms_eval.tasks.mvbench.utils import mcq_acc

    truth = next((LETTERS[i] for i, c in enumerate(doc["candidates"]) if c == doc["answer"]), None)
    score = mcq_acc(truth, results[0]) if truth is not None else 0
    return {metric: {"pred_answer": results[0], "gt_answer": truth, "score": score}}


def mvbench_process_results(doc, results):
    return _candidates_result("mvbench_accuracy", doc, results)


def mlvu_process_results(doc, results):
    return _candidates_result("mlvu_mc_accuracy", doc, results)


def lvbench_process_results(doc, results):
    return _candidates_result("lvbench_mc_accuracy", doc, results)


def offline_process_results(doc, results):
    return _candidates_result("offline_accuracy", doc, results)


def candidates_aggregate_results(results):
    """Percent correct among answered questions (a non-empty reply), as the fork and lmms-eval's MVBench."""
    answered = [result for result in results if result["pred_answer"] != ""]
    return 100 * sum(result["score"] for result in answered) / len(answered) if answered else 0


def mvbench_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """lmms-eval's MVBench videos (the ``video`` revision of OpenGVLab/MVBench, clip segments already cut)."""
    from lmms_eval.tasks.mvbench.utils import mvbench_doc_to_visual as upstream

    return upstream(doc, lmms_eval_specific_kwargs)


def mlvu_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """MLVU/MVLU's videos: ``$HF_HOME/mlvu_mc/MLVU/video/<sub_task>/<video>``."""
    task = lmms_eval_specific_kwargs["sub_task"]
    return [first_existing([hf_cache("mlvu_mc", "MLVU", "video", task, doc["video"]),
                            hf_cache("mlvu_mc", "video", task, doc["video"])])]


def lvbench_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """LVBench videos named by the fork's ``video`` ids, in ``$VIDEOCHAT_FLASH_LVBENCH_DIR`` (``$HF_HOME/lvbench``):
    ``<id>.mp4`` (or a frame folder ``<id>/``, the fork's layout); the frame cap of the original run, 640."""
    root = os.getenv("VIDEOCHAT_FLASH_LVBENCH_DIR") or hf_cache("lvbench")
    name = doc["video"]
    path = first_existing([os.path.join(root, f"{name}.mp4"), os.path.join(root, "videos", f"{name}.mp4"),
                           os.path.join(root, name)])
    return [path, {"max_num_frames": (lmms_eval_specific_kwargs or {}).get("max_num_frames", 640)}]


# ------------------------------------------------------------------------------------------------------------ Video-MME
VIDEOMME_INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video{extra}. "
                        "Respond with only the letter (A, B, C, or D) of the correct option.")


def videomme_doc_to_visual(doc):
    """lmms-lab/Video-MME's videos: ``$HF_HOME/videomme/data/<videoID>.mp4`` (or .MP4 / .mkv)."""
    stem = hf_cache("videomme", "data", doc["videoID"])
    return [first_existing([f"{stem}.mp4", f"{stem}.MP4", f"{stem}.mkv"])]


def _videomme_question(doc) -> str:
    return "Question: " + doc["question"] + "\nOption:\n" + "\n".join(doc["options"])


def videomme_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The fork's Video-MME prompt (frames only)."""
    post_prompt = (lmms_eval_specific_kwargs or {}).get("post_prompt", "The best answer is:")
    return ("These are the frames of a video. " + VIDEOMME_INSTRUCTION.format(extra="") + "\n"
            + _videomme_question(doc) + post_prompt)


def videomme_subtitles(doc) -> str | None:
    """The text lines of a video's whole subtitle file (None without a file)."""
    path = hf_cache("videomme", "subtitle", doc["videoID"] + ".srt")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        lines = [re.findall(r'<font color="white" size=".72c">(.*?)</font>', line) for line in handle]
    return "\n".join(found[0] for found in lines if found)


def videomme_subtitle_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The fork's Video-MME prompt with subtitles (the whole file)."""
    subtitles = videomme_subtitles(doc)
    head = "" if subtitles is None else "This video's subtitles are listed below: \n" + subtitles
    if subtitles:
        intro, extra = "These are the frames and subtitles of a video. ", " and the subtitles"
    else:
        intro, extra = "These are the frames of a video. ", ""
    return head + "\n" + intro + VIDEOMME_INSTRUCTION.format(extra=extra) + "\n" + _videomme_question(doc) + (
        "\nThe best answer is:")


def videomme_answer_letter(reply: str) -> str:
    """The fork's reading of a reply: answer phrases removed, then the first A-D ("" for a long reply without)."""
    # (the fork's list, where two pairs of strings run together for want of a comma)
    for prefix in ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option isThe correct option is", "Best answer:Best option:"):
        reply = reply.replace(prefix, "")
    reply = reply.strip()
    if len(reply.split()) > 10 and not re.search("[ABCD]", reply):
        return ""
    match = re.search("[ABCD]", reply)
    return match[0] if match else ""


def videomme_process_results(doc, results):
    """lmms-eval's Video-MME record (its aggregation reports per duration, domain and task type), scored with the
    fork's letter reading."""
    from lmms_eval.tasks.videomme.utils import videomme_process_results as upstream

    output = upstream(doc, results)
    record = output["videomme_perception_score"]
    record["pred_answer"] = videomme_answer_letter(results[0])
    record["score"] = float(record["pred_answer"] == doc["answer"])
    return output


def videomme_aggregate_results(results):
    from lmms_eval.tasks.videomme.utils import videomme_aggregate_results as upstream

    return upstream(results)


# ------------------------------------------------------------------------------------------------------ LongVideoBench
LONGVIDEOBENCH_DIR = ("datasets", "longvideobench")  # lmms-eval's cache_dir for longvideobench/LongVideoBench


def longvideobench_doc_to_visual(doc):
    return [hf_cache(*LONGVIDEOBENCH_DIR, "videos", doc["video_path"])]


def longvideobench_subtitles(doc, max_num_frames: int = 512) -> str:
    """The subtitles shown at the frames the fork's prompt assumes (``max_num_frames`` timestamps over the video),
    one per line (lmms-eval's interleaving without its frame markers)."""
    from lmms_eval.tasks.longvideobench.utils import compute_frame_timestamps, insert_subtitles_into_frames

    name = doc["subtitle_path"]
    english = name if name.endswith("_en.json") else name.replace(".json", "_en.json")
    path = first_existing([hf_cache(*LONGVIDEOBENCH_DIR, "subtitles", english),
                           hf_cache(*LONGVIDEOBENCH_DIR, "subtitles", name)])
    with open(path, encoding="utf-8") as handle:
        subtitles = json.load(handle)
    timestamps = compute_frame_timestamps(doc["duration"], max_num_frames)
    lines = insert_subtitles_into_frames(timestamps, subtitles, doc["starting_timestamp_for_subtitles"],
                                         doc["duration"]).split("\n")
    return "\n".join(line for line in lines if line != "<image>")


def longvideobench_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The fork's LongVideoBench prompt (``val_v`` with interleaved subtitles)."""
    kwargs = lmms_eval_specific_kwargs or {}
    options = [doc[f"option{i}"] for i in range(5) if doc.get(f"option{i}", "N/A") != "N/A"]
    question = doc["question"] + "\n" + "\n".join(f"({LETTERS[i]}). {option}" for i, option in enumerate(options))
    subtitles = longvideobench_subtitles(doc, kwargs.get("max_num_frames", 512))
    return (f"{kwargs.get('pre_prompt', '')} This video's subtitles are listed below: \n{subtitles}.\n Select the best "
            "answer to the following multiple-choice question based on the video and the subtitles. Respond with only "
            f"the letter of the correct option.\nQuestion: {question}\n{kwargs.get('post_prompt', '')}")


def longvideobench_process_results(doc, results):
    from lmms_eval.tasks.longvideobench.utils import longvideobench_process_results as upstream

    return upstream(doc, results)


def longvideobench_aggregate_results(results):
    from lmms_eval.tasks.longvideobench.utils import longvideobench_aggregate_results as upstream

    return upstream(results)


# ------------------------------------------------------------------------------------------------------ Perception Test
def perceptiontest_doc_to_visual(doc):
    """lmms-lab/PerceptionTest_Val's videos: ``$HF_HOME/perceptiontest_val/videos/<video_name>.mp4``."""
    stem = hf_cache("perceptiontest_val", "videos", doc["video_name"])
    return [first_existing([f"{stem}.mp4", f"{stem}.MP4"])]


def perceptiontest_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The fork's Perception Test prompt: ``"\\nQuestion: " + question + "\\n(A). ..." + "\\nOnly give the best
    option."``."""
    kwargs = lmms_eval_specific_kwargs or {}
    options = "".join(f"\n({LETTERS[i]}). {option}" for i, option in enumerate(doc["options"]))
    return f"{kwargs.get('pre_prompt', '')}\nQuestion: {doc['question']}{options}\nOnly give the best option."


def perceptiontest_doc_to_choice(doc):
    return list(doc["options"])


def perceptiontest_doc_to_answer(doc):
    return int(doc["answer_id"])


def perceptiontest_process_results(doc, results):
    from lmms_eval.tasks.perceptiontest.val.utils import perceptiontest_val_process_results_mc as upstream

    return upstream(doc, results)


def loglikelihood_scores(results) -> list[tuple[float, bool]]:
    """A doc's ``(loss, is_greedy)`` per option. lmms-eval 0.7.3 hands them to process_results as their ``str()``
    (``unwrap_generation_output`` turns every non-text model output into a string), so strings are read back."""
    return [ast.literal_eval(result) if isinstance(result, str) else tuple(result) for result in results]


def ppl_record(doc, results, truth: int) -> dict:
    """The option of the lowest mean negative log-likelihood (what the model's loglikelihood returns)."""
    losses = [loss for loss, _ in loglikelihood_scores(results)]
    predicted = min(range(len(losses)), key=losses.__getitem__)
    return {"pred_id": predicted, "answer_id": truth, "correct": int(predicted == truth)}


def perceptiontest_process_results_ppl(doc, results):
    record = ppl_record(doc, results, int(doc["answer_id"]))
    return {"accuracy": {"video_name": doc["video_name"], "question_id": doc.get("question_id"), **record}}


def accuracy_aggregate_results(results):
    """Fraction of correct answers (lmms-eval's Perception Test aggregation)."""
    return sum(result["correct"] for result in results) / len(results) if results else 0


# ------------------------------------------------------------------------------------- offline task (generated clips)
OFFLINE_CLIPS = "VIDEOCHAT_FLASH_OFFLINE_CLIPS"  # where the generated clips go (default: a folder in the temp dir)


def offline_clip_dir() -> Path:
    return Path(os.getenv(OFFLINE_CLIPS) or Path(tempfile.gettempdir()) / "videochat_flash_offline_clips")


def offline_clip(doc) -> str:
    """The clip of an offline doc, written once (PyAV, libx264): ``frames`` frames at ``fps`` of ``color`` with a band
    of the complementary colour moving down (``size`` pixels square)."""
    path = offline_clip_dir() / doc["clip"]
    if path.exists():
        return str(path)
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    color, side = np.array(doc["color"], np.uint8), int(doc["size"])
    with av.open(str(partial), "w") as container:
        stream = container.add_stream("libx264", rate=int(doc["fps"]))
        stream.width = stream.height = side
        stream.pix_fmt, stream.options = "yuv420p", {"preset": "ultrafast"}
        for index in range(int(doc["frames"])):
            frame = np.empty((side, side, 3), np.uint8)
            frame[:] = color
            frame[(index * 8) % side : (index * 8) % side + 16] = 255 - color
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    os.replace(partial, path)  # whole files only, even with several processes
    return str(path)


def offline_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    """The doc's clip; with ``start`` / ``end`` the fork's ``[path, media dict]`` of a clip segment."""
    if doc.get("start") is None:
        return [offline_clip(doc)]
    return [offline_clip(doc), {"start": doc["start"], "end": doc["end"], "video_read_type": "pyav"}]


def offline_doc_to_choice(doc):
    return list(doc["candidates"])


def offline_doc_to_answer(doc):
    return doc["candidates"].index(doc["answer"])


def offline_process_results_ppl(doc, results):
    return {"accuracy": {"id": doc["id"], **ppl_record(doc, results, offline_doc_to_answer(doc))}}


OFFLINE_FOLLOW_UP = "What color is the moving band?"


def offline_multi_round_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                                    previous_round_info=None):
    """Two rounds (lmms-eval's multi-round protocol): the doc's question, then a follow-up about the band."""
    if round_idx is None:  # the request's own context
        return doc["question"]
    return offline_doc_to_visual(doc), OFFLINE_FOLLOW_UP, round_idx >= 2, previous_output, {"round": round_idx}


def offline_process_results_rounds(doc, results):
    rounds = results[0]
    return {"offline_rounds": len(rounds) if all(isinstance(answer, str) for answer in rounds) else 0}

