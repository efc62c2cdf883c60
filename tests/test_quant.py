"""flux2lab.quantizers: NVFP4/FP8 numerics against torchao, NVIDIA's layer rule, memory, errors, quality order."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

from flux2lab.common.errors import FeatureNotAvailable, Flux2LabError
from flux2lab.pipeline.models import build_transformer_on_meta
from flux2lab.quantizers import (
    E2M1_PAIRS,
    FLUX2_DEV_KEEP,
    NVIDIA_FLUX2_DEV_INCLUDE,
    TEXT_ENCODER_KEEP,
    FP8EmulatedLinear,
    NVFP4EmulatedLinear,
    default_keep,
    fp8_quantize_rows,
    nvfp4_block_values,
    quantize,
    select_layers,
    tensor_bytes,
)

SHAPES = [((4, 64), 32), ((2, 7, 128), 48), ((33, 256), 256), ((1, 3, 5, 32), 16)]
DTYPES = [torch.float32, torch.bfloat16]
# Tolerance of the comparison against an fp32 reference: rounding of the output only (bf16: 8 bits).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def linear(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n).to(dtype)


def nvfp4_round_trip(t: torch.Tensor) -> torch.Tensor:
    """dequant(quant(t)) with torchao's primitives and a dynamic per-tensor scale, in fp32."""
    t2d = t.reshape(-1, t.shape[-1]).contiguous()
    scale = per_tensor_amax_to_scale(torch.max(torch.abs(t2d)))
    return NVFP4Tensor.to_nvfp4(t2d, per_tensor_scale=scale).dequantize(torch.float32).reshape(t.shape)


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.float() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"max error {err} vs max |value| {want.abs().max().item()}"


# --- numerics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,n", SHAPES)
def test_emulated_nvfp4_linear_equals_torchao_round_trip(x_shape, n, dtype):
    layer = linear(x_shape[-1], n, dtype)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(x_shape, dtype=dtype) * 3
    want = F.linear(nvfp4_round_trip(x), nvfp4_round_trip(w), b.float())
    report = quantize(layer, "nvfp4", backend="emulated")
    assert report.backend == "emulated" and isinstance(layer, NVFP4EmulatedLinear)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (*x_shape[:-1], n)
    assert_close_rel(got, want, TOL[dtype])
    # ... and really is quantized: the unquantized layer is much further from the reference.
    unquantized_err = (F.linear(x.float(), w.float(), b.float()) - want).abs().max().item()
    assert unquantized_err > 5 * (got.float() - want).abs().max().item()


def test_nvfp4_weight_decode_is_torchao_dequantize_bit_for_bit():
    w = torch.randn(96, 256) * torch.logspace(-3, 2, 256)  # blocks of very different magnitudes
    t = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=per_tensor_amax_to_scale(w.abs().max()))
    for dtype in DTYPES:
        no_tensor_scale = NVFP4Tensor(t.qdata, t.scale, 16, dtype)
        assert torch.equal(nvfp4_block_values(t, E2M1_PAIRS.to(dtype)), no_tensor_scale.dequantize(dtype))


def test_nvfp4_values_are_e2m1_with_e4m3_block_scales():
    layer = linear(64, 32, torch.float32)
    quantize(layer, "nvfp4", backend="emulated")
    w = layer.weight
    values = nvfp4_block_values(w, E2M1_PAIRS).view(32, 4, 16) / w.scale.float().view(32, 4, 1)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.isin(values.abs(), grid).all()
    assert w.scale.dtype == torch.float8_e4m3fn and w.per_tensor_scale.dtype == torch.float32


def test_nvfp4_packed_storage_is_4_5_bits_per_weight():
    layer = linear(1024, 512, torch.bfloat16)
    quantize(layer, "nvfp4", backend="emulated")
    bits = tensor_bytes(layer.weight) * 8 / layer.weight.numel()
    assert abs(bits - 4.5) < 0.01  # 4-bit values + one 8-bit scale per 16 + one fp32 per tensor


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,n", SHAPES[:3])
def test_emulated_fp8_matches_torchao_float8_round_trip(x_shape, n, dtype):
    layer = linear(x_shape[-1], n, dtype)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(x_shape, dtype=dtype) * 3
    xd = fp8_quantize_rows(x.reshape(-1, x_shape[-1])).dequantize(torch.float32).reshape(x_shape)
    want = F.linear(xd, fp8_quantize_rows(w).dequantize(torch.float32), b.float())
    quantize(layer, "fp8", backend="emulated")
    assert isinstance(layer, FP8EmulatedLinear) and layer.weight.qdata.dtype == torch.float8_e4m3fn
    assert layer.weight.scale.shape == (n, 1)  # row-wise
    assert_close_rel(layer(x), want, TOL[dtype])


