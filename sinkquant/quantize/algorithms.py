"""The weight algorithms by name: one registry, one signature.

Every algorithm is `(model, weights, calibration, *, storage_dtype, progress) -> QuantizeSummary`: it
replaces the target linear layers of `model` in place, from the recipe's `weights:` section and the
run's `Calibration` (samples drawn once per run, and the report measured on them). A recipe names one
with `weights.algorithm`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..calibrate.report import Calibration
from ..errors import InputError
from ..recipe import WeightsSection
from .gptq import gptq_quantize_
from .weights import QuantizeSummary, rtn_quantize_


class WeightAlgorithm(Protocol):
    def __call__(
        self,
        model: nn.Module,
        weights: WeightsSection,
        calibration: Calibration,
        *,
        storage_dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> QuantizeSummary: ...


ALGORITHMS: dict[str, WeightAlgorithm] = {
    "rtn": rtn_quantize_,  # round-to-nearest, int4 ranges by activation-weighted clip search
    "gptq": gptq_quantize_,  # error-compensating, decoder layer by decoder layer
}

#: algorithms that read the calibration samples themselves (all need the report for outlier columns)
NEEDS_SAMPLES = {"gptq"}


def quantize_weights(
    model: nn.Module,
    weights: WeightsSection,
    calibration: Calibration,
    *,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> QuantizeSummary:
    """Run the algorithm `weights.algorithm` names."""
    algorithm = ALGORITHMS.get(weights.algorithm)
    if algorithm is None:
        raise InputError(
            f"unknown weights.algorithm {weights.algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    return algorithm(model, weights, calibration, storage_dtype=storage_dtype, progress=progress)
