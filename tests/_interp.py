"""Run a test script in a child Python under the Triton interpreter (TRITON_INTERPRET=1 must
be set before Triton is imported, and a kernel failure must not take pytest down)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(script: str, timeout: float = 300) -> None:
    """Run ``script`` with TRITON_INTERPRET=1 and no GPU; it must print "ok" and exit 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
