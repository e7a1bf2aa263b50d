"""Needle in a video haystack (NIAH), single-hop and multi-hop, as the original's ``xtuner-eval_niah`` measures it.

The haystack video is encoded once with the streaming encoder (16 tokens per frame) and cached as safetensors, keyed
by the model, the video file and the sampling. Each needle image becomes a 4-frame clip of itself (64 tokens). For a
cell (N frames, depth d) the needle's tokens go in after frame ``int(d * N)`` of the first N frames' tokens; the
prompt is the chat template's user turn (video, then the question) and the answer is teacher-forced: one forward, and
the cell is correct when the argmax at the answer positions spells the answer (the original's rule: decoded,
lower-cased, parentheses dropped). Multi-hop chains spread their needles evenly (the first at frame 0, the last at
the end) and ask two questions each (caption, QA). Results go to ``DIR/results.jsonl`` (one line per answer, so a
run resumes), ``DIR/results.json`` (the original's ``all_accuracies.json`` rows) and ``DIR/heatmap.png``::

    settings = NIAHSettings(frames=(1000, 2000), depths=(0.0, 0.5, 1.0), rope_scaling=YARN_X4)
    results = run_niah(model, processor, "haystack.mkv", "niah-coco-singlehop_20.json", "out", settings)
    print(results["average_accuracy"])

Needles files are the original's: single-hop ``[{"question", "answer", "image"}, ...]``, multi-hop
``[{"images": [...], "question1", "answer1", "question2", "answer2"}, ...]``, image paths relative to the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .hub_export import default_cache_dir

if TYPE_CHECKING:
    import torch

# torch, transformers and the decoders are imported by the functions that need them, so that the CLI checks its
# options, the haystack and the needles file in a moment, before anything heavy loads.
__all__ = ["YARN_X4", "NIAHSettings", "Needle", "answer_logits", "check_haystack", "encode_needle",
           "haystack_tokens", "insertion_frames", "is_correct", "load_needles", "plot_heatmap", "prompt_ids", "run_niah",
           "splice"]

# The original's long-context setting (its README edits config.json to this).
YARN_X4 = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
HEATMAP_COLORS = ("#F0496E", "#EBB839", "#9ad5b3")  # the original's (and the paper's) red -> yellow -> green
MATPLOTLIB_HINT = "the heatmap needs matplotlib: pip install matplotlib"


@dataclass(frozen=True)
class NIAHSettings:
    """One NIAH run. ``frames``: haystack lengths (frames) of the grid; ``depths``: needle depths in [0, 1] (single-hop
    only: multi-hop spreads the chain over the whole haystack). ``fps``: haystack frames per second of video (the
    original: 1); None: ``max(frames)`` frames spread evenly over the video. ``repeat_above``: the original's trick
    for 10,000 frames (7,500 there): a grid longer than this encodes half as many frames and repeats them.
    ``rope_scaling`` (e.g. :data:`YARN_X4`) and ``token_dropping`` (the checkpoint's in-LLM dropping; off in the
    original) apply during the run only (the decoder's own ``decoder_chunk_tokens`` keeps a 160K-token cell's
    activations small). ``cache_dir``: haystack cache (default: the package's cache dir / niah)."""

    frames: tuple[int, ...] = tuple(range(1000, 10001, 1000))
    depths: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    fps: float | None = 1.0
    repeat_above: int | None = None
    rope_scaling: dict | None = None
    token_dropping: bool = False
    cache_dir: str | None = None
    clips_per_chunk: int = 8

    def __post_init__(self):
        object.__setattr__(self, "frames", tuple(self.frames))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        if not self.frames or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in self.frames):
            raise ValueError(f"frames must be positive integers, got {self.frames}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0 (or None), got {self.fps}")
        if self.repeat_above is not None and self.repeat_above <= 0:
            raise ValueError(f"repeat_above must be a positive count (or None), got {self.repeat_above}")


@dataclass(frozen=True)
class Needle:
    """One needle (single-hop) or chain (multi-hop): image paths in haystack order, ``(name, question, answer)``s."""

    images: tuple[str, ...]
    questions: tuple[tuple[str, str, str], ...] = field(default=())


