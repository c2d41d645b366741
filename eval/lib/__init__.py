"""What the benchmarks and probes share: paths, the machine, byte counts, peer loaders (`common`), and
the peers run in virtual environments of their own (`peers`)."""
