"""Merge a partial benchmark run into a committed results file.

    python scripts/merge_results.py OLD.json NEW.json --key seq_len head_dim causal impl \
        --commit 8a497ad --note "D=128 causal rows re-run"

Rows of NEW replace rows of OLD with the same key (the listed fields); OLD's other rows are
kept, NEW's rows come last. ``--drop FIELD=VALUE`` (VALUE as JSON, e.g. ``kind='"decode"'``)
first removes every OLD row with that field value, for a re-run that measures those rows
differently. The environment header becomes NEW's, with ``git_commit`` set
to ``--commit`` (the GPU machine's copy has no usable .git) and ``merged_from`` listing both
runs (commit, date, command). Written atomically over OLD.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slimlm._io import atomic_write_text  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--key", nargs="+", required=True, help="fields that identify a row")
    ap.add_argument("--commit", required=True, help="commit the NEW run's tree was at")
    ap.add_argument("--note", default="", help="what the NEW run re-measured")
    ap.add_argument("--drop", action="append", default=[], metavar="FIELD=VALUE",
                    help="remove OLD rows whose FIELD equals the JSON VALUE first")
    args = ap.parse_args()
    drops = []
    for d in args.drop:
        field, sep, value = d.partition("=")
        if not sep:
            raise SystemExit(f"--drop {d!r}: expected FIELD=VALUE")
        try:
            drops.append((field, json.loads(value)))
        except json.JSONDecodeError:
            raise SystemExit(f"--drop {d!r}: VALUE must be JSON (a string needs quotes: "
                             f"{field}='\"{value}\"')") from None
    old = json.loads(Path(args.old).read_text())
    new = json.loads(Path(args.new).read_text())
    if old.get("suite") != new.get("suite"):
        raise SystemExit(f"suite mismatch: {old.get('suite')!r} vs {new.get('suite')!r}")

    def key(row: dict) -> tuple:
        return tuple(json.dumps(row.get(k), sort_keys=True) for k in args.key)

    fresh = {key(r) for r in new["rows"]}
    kept = [r for r in old["rows"] if key(r) not in fresh
            and not any(r.get(f) == v for f, v in drops)]
    env = dict(new["env"])
    env["git_commit"] = args.commit
    env["git_dirty"] = False
    runs = old["env"].get("merged_from") or [{
        "git_commit": old["env"].get("git_commit"), "date": old["env"].get("date"),
        "command": old["env"].get("command"), "note": old["env"].get("note", "")}]
    runs = [r for r in runs]
    runs.append({"git_commit": args.commit, "date": new["env"].get("date"),
                 "command": new["env"].get("command"), "note": args.note})
    env["merged_from"] = runs
    env["note"] = ("rows merged from several runs (merged_from); the GPU machine's copy has no "
                   ".git, so each commit is the last one before its run")
    out = {**new, "env": env, "rows": kept + new["rows"]}
    atomic_write_text(args.old, json.dumps(out, indent=2) + "\n")
    print(f"{args.old}: kept {len(kept)} old rows, added {len(new['rows'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
