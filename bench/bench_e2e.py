"""Time to the first answer token, and to the whole answer, for a long video: end to end, ours vs the original's way.

The video: 10 minutes of 1280x720 H.264 with B-frames (lavfi ``testsrc2`` at 10 frames/s, x264 ultrafast,
``bframes=3``, GOP 250; 6,000 frames), generated once into the temp folder and cached (``--video`` takes another).
The model: the published 2B or 7B shape (``--shape``) with random weights made on the device in seconds (built on
``meta``, then filled in place), its vision tower at 224 or 448 px (``--size``). The prompt: the chat() sample of
``--frames`` frames (16 placeholders each) inside ~60 random text tokens; the answer: ``--new-tokens`` tokens
(greedy, never stopping early). Both ways share the LLM (prefill and decoding are the same code):

* ours: ``encode_video_streaming`` (PyAV, frames resized as they are decoded, or on the accelerator; chunks of one
  tower call decoded in a thread while the tower encodes the one before; oneDNN GEMMs, sdpa), then ``generate``;
* the original's way: decord ``get_batch`` of every sampled frame at full resolution (``bench_video_io``), a PIL
  resize of each, one pixel tensor, the tower with stock ops and eager attention one clip per call
  (``bench_encode.plain_tower``), ToMe + projector per clip, then the same ``generate``.

Also printed, per case: the loader's CPU work, frames/s of the CPU path (decode, resize, normalise) against the
CPU side of the accelerator path (decode only: frames go to the device as uint8, the ``meta`` device standing in
for it here), which is what sets the pace on a GPU machine.

Printed: wall times and the split (busy seconds per stage: open+probe, decode, resize, pixels, tower, merge,
prefill, decode tokens; ours overlaps decoding with the tower, so its stages can add up to more than its wall
time), the ratios original / ours, and ours in the best dtype of the device beside it (bfloat16 on a CUDA device or
a CPU with native bf16 matmuls: avx512_bf16 / AMX; ``--best-dtype none`` skips it).

    python bench/bench_e2e.py [--device cpu] [--dtype float32] [--frames 64 512] [--size 224 448] [--shape 2B 7B]
    python bench/bench_e2e.py --loader-only --frames 64 512     # the loader's CPU work only (no model)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling bench modules

from bench_common import TokenClock, available_memory_bytes, write_test_video
from bench_encode import plain_tower
from bench_video_io import original_frames, original_reader, pil_resize
from videochat_flash import processing_videochat_flash as processing
from videochat_flash import video_loading
from videochat_flash.configuration_videochat_flash import VideoChatFlashConfig
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM
from videochat_flash.streaming_videochat_flash import (
    as_mm_encoder_outputs,
    encode_video_streaming,
)

VIDEO_NAME = "bench_e2e_10min_1280x720_10fps_bframes.mp4"
VIDEO_SECONDS, VIDEO_FPS, VIDEO_SIZE = 600, 10, (1280, 720)
TEXT_TOKENS = 60  # system prompt, time message, question, chat markers
# The published LLM shapes (tests/test_checkpoints.py reads them from ../shared/golden/keys_*.json): Qwen2.5-1.5B in
# the 2B checkpoint, Qwen2-7B in the 7B ones; "tiny" is for trying the script out.
SHAPES = {
    "2B": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
           "num_attention_heads": 12, "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": True,
           "max_position_embeddings": 32768},
    "7B": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0, "tie_word_embeddings": False,
           "max_position_embeddings": 32768},
    "tiny": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "video_token_id": 1000, "image_token_id": 1001},
}
TINY_TOWER = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "patch_size": 16}
STAGES = ("open+probe", "decode", "resize", "pixels", "tower", "merge", "prefill", "decode tokens")


# ------------------------------------------------------------------------------------------------ inputs
def make_video(path: str) -> None:
    """The benchmark video (see the module docstring)."""
    write_test_video(path, VIDEO_SIZE, VIDEO_FPS, VIDEO_SECONDS,
                     {"preset": "ultrafast", "x264-params": "bframes=3:b-adapt=0:keyint=250"})  # B-frames


def cached_video(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, VIDEO_NAME)
    if not os.path.exists(path):
        make_video(path)
    return path


def prompt_ids(config, num_frames: int, device) -> torch.Tensor:
    """`(1, seq)` ids: random text around 16 video placeholders per frame (no tokenizer: the Hub is not needed)."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, min(config.vocab_size, 150000), (TEXT_TOKENS,), generator=generator)
    video = torch.full((config.tokens_per_frame * num_frames,), config.video_token_id)
    return torch.cat([text[:20], video, text[20:]])[None].to(device)


