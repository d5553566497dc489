"""vlmeff.eval: benchmarks, metrics and the runner (POPE arrives with the benchmark runner)."""
