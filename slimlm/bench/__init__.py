"""slimlm's benchmarks: one suite per technique, each a ratio against a baseline measured
in the same run (see ``shared/MEASURING.md``).

Suites live in ``slimlm/bench/<name>.py`` and register themselves with
``@harness.register("<name>")``; they are imported lazily, the first time a suite is
listed or run. A new suite adds its module name to ``SUITE_MODULES``.

Example::

    from slimlm import bench
    bench.list_suites()                              # ['ceiling', 'train', ...]
    bench.run_suite("train", quick=True)             # seconds on the CPU
    bench.run_suite("train")                         # GPU: benchmarks/results/train-h200.json
    bench.render_report()                            # benchmarks/RESULTS.md + PNG plots
"""

from __future__ import annotations

from slimlm.bench.harness import (
    get_suite,
    list_suites,
    register,
    run_all,
    run_suite,
    time_cpu,
    time_cuda,
    time_fn,
)
from slimlm.bench.report import render_report

#: Modules under slimlm.bench that define suites, in the order ``run_all`` runs them
#: ("ceiling" first: other suites report fractions of the ceilings it measures).
SUITE_MODULES: tuple[str, ...] = (
    "ceiling",
    "train",
    "attention",
    "attention_train",
    "quant",
    "quant_quality",
    "lora",
    "lora_quality",
    "kvcache",
    "decode",
    "checkpointing",
    "precision",
)

__all__ = [
    "SUITE_MODULES",
    "get_suite",
    "list_suites",
    "register",
    "render_report",
    "run_all",
    "run_suite",
    "time_cpu",
    "time_cuda",
    "time_fn",
]
