"""Peak memory and decode speed of the real-size 2B model on a CPU: float32, bfloat16 and torchao int8.

The model is VideoChat-Flash-Qwen2_5-2B_res448's shape (Qwen2.5-1.5B LLM, UMT-L tower at 448 px: the key manifest's
config and tensor shapes in ``../shared/golden``) with random weights, written once by this bench as a published,
original-format folder (bfloat16 safetensors in two shards, tied ``lm_head``, a byte-level tokenizer) in the temp
dir, and converted on the fly as ``videochat-flash chat --model FOLDER`` would. Each configuration loads it exactly
as the CLI does (``videochat_flash_cli.load_model``) and answers one question about a short clip with ``chat()``
(8 frames at 448 px, ``min_new_tokens = max_new_tokens``: random weights would stop at any token).

Every configuration runs in a fresh Python process; its peak RSS is the kernel's high-water mark of that process
(VmHWM in /proc/self/status; ``ru_maxrss`` where /proc is missing), loading and answering included. RSS counts the
checkpoint's pages the process has mapped and read: a bfloat16 load keeps its weights there (no copy), a float32
load reads them while it converts, an int8 load while it quantizes. "private" is the process's own memory after the
answer (RssAnon). Decode speed is counted from the first new token to the last (a streamer's timestamps), so it
leaves out the video encoding and the prefill; the 1-minute load average is printed beside it, because other
processes on a small machine slow the bfloat16 and int8 kernels far more than float32's. Ratios to float32 last.

    python bench/bench_memory.py [--configs float32,bfloat16,int8] [--new-tokens 16] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import TokenClock, available_memory_bytes, peak_rss_kb, status_kb  # (bench/ is on sys.path when a bench runs as a script)

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO.parent / "shared" / "golden" / "keys_VideoChat-Flash-Qwen2_5-2B_res448.json"
CHECKPOINT = "VideoChat-Flash-Qwen2_5-2B_res448"
# What the published folder's config.json has beside the manifest's fields (the original remote code's names).
ORIGINAL_FIELDS = {
    "model_type": "videochat_flash_qwen", "architectures": ["VideoChatFlashQwenForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_videochat_flash.VideoChatFlashQwenConfig",
                 "AutoModelForCausalLM": "modeling_videochat_flash.VideoChatFlashQwenForCausalLM"},
}
SHARDS = 2
# configuration -> `videochat-flash chat` options (--dtype, --quantize)
CONFIGS = {
    "float32": {"dtype": "float32", "quantize": "none"},
    "bfloat16": {"dtype": "bfloat16", "quantize": "none"},
    "int8": {"dtype": "auto", "quantize": "int8"},
}
# issue 16's targets, as ratios to float32: (measure, bound, "max" or "min")
TARGETS = {"bfloat16": ("peak RSS", 0.55, "max"), "int8": ("decode tokens/s", 1.5, "min")}
QUESTION = "Describe this video in detail."
CLIP_FRAMES, CLIP_FPS, CLIP_SIZE = 8, 4, (160, 120)


# ----------------------------------------------------------------------------------------------------- inputs
def write_original_checkpoint(folder: Path) -> Path:
    """The 2B checkpoint's config and tensor shapes with random bfloat16 weights, in the published layout; written
    once (a `.complete` marker), shard by shard so that at most one shard is in memory."""
    import torch
    from safetensors.torch import save_file

    from videochat_flash.tiny_model import build_byte_level_tokenizer

    if (folder / ".complete").exists():
        return folder
    start = time.perf_counter()
    manifest = json.loads(MANIFEST.read_text())
    config = {k: v for k, v in manifest["config_used"].items()
              if k not in ("_attn_implementation", "video_token_id", "image_token_id")}  # absent from published configs
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, **ORIGINAL_FIELDS}, indent=2))
    build_byte_level_tokenizer().save_pretrained(folder)
    keys = {k: v["shape"] for k, v in manifest["keys"].items() if k != "lm_head.weight"}  # tied: not saved
    names = sorted(keys)
    generator = torch.Generator().manual_seed(0)
    weight_map, per_shard = {}, -(-len(names) // SHARDS)
    for index in range(SHARDS):
        shard = f"model-{index + 1:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {name: (0.02 * torch.randn(keys[name], generator=generator)).to(torch.bfloat16)
                   for name in names[index * per_shard:(index + 1) * per_shard]}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    total = sum(torch.Size(shape).numel() for shape in keys.values()) * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / ".complete").write_text("ok\n")
    print(f"wrote {folder} ({total / 1e9:.2f} GB of random bfloat16 weights) in {time.perf_counter() - start:.0f} s",
          flush=True)
    return folder


def write_clip(path: Path) -> Path:
    """A short H.264 clip (8 frames at 4 fps, a bar moving right): chat() samples all 8, encoded as two 4-frame clips
    at 448 px."""
    if not path.exists():
        import numpy as np

        sys.path.insert(0, str(REPO / "tests"))
        from media import encode

        def moving_bar(i, width, height):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[:, (i * 16) % width:(i * 16) % width + 24] = (255, 128, 0)
            return frame

        encode(path, CLIP_FRAMES, *CLIP_SIZE, CLIP_FPS, frames=moving_bar)
    return path


# ----------------------------------------------------------------------------------------------------- child
def child(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from videochat_flash.videochat_flash_cli import load_model

    options = CONFIGS[args.child]
    start = time.perf_counter()
    model = load_model(args.folder, "cpu", options["dtype"], options["quantize"])
    tokenizer = AutoTokenizer.from_pretrained(args.folder, trust_remote_code=True)
    load_s, load_peak_kb, loaded_kb = time.perf_counter() - start, peak_rss_kb(), status_kb("VmRSS")
    clock = TokenClock()
    generation = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                  "streamer": clock}
    start = time.perf_counter()
    model.chat(args.video, tokenizer, QUESTION, return_history=False, generation_config=generation)
    answer_s = time.perf_counter() - start
    decode_s = clock.times[-1] - clock.times[0]
    print("RESULT " + json.dumps({
        "peak_kb": peak_rss_kb(), "load_peak_kb": load_peak_kb, "loaded_kb": loaded_kb, "load_s": load_s,
        "private_kb": status_kb("RssAnon"), "load_average": os.getloadavg()[0],
        "answer_s": answer_s, "first_token_s": clock.times[0] - start, "new_tokens": len(clock.times),
        "decode_tokens_per_s": (len(clock.times) - 1) / decode_s, "threads": torch.get_num_threads(),
        "weight_dtypes": sorted({type(p).__name__ + ":" + str(p.dtype).removeprefix("torch.")
                                 for p in model.parameters()}),
    }), flush=True)


# ----------------------------------------------------------------------------------------------------- parent
def run_config(name: str, folder: Path, video: Path, new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--video", str(video),
           "--new-tokens", str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=16)
    default_folder = Path(tempfile.gettempdir()) / "videochat_flash_bench" / CHECKPOINT
    parser.add_argument("--folder", type=Path, default=default_folder,
                        help="where the random original-format checkpoint is written (once)")
    parser.add_argument("--min-free-gb", type=float, default=13.0,
                        help="refuse to start a configuration with less memory available (the machine is shared)")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from videochat_flash.hub_export import resolve_model

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if unknown := set(names) - set(CONFIGS):
        parser.error(f"unknown configurations {sorted(unknown)}; choose from {list(CONFIGS)}")
    original = write_original_checkpoint(args.folder)
    folder = resolve_model(original, cache_dir=args.folder.parent / "cache")  # converted once, weights linked
    video = write_clip(args.folder.parent / f"clip_{CLIP_FRAMES}f_{CLIP_SIZE[0]}x{CLIP_SIZE[1]}.mp4")
    print(f"model: {CHECKPOINT} shape, random weights (bfloat16 original-format folder {original}), CPU; "
          f"{CLIP_FRAMES} frames at 448 px, {args.new_tokens} new tokens; one process per configuration")
    header = (f"{'config':<9} {'peak RSS GB':>11} {'after load GB':>13} {'private GB':>10} {'load s':>7} "
              f"{'1st token s':>11} {'decode tok/s':>12} {'load avg':>8}  weights")
    print(header)
    print("-" * len(header))
    results = {}
    for name in names:
        free = available_memory_bytes()
        if free is not None and (free := free / 1024**3) < args.min_free_gb:  # (no /proc: not checked)
            raise SystemExit(f"only {free:.1f} GB available, {args.min_free_gb} GB wanted for {name}: "
                             "wait for other jobs (or lower --min-free-gb)")
        r = results[name] = run_config(name, folder, video, args.new_tokens)
        print(f"{name:<9} {r['peak_kb'] / 1024**2:>11.2f} {r['loaded_kb'] / 1024**2:>13.2f} "
              f"{r['private_kb'] / 1024**2:>10.2f} {r['load_s']:>7.1f} {r['first_token_s']:>11.1f} "
              f"{r['decode_tokens_per_s']:>12.2f} {r['load_average']:>8.1f}  {', '.join(r['weight_dtypes'])}",
              flush=True)
    if "float32" in results:
        base = results["float32"]
        print()
        for name, r in results.items():
            if name == "float32":
                continue
            ratios = {"peak RSS": r["peak_kb"] / base["peak_kb"],
                      "decode tokens/s": r["decode_tokens_per_s"] / base["decode_tokens_per_s"]}
            target = ""
            if name in TARGETS:
                measure, bound, kind = TARGETS[name]
                met = ratios[measure] <= bound if kind == "max" else ratios[measure] >= bound
                sign, verdict = "<=" if kind == "max" else ">=", "met" if met else "NOT met"
                target = f"  (target: {measure} {sign} {bound}x: {verdict})"
            print(f"{name} / float32: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + target)


if __name__ == "__main__":
    main()