def test_emulated_fp8_matches_torchao_float8_linear_itself():
    """torchao's own Float8Tensor linear (its scaled-mm path; PyTorch runs it on CPU too) gives the same."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    from torchao.quantization.quantize_.common import KernelPreference
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
        Float8Tensor,
        QuantizeTensorToFloat8Kwargs,
    )

    layer = linear(128, 64, torch.bfloat16)
    x = torch.randn(2, 9, 128, dtype=torch.bfloat16)
    # What torchao's config builds (it refuses to run its hardware check on CPU, so built by hand here).
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    torch_kernels = KernelPreference.TORCH
    act = QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, PerRow(), kernel_preference=torch_kernels)
    w8 = Float8Tensor.from_hp(layer.weight.detach(), granularity=PerRow(), mm_config=config.mm_config,
                              act_quant_kwargs=act, kernel_preference=torch_kernels)
    try:
        want = F.linear(x, w8, layer.bias)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this PyTorch has no CPU scaled mm: {e}")
    quantize(layer, "fp8", backend="emulated")
    assert_close_rel(layer(x), want.float(), TOL[torch.bfloat16])


def test_quantized_layers_survive_moves_and_zero_inputs():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    quantize(model, "nvfp4", backend="emulated")
    model = model.to(torch.bfloat16)
    assert isinstance(model[0].weight, NVFP4Tensor) and model[0].weight.qdata.dtype == torch.uint8
    assert model[0].weight.per_tensor_scale.dtype == torch.float32  # not cast with the model
    zeros = torch.zeros(3, 32, dtype=torch.bfloat16)
    assert torch.isfinite(model(zeros)).all()
    fp8 = nn.Linear(32, 16)
    quantize(fp8, "fp8", backend="emulated")
    assert torch.equal(fp8(torch.zeros(2, 32)), fp8.bias.expand(2, 16))


# --- layer selection ------------------------------------------------------------------------------------

EXPECTED_KEPT = {
    "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
    "time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2",
    "x_embedder", "context_embedder", "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear", "single_stream_modulation.linear", "norm_out.linear", "proj_out",
    *(f"transformer_blocks.{i}.attn.{n}" for i in range(8)
      for n in ("to_add_out", "add_q_proj", "add_k_proj", "add_v_proj")),
}


@pytest.fixture(scope="module")
def full_meta():
    return build_transformer_on_meta()


def test_default_selection_on_full_size_flux2_dev(full_meta):
    quantized, kept = select_layers(full_meta)
    assert len(quantized) == 160 and len(kept) == 43
    assert set(kept) == EXPECTED_KEPT
    per_double = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out",
                  "ff_context.linear_in", "ff_context.linear_out"}
    assert set(quantized) == {f"transformer_blocks.{i}.{n}" for i in range(8) for n in per_double} | {
        f"single_transformer_blocks.{i}.attn.{n}" for i in range(48) for n in ("to_qkv_mlp_proj", "to_out")}
    assert kept["double_stream_modulation_img.linear"] == "keep pattern 'stream'"
    assert kept["transformer_blocks.3.attn.add_k_proj"] == "keep pattern 'add_k_proj'"


def test_nvidia_include_regex_is_the_same_rule_before_unfusing_qkv(full_meta):
    """NVIDIA's regex (include form) selects what the keep-list does, except the text-stream QKV, which
    their fused naming (to_added_qkv) kept and diffusers' unfused naming no longer matches."""
    by_regex, kept_by_regex = select_layers(full_meta, keep=(), include=NVIDIA_FLUX2_DEV_INCLUDE)
    by_keep, _ = select_layers(full_meta)
    assert set(by_regex) - set(by_keep) == {f"transformer_blocks.{i}.attn.add_{p}_proj" for i in range(8)
                                            for p in "qkv"}
    assert set(by_keep) <= set(by_regex)
    assert all(r == "not matched by include" for r in kept_by_regex.values())
    # The regex is a rule for what to QUANTIZE: a name it matches is quantized.
    assert re.search(NVIDIA_FLUX2_DEV_INCLUDE, "single_transformer_blocks.0.attn.to_out")
    assert not re.search(NVIDIA_FLUX2_DEV_INCLUDE, "transformer_blocks.0.attn.to_add_out")


