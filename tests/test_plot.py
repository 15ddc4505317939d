"""Training curves (rlaif_ray.plot) and TensorBoard scalars (rlaif_ray.logs.ScalarWriter), from
hand-written metrics records shaped like the ones rlaif_ray.launch writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlaif_ray.logs import ScalarWriter, flat_scalars
from rlaif_ray.plot import held_out_title, plot_runs, read_run
from rlaif_ray.plot import main as plot_main


def record(step: int, acc: float, loss: float, kl: float, learn_s: float) -> dict[str, Any]:
    """One metrics.jsonl record (the fields the plots and TensorBoard read, and some they skip)."""
    rec: dict[str, Any] = {
        "step": step,
        "samples": 40,
        "groups": 8,
        "weight_version": step,
        "rollout_versions": [step - 1],
        "group_ids": [f"{step}:{i}" for i in range(8)],
        "group_lags": [0] * 8,
        "sampled_accuracy": acc,
        "ranker": {"actors": 2, "groups": 8 * step},
        "learner": {"loss": loss, "kl": kl, "clip_frac": 0.0, "rows": 40, "skipped_step": 0.0},
        "time": {
            "wait_s": 2.0,
            "rollout_s": 0.1,
            "rank_s": 0.01,
            "learn_s": learn_s,
            "sync_s": 0.2,
            "step_s": 2.2 + learn_s,
        },
    }
    if step == 2:
        rec["eval"] = {"accuracy": acc - 0.05, "n": 16, "per_type": {"colour": acc}, "version": step}
    return rec


def fake_run(
    folder: Path, accs: list[float], losses: list[float], summary: bool = True, slower: float = 1.0
) -> Path:
    folder.mkdir(parents=True)
    records = [
        record(i + 1, acc, loss, kl=0.01 * (i + 1) * slower, learn_s=(3.0 + i) * slower)
        for i, (acc, loss) in enumerate(zip(accs, losses, strict=True))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        evals = [{"step": 0, "accuracy": 0.1, "n": 16}, {"step": 2, "accuracy": accs[1] - 0.05, "n": 16}]
        evals.append({"step": len(accs), "accuracy": accs[-1], "n": 16})
        (folder / "summary.json").write_text(json.dumps({"evals": evals, "steps": len(accs)}))
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a = fake_run(tmp_path / "run_a", [0.2, 0.3, 0.45, 0.5], [0.05, 0.04, 0.02, 0.01])
    b = fake_run(tmp_path / "run_b", [0.6, 0.4, 0.3, 0.8], [0.01, 0.06, 0.03, 0.07], slower=1.5)
    return a, b


def test_read_run_uses_summary_evals_or_the_records(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    run = read_run(two_runs[0])
    assert run.name == "run_a" and [r["step"] for r in run.records] == [1, 2, 3, 4]
    assert run.evals == [(0, 0.1), (2, pytest.approx(0.25)), (4, 0.5)]
    # A run still going: no summary yet, a torn last line.
    going = fake_run(tmp_path / "going", [0.2, 0.3, 0.4], [0.1, 0.1, 0.1], summary=False)
    with (going / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "samp')
    run = read_run(going)
    assert [r["step"] for r in run.records] == [1, 2, 3]
    assert run.evals == [(2, pytest.approx(0.25))]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_run(tmp_path)


def test_the_held_out_panel_names_the_split_evaluated(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_runs
    summary = json.loads((a / "summary.json").read_text())
    (a / "summary.json").write_text(json.dumps({**summary, "eval_split": "val"}))
    (b / "config.yaml").write_text(yaml.safe_dump({"rl": {"eval_split": "test"}}))
    runs = [read_run(a), read_run(b)]
    assert [run.split for run in runs] == ["val", "test"]
    assert held_out_title(runs[:1]) == "held-out accuracy on val (greedy, exact match)"
    assert held_out_title(runs) == "held-out accuracy on test / val (greedy, exact match)"
    assert held_out_title([read_run(fake_run(tmp_path / "c", [0.1, 0.2], [0.1, 0.1]))]).startswith(
        "held-out accuracy ("
    )


def orange(image: np.ndarray) -> int:
    """Pixels of matplotlib's second line colour (C1, #ff7f0e): the second run's lines."""
    rgb = image[..., :3]
    return int((np.abs(rgb - np.array([1.0, 0x7F / 255, 0x0E / 255])).sum(axis=-1) < 0.1).sum())


def test_plot_one_run_and_two_runs_side_by_side(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    one = plot_runs([two_runs[0]], tmp_path / "one.png")
    both = plot_runs(list(two_runs), tmp_path / "both.png")
    img_one, img_both = imread(one), imread(both)
    assert img_one.shape == img_both.shape and img_one.shape[0] > 400
    assert img_one[..., :3].std() > 0.05  # not a blank canvas
    assert not np.array_equal(img_one, img_both)
    # The second run's lines are there in the two-run figure only (one colour per run).
    assert orange(img_one) == 0
    assert orange(img_both) > 500


def test_plot_cli_default_and_out(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    plot_main([str(two_runs[0])])
    assert imread(two_runs[0] / "curves.png").shape[0] > 400
    out = tmp_path / "figs" / "compare.png"
    plot_main([str(two_runs[0]), str(two_runs[1]), "--out", str(out)])
    assert not np.array_equal(imread(out), imread(two_runs[0] / "curves.png"))


def test_flat_scalars_keeps_numbers_only() -> None:
    flat = flat_scalars(record(2, 0.5, 0.03, 0.02, 4.0))
    assert flat["learner/loss"] == 0.03 and flat["time/learn_s"] == 4.0
    assert flat["eval/accuracy"] == pytest.approx(0.45) and flat["eval/per_type/colour"] == 0.5
    assert flat["ranker/actors"] == 2.0 and flat["sampled_accuracy"] == 0.5
    assert "step" not in flat and "group_ids" not in flat and "group_lags" not in flat
    assert "sampled_accuracy" not in flat_scalars({"sampled_accuracy": None, "ok": True})


def test_tensorboard_events_read_back(tmp_path: Path) -> None:
    records = [record(i, 0.2 + 0.1 * i, 0.05 / i, 0.01 * i, 3.0 + i) for i in (1, 2, 3)]
    with ScalarWriter(tmp_path / "run") as writer:
        writer.write(0, {"eval": {"accuracy": 0.1, "n": 16}})
        for rec in records:
            writer.write(rec["step"], rec)
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"learner/loss", "learner/kl", "time/learn_s", "eval/accuracy", "sampled_accuracy"} <= tags
    assert not any(tag.startswith(("group_", "step")) for tag in tags)

    def values(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert values("learner/loss") == [
        (1, pytest.approx(0.05)),
        (2, pytest.approx(0.025)),
        (3, pytest.approx(0.05 / 3)),
    ]
    assert values("time/learn_s") == [(1, 4.0), (2, 5.0), (3, 6.0)]
    assert values("eval/accuracy") == [(0, pytest.approx(0.1)), (2, pytest.approx(0.35))]
    assert values("eval/per_type/colour") == [(2, pytest.approx(0.4))]
