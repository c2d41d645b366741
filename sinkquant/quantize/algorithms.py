"""The weight algorithms by name: one registry, one signature.

Every algorithm is `(model, weights, calibration, *, storage_dtype, progress, writer) -> QuantizeSummary`:
it replaces the target linear layers of `model` (in memory, or a `ModelHost` streaming it from disk)
decoder layer by decoder layer, from the recipe's `weights:` section and the run's `Calibration`
(samples drawn once per run, and the report measured on them), and hands each finished layer to
`writer`. A recipe names one with `weights.algorithm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..calibrate.report import Calibration
from ..errors import InputError
from ..recipe import WeightsSection
from ..stream.host import LayerWriter, ModelHost
from .gptq import gptq_quantize_
from .search_choice import judges_search, rtn_quantize_
from .weights import QuantizeSummary


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


@dataclass(frozen=True)
class Algorithm:
    """A weight algorithm and what calibration it needs for a weights section (the pipeline asks, it
    does not choose by name)."""

    run: WeightAlgorithm
    needs_samples: Callable[[WeightsSection], bool]  # reads the calibration samples itself
    needs_report: Callable[[WeightsSection], bool]  # reads the calibration report (sinks, statistics)


def _always(weights: WeightsSection) -> bool:
    return True


def _rtn_reads_report(weights: WeightsSection) -> bool:
    """Its outlier columns and its clip search's per-column weights come from the report."""
    return weights.outliers is not None


ALGORITHMS: dict[str, Algorithm] = {
    # round-to-nearest, int4 ranges by activation-weighted clip search (from the report's statistics)
    "rtn": Algorithm(rtn_quantize_, judges_search, _rtn_reads_report),
    # error-compensating, decoder layer by decoder layer on the samples; its sink_tokens modes read the
    # report's sinks
    "gptq": Algorithm(gptq_quantize_, _always, _always),
}


def calibration_needs(weights: WeightsSection | None) -> tuple[bool, bool]:
    """(samples, report): what the section's algorithm reads (nothing for no weights or `bits: null`)."""
    if weights is None or weights.bits is None or weights.algorithm not in ALGORITHMS:
        return False, False
    algorithm = ALGORITHMS[weights.algorithm]
    return algorithm.needs_samples(weights), algorithm.needs_report(weights)


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
    return algorithm.run(
        model, weights, calibration, storage_dtype=storage_dtype, progress=progress, writer=writer
    )
