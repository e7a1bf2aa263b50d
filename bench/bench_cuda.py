"""The CUDA path, checked where a GPU is present (CI has none, so this is a script, not a test).

1. The original implementation's golden model (../shared/golden) on the GPU: float32 prefill logits and greedy ids
   against the golden, eager against sdpa; bfloat16 drifts from the golden no more than bfloat16 on the CPU.
2. The tiny model loaded with ``from_pretrained(..., dtype=torch.bfloat16, device_map="cuda")``: chat() and a
   follow-up on decoded frames, with and without in-LLM token dropping; float32 GPU answers equal the CPU's.
3. flash_attention_2, when flash-attn is installed.

Every check prints its figure and a PASS/FAIL line; the exit status is the number of failures. Timings of the
real-size encoder and the LLM prefill are in ``bench_encode.py --device cuda`` and ``bench_prefill.py --device cuda``.

    python bench/bench_cuda.py
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from videochat_flash.hub_export import make_tiny_folder  # noqa: E402
from videochat_flash.tiny_model import tiny_processor
from videochat_flash.modeling_videochat_flash import VideoChatFlashForCausalLM  # noqa: E402
from test_modeling import expand_golden_ids, golden_full_model  # noqa: E402  (the tests' golden loader)

QUESTION = "What is moving in the video?"
failures = []


def check(name, passed, figure):
    print(f"{'PASS' if passed else 'FAIL'}  {name}: {figure}")
    if not passed:
        failures.append(name)


def golden_model_and_inputs(device, dtype=torch.float32):
    """The golden model on `device` in `dtype`, its tensors, and its pixels and expanded prompt ids there."""
    model, tensors = golden_full_model()
    model.to(device, dtype)
    pixels = tensors["input.pixel_values"][None].to(device, dtype)
    input_ids = expand_golden_ids(tensors["input.input_ids"], 16 * pixels.shape[1]).to(device)
    return model, tensors, pixels, input_ids


def golden_checks(device):
    # Exact float32 on the GPU: no TF32 in matmuls or in the patch-embedding convolution.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, tensors, pixels, input_ids = golden_model_and_inputs(device)
    expected_ids = tensors["output.generated_ids"].tolist()
    expected_logits = tensors["output.prefill_logits"]
    with torch.inference_mode():
        logits = {}
        for implementation in ("sdpa", "eager"):
            model.config._attn_implementation = implementation
            logits[implementation] = model(input_ids, pixel_values_videos=pixels, use_cache=False).logits.cpu()
        model.config._attn_implementation = "sdpa"
        generated = model.generate(input_ids, pixel_values_videos=pixels, max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False)
        diff = (logits["sdpa"] - expected_logits).abs().max().item()
        check("golden prefill logits, cuda float32 sdpa", diff < 1e-4, f"max abs diff {diff:.2e} (CPU tolerance 1e-4)")
        diff = (logits["eager"] - logits["sdpa"]).abs().max().item()
        check("eager vs sdpa, cuda float32", diff < 1e-4, f"max abs diff {diff:.2e}")
        new_ids = generated[:, input_ids.shape[1]:].cpu().tolist()
        check("golden greedy ids, cuda float32", new_ids == expected_ids, f"{new_ids} vs {expected_ids}")

        # bfloat16 of random weights drifts far from float32 anywhere; the GPU must drift no more than the CPU does.
        model.to(torch.bfloat16)
        gpu = model(input_ids, pixel_values_videos=pixels.bfloat16(), use_cache=False).logits.float().cpu()
        model.cpu()
        cpu = model(input_ids.cpu(), pixel_values_videos=pixels.bfloat16().cpu(), use_cache=False).logits.float()
        gpu_diff, cpu_diff = ((x - expected_logits).abs().max().item() for x in (gpu, cpu))
        agree = (gpu.argmax(-1) == expected_logits.argmax(-1)).float().mean().item()
        check("golden prefill logits, cuda bfloat16", bool(gpu.isfinite().all()) and gpu_diff <= 2 * cpu_diff,
              f"max abs diff {gpu_diff:.3f} (cpu bfloat16: {cpu_diff:.3f}); argmax agrees at {agree:.1%} of positions")


def chat_checks(device):
    frames = np.random.default_rng(0).integers(0, 256, size=(16, 48, 64, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        tiny_dir = make_tiny_folder(Path(folder) / "tiny")
        tokenizer = tiny_processor().tokenizer
        settings = {"max_new_tokens": 12, "do_sample": False}

        def conversation(model):
            first, history = model.chat(frames, tokenizer, QUESTION, generation_config=settings)
            second, _ = model.chat(frames, tokenizer, "And then?", chat_history=history, generation_config=settings)
            return first, second

        cpu = conversation(VideoChatFlashForCausalLM.from_pretrained(tiny_dir).eval())
        gpu32 = conversation(VideoChatFlashForCausalLM.from_pretrained(tiny_dir, device_map=device).eval())
        check("tiny chat + follow-up, cuda float32 == cpu float32", gpu32 == cpu, f"{gpu32} vs {cpu}")
        for dropping in (False, True):
            model = VideoChatFlashForCausalLM.from_pretrained(
                tiny_dir, dtype=torch.bfloat16, device_map=device, mm_llm_compress=dropping
            ).eval()
            answers = conversation(model)
            on_gpu = next(model.parameters()).device.type == "cuda"
            check(f"tiny chat + follow-up, cuda bfloat16, token dropping {'on' if dropping else 'off'}",
                  on_gpu and all(isinstance(a, str) for a in answers), f"{answers}")


def flash_checks(device):
    if importlib.util.find_spec("flash_attn") is None:
        print("SKIP  flash_attention_2: flash-attn is not installed here")
        return
    model, _, pixels, input_ids = golden_model_and_inputs(device, torch.bfloat16)
    with torch.inference_mode():
        sdpa = model(input_ids, pixel_values_videos=pixels, use_cache=False).logits.float()
        model.config._attn_implementation = "flash_attention_2"  # the vision tower follows the model's choice
        flash = model(input_ids, pixel_values_videos=pixels, use_cache=False).logits.float()
    diff = (flash - sdpa).abs().max().item()
    check("flash_attention_2 vs sdpa, cuda bfloat16", diff < 0.1 * sdpa.abs().max().item(), f"max abs diff {diff:.3f}")


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    golden_checks(device)
    chat_checks(device)
    flash_checks(device)
    print(f"\n{len(failures)} failed" + (f": {', '.join(failures)}" if failures else ""))
    return len(failures)


if __name__ == "__main__":
    sys.exit(main())
