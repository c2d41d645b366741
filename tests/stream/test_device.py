"""The executor on a CUDA device: each layer goes to the GPU, nothing assumes the CPU."""

import pytest
import torch

from sinkquant.pipeline import evaluate_model, quantize_model
from sinkquant.recipe import Recipe
from sinkquant.stream.host import Execution

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
RECIPE = Recipe().with_overrides(
    **{"weights.group_size": 32, "calibration.samples": 3, "calibration.seq_len": 96}
)


@needs_cuda
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_quantize_and_eval_on_cuda_match_the_cpu(algorithm, stories_path, wikitext_path, tmp_path):
    recipe = RECIPE.with_overrides(**{"weights.algorithm": algorithm})
    scores = {}
    for device in ("cpu", "cuda"):
        run = Execution(device=device)
        result = quantize_model(stories_path, tmp_path / device, recipe, progress=False, execution=run)
        assert result.report.sinks.positions is not None
        scores[device] = evaluate_model(tmp_path / device, wikitext_path, seq_len=128, max_tokens=2048,
                                        progress=False, execution=run).perplexity  # fmt: skip
    assert scores["cuda"] == pytest.approx(scores["cpu"], rel=5e-3)


def test_auto_picks_cuda_only_where_there_is_one_and_cuda_without_one_is_refused(stories_path, wikitext_path):
    from sinkquant.errors import InputError
    from sinkquant.stream.host import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            evaluate_model(stories_path, wikitext_path, seq_len=128, max_tokens=256, progress=False,
                           execution=Execution(device="cuda"))  # fmt: skip
