"""The compressed-tensors export: its tensors read back with compressed-tensors' own decompressor, the
native grid kept where the layout allows, transformers loads the folder, and the CLI's errors."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import save_tiny, tiny_llama

from sinkquant.checkpoint import load
from sinkquant.cli import main
from sinkquant.errors import InputError
from sinkquant.export import ExportSettings, export, exported_model
from sinkquant.export import compressed_tensors as ct
from sinkquant.pipeline import quantize_model
from sinkquant.quantize.linear import SinkQuantLinear
from sinkquant.recipe import Recipe

compressed_tensors = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, stories_path):
    # widths 64 and 160: group 32 divides both, as vLLM's kernels need
    return save_tiny(tiny_llama(vocab=512), tmp_path_factory.mktemp("tiny") / "model", stories_path)


def _quantize(tiny_dir, folder, **overrides):
    recipe = Recipe().with_overrides(**{"calibration.samples": 2, "calibration.seq_len": 64, **overrides})
    return quantize_model(tiny_dir, folder, recipe, progress=False).out_dir


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    return {
        "w4-asym": _quantize(tiny_dir, root / "w4-asym", **{"weights.group_size": 32}),
        "w4-sym-plain": _quantize(
            tiny_dir,
            root / "w4-sym-plain",
            **{"weights.group_size": 32, "weights.symmetric": True, "weights.outliers": None},
        ),
        "w4-sym-log-plain": _quantize(
            tiny_dir,
            root / "w4-sym-log-plain",
            **{
                "weights.group_size": 32,
                "weights.symmetric": True,
                "weights.log_scales": True,
                "weights.outliers": None,
            },
        ),  # fmt: skip
        "w8-outliers": _quantize(
            tiny_dir, root / "w8-outliers", **{"weights.bits": 8, "weights.outliers.fraction": 0.05}
        ),
    }


def _native_layers(checkpoint) -> dict[str, SinkQuantLinear]:
    model = load(checkpoint)
    return {n: m for n, m in model.named_modules() if isinstance(m, SinkQuantLinear)}


def _module_tensors(folder, name):
    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(str(file)))
    return {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}


def _ct_decompress(folder, name):
    """compressed-tensors' own decompressor on one module's tensors, with the export's config. It
    multiplies in the scale's dtype, so its result is the exact product rounded to that dtype."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(
        targets=group["targets"],
        weights=QuantizationArgs(**group["weights"]),
        input_activations=None
        if group["input_activations"] is None
        else QuantizationArgs(**group["input_activations"]),
    )
    compressor = BaseCompressor.load_from_registry(qc["format"])
    return compressor.decompress(_module_tensors(folder, name), scheme)["weight"]


def _same(theirs: torch.Tensor, exact: torch.Tensor) -> bool:
    return torch.equal(theirs, exact.to(theirs.dtype))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_compressed_tensors_packing(bits, dim):
    torch.manual_seed(0)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(low, high + 1, (24, 37), dtype=torch.int8)
    ours = ct.pack_int32(codes, bits, dim=dim)
    assert torch.equal(ours, pack_to_int32(codes, bits, packed_dim=dim))
    assert torch.equal(ct.unpack_int32(ours, bits, codes.shape[dim], dim=dim), codes)
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape, packed_dim=dim).to(torch.int8), codes)


@pytest.mark.parametrize("checkpoint", ["w4-sym-plain", "w4-sym-log-plain"])
def test_a_symmetric_layer_without_outlier_columns_exports_exactly(checkpoints, checkpoint, tmp_path):
    """Where the native grid is the format's (symmetric, whole groups, no outlier columns), the export
    dequantizes to exactly the native weights, through compressed-tensors' decompressor and ours; a
    layer with one-byte log scales exports its decoded bf16 scales."""
    out = tmp_path / "ct"
    report = export(checkpoints[checkpoint], out, ExportSettings(group_size=32))
    assert report.group_size == 32 and report.symmetric
    for name, layer in _native_layers(checkpoints[checkpoint]).items():
        native = layer.dequantized_weight()
        args = ct.WeightArgs(4, 32, True)
        assert torch.equal(ct.read_pack_quantized(_module_tensors(out, name), args), native), name
        assert _same(_ct_decompress(out, name), native), name
        assert report.fold_error[name] == 0.0


