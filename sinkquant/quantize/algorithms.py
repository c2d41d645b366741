"""The weight algorithms by name: one registry, one signature.

Every algorithm is `(model, weights, calibration, *, storage_dtype, progress, writer) -> QuantizeSummary`:
it replaces the target linear layers of `model` (in memory, or a `ModelHost` streaming it from disk)
decoder layer by decoder layer, from the recipe's `weights:` section and the run's `Calibration`
(samples drawn once per run, and the report measured on them), and hands each finished layer to
`writer`. A recipe names one with `weights.algorithm`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..calibrate.report import Calibration
from ..errors import InputError
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost
from .gptq import gptq_quantize_
from .weights import QuantizeSummary, rtn_quantize_


class WeightAlgorithm(Protocol):
    def __call__(
        self,
        model: nn.Module | ModelHost,
        weights: WeightsSection,
        calibration: Calibration,
        *,
        storage_dtype: torch.dtype | None = None,
        progress: bool = True,
        writer: LayerWriter | None = None,
    ) -> QuantizeSummary: ...


ALGORITHMS: dict[str, WeightAlgorithm] = {
    "rtn": rtn_quantize_,  # round-to-nearest, int4 ranges by activation-weighted clip search
    "gptq": gptq_quantize_,  # error-compensating, decoder layer by decoder layer
}

#: algorithms that read the calibration samples themselves (all need the report for outlier columns)
NEEDS_SAMPLES = {"gptq"}


def quantize_weights(
    model: nn.Module | ModelHost,
    weights: WeightsSection,
    calibration: Calibration,
    *,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
    writer: LayerWriter | None = None,
) -> QuantizeSummary:
    """Run the algorithm `weights.algorithm` names."""
    algorithm = ALGORITHMS.get(weights.algorithm)
    if algorithm is None:
        raise InputError(
            f"unknown weights.algorithm {weights.algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    return algorithm(
        model, weights, calibration, storage_dtype=storage_dtype, progress=progress, writer=writer
    )