def test_full_size_memory_meets_targets_on_meta(full_meta):
    """Packed storage of the full-size model (meta device, no memory): NVFP4 <= 35%, FP8 <= 55% of BF16."""
    ratios = {}
    for scheme in ("nvfp4", "fp8"):
        model = copy.deepcopy(full_meta).to(torch.bfloat16)
        r = quantize(model, scheme, backend="emulated")
        ratios[scheme] = r.bytes_after / r.bytes_before
        assert abs(r.bytes_before / 2**30 - 60.0) < 0.1
    assert 0.30 < ratios["nvfp4"] <= 0.35 and 0.50 < ratios["fp8"] <= 0.55, ratios


def test_keep_include_and_shape_rules():
    model = nn.ModuleDict({
        "attn": nn.ModuleDict({"to_q": nn.Linear(32, 32), "to_out": nn.Linear(32, 32)}),
        "odd": nn.Linear(20, 32),
        "proj_out": nn.Linear(32, 16),
    })
    q, kept = select_layers(model)  # default: FLUX.2 rule
    assert q == ["attn.to_q", "attn.to_out"]
    assert kept == {"odd": "shape not divisible by 16", "proj_out": "keep pattern 'proj_out'"}
    q, kept = select_layers(model, keep=["to_out"], include=r"^attn\.")
    assert q == ["attn.to_q"] and kept["proj_out"] == "not matched by include"
    report = quantize(model, "nvfp4", backend="emulated", keep=["to_out"])
    assert report.quantized == ["attn.to_q", "proj_out"] and "odd" in report.kept
    assert "shape not divisible by 16" in report.summary()
    assert isinstance(model["odd"], nn.Linear) and not isinstance(model["odd"], NVFP4EmulatedLinear)


def test_text_encoder_rule(tiny_pipe):
    te = copy.deepcopy(tiny_pipe.text_encoder)
    assert default_keep(te) == TEXT_ENCODER_KEEP and default_keep(tiny_pipe.transformer) == FLUX2_DEV_KEEP
    report = quantize(te, "fp8", backend="emulated")
    assert report.quantized and all(n.startswith("model.language_model.layers.") for n in report.quantized)
    assert "lm_head" in report.kept and any("vision_tower" in n for n in report.kept)
    assert report.bytes_after < report.bytes_before


def test_bf16_changes_nothing():
    layer = linear(32, 32, torch.bfloat16)
    before = layer.weight.detach().clone()
    report = quantize(layer, "bf16")
    assert type(layer) is nn.Linear and torch.equal(layer.weight, before)
    assert report.backend == "none" and report.bytes_after == report.bytes_before and not report.quantized


# --- errors ---------------------------------------------------------------------------------------------


def test_bad_names_and_wrong_hardware_give_clear_errors():
    layer = linear(32, 32, torch.bfloat16)
    with pytest.raises(Flux2LabError, match="unknown precision 'int4'.*bf16, fp8, nvfp4"):
        quantize(layer, "int4")
    with pytest.raises(Flux2LabError, match="unknown quant backend 'fast'.*auto, native, emulated"):
        quantize(layer, "nvfp4", backend="fast")
    blackwell = r"nvfp4 backend 'native' needs .*sm100\+ \(Blackwell\).*emulated"
    with pytest.raises(FeatureNotAvailable, match=blackwell):
        quantize(layer, "nvfp4", backend="native")
    with pytest.raises(FeatureNotAvailable, match=r"fp8 backend 'native' needs .*sm89\+"):
        quantize(layer, "fp8", backend="native")
    assert type(layer) is nn.Linear  # nothing changed by the failed calls


