"""Pieces the eval/ benchmarks and probes share: paths, the default model, the machine, group sizes,
byte counts, and the peer quantizers loaded the way their own documentation loads them.

Not a benchmark: the scripts of `eval.bench` and `eval.probes` import it (`from eval.lib.common import ...`).
Every peer loader raises on failure; the caller turns the exception into a one-line table row
(`one_line`), so a peer that cannot run is never a silent gap.
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SINKQUANT_SHARED", ROOT.parent / "shared"))
WIKITEXT = SHARED / "data" / "wikitext-2-raw-test.txt"
RECIPES = ROOT / "recipes"
RUNS = ROOT / "runs" / "bench"  # scratch: checkpoints, peer outputs, JSON results (git-ignored)
BENCH_RESULTS = ROOT / "eval" / "results" / "bench"  # the pages eval.bench writes
PROBE_RESULTS = ROOT / "eval" / "results" / "probes"  # the pages eval.probes write
GROUP_CHOICES = (128, 64, 32)


def default_model() -> str:
    """SmolLM2-135M as an HF folder (the shared tool materializes it once and prints its path)."""
    out = subprocess.run(
        [sys.executable, str(SHARED / "tools" / "materialize_model.py"), "smollm2-135m"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def model_name(path: str | os.PathLike) -> str:
    return Path(path).name


def one_line(exc: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, for a table cell."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_report(path: Path, lines: list[str]) -> None:
    """A result page: written to `path` (folders made) and printed, so the run's log holds it too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


def machine() -> dict:
    """What a reader needs to weigh the numbers: CPU, cores, threads, memory, versions, load."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# -- shapes and group sizes -----------------------------------------------------------------------------


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers every method quantizes: all nn.Linear except lm_head (tied to the embeddings)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.endswith("lm_head")
    }


def dividing_group(widths: list[int], choices=GROUP_CHOICES) -> int | None:
    """The largest group size of `choices` that divides every input width (None if none does)."""
    return next((g for g in choices if all(w % g == 0 for w in widths)), None)


def sinkquant_group(widths: list[int]) -> tuple[int | str, str]:
    """sinkquant's group for this model: 128 unless a layer is narrower (a shorter last group is fine).

    Returns (group_size for the recipe, why, '' when it is the recipe's 128)."""
    narrow = min(widths)
    if narrow >= 128:
        return 128, ""
    fit = next((g for g in (64, 32) if g <= narrow), None)
    if fit is None:
        return "channel", f"per channel: the narrowest layer is {narrow} wide, less than a group of 32"
    return fit, f"group {fit}: 128 exceeds the {narrow}-wide layers"


# -- bytes --------------------------------------------------------------------------------------------


def tensor_bytes(t) -> int:
    """Bytes of a tensor, following tensor subclasses (quanto's packed tensors, torchao) down to plain
    storage."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's state dict (what its checkpoint holds), shared tensors counted once."""
    seen, total = set(), 0
    for value in module.state_dict().values():
        if not isinstance(value, torch.Tensor):
            continue
        try:
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        except Exception:  # tensor subclasses without one storage (torchao, quanto)
            key = id(value)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(value)
    return total


def bits_per_weight(model: nn.Module, names: dict[str, int]) -> float:
    """8 x (bytes the quantized modules hold, scales and kept columns included) / their weights.

    `names`: {linear name: number of weights} taken from the float model."""
    held = sum(state_bytes(model.get_submodule(name)) for name in names)
    return 8 * held / sum(names.values())


def count_converted(model: nn.Module, names) -> int:
    """How many of `names` are no longer a plain float nn.Linear (a peer may skip some layers)."""
    done = 0
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        plain = type(module) is nn.Linear and (
            type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point()
        )
        done += not plain
    return done


# -- peers ------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def bnb_int8(model_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """bitsandbytes LLM.int8 (outlier threshold 6.0) through `BitsAndBytesConfig`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _quiet_transformers()
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=config, dtype=dtype, device_map="cpu"
    ).eval()


