"""Quality evaluation: perplexity and KL divergence under a fixed protocol."""

from .perplexity import PROTOCOL, EvalResult, evaluate, evaluation_windows, window_logits

__all__ = ["PROTOCOL", "EvalResult", "evaluate", "evaluation_windows", "window_logits"]
