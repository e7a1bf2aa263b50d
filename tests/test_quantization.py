"""Quantized loading: torchao int8 weight-only through transformers' ``TorchAoConfig`` (the CLI's ``--quantize int8``),
what the quantizers leave alone (vision tower, projector, ``lm_head``), the tower's float32 fast path next to quantized
weights, and the CLI's checks (``--quantize nf4`` needs CUDA). torchao comes with the ``[quant]`` extra."""

import pytest
import torch
from media import encode
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import AutoModel, TorchAoConfig
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from videochat_flash import videochat_flash_cli
from videochat_flash.hub_export import make_tiny_folder
from videochat_flash.tiny_model import build_byte_level_tokenizer
from videochat_flash.vision_tower.umt import run_linear

QUESTION = "What is moving in the video?"
COMPARED_TOKENS = 6  # the byte-level tokenizer: one token per character of the answer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("quant_tiny") / "tiny")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("quant_video") / "clip.mp4", 16, fps=8)


@pytest.fixture(scope="module")
def int8_model(tiny_dir):
    return videochat_flash_cli.load_model(tiny_dir, "cpu", "auto", "int8")


def _is_quantized(parameter) -> bool:
    return type(parameter) not in (nn.Parameter, torch.Tensor)


def test_int8_quantizes_the_llm_linears_only(int8_model):
    quantized = {name for name, p in int8_model.named_parameters() if _is_quantized(p)}
    decoder_weights = {name for name, module in int8_model.named_modules()
                       if isinstance(module, nn.Linear) and name.startswith("model.layers.")}
    assert quantized == {f"{name}.weight" for name in decoder_weights} and quantized
    assert int8_model.dtype == torch.bfloat16  # --dtype auto beside quantized weights
    assert type(int8_model.lm_head.weight) is nn.Parameter
    print(f"\n{len(quantized)} int8 weights; tower, projector, embeddings and lm_head unquantized")


def test_a_users_own_skip_list_still_keeps_the_tower_and_projector(tiny_dir):
    """`modules_to_not_convert` replaces the quantizer's defaults; the model class adds its own modules to it."""
    config = TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["lm_head"])
    model = AutoModel.from_pretrained(tiny_dir, trust_remote_code=True, dtype=torch.float32,
                                      quantization_config=config)
    quantized = [name for name, p in model.named_parameters() if _is_quantized(p)]
    assert quantized and all(name.startswith("model.layers.") for name in quantized)


def test_bitsandbytes_reads_the_same_skip_list(int8_model):
    """What the bnb 4/8-bit quantizers compute (`get_modules_to_not_convert` with `llm_int8_skip_modules` and the
    model's `_keep_in_fp32_modules`), checked without bitsandbytes (a CUDA package) on the module names they test."""
    skipped = HfQuantizer.get_modules_to_not_convert(int8_model, None, int8_model._keep_in_fp32_modules)
    names = [name for name, module in int8_model.named_modules() if isinstance(module, nn.Linear)]
    converted = {name for name in names if should_convert_module(name, skipped)}
    assert converted == {name for name in names if name.startswith("model.layers.")}


def test_int8_answer_matches_float32s_first_tokens(tiny_dir, video, int8_model):
    tokenizer = build_byte_level_tokenizer()
    generation = {"max_new_tokens": 12, "do_sample": False}
    full = videochat_flash_cli.load_model(tiny_dir, "cpu", "float32", "none")
    answers = [model.chat(video, tokenizer, QUESTION, max_num_frames=16, return_history=False,
                          generation_config=generation) for model in (full, int8_model)]
    print(f"\nfloat32 {answers[0]!r}, int8 (bfloat16 activations) {answers[1]!r}")
    assert len(answers[0]) >= COMPARED_TOKENS
    assert answers[1][:COMPARED_TOKENS] == answers[0][:COMPARED_TOKENS]