def bnb_nf4(model_path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """bitsandbytes nf4 (its default block of 64, no double quantization) through `BitsAndBytesConfig`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _quiet_transformers()
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=config, dtype=dtype, device_map="cpu"
    ).eval()


def quanto_weights(model_path: str, bits: int, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str]:
    """optimum-quanto int8/int4 weights through `QuantoConfig`; returns (model, the groups it chose).

    quanto picks int4 groups itself: 128, else 96/64/32 where 128 does not divide the width, else one
    group per output channel; the note lists what it used."""
    from transformers import AutoModelForCausalLM, QuantoConfig

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=QuantoConfig(weights=f"int{bits}"), dtype=dtype, device_map="cpu"
    ).eval()
    groups: dict[str, int] = {}
    for module in model.modules():
        if hasattr(module, "weight_qtype"):
            g = getattr(module, "weight_group_size", None)
            key = "per channel" if g is None else f"g{g}"
            groups[key] = groups.get(key, 0) + 1
    note = ", ".join(f"{k} x{v}" for k, v in sorted(groups.items())) if bits == 4 else "per channel"
    return model, note


def hqq_weights(fp32: nn.Module, bits: int, group: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """HQQ (half-quadratic, no calibration data) on every linear layer but lm_head, via hqq's HQQLinear.

    transformers 5.23's `HqqConfig` loader raises NotImplementedError, so the layers are swapped
    directly, as hqq's own README does. HQQ groups run along the flattened weight (axis 1)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = copy.deepcopy(fp32).to(dtype)
    config = BaseQuantizeConfig(nbits=bits, group_size=group)
    for name, module in quantizable_linears(model).items():
        parent, _, child = name.rpartition(".")
        layer = HQQLinear(module, quant_config=config, compute_dtype=dtype, device="cpu")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model.eval()


def torchao_int4(
    fp32: nn.Module, group: int, dtype: torch.dtype = torch.float32, copy_model: bool = True
) -> tuple[nn.Module, int]:
    """torchao int4 weight-only on CPU (`Int4OpaqueTensor`, the `_weight_int4pack_mm_for_cpu` kernel).

    torchao 0.18 moved its CPU int4 path to `prototype...PrototypeInt4WeightOnlyConfig`; the kernel
    needs out_features % 16 == 0 and in_features % group == 0 (torchao itself skips a layer whose
    width the group does not divide). Returns (model, number of linear layers quantized)."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    model = (copy.deepcopy(fp32) if copy_model else fp32).to(dtype)
    names = quantizable_linears(model)

    def fits(module: nn.Module, fqn: str) -> bool:
        return (
            fqn in names
            and isinstance(module, nn.Linear)
            and module.out_features % 16 == 0
            and module.in_features % group == 0
        )

    quantize_(
        model, PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False), filter_fn=fits
    )
    return model.eval(), count_converted(model, names)


def score_in_memory(model, tokenizer, recipe, reference, storage, tokens: int, report=None, progress=False):
    """A recipe's calibration (reusing `report` when given) and `quantize_weights` on `model` in memory,
    as `quantize_model` runs them before it writes, then perplexity, KL and top-1 against `reference` on
    WikiText-2 test (windows of 1024, first `tokens`): the probes' row. Returns (the row's numbers with
    bits per weight of the quantized layers and the seconds calibration and quantization took, the
    calibration report)."""
    from sinkquant.evaluate import evaluate
    from sinkquant.pipeline import calibrate_for
    from sinkquant.quantize.algorithms import quantize_weights

    start = time.perf_counter()
    run = calibrate_for(model, tokenizer, recipe, report, progress=False)
    summary = quantize_weights(model, recipe.weights, run, progress=progress, storage_dtype=storage)
    seconds = time.perf_counter() - start
    result = evaluate(model, tokenizer, WIKITEXT, 1024, tokens, reference=reference, progress=False)
    row = {"ppl": result.perplexity, "kl": result.kl, "top1": result.top1_agreement,
           "bits": 8 * summary.bytes_after / (summary.bytes_before / 2), "seconds": seconds}  # fmt: skip
    return row, run.report


def quantize_and_score(model: str, out: Path, recipe, tokenizer, tokens: int, reference=None):
    """One recipe as a user runs it: `quantize_model` from the model folder (calibration included),
    the checkpoint loaded back, perplexity on WikiText-2 test (windows of 1024, first `tokens`), with
    KL and top-1 agreement against `reference` (a model or a `ModelHost`) when given; returns
    (`EvalResult`, quantize seconds)."""
    from sinkquant.checkpoint import load
    from sinkquant.evaluate import evaluate
    from sinkquant.pipeline import quantize_model

    start = time.perf_counter()
    quantize_model(model, out, recipe, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    return evaluate(
        load(out), tokenizer, WIKITEXT, 1024, tokens, reference=reference, progress=False
    ), seconds