def test_keep_and_include_mistakes_are_refused():
    layer = linear(32, 32, torch.float32)
    with pytest.raises(Flux2LabError, match="looks like a regular expression.*include="):
        quantize(layer, "nvfp4", keep=[NVIDIA_FLUX2_DEV_INCLUDE])
    with pytest.raises(Flux2LabError, match="list of name substrings"):
        quantize(layer, "nvfp4", keep="proj_out")
    with pytest.raises(Flux2LabError, match="not a valid regular expression"):
        quantize(layer, "nvfp4", include="(unclosed")


def test_quantizing_twice_is_refused():
    layer = linear(32, 32, torch.float32)
    quantize(layer, "nvfp4")
    with pytest.raises(Flux2LabError, match="already quantized"):
        quantize(layer, "fp8")


def test_auto_emulates_without_the_kernels():
    layer = linear(32, 32, torch.bfloat16)
    assert quantize(layer, "nvfp4", backend="auto").backend == "emulated"  # CPU (or a pre-Blackwell GPU)


# --- quality order on the tiny pipeline -----------------------------------------------------------------


def test_tiny_pipeline_nvfp4_differs_more_than_fp8():
    from flux2lab.pipeline.core import generate
    from flux2lab.pipeline.models import load_pipeline
    from flux2lab.pipeline.recipe import Recipe

    pipe = load_pipeline("tiny", device="cpu")
    original = pipe.transformer
    recipe = Recipe(steps=3)
    prompts = ["a cat sleeping on a sofa"]

    def images():
        return np.stack([np.asarray(i, dtype=np.float32) for i in generate(pipe, prompts, 0, recipe).images])

    reference = images()
    diff = {}
    for scheme in ("fp8", "nvfp4"):
        pipe.transformer = copy.deepcopy(original)
        quantize(pipe.transformer, scheme, backend="emulated")
        diff[scheme] = np.abs(images() - reference).mean()
    assert 0 < diff["fp8"] < diff["nvfp4"], diff
    # The text encoder takes the same call (FP8, as NVIDIA used there) and the pipeline still runs.
    quantize(pipe.text_encoder, "fp8", backend="emulated")
    assert images().shape == reference.shape


# --- GPU ------------------------------------------------------------------------------------------------


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme, backend", [
    pytest.param("nvfp4", "native", marks=pytest.mark.skipif(
        _capability() < (10, 0), reason="native NVFP4 needs an sm100+ (Blackwell) GPU")),
    pytest.param("fp8", "auto", marks=pytest.mark.skipif(
        _capability() < (8, 9), reason="native FP8 needs an sm89+ GPU")),
])
def test_native_matches_emulation(scheme, backend):
    layer = linear(512, 256, torch.bfloat16).cuda()
    emulated = copy.deepcopy(layer)
    x = torch.randn(128, 512, dtype=torch.bfloat16, device="cuda")
    assert quantize(layer, scheme, backend=backend).backend == "native"
    quantize(emulated, scheme, backend="emulated")
    assert_close_rel(layer(x), emulated(x).float(), 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_emulated_nvfp4_is_the_same_on_gpu_and_cpu():
    layer = linear(256, 128, torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    gpu = copy.deepcopy(layer).cuda()
    quantize(layer, "nvfp4", backend="emulated")
    quantize(gpu, "nvfp4", backend="emulated")
    assert_close_rel(gpu(x.cuda()).cpu(), layer(x).float(), TOL[torch.bfloat16])


# --- the benchmark script -------------------------------------------------------------------------------


def test_bench_script_runs_tiny_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_quant_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_quant_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--height", "64", "--width", "64", "--variants", "bf16,fp8,nvfp4-emulated",
                "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "quant_bench_64x64_tiny.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"bf16", "fp8", "nvfp4-emulated"} and all("error" not in r for r in rows.values())
    nvfp4 = rows["nvfp4-emulated"]
    assert nvfp4["quantized_layers"] == 20 and nvfp4["backend"] == "emulated"
    assert rows["nvfp4-emulated"]["weights_gib"] < rows["fp8"]["weights_gib"] < rows["bf16"]["weights_gib"]
    assert "nvfp4-emulated weights_ratio" in (tmp_path / "quant_bench_64x64_tiny.md").read_text()
    with pytest.raises(Flux2LabError, match="unknown nope"):
        bench.main(["--tiny", "--variants", "nope", "--out", str(tmp_path)])
