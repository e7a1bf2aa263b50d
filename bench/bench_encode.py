"""Visual encoding throughput of a full-size UMT-L tower (random weights) + ToMe merge.

Ours: `VideoChatFlashModel.encode_clips` as shipped (4-frame clips, `clips_per_tower_call` per call, sdpa, oneDNN
float32 GEMMs for the linear layers on CPU, merging vectorised over clips). Baseline: the plain way, written out
here with stock PyTorch ops over the same weights (nn.Linear, eager softmax attention, Conv3d patches), one clip
at a time, then the projector on that clip. Frames/s at 224 and 448 px in float32 and bfloat16; ratios last.

For float32 it also profiles ours: the time and FLOP rate of its linear layers and of its attention, next to a
square float32 matmul on this machine, i.e. how close to the machine's GEMM peak the remaining time already is.

    python bench/bench_encode.py [--clips-224 4] [--clips-448 1] [--dtypes float32,bfloat16] [--device cuda]
"""

import argparse
import time

import torch
import torch.nn.functional as F


from videochat_flash.configuration_videochat_flash import VideoChatFlashConfig
from videochat_flash.modeling_videochat_flash import VideoChatFlashModel

SMALL_LLM = {"vocab_size": 1024, "hidden_size": 1536, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 12, "num_key_value_heads": 2}


def build(image_size, dtype):
    tower = "umt-hd-large" if image_size == 448 else "umt-large"
    config = VideoChatFlashConfig(**SMALL_LLM, mm_vision_tower=tower)  # ViT-L/16 dims from the tower name
    torch.manual_seed(0)
    return VideoChatFlashModel(config).to(dtype).eval()


def ours(model, clips):
    model.config._attn_implementation = "sdpa"
    return model.encode_clips(clips)


def plain_tower(tower, clip):
    """`(T, 3, S, S)` -> `(1, T * L, C)`: the textbook ViT forward of the UMT tower with stock ops."""
    encoder = tower.vision_tower.encoder
    patches = encoder.patch_embed.proj(clip.transpose(0, 1)[None])  # Conv3d on (1, 3, T, S, S)
    hidden = patches.flatten(2).transpose(1, 2)  # (1, T * L, C)
    hidden = hidden + encoder.position_table("video", hidden.device, hidden.dtype)
    batch, length, width = hidden.shape
    for block in encoder.blocks:
        attn = block.attn
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        qkv = F.linear(block.norm1(hidden), attn.qkv.weight, bias)
        query, key, value = qkv.reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((query * attn.scale) @ key.transpose(-2, -1), dim=-1)
        hidden = hidden + attn.proj((weights @ value).transpose(1, 2).reshape(batch, length, width))
        hidden = hidden + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(hidden))))
    return encoder.vision_layernorm(hidden)


def plain_loop(model, clips):
    outputs = []
    for clip in clips:  # one clip per call, as the original encodes a video
        features = plain_tower(model.vision_tower, clip)
        features = features.reshape(clip.shape[0], -1, features.shape[-1])
        outputs.append(model.mm_projector(features, compress=True, local_num_frames=clip.shape[0]))
    return torch.cat(outputs)


def profile_ours(model, clips):
    """Seconds and GFLOP/s of ours' linear layers and attention, and its total seconds (one profiled run)."""
    tower = model.vision_tower
    width, depth = tower.hidden_size, tower.num_blocks
    clip_tokens = clips.shape[1] * tower.num_patches_per_frame
    tokens = clips.shape[0] * clip_tokens
    linear_flops = 2 * tokens * width * (4 * width + 2 * tower.intermediate_size) * depth  # qkv, proj, fc1, fc2
    attention_flops = 4 * clips.shape[0] * clip_tokens**2 * width * depth  # q @ k^T and weights @ v
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        ours(model, clips)
        total = time.perf_counter() - start
    events = prof.key_averages()
    linear = sum(e.self_cpu_time_total for e in events if e.key in ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")) / 1e6
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e6
    return total, linear, linear_flops / linear / 1e9, attention, attention_flops / attention / 1e9


def square_matmul_gflops(dtype, size=2048):
    square = torch.randn(size, size, dtype=dtype)
    with torch.inference_mode():
        square @ square
        start = time.perf_counter()
        square @ square
        return 2 * size**3 / (time.perf_counter() - start) / 1e9


def timed(fn, *args):
    with torch.inference_mode():
        start = time.perf_counter()
        result = fn(*args)
        if result.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(result.device)
        return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips-224", type=int, default=4)
    parser.add_argument("--clips-448", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}")
    ratios = {}
    for image_size, num_clips in ((224, args.clips_224), (448, args.clips_448)):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            model = build(image_size, dtype).to(device)
            clips = torch.randn(num_clips, 4, 3, image_size, image_size, dtype=dtype, device=device)
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
            if dtype == torch.float32 and device.type == "cpu":
                total, linear, linear_rate, attention, attention_rate = profile_ours(model, clips)
                print(f"    ours, profiled: {total:.2f} s = linear layers {linear:.2f} s at {linear_rate:.0f} GFLOP/s + "
                      f"attention {attention:.2f} s at {attention_rate:.0f} GFLOP/s + the rest "
                      f"{total - linear - attention:.2f} s (a 2048x2048 float32 matmul here: "
                      f"{square_matmul_gflops(dtype):.0f} GFLOP/s)")
            del model
    print()
    for (image_size, dtype_name), ratio in ratios.items():
        print(f"speedup ours / plain loop at {image_size} px {dtype_name}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