def test_int8_keeps_its_codes_and_scales_where_the_outlier_columns_fit(checkpoints, tmp_path):
    """A row keeps its native codes and scale, and only its outlier columns are rounded, unless an
    outlier weight lies beyond the row's grid; then the row is quantized again on a larger scale."""
    out = tmp_path / "ct"
    export(checkpoints["w8-outliers"], out, ExportSettings(activations="int8"))
    kept_rows = 0
    for name, layer in _native_layers(checkpoints["w8-outliers"]).items():
        tensors = _module_tensors(out, name)
        keep, outliers = layer._layouts.keep, layer.outlier_idx.long()
        assert layer.n_outliers > 0
        scale, native_scale = tensors["weight_scale"][:, 0], layer.weight_scale
        same = scale == native_scale
        assert bool((scale[~same] > native_scale[~same]).all()), name
        assert torch.equal(tensors["weight"][same][:, keep], layer.weight[same]), name
        decompressed = _ct_decompress(out, name).float()
        assert torch.equal(decompressed[same][:, keep], layer.dequantized_kept()[same]), name
        error = (decompressed[:, outliers] - layer.outlier_weight.float()).abs()
        assert bool((error <= scale[:, None].float() / 2 + 1e-7).all()), name
        kept_rows += int(same.sum())
    assert kept_rows > 0


def test_the_asymmetric_fold_reads_back_the_same_with_compressed_tensors(checkpoints, tmp_path):
    out = tmp_path / "ct"
    report = export(checkpoints["w4-asym"], out)
    assert not report.symmetric and report.group_size == 32
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    args = ct.WeightArgs(4, 32, False)
    assert qc["format"] == "pack-quantized" and "lm_head" in qc["ignore"]
    for name, layer in _native_layers(checkpoints["w4-asym"]).items():
        tensors = _module_tensors(out, name)
        theirs = ct.read_pack_quantized(tensors, args)
        assert _same(_ct_decompress(out, name), theirs), name
        # every weight within one step of the effective weight it was folded from (half a step of
        # rounding, plus up to half a step where the zero point's rounding moved the grid)
        step = tensors["weight_scale"].float().repeat_interleave(32, dim=1)
        assert bool(((theirs - layer.dequantized_weight()).abs() <= step + 1e-6).all()), name


