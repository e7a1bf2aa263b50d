"""Visual encoding throughput of a full-size UMT-L tower (random weights) + ToMe merge.

Ours: `VideoChatFlashModel.encode_clips`, i.e. several 4-frame clips per tower call, sdpa attention, merging
vectorised over clips. Baseline: the plain way, one clip at a time through the tower with eager attention, then
the projector on that clip. Frames/s at 224 and 448 px in float32 and bfloat16; the ratios are printed last.

    python bench/bench_encode.py [--clips-224 4] [--clips-448 1] [--dtypes float32,bfloat16]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_videochat_flash import VideoChatFlashConfig  # noqa: E402
from modeling_videochat_flash import VideoChatFlashModel  # noqa: E402

SMALL_LLM = {"vocab_size": 1024, "hidden_size": 1536, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 12, "num_key_value_heads": 2}


def build(image_size, dtype):
    tower = "umt-hd-large" if image_size == 448 else "umt-large"
    config = VideoChatFlashConfig(**SMALL_LLM, mm_vision_tower=tower)  # ViT-L/16 dims from the tower name
    torch.manual_seed(0)
    return VideoChatFlashModel(config).to(dtype).eval()


def ours(model, clips):
    model.vision_clips_per_batch = clips.shape[0]
    model.config._attn_implementation = "sdpa"
    return model.encode_clips(clips)


def plain_loop(model, clips):
    model.vision_tower.set_attn_implementation("eager")
    model._vision_attn_implementation = "eager"
    try:
        outputs = []
        for clip in clips:  # one clip per call, as the original encodes a video
            features = model.vision_tower(clip[None])
            features = features.reshape(clip.shape[0], -1, features.shape[-1])
            outputs.append(model.mm_projector(features, compress=True, local_num_frames=clip.shape[0]))
        return torch.cat(outputs)
    finally:
        model.vision_tower.set_attn_implementation("sdpa")
        model._vision_attn_implementation = "sdpa"


def timed(fn, *args):
    with torch.inference_mode():
        start = time.perf_counter()
        result = fn(*args)
        return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-224", type=int, default=4)
    parser.add_argument("--clips-448", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ratios = {}
    for image_size, num_clips in ((224, args.clips_224), (448, args.clips_448)):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            model = build(image_size, dtype)
            clips = torch.randn(num_clips, 4, 3, image_size, image_size, dtype=dtype)
            with torch.inference_mode():  # warm-up both paths on one clip
                ours(model, clips[:1])
                plain_loop(model, clips[:1])
            # The two paths alternate, so load from other processes hits both alike; best of the rounds.
            t_ours = t_plain = float("inf")
            for _ in range(args.repeats):
                seconds, a = timed(ours, model, clips)
                t_ours = min(t_ours, seconds)
                seconds, b = timed(plain_loop, model, clips)
                t_plain = min(t_plain, seconds)
            frames = num_clips * 4
            diff = (a.float() - b.float()).abs().max().item()
            print(f"{image_size} px {dtype_name:8s}: ours {frames / t_ours:6.2f} frames/s, plain loop "
                  f"{frames / t_plain:6.2f} frames/s ({frames} frames; max |diff| {diff:.1e})")
            ratios[(image_size, dtype_name)] = t_plain / t_ours
            del model
    print()
    for (image_size, dtype_name), ratio in ratios.items():
        print(f"speedup ours / plain loop at {image_size} px {dtype_name}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
