"""Run every benchmark in turn (``make bench``); each writes its own JSON under bench/results/.

The figures in docs/BENCHMARKS.md measured before the default visual tokens became ``motion``
(and the default SFT 600 steps) were measured with ``model.visual_tokens=patch sft.steps=300``:
those runs get these overrides, so that ``make bench`` reproduces what the docs quote.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EARLIER_DEFAULT = ["model.visual_tokens=patch", "sft.steps=300", "sft.output_dir=checkpoints/sft_patch300"]
TOKENS = ["--steps", "600", "--eval-every", "150", "--seeds", "0", "1", "2"]

for script, *args in (
    ("sft_curve.py", *EARLIER_DEFAULT[:1]),
    ("sft_curve.py", *TOKENS, "--name", "sft_tokens_motion", "model.visual_tokens=motion"),
    ("sft_curve.py", *TOKENS, "--name", "sft_tokens_patch", "model.visual_tokens=patch"),
    ("rl_learning.py", *EARLIER_DEFAULT),
    ("ranker_scaling.py",),
    ("async.py", *EARLIER_DEFAULT),
    ("throughput.py",),
    ("weight_sync.py",),
    ("profile_step.py", *EARLIER_DEFAULT),
):
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)