def test_decode_rows_run_atens_int8_kernel(int8_model):
    """Loading routes every int8 LLM linear's few-row inputs to ATen's int8 kernel; its output equals torchao's own
    forward to bfloat16 rounding, and longer inputs, gradients and float32 inputs take torchao's forward unchanged."""
    from videochat_flash.modeling_videochat_flash import INT8_KERNEL_MAX_ROWS

    routed = [m for m in int8_model.modules() if hasattr(m, "_stock_forward")]
    assert routed and len(routed) == sum(_is_quantized(m.weight) for m in int8_model.modules() if isinstance(m, nn.Linear))
    layer = routed[0]
    torch.manual_seed(0)
    calls = []
    kernel = torch.ops.aten._weight_int8pack_mm
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *a: calls.append(a) or kernel(*a), raising=False)
        for rows in (1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1):
            hidden = torch.randn(1, rows, layer.in_features, dtype=torch.bfloat16)
            before = len(calls)
            output, stock = layer(hidden), layer._stock_forward(hidden)
            assert len(calls) - before == (rows <= INT8_KERNEL_MAX_ROWS)
            assert output.shape == stock.shape and output.dtype == torch.bfloat16
            assert (output.float() - stock.float()).abs().max() <= 0.02 * stock.float().abs().max()
        assert len(calls) == 2
    hidden = torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16)
    assert torch.equal(layer(hidden).detach(), layer._stock_forward(hidden).detach())  # gradients on: torchao's


def test_run_linear_leaves_quantized_weights_to_their_layer():
    """torchao keeps the nn.Linear and swaps in a tensor subclass that reports float32: the oneDNN float32 path must
    not take it (it has no kernel for the subclass); the layer's own forward runs, the extra bias and GELU after."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    quantize_(layer, Int8WeightOnlyConfig())
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and _is_quantized(layer.weight)
    hidden, extra = torch.randn(2, 5, 64), torch.randn(96)
    with torch.no_grad():
        expected = nn.functional.gelu(layer(hidden) + extra)
        assert torch.equal(run_linear(layer, hidden, extra_bias=extra, gelu=True), expected)
        assert torch.equal(run_linear(layer, hidden), layer(hidden))


def test_a_quantized_tower_still_encodes(tiny_dir, video):
    """Quantizing the tower is not the default, but a user may do it (quantize_ on the module): its float32 no-grad
    encode runs through the quantized layers and stays close to the dense tower's."""
    model = videochat_flash_cli.load_model(tiny_dir, "cpu", "float32", "none")
    clips = torch.randn(2, model.config.mm_local_num_frames, 3, 128, 128)
    with torch.no_grad():
        dense = model.model.encode_clips(clips)
        quantize_(model.model.vision_tower, Int8WeightOnlyConfig())
        quantized = model.model.encode_clips(clips)
    assert (quantized - dense).abs().max() <= 0.05 * dense.abs().max()


def test_cli_chat_with_int8(tiny_dir, video, capsys):
    args = ["chat", video, QUESTION, "--model", str(tiny_dir), "--device", "cpu", "--quantize", "int8",
            "--max-new-tokens", "6"]
    assert videochat_flash_cli.main(args) == 0
    assert capsys.readouterr().out.strip()


def test_cli_nf4_on_a_cpu_is_one_clear_error_before_loading(tiny_dir, video, capsys, monkeypatch):
    monkeypatch.setattr(videochat_flash_cli, "_load", lambda *a, **k: pytest.fail("the model must not load"))
    for device in ("cpu", "auto"):
        if device == "auto" and torch.cuda.is_available():
            continue
        args = ["chat", video, QUESTION, "--model", str(tiny_dir), "--device", device, "--quantize", "nf4"]
        assert videochat_flash_cli.main(args) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "CUDA" in err and "--quantize int8" in err, err


def test_dtype_auto_beside_quantized_weights_is_bfloat16():
    assert videochat_flash_cli._device_and_dtype("cpu", "auto", "int8") == ("cpu", torch.bfloat16)
    assert videochat_flash_cli._device_and_dtype("cpu", "auto") == ("cpu", torch.float32)
    config = videochat_flash_cli.quantization_config("nf4", torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_a_float16_load_keeps_the_tower_and_projector_float32(tiny_dir, video):
    """The side effect of `_keep_in_fp32_modules` (transformers upcasts those modules in float16 loads): the visual
    tokens are computed in float32 and cast to the LLM's float16; chat() works."""
    model = AutoModel.from_pretrained(tiny_dir, trust_remote_code=True, dtype=torch.float16).eval()
    visual = {p.dtype for name, p in model.named_parameters() if name.startswith(("model.vision_tower",
                                                                                  "model.mm_projector"))}
    assert visual == {torch.float32} and model.model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    answer = model.chat(video, build_byte_level_tokenizer(), QUESTION, max_num_frames=16, return_history=False,
                        generation_config={"max_new_tokens": 4, "do_sample": False})
    assert isinstance(answer, str)
