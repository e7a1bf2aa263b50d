"""UMT vision tower and ToMe projector against the original implementation's golden outputs."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import PretrainedConfig, PreTrainedModel

from videochat_flash.vision_tower import ToMeProjector, UMTVisionTower, umt
from videochat_flash.vision_tower.token_merging import merge_schedule

ATOL = 2e-5
SMALL_TOWER = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "patch_size": 16, "image_size": 224}
SMALL_PROJECTOR = {
    "mm_hidden_size": 64,
    "hidden_size": 96,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 16,
}
MANIFESTS = ["VideoChat-Flash-Qwen2-7B_res224", "VideoChat-Flash-Qwen2-7B_res448", "VideoChat-Flash-Qwen2_5-2B_res448"]


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def strip_prefix(state, prefix):
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def tower_golden(golden):
    return load_file(golden("vision_tower_224.safetensors"))


@pytest.fixture(scope="module")
def projector_golden(golden):
    return load_file(golden("projector_tome16_224.safetensors"))


@pytest.fixture(scope="module")
def tower(tower_golden):
    model = UMTVisionTower(**SMALL_TOWER, select_layer=-2)
    # Golden keys are `vision_tower.<tower state dict>`; the tower's own keys start with its `vision_tower.` child.
    model.load_state_dict(strip_prefix(tower_golden, "vision_tower."), strict=True)  # raises on any key mismatch
    return model.eval()


@pytest.fixture(scope="module")
def projector(projector_golden):
    model = ToMeProjector(**SMALL_PROJECTOR)
    model.load_state_dict(strip_prefix(projector_golden, "mm_projector."), strict=True)
    return model.eval()


def random_tower(seed=0, **overrides):
    torch.manual_seed(seed)
    model = UMTVisionTower(**{**SMALL_TOWER, **overrides})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "q_bias", "v_bias")):
                param.normal_(0, 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------- tower
def test_tower_builds_only_selected_blocks():
    assert len(UMTVisionTower(**SMALL_TOWER).vision_tower.encoder.blocks) == 2
    with torch.device("meta"):
        assert len(UMTVisionTower(1024, 24, 16).vision_tower.encoder.blocks) == 23
        assert len(UMTVisionTower(1024, 24, 16, select_layer=-1).vision_tower.encoder.blocks) == 24


@pytest.mark.parametrize("kind", ["video", "image"])
def test_tower_matches_golden(tower, tower_golden, kind):
    with torch.no_grad():
        out = tower(tower_golden[f"input.{kind}"])
    expected = tower_golden[f"output.{kind}"]
    assert out.shape == expected.shape
    diff = max_diff(out, expected)
    print(f"tower {kind} sdpa max abs diff {diff:.3g}")
    assert diff <= ATOL


def test_position_tables_match_golden(tower, tower_golden):
    video = tower.position_table("video")
    image = tower.position_table("image")
    assert video.shape == (1, 784, 64) and image.shape == (1, 196, 64)
    print(
        f"pos_embed diff {max_diff(video, tower_golden['aux.pos_embed']):.3g}, "
        f"img_pos_embed diff {max_diff(image, tower_golden['aux.img_pos_embed']):.3g}"
    )
    assert max_diff(video, tower_golden["aux.pos_embed"]) <= 1e-6
    assert max_diff(image, tower_golden["aux.img_pos_embed"]) <= 1e-6
    # Not parameters, not buffers: nothing in the state dict, nothing for meta-device init to miss.
    assert not any("pos" in key for key in tower.state_dict())
    assert not list(tower.buffers())


def test_position_tables_follow_dtype(tower):
    table = tower.position_table("video", dtype=torch.bfloat16)
    assert table.dtype == torch.bfloat16
    assert torch.equal(table, tower.position_table("video").bfloat16())


def test_448_tables_are_bicubic_resizes_of_224_tables(tower_golden):
    """At 448 px the pretraining tables (4 x 14x14 for video, 14x14 for images) are resized to 28x28 per frame."""
    with torch.device("meta"):
        hd = UMTVisionTower(**{**SMALL_TOWER, "image_size": 448})
    for kind, golden_key, frames in [("video", "aux.pos_embed", 4), ("image", "aux.img_pos_embed", 1)]:
        base = tower_golden[golden_key].reshape(frames, 14, 14, 64).permute(0, 3, 1, 2)
        expected = F.interpolate(base, size=(28, 28), mode="bicubic", align_corners=False)
        expected = expected.permute(0, 2, 3, 1).reshape(1, frames * 784, 64)
        assert max_diff(hd.position_table(kind), expected) <= 1e-6


def test_eager_and_flash_fallback_match_sdpa(tower, tower_golden):
    pixels = tower_golden["input.video"]
    with torch.no_grad():
        sdpa = tower(pixels)
        try:
            tower.set_attn_implementation("eager")
            eager = tower(pixels)
            # On CPU / float32 flash-attn is never used: the flash setting must fall back to sdpa.
            tower.set_attn_implementation("flash_attention_2")
            flash_fallback = tower(pixels)
        finally:
            tower.set_attn_implementation("sdpa")
    golden_diff = max_diff(eager, tower_golden["output.video"])
    print(f"eager vs sdpa {max_diff(eager, sdpa):.3g}, eager vs golden {golden_diff:.3g}")
    assert max_diff(eager, sdpa) <= 1e-5
    assert golden_diff <= ATOL
    assert torch.equal(flash_fallback, sdpa)


def test_tower_batch_equals_single_runs():
    tower = random_tower()
    torch.manual_seed(1)
    clips = torch.randn(2, 4, 3, 224, 224)
    with torch.no_grad():
        batched = tower(clips)
        singles = torch.cat([tower(clips[:1]), tower(clips[1:])])
    assert batched.shape == (2, 4 * 196, 64)
    assert max_diff(batched, singles) <= 1e-5


def linear_kernels(fn):
    """Run `fn` under the profiler; return (its result, the set of linear-layer ops that ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    names = {event.key for event in prof.key_averages()}
    return result, names & {"mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear"}


def test_float32_cpu_inference_runs_onednn_linears_with_the_stock_result():
    """No-grad float32 on CPU takes oneDNN's GEMM (GELU fused); with gradients the stock ops run and backprop;
    both agree to float32 rounding. bfloat16 keeps the stock ops."""
    tower = random_tower()
    torch.manual_seed(3)
    pixels = torch.randn(1, 4, 3, 224, 224)
    with torch.no_grad():
        fast, fast_ops = linear_kernels(lambda: tower(pixels))
    stock, stock_ops = linear_kernels(lambda: tower(pixels))
    stock.sum().backward()
    assert all(param.grad is not None for param in tower.parameters() if param.requires_grad)
    assert "mkldnn::_linear_pointwise" not in stock_ops
    assert ("mkldnn::_linear_pointwise" in fast_ops) == umt._ONEDNN_LINEAR
    print(f"oneDNN vs stock linear layers: max abs diff {max_diff(fast, stock):.3g}")
    assert max_diff(fast, stock) <= 1e-5
    with torch.no_grad():
        _, bf16_ops = linear_kernels(lambda: tower.to(torch.bfloat16)(pixels.bfloat16()))
    assert "mkldnn::_linear_pointwise" not in bf16_ops


def test_wrapped_linear_layers_run_their_own_forward():
    """A layer that is not a plain nn.Linear (a PEFT adapter, a quantised subclass) is called, never bypassed."""
    calls = []

    class Counted(torch.nn.Linear):
        def forward(self, hidden_states):
            calls.append(self)
            return super().forward(hidden_states)

    tower = random_tower()
    pixels = torch.randn(1, 4, 3, 224, 224)
    blocks = tower.vision_tower.encoder.blocks
    with torch.no_grad():
        reference = tower(pixels)
        for block in blocks:
            for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
                plain = getattr(parent, name)
                wrapped = Counted(plain.in_features, plain.out_features, bias=plain.bias is not None)
                wrapped.load_state_dict(plain.state_dict())
                setattr(parent, name, wrapped)
        wrapped_output = tower(pixels)
    assert len(calls) == 4 * len(blocks)
    assert max_diff(wrapped_output, reference) <= 1e-5


def test_tower_bfloat16_forward():
    tower = random_tower().to(torch.bfloat16)
    torch.manual_seed(2)
    pixels = torch.randn(1, 4, 3, 224, 224)
    with torch.no_grad():
        out = tower(pixels.bfloat16())
        reference = random_tower()(pixels)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 784, 64)
    assert torch.isfinite(out).all()
    assert max_diff(out, reference) < 0.5  # bf16 rounding only, not a different computation


