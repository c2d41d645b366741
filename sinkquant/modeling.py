"""Loading models and tokenizers, and finding the parts of a model that sinkquant looks at.

Architectures differ in attribute names (`model.layers`, `transformer.h`, ...); everything here finds
parts by structure (the module list with `num_hidden_layers` entries, modules that act as linear
layers), so Llama, Qwen2, Gemma 3 and GPT-2 share one path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, SinkQuantError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP16_MAX = 65504.0


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`auto` means float32 on CPU (the reference precision of every figure sinkquant reports)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if not torch.cuda.is_available() else torch.bfloat16
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; give a Hugging Face model folder or a hub id")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}/config.json cannot be read as JSON ({exc}); repair or re-download the model"
        ) from exc


def is_sinkquant_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except ValueError:
        return False
    return qc.get("quant_method") == "sinkquant"


def load_tokenizer(model_id: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_id), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"no usable tokenizer in {model_id}: {str(exc).splitlines()[0]}") from exc


def load_model(
    model_id: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM (plain or a sinkquant checkpoint) for inference, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(model_id).expanduser()
    if path.exists():
        _check_model_dir(path)
    elif os.sep in str(model_id) or str(model_id).startswith("."):
        raise InputError(f"model folder {model_id} does not exist; check the path")
    torch_dtype = resolve_dtype(dtype)
    if (
        path.exists()
        and not trust_remote_code
        and "auto_map" in json.loads((path / "config.json").read_text())
    ):
        raise InputError(
            f"{path} ships its own Python code (auto_map in config.json); sinkquant does not run code from a model "
            "folder unless you pass --trust-remote-code (read that code first)"
        )
    if path.exists() and is_sinkquant_checkpoint(path):
        from .checkpoint import load

        return load(path, dtype=torch_dtype)
    load_dtype = torch.float32 if torch_dtype == torch.float16 else torch_dtype
    kwargs = {"dtype": load_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else str(model_id), **kwargs)
    except ValueError as exc:
        raise InputError(
            f"{model_id} is not a causal language model transformers can load: {str(exc).splitlines()[0]}"
        ) from exc
    except OSError as exc:
        raise InputError(f"cannot load {model_id}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    # the precision the weights were stored in, before `dtype` upcast them: quantization keeps the
    # full-precision columns in it, bit-identical to the source
    stored = None
    if path.exists():
        cfg = json.loads((path / "config.json").read_text())
        stored = cfg.get("dtype") or cfg.get("torch_dtype")
    model._sinkquant_source_dtype = (
        DTYPES.get(stored, torch.float32) if isinstance(stored, str) else torch.float32
    )
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList holding `num_hidden_layers` blocks."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return module
    raise SinkQuantError(f"could not find the {n} decoder layers of {type(model).__name__}")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (a linear layer with a transposed weight)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by qualified name (lm_head included; the weights step decides what to skip)."""
    return {name: m for name, m in model.named_modules() if is_linear(m)}


def hidden_of(output) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def check_fp16_range(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse float16 for a model whose residual stream leaves the fp16 range (|h| > 65,504).

    Run in the model's current (wider) precision on real tokens; names the first layer that overflows.
    """
    layers = decoder_layers(model)
    peaks: list[float] = [0.0] * len(layers)
    handles = [
        layer.register_forward_hook(
            lambda _m, _i, out, i=i: peaks.__setitem__(i, float(hidden_of(out).abs().amax()))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for i, peak in enumerate(peaks):
        if not peak < FP16_MAX:  # also catches inf / nan
            raise InputError(
                f"float16 cannot hold this model's activations: decoder layer {i} reaches |h| = {peak:,.0f} "
                f"(> {FP16_MAX:,.0f}); use --dtype float32 or bfloat16"
            )


def prepare_model(model_id, dtype="auto", trust_remote_code=False, attn_implementation=None, probe_ids=None):
    """Load model and tokenizer; for float16, check the activation range first on `probe_ids`."""
    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(model_id, trust_remote_code)
    model = load_model(model_id, torch_dtype, trust_remote_code, attn_implementation)
    if torch_dtype == torch.float16 and next(model.parameters()).dtype != torch.float16:
        if probe_ids is not None:
            check_fp16_range(model, probe_ids)
        model = model.to(torch.float16)
    return model, tokenizer
