"""Render ``benchmarks/RESULTS.md`` (tables and PNG plots) from the JSON result files.

Each ``<suite>-<gpu>.json`` written by :func:`slimlm.bench.harness.run_suite` becomes a
section: the environment it was measured in (GPU, driver, CUDA, torch, date, commit,
command), a table of its rows (the suite module's ``REPORT_COLUMNS`` if it names them, else every
column that holds a value; numbers formatted by magnitude) and, when the suite's module defines ``plot(rows, ax) -> bool``,
a PNG beside the report (``benchmarks/<suite>-<gpu>.png``). Quick (CPU smoke) results are
left out unless asked for, since their figures mean nothing. Every file is written to a
temporary name and renamed, so a failed render never leaves half a report.

Example::

    from slimlm.bench import render_report
    render_report("benchmarks/results", "benchmarks/RESULTS.md")
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimlm._io import atomic_write_text as _atomic_write_text

# Columns that say what a row is come first in tables, in this order.
_LEAD_COLS = ("model", "op", "impl", "method", "sdpa_backend", "shape", "dtype", "batch",
              "seq_len", "precision")
_FAILURE_COLS = ("oom", "skipped", "error")


def format_value(v: Any) -> str:
    """A table cell: thousands separators for large numbers, 3 significant digits for
    small ones, "-" for missing values."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _cell(v: Any) -> str:
    return format_value(v).replace("|", "\\|").replace("\n", " ")


def _columns(rows: list[dict[str, Any]], only: Sequence[str] | None = None) -> list[str]:
    """Columns holding a value in some row: ``only`` (a suite's ``REPORT_COLUMNS``) in its
    order plus any failure columns, else every key with the identifying ones first."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    cols = [k for k in seen if k != "suite" and any(r.get(k) is not None for r in rows)]
    if only is not None:
        # dict.fromkeys: a failure column the suite also names appears once
        return [c for c in dict.fromkeys((*only, *_FAILURE_COLS)) if c in cols]
    lead = [c for c in _LEAD_COLS if c in cols]
    return lead + [c for c in cols if c not in lead]


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows``; ``columns`` picks and orders the columns (failure
    columns are always kept), default: every column that holds a value."""
    if not rows:
        return "_no rows_\n"
    cols = _columns(rows, columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _env_line(env: dict[str, Any]) -> str:
    gpu = env.get("gpu") or "CPU"
    extra = [f"driver {env['driver']}" if env.get("driver") else None,
             f"CUDA {env['cuda']}" if env.get("cuda") and env.get("gpu") else None]
    extra = [e for e in extra if e]
    parts = [f"**{gpu}**" + (f" ({', '.join(extra)})" if extra else "")]
    for key, label in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                       ("python", "Python"), ("slimlm", "slimlm")):
        if env.get(key):
            parts.append(f"{label} {env[key]}")
    if env.get("date"):
        parts.append(str(env["date"]))
    if env.get("git_commit"):
        parts.append(f"commit `{str(env['git_commit'])[:10]}`"
                     + (" (uncommitted changes)" if env.get("git_dirty") else ""))
    if env.get("command"):
        parts.append(f"`{env['command']}`")
    return " · ".join(parts)




def _suite_module(suite: str) -> Any:
    """The suite's module (for its optional ``plot`` and ``REPORT_COLUMNS``), or None."""
    try:
        return importlib.import_module(f"slimlm.bench.{suite}")
    except ImportError:
        return None


def _plot(suite: str, rows: list[dict[str, Any]], path: Path) -> bool:
    """Draw the suite's plot (its module's ``plot(rows, ax)``) into ``path``, atomically.
    False when the suite has no plot or nothing to draw."""
    plot = getattr(_suite_module(suite), "plot", None)
    if plot is None:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the GPU machine or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    try:
        if not plot(rows, ax):
            return False
        fig.tight_layout()
        from slimlm._io import atomic_write

        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        return True
    finally:
        plt.close(fig)


