"""Bench2Drive-style benchmark: metrics on per-route logs (:mod:`craft.bench.metrics`) and reports
(:mod:`craft.bench.report`)."""

BENCHMARK_VERSION = 2
"""The version of the benchmark's driving content (scenario scripts, adversaries, traffic): results measured
under another version are not the same benchmark, so experiment pools key their runs and evaluations on it
and never reuse those of another version. 1: adversaries triggered at fixed distances, flows that yield;
2: Bench2Drive's time-to-arrival triggers and flows that ignore vehicles (``docs/benchmark.md``, "Scenario
adversaries")."""
