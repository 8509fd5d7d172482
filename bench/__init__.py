"""Benchmark of the two backends on this machine (imports both frameworks, so it lives outside the
three packages): `python scripts/bench.py --out DIR` (or `python -m bench` from the repo root).

For each stage (prior, decoder), model size (scripts/make_tiny_kandinsky.py --size tiny|small) and
encode-once cache setting (--embeddings_cache off/on), one fresh process per run trains through the
real loop, `flax_kandinsky.training.loop.train` or `torch_kandinsky.training.loop.train`, and reads
the per-update wall times the loops return (`update_seconds`):

- steady-state samples/s: median update time of updates 3..N (compilation and warm-up excluded);
- time to first step: process start (before imports) to the end of the first update, flax with a
  cold and then a warm persistent compilation cache (--compile_cache_dir);
- achieved GFLOP/s: XLA's flop count of the compiled flax step (`cost_analysis()`) over its median
  update time, against the fp32 matmul peak (numpy, jax, torch) measured in the same run.

The table goes to stdout, everything (per-update times included) to DIR/bench_results.json.
bench/worker.py runs inside each measured process, bench/run.py drives them.
"""
