"""Under CI=true a skip is a failure: a test's own skip (conftest's report hook) and a whole module that
skips while it is collected (`pytest.importorskip` at module level), which has no test report."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")
MODULES = {
    "test_collect_skip.py": 'import pytest\npytest.importorskip("no_such_module_here")\n\ndef test_x():\n    pass\n',
    "test_run_skip.py": 'import pytest\n\ndef test_y():\n    pytest.skip("nothing to run on")\n',
}


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("ci", ["true", ""])
def test_a_skip_fails_only_in_ci(tmp_path, module, ci):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / module).write_text(MODULES[module])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {"CI": ci}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(tmp_path / module)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    if ci:
        assert done.returncode != 0, done.stdout
        assert "in CI, where every test must run" in done.stdout
    else:
        assert done.returncode in (0, 5), done.stdout  # 5: pytest ran no test (the module skipped)
        assert "skipped" in done.stdout
