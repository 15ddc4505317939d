"""Helpers shared by the benchmark scripts: machine description, result files, tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rlaif_ray.groups import Group
    from rlaif_ray.learner.worker import LearnerWorker

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the machine description added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    return path


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def prefix_token_fraction(prompt_lengths: list[float], answer_lengths: list[list[float]]) -> float:
    """The fraction of LM token positions per pass that the shared prefix removes: for group i with
    prompt length P_i (its visual tokens included) and answers of a_ij tokens,
    1 - sum_i (P_i + sum_j a_ij) / sum_i sum_j (P_i + a_ij)."""
    full = sum(
        len(answers) * p + sum(answers) for p, answers in zip(prompt_lengths, answer_lengths, strict=True)
    )
    shared = sum(p + sum(answers) for p, answers in zip(prompt_lengths, answer_lengths, strict=True))
    return 1 - shared / full if full else 0.0


def token_fraction_removed(learner: LearnerWorker, groups: list[Group]) -> float:
    """:func:`prefix_token_fraction` of ``groups`` as ``learner`` sees them (a video's placeholder
    token becomes the learner's visual tokens)."""
    visual = learner.blank_features.shape[1]
    prompts = [
        len(learner.policy.prompt_ids(g.question, video=g.video is not None))
        + (visual - 1 if g.video is not None else 0)
        for g in groups
    ]
    return prefix_token_fraction(prompts, [[len(ids) for ids in g.completion_ids] for g in groups])
