"""sinkquant's jobs refuse a transformers release they are not tested on with one line (the package
itself installs beside vLLM's older transformers, where only its layers run)."""

import pytest

from sinkquant.compat import TESTED_TRANSFORMERS, check_transformers
from sinkquant.errors import InputError


def test_the_installed_transformers_is_the_tested_one():
    check_transformers()


@pytest.mark.parametrize("version", ["5.23.0", "5.23.2", "5.23.0.dev0"])
def test_tested_release_passes(version):
    check_transformers(version)


@pytest.mark.parametrize("version", ["5.19.0", "5.24.0", "4.57.1", "main"])
def test_other_release_is_refused_with_one_line(version):
    with pytest.raises(InputError) as refused:
        check_transformers(version)
    message = str(refused.value)
    assert "\n" not in message and version in message
    assert "transformers==" + ".".join(map(str, TESTED_TRANSFORMERS)) in message
