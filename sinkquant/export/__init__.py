"""Export: a sinkquant checkpoint rewritten in a format that serving engines read without sinkquant.

    export(CHECKPOINT, OUT_DIR, ExportSettings(format="compressed-tensors", ...)) -> ExportReport

The checkpoint is read one quantized layer at a time (its tensors through safetensors' memory map), so
an export needs about one layer of memory whatever the model's size. Each format is an entry in
`EXPORT_FORMATS`: it names the on-disk layout of one quantized layer and the `quantization_config`
that goes into config.json. The folder is written into a temporary folder beside OUT_DIR and renamed
at the end, as checkpoints are. `exported_model` rebuilds the export's effective weights on a loaded
checkpoint, so sinkquant's evaluator can say what the fold costs (`sinkquant export --eval`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..format import export_refusals
from . import compressed_tensors as ct
from . import smooth
from .formats import EXPORT_FORMATS, ExportFormat, keys_by_module
from .readback import exported_model

#: the files besides the tensors and config.json that an export copies from the checkpoint
_COPIED = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
EXPORT_NOTE = "sinkquant-export.json"


@dataclass
class ExportSettings:
    """What to write. `group_size` None: the checkpoint's (made to divide every input width);
    `symmetric` None: the checkpoint's; `activations` "int8" writes W8A8, or W4A8 (symmetric int4,
    the one 4-bit scheme vLLM's CPU backend serves on AVX2 machines) from a 4-bit checkpoint;
    `dense` regular expressions of modules kept unquantized (widened to their fused groups);
    `narrow_int8` writes W8A8 weight codes in [-64, 64], which vLLM's CPU kernel multiplies exactly on
    x86 CPUs without VNNI (`ct.NARROW_INT8_LIMIT`)."""

    format: str = "compressed-tensors"
    group_size: int | None = None
    symmetric: bool | None = None
    activations: str = "none"
    dense: list[str] = field(default_factory=list)
    scale_dtype: str = "bfloat16"
    #: scale input channels where they are produced before quantizing (`smooth.py`); needs a
    #: calibration pass over the checkpoint, held in memory
    smooth: bool = False
    #: SmoothQuant's migration strength for int8 activations (None: its paper's 0.5); weight-only
    #: exports search theirs per site
    smooth_alpha: float | None = None
    calibration_samples: int = 16
    narrow_int8: bool = False
    overwrite: bool = False


@dataclass
class ExportReport:
    out_dir: str
    format: str
    scheme: str
    group_size: int | None
    symmetric: bool
    #: storage bits per weight over every exported module (dense ones at their dtype's bits), codes,
    #: scales and zero points included
    bits_per_weight: float
    modules: int
    dense: list[str]
    seconds: float
    #: module -> ||W_exported - W_checkpoint|| / ||W_checkpoint|| of its effective weight
    fold_error: dict[str, float] = field(default_factory=dict)
    #: with `smooth`: the strength chosen at each site (its producer's name)
    smoothing: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _read_checkpoint_config(checkpoint: Path) -> tuple[dict, dict]:
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{checkpoint} is not a sinkquant checkpoint (config.json unreadable: {exc})"
        ) from exc
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "sinkquant":
        raise InputError(
            f"{checkpoint} is not a sinkquant checkpoint (its quant_method is {qc.get('quant_method')!r}); "
            "export reads what `sinkquant quantize` wrote"
        )
    return config, qc


def _scheme(qc: dict, settings: ExportSettings) -> tuple[ct.WeightArgs, str]:
    layers = qc["layers"]
    bits = {spec["bits"] for spec in layers.values()}
    if len(bits) != 1:
        raise InputError(f"the checkpoint mixes {sorted(bits)}-bit layers; export writes one bit width")
    (n_bits,) = bits
    if settings.activations not in ("none", "int8"):
        raise InputError(f"--activations must be none or int8 (got {settings.activations!r})")
    if settings.smooth_alpha is not None and not (
        settings.smooth and settings.activations == "int8" and 0.0 <= settings.smooth_alpha <= 1.0
    ):
        raise InputError(
            f"--smooth-alpha {settings.smooth_alpha} needs --smooth, --activations int8 and a value in [0, 1]"
        )
    if settings.narrow_int8 and not (n_bits == 8 and settings.activations == "int8"):
        raise InputError(
            "--narrow-int8 applies to W8A8 exports only: give an 8-bit checkpoint and --activations int8"
        )
    if n_bits == 8:
        if settings.activations == "int8" and settings.narrow_int8:
            limit = ct.NARROW_INT8_LIMIT
            scheme = f"W8A8 int8 (codes in [-{limit}, {limit}], dynamic per-token activations)"
            return ct.WeightArgs(8, None, True, code_limit=limit), scheme
        if settings.activations == "int8":
            return ct.WeightArgs(8, None, True), "W8A8 int8 (dynamic per-token activations)"
        return ct.WeightArgs(8, None, True), "W8A16 int8 per channel"
    symmetric = qc.get("symmetric", False) if settings.symmetric is None else settings.symmetric
    widths = {spec["in_features"] for spec in layers.values()}
    requested = settings.group_size or qc.get("group_size") or 128
    group = ct.export_group_size(requested, widths)
    if settings.activations == "int8":
        # vLLM's W4A8 (int4 weights, dynamic per-token int8 activations) has no zero points
        if settings.symmetric is False:
            raise InputError(
                "--activations int8 with 4-bit weights (W4A8) is symmetric only; drop --asymmetric"
            )
        scheme = f"W4A8 int4 g{group} symmetric (dynamic per-token int8 activations, one code per byte)"
        return ct.WeightArgs(n_bits, group, True), scheme
    kind = "symmetric" if symmetric else "asymmetric"
    return ct.WeightArgs(n_bits, group, symmetric), f"W{n_bits}A16 g{group} {kind}"


def _mean_bits(layers: dict[str, dict], dense: set[str], quantized_bits: float) -> float:
    total = bits = 0.0
    for name, spec in layers.items():
        n = spec["in_features"] * spec["out_features"]
        total += n
        bits += n * (
            torch.finfo(getattr(torch, spec.get("dtype", "float16"))).bits
            if name in dense
            else quantized_bits
        )
    return bits / max(total, 1.0)


def _export_format(settings: ExportSettings) -> ExportFormat:
    fmt = EXPORT_FORMATS.get(settings.format)
    if fmt is None:
        raise InputError(
            f"unknown export format {settings.format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    return fmt


def _checked_config(checkpoint: Path) -> tuple[dict, dict]:
    """The checkpoint's config and `quantization_config`, its files checked against the manifest;
    refused where a layer uses a feature the export cannot store."""
    from ..checkpoint import verify_manifest

    config, qc = _read_checkpoint_config(checkpoint)
    verify_manifest(checkpoint)
    refusals = export_refusals(qc["layers"])
    if refusals:  # the newest feature first: name one, as the message can only say one thing to do
        feature, found = refusals[0]
        what, why = feature.export_refusal
        raise InputError(
            f"{checkpoint} has {what} (weights.{feature.field}, e.g. {found[0]}); {why}: serve the checkpoint "
            f"itself with sinkquant or its vLLM plugin, or re-quantize without weights.{feature.field} to export it"
        )
    return config, qc


def _scale_dtype(settings: ExportSettings) -> torch.dtype:
    scale_dtype = getattr(torch, settings.scale_dtype, None)
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise InputError(
            f"--scale-dtype must be a float dtype such as bfloat16 (got {settings.scale_dtype!r})"
        )
    return scale_dtype


@dataclass(frozen=True)
class _Plan:
    """How each layer is rewritten: the format and its arguments, the modules kept dense, and with
    smoothing the scales of each module's input columns and of each producer's channels."""

    fmt: ExportFormat
    args: ct.WeightArgs
    scale_dtype: torch.dtype
    activations: str
    dense: set[str]
    columns: dict[str, torch.Tensor]  # module -> s (its input columns are multiplied by s)
    producers: dict[str, torch.Tensor]  # norm weight or module -> s (its channels divided by s)
    sites: dict[str, smooth.Site]  # by producer


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    settings: ExportSettings | None = None,
    progress: bool = False,
) -> ExportReport:
    """Write the checkpoint at `checkpoint` to `out_dir` in `settings.format`; see the module docstring."""
    from ..checkpoint import atomic_dir, prepare_out_dir
    from ..stream.source import SafetensorsSource

    settings = settings or ExportSettings()
    fmt = _export_format(settings)
    start = time.perf_counter()
    checkpoint = Path(checkpoint).expanduser()
    config, qc = _checked_config(checkpoint)
    args, scheme = _scheme(qc, settings)
    scale_dtype = _scale_dtype(settings)
    layers: dict[str, dict] = qc["layers"]
    names = sorted(layers)
    dense = ct.dense_modules(settings.dense, names)
    ignore = sorted(set(qc.get("modules_to_not_convert") or []) | dense)
    out = prepare_out_dir(out_dir, settings.overwrite)
    source = SafetensorsSource(checkpoint)
    report = ExportReport(
        str(out),
        fmt.name,
        scheme,
        args.group_size,
        args.symmetric,
        _mean_bits(
            layers, dense, ct.bits_per_weight(args, torch.finfo(scale_dtype).bits, settings.activations)
        ),
        len(names) - len(dense),
        sorted(dense),
        0.0,
    )
    columns, producers, sites = {}, {}, {}
    if settings.smooth:
        columns, producers, sites = _smoothing(
            checkpoint, names, dense, args, settings, scale_dtype, report, progress
        )
    plan = _Plan(fmt, args, scale_dtype, settings.activations, dense, columns, producers, sites)
    with atomic_dir(out, settings.overwrite) as tmp:
        files = _write_tensors(tmp, source, layers, plan, report, progress)
        config["quantization_config"] = fmt.config(args, settings.activations, ignore)
        _write_files(tmp, checkpoint, config, qc, files, report, start)
    return report


def _write_tensors(
    folder: Path, source, layers: dict[str, dict], plan: _Plan, report: ExportReport, progress: bool
) -> list[str]:
    """The export's tensors into `folder`: those outside the quantized layers as stored (a smoothed
    producer's channels divided by its scales), then each layer rewritten; returns the files written."""
    from tqdm.auto import tqdm

    from ..stream.writer import ShardWriter

    names = sorted(layers)
    shards = ShardWriter(folder)
    keys_of, outside = keys_by_module(source.names(), set(names))
    for name in outside:
        tensor = source.read([name])[name]
        if name in plan.producers:
            tensor = smooth.divide_producer(plan.sites[name], tensor, plan.producers[name])
        shards.add(name, tensor)
    for name in tqdm(names, desc="exporting", unit="layer", disable=not progress):
        state = {k[len(name) + 1 :]: v for k, v in source.read(keys_of[name]).items()}
        for key, tensor in _layer_tensors(name, layers[name], state, plan, report).items():
            shards.add(f"{name}.{key}", tensor)
    return shards.finish()


