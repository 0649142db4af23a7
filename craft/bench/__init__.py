"""Bench2Drive-style benchmark: metrics on per-route logs (:mod:`craft.bench.metrics`) and reports
(:mod:`craft.bench.report`)."""
