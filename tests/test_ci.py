"""CI means everything ran: .ci/run refuses to start without ../shared, and under CI=true a test that
would skip for a missing asset fails instead (on a developer's machine it still skips)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import ROOT


def _pytest(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"SINKQUANT_SHARED": str(tmp_path / "no-shared"), **({"CI": "true"} if ci else {})})
    test = "tests/test_cli.py::test_calibrate_writes_report_and_plots"  # needs ../shared's stories260k
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", test],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_missing_asset_skips_on_a_developer_machine_and_fails_in_ci(tmp_path):
    dev = _pytest(tmp_path, ci=False)
    assert dev.returncode == 0 and "1 skipped" in dev.stdout
    ci = _pytest(tmp_path, ci=True)
    # the skip happens in a fixture, so pytest counts the failure as an error in setup
    assert ci.returncode == 1 and ("1 failed" in ci.stdout or "1 error" in ci.stdout), ci.stdout
    assert "skipped in CI" in ci.stdout


def test_ci_script_refuses_to_run_without_shared(tmp_path):
    repo = tmp_path / "clone"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    done = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "../shared" in done.stderr
    assert not (repo / ".ci-venv").exists()  # it stopped before installing anything