def _layer_tensors(
    name: str, spec: dict, state: dict, plan: _Plan, report: ExportReport
) -> dict[str, torch.Tensor]:
    """One quantized layer as the format's tensors (its fold error into `report`)."""
    from ..quantize.weights import empty_from_spec

    module = empty_from_spec(spec)
    module.load_state_dict(state)
    weight = module.dequantized_weight()
    col = plan.columns.get(name, torch.ones(weight.shape[1]))
    row = plan.producers.get(name, torch.ones(weight.shape[0]))
    scaled = weight * col / row[:, None]
    if name in plan.dense:
        tensors = {"weight": scaled.to(getattr(torch, spec.get("dtype", "float16")))}
        report.fold_error[name] = 0.0
    else:
        if name in plan.columns or name in plan.producers or plan.args.code_limit is not None:
            # the native grid cannot be kept: the weight changed, or the codes must be narrower
            tensors = plan.fmt.quantize(scaled, plan.args, plan.scale_dtype, plan.activations)
        else:
            tensors = plan.fmt.write(module, plan.args, plan.scale_dtype, plan.activations)
        back = plan.fmt.read(tensors, plan.args, plan.activations) / col * row[:, None]
        report.fold_error[name] = ct.relative_error(back, weight)
    if module.bias is not None:
        tensors["bias"] = (module.bias.float() / row).to(module.bias.dtype)
    return tensors


