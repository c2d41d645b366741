import math

import pytest
import torch

from sinkquant.errors import InputError
from sinkquant.evaluate import evaluate, evaluation_windows


def _independent_perplexity(model, tok, path, seq_len, max_tokens):
    """Plain transformers code: CRLF -> LF, tokenize once, non-overlapping windows, HF's own loss."""
    text = open(path, encoding="utf-8", newline="").read().replace("\r\n", "\n")
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            window = torch.tensor([ids[start : start + seq_len]])
            losses.append(float(model(input_ids=window, labels=window).loss))
    return math.exp(sum(losses) / len(losses))


#: four windows of the protocol's 1024 tokens: enough to tell a wrong window, shift or loss from the
#: plain transformers computation (the full 16,384-token figure is the benchmarks' job)
WINDOWS = 4


@pytest.fixture(scope="module")
def smollm2_eval(smollm2, wikitext_path):
    model, tok = smollm2
    return evaluate(model, tok, wikitext_path, seq_len=1024, max_tokens=WINDOWS * 1024, progress=False)


def test_smollm2_perplexity_matches_plain_transformers(smollm2, smollm2_eval, wikitext_path):
    model, tok = smollm2
    reference = _independent_perplexity(model, tok, wikitext_path, 1024, WINDOWS * 1024)
    assert smollm2_eval.windows == WINDOWS and smollm2_eval.tokens == WINDOWS * 1023
    assert abs(smollm2_eval.perplexity / reference - 1) < 0.01
    assert 15 < smollm2_eval.perplexity < 30  # a sane fp32 figure (22.55 on the full protocol)


def test_smollm2_chunked_matches_single_pass(smollm2, wikitext_path):
    """Two windows fed 64 tokens at a time through the KV cache score what one pass scores."""
    model, tok = smollm2
    single = evaluate(model, tok, wikitext_path, seq_len=1024, max_tokens=2048, progress=False)
    chunked = evaluate(
        model, tok, wikitext_path, seq_len=1024, max_tokens=2048, chunk_size=64, progress=False
    )
    assert chunked.windows == 2 and abs(chunked.perplexity / single.perplexity - 1) < 1e-3


def test_kl_of_a_model_against_itself_is_zero(smollm2, wikitext_path):
    model, tok = smollm2
    result = evaluate(
        model, tok, wikitext_path, seq_len=512, max_tokens=2048, reference=model, progress=False
    )
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.top1_agreement == 1.0


def test_kl_and_top1_between_two_models_match_an_independent_computation(smollm2, wikitext_path):
    """Two different models (SmolLM2 and a copy whose MLPs are rounded to 5 mantissa bits): the
    evaluator's KL(p_ref || p) and top-1 agreement against torch's own kl_div on plain transformers
    logits of the same windows."""
    import copy

    model, tok = smollm2
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if ".mlp." in name:
                mantissa, exponent = torch.frexp(param)
                param.copy_(torch.ldexp(torch.round(mantissa * 32) / 32, exponent))
    result = evaluate(
        other, tok, wikitext_path, seq_len=512, max_tokens=1024, reference=model, progress=False
    )
    text = open(wikitext_path, encoding="utf-8", newline="").read().replace("\r\n", "\n")
    windows = evaluation_windows(tok, text, 512, 1024)  # two windows: the sums are per token
    kl_sum, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for window in windows:
            ref = torch.log_softmax(model(input_ids=window[None]).logits[0, :-1].double(), -1)
            mine = torch.log_softmax(other(input_ids=window[None]).logits[0, :-1].double(), -1)
            kl_sum += float(torch.nn.functional.kl_div(mine, ref, log_target=True, reduction="sum"))
            agree += int((ref.argmax(-1) == mine.argmax(-1)).sum())
            count += ref.shape[0]
    assert result.kl > 1e-3  # the two models differ
    assert result.kl == pytest.approx(kl_sum / count, rel=1e-3)
    assert result.top1_agreement == pytest.approx(agree / count, abs=2 / count)
    del other


def test_bos_tokenizer_windows_start_with_bos(stories, wikitext_path):
    model, tok = stories
    windows = evaluation_windows(tok, "once upon a time there was a cat. " * 50, 64)
    assert bool((windows[:, 0] == tok.bos_token_id).all()) and windows.shape[1] == 64
    single = evaluate(model, tok, wikitext_path, seq_len=256, max_tokens=4096, progress=False)
    chunked = evaluate(model, tok, wikitext_path, seq_len=256, max_tokens=4096, chunk_size=17, progress=False)
    assert single.bos and single.tokens == single.windows * 255
    assert abs(chunked.perplexity / single.perplexity - 1) < 1e-3


def test_text_shorter_than_one_window_is_an_input_error(stories, tmp_path):
    model, tok = stories
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(InputError, match="fewer than one window"):
        evaluate(model, tok, path, seq_len=128, progress=False)
