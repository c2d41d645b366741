"""sinkquant: sink-aware quantization for Hugging Face causal language models.

Importing the package registers the "sinkquant" quantization method with transformers, so a saved
checkpoint loads with `AutoModelForCausalLM.from_pretrained(folder)`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sinkquant")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from .quiet import quiet_third_party

with quiet_third_party():  # optional backends transformers imports may log about their builds
    from .calibrate import Calibration, CalibrationReport, CalibrationSettings, calibrate
    from .checkpoint import SinkQuantConfig, load, save
    from .errors import InputError, SinkQuantError
    from .evaluate import evaluate
    from .kv import KVCacheConfig, SinkQuantizedCache
    from .pipeline import calibrate_for, calibrate_model, evaluate_model, quantize_model
    from .quantize.algorithms import quantize_weights
    from .quantize.linear import SinkQuantLinear
    from .quantize.weights import quantize_
    from .recipe import Recipe, load_recipe, parse_recipe

__all__ = [
    "Calibration",
    "CalibrationReport",
    "KVCacheConfig",
    "SinkQuantizedCache",
    "CalibrationSettings",
    "InputError",
    "Recipe",
    "SinkQuantConfig",
    "SinkQuantError",
    "SinkQuantLinear",
    "__version__",
    "calibrate",
    "calibrate_for",
    "calibrate_model",
    "evaluate_model",
    "evaluate",
    "load",
    "load_recipe",
    "parse_recipe",
    "quantize_",
    "quantize_model",
    "quantize_weights",
    "save",
]
