"""Loading plain (not yet quantized) models and tokenizers, with every check a bad source needs.

Each mistake in a model source (a missing folder, a broken config.json, a non-causal model, truncated
or pickled weights, code shipped in the folder) gets one clear message before any library error can.
`sinkquant.loading` decides whether a folder is a sinkquant checkpoint or a plain model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .architecture import decoder_layers, hidden_of
from .errors import InputError

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
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}/config.json cannot be read as JSON ({exc}); repair or re-download the model"
        ) from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(
            f"{path}/config.json has no model_type, so transformers cannot tell what model it is; "
            "repair or re-download the model"
        )


def _ships_code(path: Path) -> str | None:
    """The file in a model folder that points transformers at Python code inside it (auto_map), if any."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            return name
    return None


def _looks_like_path(model_id: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else the user typed is meant as a folder."""
    return (
        model_id.startswith((".", "/", "~"))
        or model_id.count("/") > 1
        or (os.sep != "/" and os.sep in model_id)
        or model_id.endswith("/")
    )


def _cached_on_hub(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def check_model_source(model_id: str | os.PathLike, trust_remote_code: bool = False) -> Path | None:
    """Refuse a model source that cannot work, before any tokenizer or weights are loaded, so every
    mistake gets one clear message instead of whichever library error comes first.

    Returns the local folder, or None for a hub id (left to transformers, cache first)."""
    from .data import check_hub_reachable, hub_set_offline

    path = Path(model_id).expanduser()
    if not path.exists():
        if _looks_like_path(str(model_id)):
            raise InputError(f"model folder {model_id} does not exist; check the path")
        if not _cached_on_hub(str(model_id)):
            if hub_set_offline():
                raise InputError(
                    f"{model_id} is not a local folder, and as a hub name it cannot be fetched: the Hugging "
                    "Face hub is set offline (HF_HUB_OFFLINE); check the path, or download the model and pass "
                    "its folder"
                )
            check_hub_reachable(f"model {model_id}")
        return None
    if not path.is_dir():
        raise InputError(f"{path} is a file; give the model's folder (with config.json and the weights)")
    _check_model_dir(path)
    shipped = _ships_code(path)
    if shipped and not trust_remote_code:
        raise InputError(
            f"{path} ships its own Python code (auto_map in {shipped}); sinkquant does not run code from a model "
            "folder unless you pass --trust-remote-code (read that code first)"
        )
    if not shipped:
        _check_decoder_only(path)
    return path


def _check_decoder_only(path: Path) -> None:
    """A causal LM transformers can build. Encoder models (BERT, RoBERTa, ...) have an
    AutoModelForCausalLM class too, but only as a decoder added for seq2seq training: their checkpoints
    are masked-language models, and loading one as causal leaves its weights unused."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = json.loads((path / "config.json").read_text())
    model_type = config["model_type"]
    fix = "give a decoder-only LM such as Llama, Qwen2, Gemma 3 or GPT-2"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(
            f"{path} holds a {model_type!r} model, which is not a causal language model transformers can "
            f"load (no AutoModelForCausalLM for it); {fix}"
        )
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and config.get("is_decoder") is not True:
        raise InputError(
            f"{path} holds a {model_type!r} model, an encoder (masked-language model), not a decoder-only "
            f"causal LM; {fix}"
        )


def check_weight_files(path: Path) -> None:
    """Every safetensors file must have a whole, readable header (a truncated or corrupt download fails
    here, naming the file); without safetensors, only `.bin` files are accepted, and those are read
    with `torch.load(weights_only=True)`, which refuses any pickled object that is not a tensor."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(
                f"{file} is not a readable safetensors file ({str(exc).splitlines()[0]}): it is truncated or "
                "corrupt; re-download or re-copy the model"
            ) from exc
    if not files and not any(path.glob("*.bin")):
        raise InputError(
            f"{path} holds no weights (no *.safetensors or pytorch_model.bin file); copy the model's weight "
            "files into it"
        )


#: files one of which a tokenizer folder holds (fast, sentencepiece, BPE, WordPiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def load_tokenizer(model_id: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    local = check_model_source(model_id, trust_remote_code)
    if local is not None and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{local} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files of "
            "the model into the folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_id), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"no usable tokenizer in {model_id}: {str(exc).splitlines()[0]}") from exc


def stored_dtype(model_id: str | os.PathLike) -> torch.dtype:
    """The precision a local model's weights were saved in (config.json's dtype; float32 when it does
    not say or for a hub id): quantization keeps the full-precision columns in it, bit-identical to
    the source, whatever precision the model was loaded in."""
    config = Path(model_id).expanduser() / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return torch.float32
    stored = cfg.get("dtype") or cfg.get("torch_dtype")
    return DTYPES.get(stored, torch.float32) if isinstance(stored, str) else torch.float32


def load_pretrained(
    model_id: str | os.PathLike,
    local: Path | None,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a plain causal LM for inference, in eval mode (`local`: its folder from
    `check_model_source`, None for a hub id). Weights that do not cover the model (random
    initialisation would fill the gap) are refused."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if local is not None:
        check_weight_files(local)
    load_dtype = torch.float32 if dtype == torch.float16 else dtype
    kwargs = {
        "dtype": load_dtype,
        "trust_remote_code": trust_remote_code,
        "weights_only": True,
        "output_loading_info": True,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with warnings.catch_warnings():
            # torch's note on a .bin's pickle protocol: the weights-only unpickler still decides
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model, info = AutoModelForCausalLM.from_pretrained(str(local or model_id), **kwargs)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"the .bin weights in {model_id} hold pickled objects other than tensors, and sinkquant never runs "
            "pickled code (torch.load weights_only=True refused them); use a safetensors copy of the model"
        ) from exc
    except SafetensorError as exc:
        raise InputError(
            f"the weights in {model_id} cannot be read ({str(exc).splitlines()[0]}); re-download the model"
        ) from exc
    except ValueError as exc:
        raise InputError(
            f"{model_id} is not a causal language model transformers can load: {str(exc).splitlines()[0]}"
        ) from exc
    except OSError as exc:
        raise InputError(f"cannot load {model_id}: {str(exc).splitlines()[0]}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise InputError(
            f"the weights in {model_id} do not match its config.json: {len(missing)} tensors are missing "
            f"({', '.join(missing[:3])}); re-download the model or fix config.json"
        )
    model.eval()
    return model


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
