"""sinkquant's evaluation: benchmarks and standing checks (`eval.bench`), dated one-off studies
(`eval.probes`) and what they share (`eval.lib`). Not part of the installed package: run a script as a
module from the repository root, e.g. `python -m eval.bench.bench_speed --help`."""
