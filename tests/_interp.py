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


def run_interpreted_parallel(scripts: list[str], timeout: float = 300,
                             marker: str = "ok") -> None:
    """Run several interpreter scripts at once, one single-threaded child each: the
    interpreter runs Python one op at a time on one core, so on the 2-core CI machine two
    children take about 60% of the wall time of one running everything. Each must print
    ``marker`` and exit 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", s], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in scripts]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and marker in out, (i, err[-3000:])