def test_tower_rejects_bad_inputs(tower):
    with pytest.raises(ValueError, match="4-frame"):
        tower(torch.zeros(1, 2, 3, 224, 224))
    with pytest.raises(ValueError, match="224x224"):
        tower(torch.zeros(1, 4, 3, 448, 448))
    with pytest.raises(ValueError, match="batch, frames"):
        tower(torch.zeros(4, 3, 224, 224))
    with pytest.raises(ValueError, match="select_layer"):
        UMTVisionTower(**SMALL_TOWER, select_layer=3)
    with pytest.raises(ValueError, match="attn_implementation"):
        UMTVisionTower(**SMALL_TOWER, attn_implementation="magic")


class _TowerConfig(PretrainedConfig):
    model_type = "umt_tower_test"


class _TowerModel(PreTrainedModel):
    """Minimal PreTrainedModel around the tower, to drive `gradient_checkpointing_enable()` as the real model does."""

    config_class = _TowerConfig
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        self.tower = random_tower(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64)

    def forward(self, pixel_values):
        return self.tower(pixel_values)


def test_gradient_checkpointing_gives_identical_grads():
    model = _TowerModel(_TowerConfig())
    model.tower.load_state_dict(
        random_tower(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64).state_dict()
    )
    model.train()
    torch.manual_seed(3)
    pixels = torch.randn(2, 4, 3, 64, 64)

    def grads():
        model.zero_grad(set_to_none=True)
        model(pixels).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    # `gradient_checkpointing_enable()` is the deprecated alias of this in transformers v5.
    model.activation_checkpointing_enable()
    blocks = model.tower.vision_tower.encoder.blocks
    assert all(block.gradient_checkpointing for block in blocks)
    calls = []
    # Hooks on the block itself stay outside the checkpoint; one inside it sees the backward recomputation.
    hook = blocks[0].norm1.register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6, rtol=0), name


