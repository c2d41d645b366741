"""Benchmarks that regenerate eval/RESULTS.md and the pages under eval/results/bench/, and the standing
checks (reproducibility, numerics, streaming, CI time). Run each as `python -m eval.bench.NAME` from the
repository root; `serving_worker.py` is the exception, run by path by vLLM's own python."""
