"""The `sinkquant` command. `app` holds the group and its error handling; each command module adds
its commands to it when imported."""

from . import calibrate, evaluate, export, info, quantize  # noqa: F401  (registers the commands)
from .app import main

__all__ = ["main"]