def load_results(results_dir: str | os.PathLike = "benchmarks/results", *,
                 include_quick: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """Every result document in ``results_dir`` as (path, document), in suite order."""
    d = Path(results_dir)
    if not d.is_dir():
        raise ValueError(f"results_dir={str(results_dir)!r}: not a folder (expected the folder "
                         "of <suite>-<gpu>.json files that `slimlm bench` writes)")
    docs = []
    for p in sorted(d.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or "suite" not in doc or "rows" not in doc:
            raise ValueError(f"{p}: not a slimlm benchmark result (expected keys suite, rows)")
        if doc.get("env", {}).get("quick") and not include_quick:
            continue
        docs.append((p, doc))
    from slimlm.bench import SUITE_MODULES

    order = {m: i for i, m in enumerate(SUITE_MODULES)}
    docs.sort(key=lambda pd: (order.get(pd[1]["suite"], len(order)), pd[1]["suite"], pd[0].name))
    return docs


def _sections(rows: list[dict[str, Any]]) -> list[tuple[str | None, list[dict[str, Any]]]]:
    """Rows split by their ``section`` (or ``part``) field, in order of first appearance,
    so that a suite measuring several things gets one table each, with its own columns."""
    key = "section" if any("section" in r for r in rows) else \
        "part" if any("part" in r for r in rows) else None
    if key is None:
        return [(None, rows)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key, "other")), []).append(r)
    return [(f"{key}: {name}", group) for name, group in groups.items()]


def render_report(results_dir: str | os.PathLike = "benchmarks/results",
                  out: str | os.PathLike = "benchmarks/RESULTS.md", *,
                  include_quick: bool = False) -> Path:
    """Write the markdown report (and one PNG per plotted result beside it); returns its path."""
    out = Path(out)
    docs = load_results(results_dir, include_quick=include_quick)
    lines = ["# slimlm benchmark results", "",
             "Rendered by `slimlm bench --report` from the JSON files in "
             f"`{Path(results_dir).as_posix()}`; do not edit by hand. Every ratio is against a "
             "baseline measured in the same run on the same GPU (see MEASURING.md).", ""]
    if not docs:
        lines += ["_No results yet: run `slimlm bench all` on a GPU._", ""]
    for path, doc in docs:
        suite, env, rows = doc["suite"], doc.get("env", {}), doc.get("rows", [])
        stem = path.stem  # <suite>-<gpu>[-quick]
        lines += [f"## {suite} ({env.get('gpu') or 'CPU'}{', quick' if env.get('quick') else ''})",
                  "", _env_line(env), ""]
        if doc.get("status") not in (None, "ok"):
            lines += [f"> incomplete run: {doc.get('error') or doc.get('status')}", ""]
        if env.get("options"):
            lines += [f"Options: `{json.dumps(env['options'], separators=(',', ':'))}`", ""]
        if env.get("merged_from"):
            # a file re-measured in parts (scripts/merge_results.py): the header above is the
            # latest part's; list every run its rows come from
            lines += ["Rows from several runs (latest part above; each later run replaced the "
                      "rows it re-measured):", ""]
            for run in env["merged_from"]:
                lines.append(f"- commit `{str(run.get('git_commit', '?'))[:10]}`, "
                             f"{run.get('date', '?')}: {run.get('note') or run.get('command', '')}")
            lines.append("")
        columns = getattr(_suite_module(suite), "REPORT_COLUMNS", None)
        # curve points (kind="curve": a loss per logged step) are the plot's data, not table
        # rows: hundreds of one-number lines would bury the table
        table_rows = [r for r in rows if r.get("kind") != "curve"]
        n_curve = len(rows) - len(table_rows)
        for title, group in _sections(table_rows):
            if title:
                lines += [f"**{title}**", ""]
            lines.append(markdown_table(group, columns).rstrip("\n"))
            lines.append("")
        png = out.parent / f"{stem}.png"
        plotted = bool(rows) and _plot(suite, rows, png)
        if n_curve:
            where = "the JSON and the plot below" if plotted else "the JSON"
            lines += [f"{n_curve} curve points (kind `curve`) are in {where}.", ""]
        lines += ["", f"All fields: `{path.name}`.", ""]
        if plotted:
            rel = os.path.relpath(png, out.parent)
            lines += [f"![{suite} on {env.get('gpu') or 'CPU'}]({Path(rel).as_posix()})", ""]
    _atomic_write_text(out, "\n".join(lines).rstrip() + "\n")
    return out
