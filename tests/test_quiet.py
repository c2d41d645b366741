"""Importing sinkquant holds back third-party import noise and nothing of its own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest

from sinkquant.quiet import quiet_third_party


def test_other_packages_noise_is_dropped_and_sinkquants_kept(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING), quiet_third_party():
            logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
            warnings.warn_explicit(
                "register_constant is deprecated", UserWarning, "x.py", 1, module="torch.x"
            )
            warnings.warn_explicit(
                "ignore pattern matches nothing", UserWarning, "w.py", 1, module="sinkquant.w"
            )
        logging.getLogger("torchao").warning("after the import")
    assert [str(w.message) for w in caught] == ["ignore pattern matches nothing"]
    assert [r.getMessage() for r in caplog.records] == ["after the import"]  # logging is back as it was


@pytest.mark.parametrize(
    "args",
    [
        ["quantize", "/nonexistent/model", "/tmp/sinkquant-never-written"],
        ["recipe", "validate", "/nonexistent.yaml"],
    ],
)
def test_a_bad_input_prints_one_line_with_the_bench_extra_installed(args):
    """With the optional backends installed (the `bench` extra), the CLI still prints one line."""
    pytest.importorskip("torchao", reason="the bench extra (torchao, hqq, quanto) is part of the dev install")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sinkquant.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
