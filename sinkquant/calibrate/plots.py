"""PNG pictures of a calibration report: where the sinks are and how large the residual stream gets."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .report import CalibrationReport


def save_plots(report: CalibrationReport, folder: str | os.PathLike) -> list[Path]:
    """Write `attention_position0.png` (layer x head heat map of the mean attention position 0
    receives) and `massive_activations.png` (max |hidden| per layer, log scale)."""
    try:
        import matplotlib
    except ImportError as exc:  # an optional extra: only --plots needs it
        raise InputError(
            "--plots needs matplotlib, which is not installed; pip install 'sinkquant[plots]'"
        ) from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    scores = report.sinks.head_scores
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(scores[0]) + 2), max(4, 0.22 * len(scores) + 1.5)))
    image = ax.imshow(scores, aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    share = report.sinks.score.get(0, 0.0)
    ax.set_title(
        f"mean attention on position 0\nSink_0^{report.settings.epsilon} = {share:.2f}  ({report.model_type})"
    )
    fig.colorbar(image, ax=ax, label="mean attention from later queries")
    fig.tight_layout()
    paths.append(folder / "attention_position0.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    layers = [la.layer for la in report.massive.layers]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(layers, [la.max_abs for la in report.massive.layers], "o-", label="max |h| (any position)")
    ax.semilogy(
        layers,
        [max(la.position0_max_abs, 1e-6) for la in report.massive.layers],
        "s--",
        label="max |h| at position 0",
    )
    ax.semilogy(layers, [max(la.median_abs, 1e-6) for la in report.massive.layers], ":", label="median |h|")
    ax.axhline(
        report.settings.massive_abs, color="grey", lw=0.8, label=f"|h| = {report.settings.massive_abs:g}"
    )
    ax.set_xlabel("decoder layer (output)")
    ax.set_ylabel("|hidden state|")
    dims = ", ".join(str(d) for d in report.massive.dims) or "none"
    ax.set_title(f"massive activations (dims: {dims})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(folder / "massive_activations.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
