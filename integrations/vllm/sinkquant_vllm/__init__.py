"""sinkquant-vllm: serve sinkquant checkpoints on vLLM (`quant_method: sinkquant`).

vLLM calls `register()` in each of its processes through the `vllm.general_plugins` entry point; it
checks the vLLM release (`compat.py`), that sinkquant is importable (its layer format and its layers
serve every checkpoint), and registers the quantization config.
"""

from __future__ import annotations


def register() -> None:
    import vllm

    from .compat import check_vllm_version

    check_vllm_version(vllm.__version__)
    try:
        import sinkquant.format  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "sinkquant-vllm serves checkpoints through sinkquant's own layers, and sinkquant is not "
            "importable here: pip install --no-deps <sinkquant checkout> in vLLM's environment"
        ) from exc
    from . import method  # noqa: F401  (registering is the import's effect)
