"""Run every benchmark in turn (``make bench``); each writes its own JSON under bench/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in (
    "sft_curve.py",
    "rl_learning.py",
    "ranker_scaling.py",
    "async.py",
    "throughput.py",
    "weight_sync.py",
    "profile_step.py",
):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
