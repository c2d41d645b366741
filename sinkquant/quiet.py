"""Importing sinkquant without third-party noise.

Registering the quantization method imports `transformers.quantizers`, which imports every optional
backend that is installed (torchao, hqq, quanto, ...). Some of them log warnings about their own
builds while they load (a CUDA library missing on a CPU machine, a deprecated torch API). Those lines
are not about anything the user did, and they would break the CLI's promise of one line per error, so
they are held back while the libraries load. Warnings raised by sinkquant itself still show.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block: log records up to WARNING and warnings from other packages are dropped."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"sinkquant(\.|$)")
            yield
    finally:
        logging.disable(previous)