def _write_files(
    folder: Path,
    checkpoint: Path,
    config: dict,
    qc: dict,
    files: list[str],
    report: ExportReport,
    start: float,
) -> None:
    """config.json, the files copied from the checkpoint and the export's note."""
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in _COPIED:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, folder / name)
    report.seconds = round(time.perf_counter() - start, 2)
    note = {
        "source": str(checkpoint),
        "note": "exported by sinkquant; the KV-cache settings of the checkpoint are not carried: vLLM has "
        "no sink-aware KV cache",
        "kv_cache": qc.get("kv_cache"),
        "files": files,
        **report.to_dict(),
    }
    (folder / EXPORT_NOTE).write_text(json.dumps(note, indent=1) + "\n")


def _smoothing(checkpoint, names, dense, args, settings, scale_dtype, report, progress):
    """Calibrate the checkpoint's own effective weights and choose the scales of every site."""
    from ..architecture import decoder_layers, replace_module
    from ..calibrate import calibrate
    from ..checkpoint import load
    from ..modeling import load_tokenizer
    from ..quantize.linear import SinkQuantLinear

    model = load(checkpoint)
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        if isinstance(module, SinkQuantLinear):
            dense_layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense_layer.weight.data = module.dequantized_weight()
            if module.bias is not None:
                dense_layer.bias.data = module.bias.float()
            replace_module(model, name, dense_layer)
    modules = dict(model.named_modules())
    tokenizer = load_tokenizer(str(checkpoint))
    stats = calibrate(model, tokenizer, None, samples=settings.calibration_samples, progress=progress).linear
    layer_names = {id(m): n for n, m in modules.items()}
    prefixes = [layer_names[id(layer)] + "." for layer in decoder_layers(model)]
    quantized = set(names) - dense
    columns, producers, sites = {}, {}, {}
    for site in smooth.sites(prefixes, modules, quantized):
        weights = [modules[t].weight.data.float() for t in site.targets]
        first = stats[site.targets[0]]
        if settings.activations == "int8":
            alpha = smooth.SMOOTHQUANT_ALPHA if settings.smooth_alpha is None else settings.smooth_alpha
            s = smooth.smoothquant_scales(torch.tensor(first.max_abs), weights, alpha)
            report.smoothing[site.producer] = alpha
        else:

            def roundtrip(w):
                return ct.read_pack_quantized(ct.pack_quantized_tensors(w, args, scale_dtype), args)

            s, alpha = smooth.weight_only_scales(torch.tensor(first.mean_abs), weights, roundtrip)
            report.smoothing[site.producer] = alpha
        for target in site.targets:
            columns[target] = columns.get(target, torch.ones_like(s)) * s
        producers[site.producer] = s
        sites[site.producer] = site
    del model
    return columns, producers, sites


__all__ = ["EXPORT_FORMATS", "ExportReport", "ExportSettings", "export", "exported_model"]
