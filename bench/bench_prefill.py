"""Prefill time with and without in-LLM visual token dropping.

A Qwen2-0.5B-shaped random LLM (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936; weights made
in place, as bench_e2e.py makes them) reads a prompt of 1,024 and of 4,096 visual tokens (64 / 256 frames) plus
text. Visual features are random and passed pre-computed, so only the LLM is timed. Dropping uses the model card's
settings (uniform0_attention, layers [4, 18], ratios [1, 0.75, 0.25]) and, for reference, the config default
schedule. The ratios are printed last: dropping must never be slower than no dropping (>= 1.00x).

    python bench/bench_prefill.py [--dtype float32|bfloat16] [--visual-tokens 1024 4096] [--repeats 3] [--device cuda]
"""

import argparse
import os
import sys
import time

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling bench modules

from bench_e2e import random_model
from videochat_flash.configuration_videochat_flash import VideoChatFlashConfig

QWEN2_0_5B = {
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
SMALL_TOWER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 16, "image_size": 128}
SETTINGS = {
    "no dropping": {"mm_llm_compress": False},
    "model card (uniform0_attention [4,18] [1,.75,.25])": {
        "mm_llm_compress": True, "llm_compress_type": "uniform0_attention",
        "llm_compress_layer_list": [4, 18], "llm_image_token_ratio_list": [1.0, 0.75, 0.25],
    },
    "attention [8,16] [1,.5,.25]": {
        "mm_llm_compress": True, "llm_compress_type": "attention",
        "llm_compress_layer_list": [8, 16], "llm_image_token_ratio_list": [1.0, 0.5, 0.25],
    },
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--visual-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)

    config = VideoChatFlashConfig(**QWEN2_0_5B, mm_vision_tower="umt-large", vision_config=SMALL_TOWER)
    start = time.perf_counter()
    model = random_model(config, device, dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"made a {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameter model in "
          f"{time.perf_counter() - start:.1f} s ({args.dtype}, {where}); load average {os.getloadavg()[0]:.2f}")
    results = {count: measure(model, config, count, args, device, dtype) for count in args.visual_tokens}
    print(f"\n{args.dtype}, {args.text_tokens} text tokens; load average {os.getloadavg()[0]:.2f}")
    for count, timings in results.items():
        base = timings["no dropping"]
        for name, seconds in timings.items():
            if name != "no dropping":
                verdict = "ok" if base / seconds >= 1.0 else "SLOWER than no dropping"
                print(f"{count} visual tokens: speedup {name}: {base / seconds:.2f}x ({verdict})")


def measure(model, config, visual_tokens: int, args, device, dtype) -> dict[str, float]:
    """Best prefill seconds of each setting for one prompt; the settings alternate, so load hits them alike."""
    half = args.text_tokens // 2
    input_ids = torch.cat([
        torch.randint(0, 150000, (half,)),
        torch.full((visual_tokens,), config.video_token_id),
        torch.randint(0, 150000, (args.text_tokens - half,)),
    ])[None].to(device)
    features = torch.randn(visual_tokens, config.hidden_size, dtype=dtype, device=device)
    features = BaseModelOutputWithPooling(pooler_output=(features,))

    def prefill():
        with torch.inference_mode():
            model(input_ids, mm_encoder_outputs={"video": features}, use_cache=True, logits_to_keep=1)
        if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(device)

    def apply(overrides):
        for key, value in overrides.items():
            setattr(model.config, key, value)

    for overrides in SETTINGS.values():  # warm-up every path once
        apply(overrides)
        prefill()
    timings = {name: float("inf") for name in SETTINGS}
    for _ in range(args.repeats):
        for name, overrides in SETTINGS.items():
            apply(overrides)
            start = time.perf_counter()
            prefill()
            timings[name] = min(timings[name], time.perf_counter() - start)
    print(f"\n{visual_tokens} visual tokens:")
    for name, seconds in timings.items():
        print(f"  {name:55s} prefill {seconds:8.4f} s  (best of {args.repeats})")
    return timings


if __name__ == "__main__":
    main()
