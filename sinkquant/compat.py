"""Which transformers release sinkquant's jobs run on, checked before a command starts.

sinkquant's requirement admits the older transformers that vLLM pins (5.19 for vLLM 0.32), because its
layers and kernels also run inside vLLM's environment under the sinkquant-vllm plugin, where they use
only transformers' stable model classes. Its jobs (calibrate, quantize, eval, export) hook into
transformers' quantizer registry and Cache layers, which change between releases; the suite runs them on
one release, so a command on another refuses with one line instead of failing halfway.
"""

from __future__ import annotations

from .errors import InputError

#: the (major, minor) release of transformers the test suite runs sinkquant's jobs on
TESTED_TRANSFORMERS = (5, 23)


def check_transformers(version: str | None = None) -> None:
    """Raise InputError (one line) where transformers `version` (default: the installed one) is not the
    tested release."""
    if version is None:
        import transformers

        version = transformers.__version__
    parts = version.split(".")
    release = tuple(int(p) for p in parts[:2]) if all(p.isdigit() for p in parts[:2]) else None
    if release == TESTED_TRANSFORMERS:
        return
    tested = ".".join(map(str, TESTED_TRANSFORMERS))
    raise InputError(
        f"sinkquant's commands run on transformers {tested}, but this environment has {version} (vLLM's "
        f"environment pins an older one, where sinkquant serves only through the plugin); "
        f"run sinkquant in its own environment or pip install 'transformers=={tested}.*'"
    )
