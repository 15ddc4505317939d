"""Training curves of one run, or of several side by side, from their run folders.

    python -m rlaif_ray.plot RUN_DIR [RUN_DIR ...] [--out FILE]

Reads each folder's ``metrics.jsonl`` (one record per RL step; a run still going is fine) and,
when there, ``summary.json`` (its ``evals``: the held-out accuracy before RL, at every
``rl.eval_every`` and after RL). Six panels against the RL step: held-out accuracy, sampled
accuracy, samples/s, loss, KL and the step's stage times; one line per run, the legend naming
each run by its folder. ``rlaif_ray.launch`` draws ``curves.png`` into the run folder this way.
Without ``--out`` the figure goes to ``RUN_DIR/curves.png`` for one run, ``curves.png`` for several.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


@dataclass
class RunCurves:
    """What one run folder holds, ready to plot."""

    name: str
    records: list[dict[str, Any]]
    # (step, held-out accuracy), step 0 = before RL
    evals: list[tuple[int, float]] = field(default_factory=list)
    split: str | None = None  # the split evaluated (rl.eval_split), when the run folder says


def read_run(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """The metrics records and held-out evaluations of ``run_dir`` (a torn last line is skipped)."""
    folder = Path(run_dir)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{folder}: no metrics.jsonl (is this a run folder?)")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a run still writing its last line
    summary_file, config_file = folder / "summary.json", folder / "config.yaml"
    split = None
    if config_file.is_file():
        split = (yaml.safe_load(config_file.read_text()) or {}).get("rl", {}).get("eval_split")
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        evals = [(int(e["step"]), float(e["accuracy"])) for e in summary.get("evals", [])]
        split = summary.get("eval_split", split)
    else:
        evals = [(int(r["step"]), float(r["eval"]["accuracy"])) for r in records if "eval" in r]
    return RunCurves(name or folder.name, records, evals, split)


def held_out_title(runs: list[RunCurves]) -> str:
    """The held-out panel's title, naming the split(s) the runs evaluated on."""
    splits = sorted({run.split for run in runs if run.split})
    where = f" on {' / '.join(splits)}" if splits else ""
    return f"held-out accuracy{where} (greedy, exact match)"


def _get(record: dict[str, Any], path: str) -> float:
    value: Any = record
    for key in path.split("/"):
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    return math.nan if value is None or isinstance(value, bool) else float(value)


def _rate(record: dict[str, Any]) -> float:
    step_s = _get(record, "time/step_s")
    return _get(record, "samples") / step_s if step_s > 0 else math.nan


def _series(run: RunCurves, value: Callable[[dict[str, Any]], float]) -> tuple[list[int], list[float]]:
    return [int(r["step"]) for r in run.records], [value(r) for r in run.records]


STAGES = (
    ("time/wait_s", "wait (sample + rank)", "-"),
    ("time/learn_s", "learn", "--"),
    ("time/sync_s", "weight sync", ":"),
    ("time/step_s", "whole step", "-."),
)
# One run: a colour per stage (not orange or blue, the first two runs' colours elsewhere).
STAGE_COLOURS = ("tab:green", "tab:red", "tab:purple", "tab:gray")


def _labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name."""
    paths = [Path(d).resolve() for d in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def draw(runs: Sequence[RunCurves]) -> Figure:
    """The six-panel figure of ``runs``."""
    fig = Figure(figsize=(15, 8.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 3)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    line_panels: list[tuple[Axes, str, str, Callable[[dict[str, Any]], float]]] = [
        (
            axes[0, 1],
            "sampled accuracy",
            "oracle accuracy of sampled answers",
            lambda r: _get(r, "sampled_accuracy"),
        ),
        (axes[0, 2], "throughput", "samples / s", _rate),
        (axes[1, 0], "loss", "GRPO_rank loss", lambda r: _get(r, "learner/loss")),
        (axes[1, 1], "KL to the reference policy", "KL", lambda r: _get(r, "learner/kl")),
    ]
    held_out = axes[0, 0]
    for run, colour in zip(runs, colours, strict=True):
        if run.evals:
            steps, acc = zip(*run.evals, strict=True)
            held_out.plot(steps, acc, "o-", color=colour, label=run.name)
        for ax, _, _, value in line_panels:
            ax.plot(*_series(run, value), ".-", color=colour, label=run.name)
    held_out.set_title(held_out_title(runs))
    held_out.set_ylabel("accuracy")
    for ax, title, ylabel, _ in line_panels:
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    times = axes[1, 2]
    for run, colour in zip(runs, colours, strict=True):
        for (key, stage, style), stage_colour in zip(STAGES, STAGE_COLOURS, strict=True):
            times.plot(
                *_series(run, lambda r, k=key: _get(r, k)),
                style,
                color=stage_colour if len(runs) == 1 else colour,
                label=stage if len(runs) == 1 else None,
            )
    times.set_title("time per step, by stage" + ("" if len(runs) == 1 else " (line style = stage)"))
    times.set_ylabel("seconds")
    if len(runs) > 1:  # the styles stand for stages: name them without a colour
        handles = [times.plot([], [], style, color="black", label=stage)[0] for _, stage, style in STAGES]
        times.legend(handles=handles, fontsize="small")
    else:
        times.legend(fontsize="small")

    for ax in axes.flat:
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in (held_out, axes[0, 1]):
        ax.set_ylim(-0.02, 1.02)
    held_out.legend(title="run", fontsize="small")
    fig.suptitle("rlaif_ray: " + ", ".join(run.name for run in runs))
    return fig


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Draw the runs in ``run_dirs`` (one line each) into the PNG ``out``; returns its path."""
    if not run_dirs:
        raise ValueError("no run folder to plot")
    runs = [read_run(d, name) for d, name in zip(run_dirs, _labels(run_dirs), strict=True)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(runs).savefig(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Training curves of rlaif_ray runs (PNG)")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png, or curves.png)")
    args = parser.parse_args(argv)
    out = args.out or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else "curves.png")
    print(plot_runs(args.run_dirs, out))


if __name__ == "__main__":
    main()