# ---------------------------------------------------------------------------------------- real-size keys
@pytest.mark.parametrize("manifest", MANIFESTS)
def test_real_size_keys_and_shapes(golden, manifest):
    info = json.loads(golden(f"keys_{manifest}.json").read_text())
    expected = {k: tuple(v["shape"]) for k, v in info["keys"].items()}
    config = info["config_used"]
    image_size = info["vision"]["image_size"]
    with torch.device("meta"):
        tower = UMTVisionTower(
            hidden_size=config["mm_hidden_size"],
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=16,
            image_size=image_size,
            num_frames=config["mm_local_num_frames"],
            select_layer=config["mm_vision_select_layer"],
        )
        projector = ToMeProjector(
            mm_hidden_size=config["mm_hidden_size"],
            hidden_size=config["hidden_size"],
            num_attention_heads=16,
            image_size=image_size,
            patch_size=16,
        )
    for prefix, module in [("model.vision_tower.", tower), ("model.mm_projector.", projector)]:
        ours = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
        theirs = {k: v for k, v in expected.items() if k.startswith(prefix)}
        assert ours == theirs
    # The non-persistent tables the original keeps as attributes.
    assert list(tower.position_table("video").shape) == info["vision"]["pos_embed_shape(non-persistent)"]
    assert list(tower.position_table("image").shape) == info["vision"]["img_pos_embed_shape(non-persistent)"]