def test_w4a8_stores_symmetric_int4_codes_one_per_byte(checkpoints, tmp_path):
    """W4A8 (what vLLM's AVX2 CPU build serves at 4 bits): `int-quantized` int8 tensors holding int4
    codes, read back the same by compressed-tensors; a symmetric checkpoint keeps its grid exactly."""
    out = tmp_path / "ct"
    report = export(checkpoints["w4-sym-plain"], out, ExportSettings(activations="int8"))
    assert report.symmetric and report.scheme.startswith("W4A8")
    # each int4 code takes a byte on disk: 8 bits plus a bf16 scale per group of 32
    assert report.bits_per_weight == pytest.approx(8 + 16 / 32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "int-quantized" and group["input_activations"]["strategy"] == "token"
    assert group["weights"]["num_bits"] == 4 and group["weights"]["symmetric"]
    for name, layer in _native_layers(checkpoints["w4-sym-plain"]).items():
        tensors = _module_tensors(out, name)
        codes = tensors["weight"]
        assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7, name
        assert torch.equal(ct.read_int_quantized(tensors), layer.dequantized_weight()), name
        assert _same(_ct_decompress(out, name), layer.dequantized_weight()), name


def test_narrow_int8_codes_stay_where_onednn_multiplies_exactly(checkpoints, tmp_path):
    """--narrow-int8: every W8A8 code within [-64, 64], the largest weight of each row on +-64, the
    codes read back the same by compressed-tensors, each weight within half a step of the checkpoint's."""
    limit = ct.NARROW_INT8_LIMIT
    # an unsigned 8-bit activation times two codes of |w| <= limit fits int16; one more does not
    assert 255 * limit * 2 <= 32767 < 255 * (limit + 1) * 2
    out = tmp_path / "ct"
    report = export(checkpoints["w8-outliers"], out, ExportSettings(activations="int8", narrow_int8=True))
    assert "[-64, 64]" in report.scheme and report.bits_per_weight == 8.0
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["num_bits"] == 8 and group["weights"]["symmetric"]
    for name, layer in _native_layers(checkpoints["w8-outliers"]).items():
        tensors = _module_tensors(out, name)
        codes, scale = tensors["weight"], tensors["weight_scale"].float()
        assert codes.dtype == torch.int8 and int(codes.abs().max()) == limit, name
        assert bool((codes.abs().amax(1) == limit).all()), name
        theirs = ct.read_int_quantized(tensors)
        assert _same(_ct_decompress(out, name), theirs), name
        assert bool(((theirs - layer.dequantized_weight()).abs() <= scale / 2 * (1 + 1e-6)).all()), name


def test_smoothing_moves_channels_without_changing_the_function():
    """Each scaling site (input norm -> q/k/v, post-attention norm -> gate/up, up rows -> down): dividing
    the producer's channels by s and multiplying the consumers' columns by s leaves the logits alone."""
    from sinkquant.export import smooth

    model = tiny_llama(vocab=128).double()
    modules = dict(model.named_modules())
    linears = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    prefixes = [f"model.layers.{i}." for i in range(2)]
    sites = smooth.sites(prefixes, modules, linears)
    assert len(sites) == 6
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        params = dict(model.named_parameters())
        generator = torch.Generator().manual_seed(1)
        for site in sites:
            width = modules[site.targets[0]].in_features
            s = torch.rand(width, generator=generator, dtype=torch.float64) * 4 + 0.25
            if site.kind == "rows":
                producer = modules[site.producer].weight
            else:
                producer = params[site.producer]
            producer.copy_(smooth.divide_producer(site, producer, s))
            for target in site.targets:
                modules[target].weight.mul_(s)
        after = model(ids).logits
    # divide_producer computes in float32: equal to its rounding
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


def test_transformers_loads_the_export_as_the_numbers_sinkquant_scores(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    export(checkpoints["w4-asym"], out)
    served = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = exported_model(load(checkpoints["w4-asym"]), out).eval()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = served(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_dense_modules_take_their_fused_siblings():
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [
        f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")
    ]
    assert ct.dense_modules([r"k_proj"], names) == {names[0], names[1], names[2]}
    assert ct.dense_modules([r"up_proj"], names) == {names[4], names[5]}
    with pytest.raises(InputError, match="matches no quantized module"):
        ct.dense_modules([r"nothing"], names)


def test_the_group_size_is_made_to_divide_every_width():
    assert ct.export_group_size(128, {576, 1536}) == 64
    assert ct.export_group_size(96, {576, 1536}) == 96
    assert ct.export_group_size(128, {4096, 11008}) == 128
    with pytest.raises(InputError, match="divides the input widths"):
        ct.export_group_size(128, {64, 172})


def test_cli_export_writes_and_reports(checkpoints, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["export", str(checkpoints["w4-asym"]), str(out), "--dense", "down_proj"]
    )
    assert result.exit_code == 0, result.output
    assert "W4A16 g32 asymmetric" in result.output and "kept dense: 2 modules" in result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.down_proj" in qc["ignore"]
    assert "sinkquant-export.json" in {p.name for p in out.iterdir()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--activations", "int8", "--asymmetric"], "is symmetric only"),
        (["--dense", "("], "is not a regular expression"),
        (["--narrow-int8"], "applies to W8A8 exports only"),
        (["--activations", "int8", "--smooth-alpha", "0.6"], "needs --smooth"),
    ],
)
def test_cli_export_refuses_bad_options_in_one_line(checkpoints, tmp_path, args, message):
    out = tmp_path / "bad"
    result = CliRunner().invoke(main, ["export", str(checkpoints["w4-asym"]), str(out), *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_export_refuses_a_folder_that_is_not_a_sinkquant_checkpoint(tiny_dir, tmp_path):
    result = CliRunner().invoke(main, ["export", str(tiny_dir), str(tmp_path / "out")])
    assert result.exit_code == 2 and "is not a sinkquant checkpoint" in result.output
