"""Dated one-off studies (probes and sweeps) behind a decision; their pages are under
eval/results/probes/. Run each as `python -m eval.probes.NAME` from the repository root."""