# ------------------------------------------------------------------------------------------- projector
def test_merge_schedule():
    assert merge_schedule(784, 64) == [392, 196, 98, 34]
    assert merge_schedule(196, 64) == [98, 34]
    assert merge_schedule(64, 64) == []


def check_merged(ours, expected):
    """Same values AND same order: every golden token's nearest merged token sits at the same index."""
    assert ours.shape == expected.shape
    nearest = torch.cdist(expected, ours).argmin(dim=-1)
    assert torch.equal(nearest, torch.arange(expected.shape[1]).expand_as(nearest))
    return max_diff(ours, expected)


def test_projector_video_matches_golden(projector, projector_golden):
    features = projector_golden["input.video"]  # (8 frames, 196, 64)
    with torch.no_grad():
        merged = projector.merge_tokens(features.reshape(2, 4 * 196, 64), 64)
        out = projector(features, compress=True, local_num_frames=4)
    merge_diff = check_merged(merged, projector_golden["aux.video_merged_before_mlp"])
    out_diff = max_diff(out, projector_golden["output.video"])
    print(f"projector video: merged diff {merge_diff:.3g}, output diff {out_diff:.3g}")
    assert merge_diff <= ATOL and out_diff <= ATOL
    assert out.shape == (2, 64, 96)


def test_projector_image_matches_golden(projector, projector_golden):
    features = projector_golden["input.image"]  # (2 images, 196, 64)
    with torch.no_grad():
        merged = projector.merge_tokens(features, 64)
        out = projector(features, compress=False)
        out_local1 = projector(features, compress=False, local_num_frames=1)
    merge_diff = check_merged(merged, projector_golden["aux.image_merged_before_mlp"])
    out_diff = max_diff(out, projector_golden["output.image"])
    print(f"projector image: merged diff {merge_diff:.3g}, output diff {out_diff:.3g}")
    assert merge_diff <= ATOL and out_diff <= ATOL
    assert torch.equal(out, out_local1)


def test_projector_batch_equals_single_clips(projector, projector_golden):
    features = projector_golden["input.video"]
    with torch.no_grad():
        batched = projector(features, compress=True, local_num_frames=4)
        singles = torch.cat([projector(features[i : i + 4], compress=True, local_num_frames=4) for i in (0, 4)])
        whole = projector(features[:4], compress=True)  # local_num_frames=-1: all rows are one clip
    assert torch.equal(batched, singles)
    assert torch.equal(whole, singles[:1])


def test_projector_bfloat16(projector, projector_golden):
    features = projector_golden["input.video"].reshape(2, 784, 64).bfloat16()
    merged = projector.merge_tokens(features, 64)
    assert merged.dtype == torch.bfloat16 and torch.isfinite(merged).all()
    # Averages are accumulated in float32 and rounded once: identical to merging the same values in float32.
    assert torch.equal(merged, projector.merge_tokens(features.float(), 64).bfloat16())
    with torch.no_grad():
        out = projector.to(torch.bfloat16)(features.reshape(8, 196, 64), compress=True, local_num_frames=4)
    projector.float()
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 96) and torch.isfinite(out).all()


def test_projector_rejects_bad_inputs(projector):
    with pytest.raises(ValueError, match="196"):
        projector(torch.zeros(4, 100, 64), compress=True, local_num_frames=4)
    with pytest.raises(ValueError, match="compress=True"):
        projector(torch.zeros(4, 196, 64), local_num_frames=4)
    with pytest.raises(ValueError, match="clips"):
        projector(torch.zeros(6, 196, 64), compress=True, local_num_frames=4)
