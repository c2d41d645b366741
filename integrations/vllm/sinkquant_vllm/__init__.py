"""sinkquant-vllm: serve sinkquant checkpoints on vLLM (`quant_method: sinkquant`).

vLLM calls `register()` in each of its processes through the `vllm.general_plugins` entry point; it
checks the vLLM release (`compat.py`) and registers the quantization config. `layer` (torch only) holds
the format and the forward.
"""

from __future__ import annotations


def register() -> None:
    import vllm

    from .compat import check_vllm_version

    check_vllm_version(vllm.__version__)
    from . import method  # noqa: F401  (registering is the import's effect)
