"""Shared fixtures: real models and data from ../shared.

On a developer's machine a test whose ../shared asset is absent skips with a reason. In CI (`CI=true`)
every skip is a failure, so that a green run means every test ran; only skips that need hardware CI
does not have (a CUDA device) are allowed there.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in one worker per core (pyproject's addopts): one intra-op thread each, so two
    # workers do not fight over the same cores
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SINKQUANT_SHARED", ROOT.parent / "shared"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
#: skip reasons CI may keep: hardware a CI machine does not have
CI_MAY_SKIP = ("needs a CUDA device",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.removeprefix("Skipped: ").startswith(CI_MAY_SKIP):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips while it is collected (`pytest.importorskip` at module level) skips every
    test in it without a test report of its own: in CI that is a failure too."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.removeprefix("Skipped: ").startswith(CI_MAY_SKIP):
            report.outcome = "failed"
            report.longrepr = (
                f"{collector.nodeid} skipped while collected in CI, where every test must run: {reason}"
            )


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real models and data live in ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def stories_path(shared) -> Path:
    return _need(shared / "models" / "stories260k")


@pytest.fixture(scope="session")
def wikitext_path(shared) -> Path:
    return _need(shared / "data" / "wikitext-2-raw-test.txt")


@pytest.fixture(scope="session")
def c4_path(shared) -> Path:
    return _need(shared / "data" / "c4-validation-2k.jsonl")


@pytest.fixture(scope="session")
def smollm2_path(shared) -> Path:
    """SmolLM2-135M as an HF folder, made once from the GGUF in ../shared (cached by the tool)."""
    tool = _need(shared / "tools" / "materialize_model.py")
    _need(shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    # one worker converts while the others wait (the tool's final rename would fail for a second one)
    with open(Path(tempfile.gettempdir()) / "sinkquant-tests-materialize.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(
            [sys.executable, str(tool), "smollm2-135m"], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"materialize_model.py failed: {done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) in float32, loaded once for the whole session. Tests must not modify it."""
    from sinkquant.loading import prepare_model

    return prepare_model(smollm2_path, "float32")


@pytest.fixture(scope="session")
def stories(stories_path):
    from sinkquant.loading import prepare_model

    return prepare_model(stories_path, "float32")