# ------------------------------------------------------------------------------------------------ the model
def model_config(shape: str, size: int) -> VideoChatFlashConfig:
    tower = {"mm_vision_tower": "umt-hd-large" if size == 448 else "umt-large"}
    if shape == "tiny":
        tower["vision_config"] = {**TINY_TOWER, "image_size": size}
    return VideoChatFlashConfig(**SHAPES[shape], **tower)


def parameter_bytes(config: VideoChatFlashConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = VideoChatFlashForCausalLM(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * dtype.itemsize


def random_model(config: VideoChatFlashConfig, device, dtype) -> VideoChatFlashForCausalLM:
    """The model with random weights, made where it runs without an init pass: built on ``meta`` (no memory, no
    initialisation), given uninitialised storage on `device`, then filled in place (norm weights 1, biases 0, the
    rest normal(0, 0.02)). Timing needs no trained weights, only sane (finite, non-denormal) values."""
    with torch.device("meta"):
        model = VideoChatFlashForCausalLM(config).to(dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # buffers, not parameters: real ones
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            for name, param in module.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


# ------------------------------------------------------------------------------------------------ clocks
class StageClock:
    """Busy seconds per stage, from functions wrapped while a run lasts (thread-safe: decoder threads resize)."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.device = device
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def synchronize(self) -> None:
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str, device_work: bool = False):
        if device_work:
            self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if device_work:
                self.synchronize()
            self.add(name, time.perf_counter() - start)

    def wrap(self, function, stage: str, device_work: bool = False):
        def timed(*args, **kwargs):
            with self.stage(stage, device_work):
                return function(*args, **kwargs)
        return timed

    def patched(self, owner, name: str, stage: str, device_work: bool = False):
        """`owner.name` timed as `stage` inside the block."""
        return replaced(owner, name, self.wrap(getattr(owner, name), stage, device_work))


@contextlib.contextmanager
def replaced(owner, name: str, value):
    """`owner.name` is `value` inside the block (on an instance, an attribute shadows the method until removed)."""
    own, original = name in vars(owner), getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def answer(model, clock: StageClock, ids, features, new_tokens: int, start: float) -> dict:
    """generate() on precomputed visual tokens; adds prefill and decode tokens to `clock`, returns the wall times."""
    tokens = TokenClock()
    clock.synchronize()  # the visual tokens are ready: what follows is the LLM's
    encoded = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, mm_encoder_outputs=as_mm_encoder_outputs(features), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=tokens)
    done = time.perf_counter()
    first_token = tokens.times[0]
    clock.add("prefill", first_token - encoded)
    clock.add("decode tokens", done - first_token)
    return {"encode": encoded - start, "first token": first_token - start, "answer": done - start}


# ------------------------------------------------------------------------------------------------ the two ways
def run_ours(model, video: str, frames: int, new_tokens: int, device) -> tuple[dict, dict]:
    """encode_video_streaming + generate, as chat() runs them, with each stage's busy time measured."""
    clock = StageClock(device)
    base = model.model
    probe = processing.VideoChatFlashVideoProcessor.iter_pixel_chunks

    def iter_pixel_chunks(self, *args, **kwargs):  # opening + probing happen in the call; decoding in the chunks
        with clock.stage("open+probe"):
            metadata, chunks = probe(self, *args, **kwargs)
        return metadata, timed_chunks(chunks)

    def timed_chunks(chunks):
        while True:
            before = dict(clock.seconds)
            start = time.perf_counter()
            chunk = next(chunks, None)
            if chunk is None:
                return
            inner = sum(clock.seconds[s] - before.get(s, 0.0) for s in ("resize", "pixels"))
            # what is left of producing it (resizing in several decoder threads at once can exceed the wall time)
            clock.add("decode", max(0.0, time.perf_counter() - start - inner))
            yield chunk

    start = time.perf_counter()
    with contextlib.ExitStack() as patches:
        patches.enter_context(replaced(processing.VideoChatFlashVideoProcessor, "iter_pixel_chunks",
                                       iter_pixel_chunks))
        patches.enter_context(clock.patched(video_loading, "resize_frame", "resize"))
        patches.enter_context(clock.patched(processing, "frames_to_pixels", "pixels", device_work=True))
        patches.enter_context(clock.patched(base, "_run_vision_tower", "tower", device_work=True))
        patches.enter_context(clock.patched(base.mm_projector, "forward", "merge", device_work=True))
        features, metadata = encode_video_streaming(model, video, max_num_frames=frames)
    walls = answer(model, clock, prompt_ids(model.config, metadata.num_frames, device), features, new_tokens, start)
    return walls, clock.seconds


def run_original(model, video: str, frames: int, new_tokens: int, device) -> tuple[dict, dict]:
    """The original's way, stage after stage (see the module docstring)."""
    clock = StageClock(device)
    base, size = model.model, model.config.image_size
    start = time.perf_counter()
    with torch.inference_mode():
        with clock.stage("open+probe"):
            reader = original_reader(video)
        with clock.stage("decode"):
            full = original_frames(reader, frames)
        with clock.stage("resize"):
            resized = [pil_resize(frame, size) for frame in full]
        del full
        with clock.stage("pixels", device_work=True):  # the original processor's arithmetic, one tensor
            pixels = torch.from_numpy(processing.frames_to_pixels(resized, {"height": size, "width": size}))
            pixels = pixels.to(device=device, dtype=base.vision_tower_dtype)
        clip = model.config.mm_local_num_frames
        outputs = []
        for clip_pixels in pixels.split(clip):  # one clip per call
            with clock.stage("tower", device_work=True):
                features = plain_tower(base.vision_tower, clip_pixels)
            with clock.stage("merge", device_work=True):
                features = features.reshape(clip, -1, features.shape[-1])
                outputs.append(base.mm_projector(features, compress=True, local_num_frames=clip))
        features = torch.cat(outputs).flatten(0, 1)
    walls = answer(model, clock, prompt_ids(model.config, len(pixels), device), features, new_tokens, start)
    return walls, clock.seconds


def warm_up(model, frames: int, device, with_original: bool) -> None:
    """First calls of each path, not measured (kernel choices, allocations, position tables): one clip through each
    tower, and a prefill of the measured prompt's length, so neither way pays them for the other."""
    base, config = model.model, model.config
    size, clip = config.image_size, config.mm_local_num_frames
    pixels = torch.zeros(clip, 3, size, size, dtype=base.vision_tower_dtype, device=device)
    features = torch.randn(frames * config.tokens_per_frame, config.hidden_size, dtype=model.dtype, device=device)
    with torch.inference_mode():
        base.encode_clips(pixels[None])
        if with_original:
            plain_tower(base.vision_tower, pixels)
        model.generate(prompt_ids(config, frames, device), mm_encoder_outputs=as_mm_encoder_outputs(features),
                       max_new_tokens=2, do_sample=False)


# ------------------------------------------------------------------------------------------------ reporting
def best_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where matmuls have it natively (any CUDA device here; a CPU with avx512_bf16 or AMX), else None."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
            if "avx512_bf16" in flags or "amx_bf16" in flags:
                return torch.bfloat16
    return None


# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by device name: what "% of peak" is counted against
DENSE_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def tower_flops(tower, frames: int) -> float:
    """FLOPs (2 per multiply-add) of the tower's blocks over `frames` frames, clip by clip: per block and clip of
    N tokens of width C and MLP width H, 2N * 4C^2 (q, k, v, output projections) + 2N * 2CH (MLP) + 2 * 2N^2 C
    (attention scores and their weighted sum); patch embedding, norms and softmax left out (under 1%)."""
    tokens, width = tower.num_patches_per_frame * tower.num_frames, tower.hidden_size
    per_clip = 2 * tokens * 4 * width**2 + 2 * tokens * 2 * width * tower.intermediate_size + 4 * tokens**2 * width
    return tower.num_blocks * per_clip * frames / tower.num_frames


def peak_tflops(device: torch.device, dtype: torch.dtype, given: float | None) -> float | None:
    if given is not None or device.type != "cuda" or dtype != torch.bfloat16:
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_TFLOPS.items() if key in name), None)


def print_split(name: str, walls: dict, seconds: dict, flops: float | None = None, peak: float | None = None):
    """The walls and busy seconds of a run; with the tower's `flops`, its rate (and share of the `peak` TFLOP/s)
    and how busy it kept the encode phase (decoding hidden behind it: near 100%)."""
    stages = ", ".join(f"{stage} {seconds.get(stage, 0.0):.2f}" for stage in STAGES)
    print(f"  {name:22s} first token {walls['first token']:8.2f} s, answer {walls['answer']:8.2f} s  |  {stages}",
          flush=True)
    if flops and seconds.get("tower"):
        rate = flops / seconds["tower"] / 1e12
        share = f" = {100 * rate / peak:.0f}% of the {peak:.0f} TFLOP/s dense peak" if peak else ""
        print(f"  {'':22s} tower {flops / 1e12:.1f} TFLOP at {rate:.2f} TFLOP/s{share}; tower busy "
              f"{100 * seconds['tower'] / walls['encode']:.0f}% of the encode phase ({walls['encode']:.2f} s)",
              flush=True)


def print_ratios(label: str, reference: tuple, other: tuple) -> None:
    (ref_walls, ref_seconds), (walls, seconds) = reference, other
    ends = ", ".join(f"{key} {ref_walls[key] / walls[key]:.2f}x" for key in ("first token", "answer"))
    stages = ", ".join(f"{stage} {ref_seconds[stage] / seconds[stage]:.2f}x" for stage in STAGES
                       if seconds.get(stage) and ref_seconds.get(stage))
    print(f"  {label}: {ends}  |  per stage: {stages}", flush=True)


def check_fits(config, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the model does not fit in memory (None: it does); weights only, plus 15% for activations."""
    need = parameter_bytes(config, dtype) * 1.15
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else (
        available_memory_bytes() if device.type == "cpu" else None)
    if have is not None and need > have:
        return f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
    return None


def loader_cpu_side(video: str, frames: int, size: int) -> None:
    """Frames/s of the loader's CPU work: the CPU path, and the accelerator path's CPU side (see the docstring)."""
    processor = processing.VideoChatFlashVideoProcessor(size=size)
    rates = {}
    for name, pixel_device in (("CPU path", None), ("accelerator path, CPU side", "meta")):
        start = time.perf_counter()
        metadata, chunks = processor.iter_pixel_chunks(video, 64, pixel_device=pixel_device, max_num_frames=frames)
        for _ in chunks:
            pass
        rates[name] = metadata.num_frames / (time.perf_counter() - start)
    print("  loader CPU work: " + ", ".join(f"{name} {rate:.0f} frames/s" for name, rate in rates.items())
          + f" ({rates['accelerator path, CPU side'] / rates['CPU path']:.2f}x)", flush=True)


def run_case(args, device, shape: str, size: int, frames: int, video: str) -> None:
    dtype, config = getattr(torch, args.dtype), model_config(shape, size)
    best = None if args.best_dtype == "none" else best_dtype(device) if args.best_dtype == "auto" else getattr(
        torch, args.best_dtype)
    print(f"\n{shape} shape, {size} px, {frames} frames ({frames * config.tokens_per_frame} visual tokens), "
          f"{args.new_tokens} new tokens, {device}", flush=True)
    loader_cpu_side(video, frames, size)
    if args.loader_only:
        return
    plan = [(dtype, ("original", "ours") if args.original else ("ours",))]
    if best is not None and best != dtype:
        plan.append((best, ("ours",)))
    runs = {}
    for run_dtype, ways in plan:
        name = str(run_dtype).removeprefix("torch.")
        if problem := check_fits(config, run_dtype, device):
            print(f"  {name}: skipped, the model {problem}", flush=True)
            continue
        start = time.perf_counter()
        model = random_model(config, device, run_dtype)
        print(f"  {name}: random {shape} model made in {time.perf_counter() - start:.1f} s", flush=True)
        if args.warmup:
            warm_up(model, frames, device, with_original="original" in ways)
        for way in ways:
            runner = run_original if way == "original" else run_ours
            runs[(way, name)] = runner(model, video, frames, args.new_tokens, device)
            print_split(f"{way} {name}", *runs[(way, name)], flops=tower_flops(model.model.vision_tower, frames),
                        peak=peak_tflops(device, run_dtype, args.peak_tflops))
        del model
    print("  ratios (the original's way / ours; > 1: ours is faster):", flush=True)
    reference = runs.get(("original", args.dtype))
    for (way, name), run in runs.items():
        if way == "ours" and reference is not None:
            print_ratios(f"original {args.dtype} / ours {name}", reference, run)
    if ("ours", args.dtype) in runs and best is not None and (key := ("ours", str(best).removeprefix("torch."))) in runs:
        print_ratios(f"ours {args.dtype} / ours {key[1]}", runs[("ours", args.dtype)], runs[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--best-dtype", default="auto", help="auto, none, or a dtype: ours again in it")
    parser.add_argument("--frames", type=int, nargs="+", default=[64])
    parser.add_argument("--size", type=int, nargs="+", default=[448], choices=[224, 448])
    parser.add_argument("--shape", nargs="+", default=["2B"], choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak for the tower's share (default: known CUDA devices, bf16)")
    parser.add_argument("--no-original", dest="original", action="store_false", help="ours only")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="measure first calls too")
    parser.add_argument("--loader-only", action="store_true", help="only the loader's CPU work, no model")
    parser.add_argument("--video", help="another video file (default: the generated 10-minute 720p one)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vcf_bench_cache"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (this torch build or machine has none)")
    video = args.video or cached_video(args.cache)
    threads = torch.get_num_threads() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {threads} torch threads; video {video} "
          f"({os.path.getsize(video) / 1e6:.0f} MB); load average {os.getloadavg()[0]:.2f}", flush=True)
    for shape in args.shape:
        for size in args.size:
            for frames in args.frames:
                run_case(args, device, shape, size, frames, video)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