def load_needles(path) -> tuple[str, list[Needle]]:
    """``("single-hop" | "multi-hop", needles)`` of an original-format needles file; ValueError for a bad file and
    FileNotFoundError for a missing image (checked before any model loads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"needles file not found: {path}")
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        raise ValueError(f"{path}: expected a non-empty list of needle objects")
    multi = "images" in items[0]
    keys = ("images", "question1", "answer1", "question2", "answer2") if multi else ("question", "answer", "image")
    needles = []
    for index, item in enumerate(items):
        missing = [key for key in keys if not item.get(key)]
        if missing:
            raise ValueError(f"{path}: needle {index} lacks {', '.join(missing)} (a {'multi' if multi else 'single'}"
                             f"-hop file has {', '.join(keys)})")
        images = tuple(str(path.parent / image) for image in (item["images"] if multi else [item["image"]]))
        if multi and len(images) < 2:
            raise ValueError(f"{path}: multi-hop needle {index} has {len(images)} image; a chain needs at least 2")
        for image in images:
            if not os.path.isfile(image):
                raise FileNotFoundError(f"{path}: needle {index}: image {image} not found")
        if multi:
            questions = (("caption", item["question1"], str(item["answer1"])),
                         ("qa", item["question2"], str(item["answer2"])))
        else:
            questions = (("single", item["question"], str(item["answer"])),)
        needles.append(Needle(images, questions))
    return ("multi-hop" if multi else "single-hop"), needles


# ---------------------------------------------------------------------------------------------------- visual tokens
def _model_fingerprint(model) -> str:
    """What the haystack tokens depend on: the model's name, dtype, tower settings and a strided sample of every
    vision tower and projector weight (cheap, and different for different weights)."""
    digest = hashlib.sha256()
    config = model.config
    digest.update(json.dumps([config._name_or_path, str(model.dtype), config.mm_vision_tower, config.image_size,
                              config.vision_config, config.tokens_per_frame]).encode())
    core = model.model
    for name, weight in [*core.vision_tower.named_parameters(), *core.mm_projector.named_parameters()]:
        digest.update(f"{name}{tuple(weight.shape)}".encode())
        if weight.device.type != "meta":
            flat = weight.detach().reshape(-1)
            digest.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _haystack_sampling(settings: NIAHSettings) -> tuple[dict, int, int]:
    """``(video processor options, distinct frames, frames needed)`` for the haystack of this grid."""
    needed = max(settings.frames)
    repeat = settings.repeat_above is not None and needed > settings.repeat_above
    distinct = 4 * math.ceil((math.ceil(needed / 2) if repeat else needed) / 4)
    sampling = {"num_frames": distinct} if settings.fps is None else {
        "fps": settings.fps, "max_num_frames": distinct, "min_num_frames": 0, "frames_multiple": 4}
    return sampling, distinct, needed


def haystack_cache_path(model, video, settings: NIAHSettings) -> Path:
    """The safetensors file of this haystack: a hash of the model, the video file (path, size, mtime) and the
    sampling, under ``settings.cache_dir`` (default: the package's cache dir) / niah."""
    stat = os.stat(video)
    sampling, distinct, needed = _haystack_sampling(settings)
    key = json.dumps({"model": _model_fingerprint(model), "video": [os.path.abspath(video), stat.st_size,
                                                                   stat.st_mtime_ns],
                      "sampling": sampling, "frames": [distinct, needed]}, sort_keys=True)
    root = Path(settings.cache_dir) if settings.cache_dir is not None else default_cache_dir() / "niah"
    return root / f"haystack-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def check_haystack(video, settings: NIAHSettings) -> int:
    """The number of frames the haystack sampling takes from `video` (its metadata, nothing decoded); ValueError when
    that is fewer than the grid needs, FileNotFoundError / ValueError for a missing or unreadable video."""
    from .frame_sampling import FrameSampling
    from .video_loading import iter_video_chunks

    sampling, distinct, _ = _haystack_sampling(settings)
    metadata, chunks = iter_video_chunks(str(video), 4, sampling=FrameSampling(**sampling))
    getattr(chunks, "close", lambda: None)()
    if metadata.num_frames < distinct:
        _too_few(video, metadata.num_frames, distinct, settings)
    return metadata.num_frames


def _too_few(video, frames: int, distinct: int, settings: NIAHSettings):
    rate = "evenly" if settings.fps is None else f"at {settings.fps:g} frame/s"
    raise ValueError(f"the haystack {video} gives {frames} frames sampled {rate}; the grid needs {distinct}: use a "
                     "longer video, a higher fps, or repeat_above (--repeat-above)")


def haystack_tokens(model, processor, video, settings: NIAHSettings, num_frames: int | None = None,
                    progress: bool = False) -> torch.Tensor:
    """``(16 * num_frames, hidden)`` tokens of the haystack's first `num_frames` frames (default: ``max(frames)``),
    read from its cache file; a missing file is made first, the video encoded once (the streaming encoder: bounded
    memory). Read per cell, only that cell's frames are in memory. ValueError when the video gives too few frames."""
    from safetensors import safe_open

    path = haystack_cache_path(model, video, settings)
    if not path.is_file():
        _encode_to_cache(model, processor, video, settings, path, progress)
    num_frames = num_frames or max(settings.frames)
    if num_frames > max(settings.frames):
        raise ValueError(f"{num_frames} haystack frames asked for; these settings cache {max(settings.frames)}")
    rows = num_frames * model.config.tokens_per_frame
    with safe_open(path, framework="pt", device=str(model.get_input_embeddings().weight.device)) as cache:
        return cache.get_slice("tokens")[:rows]


def _encode_to_cache(model, processor, video, settings: NIAHSettings, path: Path, progress: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from .streaming_videochat_flash import encode_video_streaming

    sampling, distinct, needed = _haystack_sampling(settings)
    tokens, _ = encode_video_streaming(model, video, video_processor=processor.video_processor,
                                       clips_per_chunk=settings.clips_per_chunk, progress=progress, **sampling)
    per_frame = model.config.tokens_per_frame
    if tokens.shape[0] < distinct * per_frame:
        _too_few(video, tokens.shape[0] // per_frame, distinct, settings)
    tokens = tokens[: distinct * per_frame]
    if distinct < needed:  # the original's halving: the same frames twice
        tokens = torch.cat([tokens, tokens])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    save_file({"tokens": tokens[: needed * per_frame].contiguous().cpu()}, partial,
              metadata={"video": os.path.abspath(video), "frames": str(needed)})
    os.replace(partial, path)


def encode_needle(model, processor, image) -> torch.Tensor:
    """``(16 * 4, hidden)`` tokens of one needle image: padded to a square of the mean colour and resized (the
    original's ``image_aspect_ratio="pad"``), repeated into a 4-frame clip, encoded as a video."""
    import torch

    pixels = processor.image_processor(image, image_aspect_ratio="pad", return_tensors="pt")["pixel_values"]
    clip = pixels.expand(model.config.mm_local_num_frames, -1, -1, -1)
    with torch.no_grad():
        return model.get_video_features(clip[None])[0]


# ---------------------------------------------------------------------------------------------------- one cell
def prompt_ids(processor, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the video of the chat template's user turn ``[video, question]`` with the
    generation prompt: the original's ``qwen2`` preprompt and ``question + postprompt``."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before, after = text.split(processor.video_token)
    encode = processor.tokenizer.encode
    return encode(before, add_special_tokens=False), encode(after, add_special_tokens=False)


def insertion_frames(num_frames: int, num_needles: int = 1, depth: float | None = None) -> list[int]:
    """After which haystack frame each needle goes: ``int(depth * N)`` for one needle; a chain of K the original's
    way, the first at 0 and needle i at ``int(i * N / (K - 1))`` (the last at the end)."""
    if num_needles == 1:
        return [int(depth * num_frames)]
    interval = num_frames / (num_needles - 1)
    return [int(i * interval) for i in range(num_needles)]


def splice(haystack: torch.Tensor, needles, at: list[int], num_frames: int, tokens_per_frame: int = 16) -> list:
    """The visual tokens of a cell as pieces in order: the first `num_frames` frames of `haystack` ``(16 * T,
    hidden)`` with needle i's tokens after frame ``at[i]``."""
    pieces, start = [], 0
    for needle, frame in zip(needles, at):
        pieces += [haystack[start * tokens_per_frame : frame * tokens_per_frame], needle]
        start = frame
    return pieces + [haystack[start * tokens_per_frame : num_frames * tokens_per_frame]]


def answer_logits(model, before: list[int], visual: list, after: list[int], answer: list[int],
                  release: bool = False) -> torch.Tensor:
    """``(len(answer), vocab)`` logits predicting each answer token, from one teacher-forced forward over ``before +
    visual + after + answer``: text embedded by the model, visual tokens spliced in as they are. The placeholder ids
    go along, so in-LLM token dropping (when on) finds the visual tokens and ranks them from the prompt's end, as a
    cached prefill in ``generate`` would. ``release``: empty the `visual` list once embedded, so that the haystack
    it views is freed before the forward (its peak memory is the forward's, not the forward's + the haystack's)."""
    import torch

    embed = model.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    num_visual = sum(piece.shape[0] for piece in visual)
    ids = torch.tensor(before + [model.config.video_token_id] * num_visual + after + answer, device=device)[None]
    with torch.no_grad():
        text_before, text_after = embed(ids[:, : len(before)])[0], embed(ids[:, len(before) + num_visual :])[0]
        embeds = torch.cat([text_before, *(piece.to(device, dtype) for piece in visual), text_after])[None]
        if release:
            visual.clear()
        output = model(input_ids=ids, inputs_embeds=embeds, use_cache=False, logits_to_keep=len(answer) + 1,
                       drop_query_position=ids.shape[1] - len(answer) - 1)
    return output.logits[0, :-1]


def is_correct(tokenizer, predicted: list[int], answer: list[int]) -> tuple[str, bool]:
    """``(prediction, correct)`` by the original's rule: the decoded argmax, lower-cased and without parentheses,
    equals the decoded answer, lower-cased."""
    prediction = tokenizer.decode(predicted).lower()
    return prediction, prediction.replace("(", "").replace(")", "") == tokenizer.decode(answer).lower()


# ---------------------------------------------------------------------------------------------------- the grid
@contextlib.contextmanager
def _run_options(model, settings: NIAHSettings):
    """The run's rope scaling and token dropping on the model, the model's own restored afterwards."""
    config = model.config
    rope, dropping = dict(config.rope_parameters), config.mm_llm_compress
    try:
        if settings.rope_scaling is not None:
            model.set_rope_scaling(settings.rope_scaling)
        config.mm_llm_compress = settings.token_dropping
        if settings.token_dropping:
            config.validate_token_dropping()
        yield
    finally:
        config.mm_llm_compress = dropping
        if settings.rope_scaling is not None:
            previous = {k: v for k, v in rope.items() if k != "rope_theta"}
            model.set_rope_scaling(None if previous.get("rope_type", "default") == "default" else previous)


def _cells(mode: str, settings: NIAHSettings, needles: list[Needle]):
    """``(frames, depth, needle index, question index)`` in the original's order (depth None for multi-hop)."""
    for frames in settings.frames:
        for depth in (settings.depths if mode == "single-hop" else (None,)):
            for index, needle in enumerate(needles):
                for question in range(len(needle.questions)):
                    yield frames, depth, index, question


def _open_records(path: Path, header: dict) -> dict:
    """The answers already in `path` (a JSONL whose first line is the run's header), by cell; ValueError when they
    come from another run (model, haystack, needles or options)."""
    if not path.is_file() or not path.stat().st_size:
        path.write_text(json.dumps({"run": header}) + "\n")
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if lines[0].get("run") != header:
        changed = sorted(k for k in header if lines[0].get("run", {}).get(k) != header[k])
        raise ValueError(f"{path} holds the results of another run ({', '.join(changed)} differ): use another "
                         "output folder or delete it")
    return {(r["frames"], r["depth"], r["needle"], r["question"]): r for r in lines[1:]}


def summarize(mode: str, records: list[dict], settings: NIAHSettings) -> list[dict]:
    """The original's ``all_accuracies.json`` rows: per (frames, depth) ``Num. Frame``, ``Frame Depth`` (percent),
    ``Score`` for single-hop; per frame count the caption / QA / combined scores and counts for multi-hop."""
    rows = []
    for frames in settings.frames:
        if mode == "single-hop":
            for depth in settings.depths:
                scores = [r["correct"] for r in records if r["frames"] == frames and r["depth"] == depth]
                rows.append({"Num. Frame": frames, "Frame Depth": round(depth * 100, 2),
                             "Score": sum(scores) / len(scores)})
            continue
        pairs = {}
        for r in (r for r in records if r["frames"] == frames):
            pairs.setdefault(r["needle"], {})[r["name"]] = r["correct"]
        cap, qa = [p["caption"] for p in pairs.values()], [p["qa"] for p in pairs.values()]
        both = sum(c and q for c, q in zip(cap, qa))
        rows.append({"Num. Frame": frames, "Score": (sum(cap) + sum(qa)) / (2 * len(cap)),
                     "Caption Score": sum(cap) / len(cap), "QA Score": sum(qa) / len(qa),
                     "Total question pair": len(cap), "Both correct": both, "Only cap correct": sum(cap) - both,
                     "Only qa correct": sum(qa) - both, "Both wrong": len(cap) - sum(cap) - sum(qa) + both})
    return rows


def plot_heatmap(rows: list[dict], path, title: str | None = None) -> bool:
    """The paper's heatmap of result rows (depth percent x frames for single-hop; caption / QA / combined scores x
    frames for multi-hop) as a PNG; False (nothing written) without matplotlib. No pyplot: no global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure
    except ImportError:
        return False
    frames = sorted({row["Num. Frame"] for row in rows})
    if "Frame Depth" in rows[0]:
        labels = sorted({row["Frame Depth"] for row in rows})
        score = {(row["Frame Depth"], row["Num. Frame"]): row["Score"] for row in rows}
        grid = [[score.get((label, n), float("nan")) for n in frames] for label in labels]
        ylabel, labels = "Depth Percent", [f"{label:g}" for label in labels]
    else:
        names = ("Caption Score", "QA Score", "Score")
        grid = [[next(row[name] for row in rows if row["Num. Frame"] == n) for n in frames] for name in names]
        ylabel, labels = "", ["Caption", "QA", "Combined"]
    figure = Figure(figsize=(17.5, 8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    cmap = LinearSegmentedColormap.from_list("niah", HEATMAP_COLORS)
    mesh = axes.pcolormesh(grid, cmap=cmap, vmin=0, vmax=1, edgecolors="white", linewidth=1.5)
    figure.colorbar(mesh, ax=axes).set_label("Score", size=14)
    axes.set_xticks([i + 0.5 for i in range(len(frames))], [f"{n / 1000:.1f}K" if n >= 1000 else str(n)
                                                            for n in frames], rotation=45, fontsize=14)
    axes.set_yticks([i + 0.5 for i in range(len(labels))], labels, fontsize=14)
    axes.invert_yaxis()  # the first row (depth 0) on top, as the paper's figure
    axes.set_xlabel("Num. of Frames", fontsize=14)
    axes.set_ylabel(ylabel, fontsize=14)
    if title:
        axes.set_title(title, fontsize=16)
    figure.tight_layout()
    figure.savefig(path)
    return True


def _run_header(model, haystack, settings: NIAHSettings, mode: str, needles: list[Needle]) -> dict:
    """What the answers of a results.jsonl depend on (a resumed run must match it)."""
    needles_hash = hashlib.sha256(json.dumps([asdict(needle) for needle in needles]).encode()).hexdigest()
    return {"mode": mode, "model": _model_fingerprint(model)[:24],
            "haystack": haystack_cache_path(model, haystack, settings).stem, "needles": needles_hash[:24],
            "rope_scaling": settings.rope_scaling, "token_dropping": settings.token_dropping}


def _answer_cell(model, processor, haystack, settings: NIAHSettings, needle: Needle, needle_tokens: list, cell) -> dict:
    """One cell's record: the needle's tokens spliced into the first frames of the haystack, one teacher-forced
    forward, the original's answer rule."""
    frames, depth, index, question = cell
    name, text, answer = needle.questions[question]
    before, after = prompt_ids(processor, text)
    answer_ids = processor.tokenizer.encode(answer, add_special_tokens=False)
    at = insertion_frames(frames, len(needle.images), depth)
    visual = splice(haystack_tokens(model, processor, haystack, settings, frames), needle_tokens, at, frames,
                    model.config.tokens_per_frame)
    logits = answer_logits(model, before, visual, after, answer_ids, release=True)
    prediction, correct = is_correct(processor.tokenizer, logits.argmax(-1).tolist(), answer_ids)
    return {"frames": frames, "depth": depth, "needle": index, "question": question, "name": name, "answer": answer,
            "prediction": prediction, "correct": correct}


def run_niah(model, processor, haystack, needles, out_dir, settings: NIAHSettings = NIAHSettings(),
             progress: bool = False) -> dict:
    """The NIAH grid of `settings` for a model and its processor: `haystack` a video file, `needles` a needles file
    (or :func:`load_needles`' result). Writes ``out_dir/results.jsonl`` (resumed when present), ``results.json`` and
    ``heatmap.png`` (when matplotlib is installed); returns the results.json content (``heatmap``: its path or None)."""
    from tqdm.auto import tqdm

    mode, needles = load_needles(needles) if isinstance(needles, (str, os.PathLike)) else needles
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = _open_records(out / "results.jsonl", _run_header(model, haystack, settings, mode, needles))
    todo = [cell for cell in _cells(mode, settings, needles) if cell not in records]
    with _run_options(model, settings), open(out / "results.jsonl", "a") as log:
        if todo:  # encoded (or found in the cache) once, before the first cell
            haystack_tokens(model, processor, haystack, settings, num_frames=1, progress=progress)
        needle_tokens = {}  # needle index -> its images' tokens, encoded when first needed
        for cell in tqdm(todo, desc="NIAH", unit="cell", disable=None if progress else True):
            needle = needles[cell[2]]
            if cell[2] not in needle_tokens:
                needle_tokens[cell[2]] = [encode_needle(model, processor, image) for image in needle.images]
            records[cell] = _answer_cell(model, processor, haystack, settings, needle, needle_tokens[cell[2]], cell)
            log.write(json.dumps(records[cell]) + "\n")
            log.flush()
    wanted = set(_cells(mode, settings, needles))
    rows = summarize(mode, [record for cell, record in records.items() if cell in wanted], settings)
    average = sum(row["Score"] for row in rows) / len(rows)
    heatmap = out / "heatmap.png"
    drawn = plot_heatmap(rows, heatmap, f"{mode} NIAH, average accuracy {average:.3f}")
    if not drawn:
        heatmap.unlink(missing_ok=True)  # never leave an earlier run's picture beside these results
        warnings.warn(f"{out / 'results.json'} written; {MATPLOTLIB_HINT}", stacklevel=2)
    results = {"mode": mode, "average_accuracy": average, "results": rows, "heatmap": str(heatmap) if drawn else None,
               "settings": {**asdict(settings), "haystack": str(haystack)}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# ---------------------------------------------------------------------------------------------------- the CLI's
def settings_from_args(args) -> NIAHSettings:
    """`videochat-flash niah`'s options as settings, the needles file and the haystack's length checked (ValueError /
    FileNotFoundError)."""
    if args.yarn is not None and not args.yarn > 1:
        raise ValueError(f"--yarn must be a factor > 1, got {args.yarn}")
    defaults = NIAHSettings()
    settings = NIAHSettings(
        frames=args.frames or defaults.frames, depths=args.depths or defaults.depths, fps=args.fps,
        repeat_above=args.repeat_above, token_dropping=args.token_dropping,
        rope_scaling=None if args.yarn is None else {**YARN_X4, "factor": args.yarn},
        cache_dir=None if args.cache_dir is None else str(Path(args.cache_dir) / "niah"))
    load_needles(args.needles)
    check_haystack(args.haystack, settings)
    return settings


def load_model(folder, device, dtype, device_map=None):
    """``(model, processor)`` of a folder, on `device` or spread by `device_map` (e.g. ``"auto"``: accelerate)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, device_map=device_map)
    model = (model if device_map is not None else model.to(device)).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)
