"""Learning comparisons under one protocol: arms (task x method x seed), val to choose, test to report.

    python bench/learning.py [--tasks default graded converged rlaif] [--methods start dcg score sft]
        [--seeds 0 1 2] [--minutes 10] [--data-seed 0] [--lrs 2e-4 5e-4] [--name learning]
        [--report-only] [key=value ...]

Every RL arm is one run of the whole Ray pipeline (``rlaif_ray.launch.run``) from the task's SFT
warm start (trained once per task, shared by the seeds: its fingerprint leaves the seed out), for
``--minutes`` of RL wall time (``rl.time_limit_s``; evaluations do not count), evaluated on the val
split every ``rl.eval_every`` steps (``rl.eval_split=val``: choose settings there) and once on
the test split at the end (``rl.final_test``: report that). ``seed=S`` sets the initialisation of
what RL adds, the order of the prompts and the sampling; the data and the warm start are the task's.

Arms are resumable in parts: each finished arm writes ``bench/results/<name>/<task>-<method>-seed<S>.json``
and is skipped when that file exists, so the comparison can be run a few arms at a time (by
different ``--methods``/``--seeds``) and the report (``--report-only``) made from whatever has
accumulated. The report, ``bench/results/<name>.json``, gives per task and method, as mean ± sd
over the seeds: test exact-match and part accuracy at the end, and the val accuracy at the end and
averaged over the second half of the evaluations (one noisy evaluation moves an end point more).

Tasks, each with its own generated data (val 10%, test 20% of the videos: 800 test questions) and
its own warm start:

* ``default``: the built-in task (colour, shape, direction, count; one-word answers), 1000 videos;
* ``graded``: ``describe`` questions only ("red circle up", judged part by part), 4000 videos;
* ``converged``: the default task's data with a long SFT (``sft.keep_best``: the evaluation with the
  best val accuracy is the warm start), to ask whether RL adds anything to a converged SFT;
* ``rlaif``: RLAIF: the default task, 1000 videos, answers kept for a fifth of the training
  videos only (``data.synthetic_label_fraction=0.2``); the warm start is SFT on those; the Oracle
  is the video judge (``ranker.backend=video_judge``, built by ``rlaif_ray.prepare`` on 400 videos
  of its own seed, never the policy's). ``--data-seed S`` makes all of it afresh for seed S, each
  in its own folder (data, label split, judge, warm start): the comparison repeated on data nobody
  tuned on. Its arms are named ``rlaif-dS``.

Methods (the ground-truth oracle's orderings or scores in every RL case but ``rlaif``'s, where the
video judge's):

* ``start``: the warm start itself, evaluated (no training; greedy evaluation has no seed, so one
  arm, whatever ``--seeds`` says);
* ``dcg``: GRPO_rank, DCG rank advantages;
* ``dcg_std``: the same, standardised per group like GRPO's advantages (the same scale: a
  different step size is then not what makes the difference);
* ``score``: plain GRPO on binary correctness;
* ``score_parts``: plain GRPO on part accuracy (a graded scalar reward);
* ``sft``: more SFT from the warm start on the same training questions, for the same minutes of
  training time (``sft.init_from``, ``sft.time_limit_s``), evaluated on val about as often as RL
  (on ``rlaif``: the labelled lines only);
* ``distill`` (``rlaif``): the same, on the labelled lines plus the judge's greedy answers to every
  line nobody labelled (``python -m rlaif_ray.prepare distill``): the strong baseline for RL from
  the judge's rankings;
* ``judge`` (``rlaif``): the judge itself, evaluated on the same test questions (one arm).

Learning rate chosen on val (``--lrs A B ...``): the first of ``--seeds`` runs every training
method (all but ``start`` and ``judge``) at each learning rate (``learner.lr`` for RL, ``sft.lr``
for ``sft``/``distill``; arms named ``<task>-<method>-lr<A>-seed<S>``); the later seeds run only
the rate whose first-seed arm had the best val accuracy over the second half of its evaluations.
The report keeps, per task and method, the arms at that rate (the choice and each rate's val
figure under ``lr_selection``); test is never looked at to choose.

On ``rlaif`` the report adds the targets, each a paired difference over the seeds on test:
``dcg - sft >= +0.05``, ``dcg >= distill``, ``dcg >= score`` and ``dcg`` above its judge.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, print_table, write_result  # noqa: E402
from rlaif_ray.checkpoint import fingerprint, fingerprint_differences, finished_checkpoint  # noqa: E402
from rlaif_ray.config import load_config  # noqa: E402
from rlaif_ray.launch import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

METHODS: dict[str, list[str]] = {
    "start": ["rl.steps=0"],
    "dcg": ["algo.advantage=dcg"],
    "dcg_std": ["algo.advantage=dcg_std"],
    "score": ["algo.advantage=score", "ranker.score=binary"],
    "score_parts": ["algo.advantage=score", "ranker.score=parts"],
    "sft": [],  # not an RL run: see run_sft_arm
    "distill": [],  # rlaif only: run_sft_arm on the judge-labelled lines
    "judge": [],  # rlaif only: run_judge_arm
}
RLAIF_ONLY = ("distill", "judge")
# SFT steps between val evaluations in an `sft` arm: ~34 s, as RL's 20 steps of ~1.7 s.
SFT_EVAL_EVERY = 200


def task_data(folder: str, videos: int, *extra: str) -> list[str]:
    """Overrides for a task generated into ``data/<folder>`` with 800+ test questions."""
    return [
        f"data.synthetic_dir=data/{folder}",
        f"data.train=data/{folder}/train.jsonl",
        f"data.val=data/{folder}/val.jsonl",
        f"data.test=data/{folder}/test.jsonl",
        f"data.synthetic_videos={videos}",
        "data.synthetic_val_frac=0.1",
        "data.synthetic_test_frac=0.2",
        *extra,
    ]


TASKS: dict[str, list[str]] = {  # and "rlaif", whose overrides depend on --data-seed: rlaif_task
    "default": [*task_data("bench_default", 1000), "sft.output_dir=checkpoints/sft_bench_default"],
    "graded": [
        *task_data("bench_graded", 4000, "data.synthetic_question_types=[describe]"),
        "sft.output_dir=checkpoints/sft_bench_graded",
    ],
    "converged": [
        *task_data("bench_default", 1000),
        "sft.steps=2400",
        "sft.eval_every=200",
        "sft.keep_best=true",
        "sft.output_dir=checkpoints/sft_bench_converged",
    ],
}


def rlaif_task(data_seed: int) -> list[str]:
    """Overrides of the ``rlaif`` task for data seed ``data_seed``: its data, label split, judge
    (data from seed ``1000 + data_seed``) and warm start, each in a folder of its own."""
    suffix = f"rlaif_d{data_seed}"
    return [
        *task_data(f"bench_{suffix}", 1000, f"data.synthetic_seed={data_seed}"),
        "data.synthetic_label_fraction=0.2",
        f"sft.output_dir=checkpoints/sft_bench_{suffix}",
        "ranker.backend=video_judge",
        f"ranker.judge_path=checkpoints/judge_bench_{suffix}",
        f"judge.data_dir=data/bench_{suffix}_judge",
        f"judge.seed={1000 + data_seed}",
    ]


def task_overrides(task: str, data_seed: int) -> list[str]:
    return rlaif_task(data_seed) if task == "rlaif" else TASKS[task]


def task_label(task: str, data_seed: int) -> str:
    """How an arm names its task: ``rlaif-dS`` for the rlaif task on data seed S."""
    return f"rlaif-d{data_seed}" if task == "rlaif" else task


def arm_name(label: str, method: str, seed: int, lr: float | None) -> str:
    """An arm's file stem: ``<task>-<method>[-lr<lr>]-seed<S>`` (the rate only when ``--lrs`` chose it)."""
    return f"{label}-{method}{'' if lr is None else f'-lr{lr:g}'}-seed{seed}"


def lr_override(method: str, lr: float | None) -> list[str]:
    """The learning-rate override of a training arm: ``sft.lr`` for the SFT methods, ``learner.lr`` else."""
    if lr is None:
        return []
    return [f"{'sft' if method in ('sft', 'distill') else 'learner'}.lr={lr}"]


def chosen_lr(arms: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """The learning rate chosen on val among one method's arms: the best ``val_second_half`` at the
    seed every rate was run with (the lowest such seed; the smaller rate on a tie). Returns the rate
    and each rate's val figure at that seed."""
    by_seed: dict[int, dict[float, float]] = {}
    for arm in arms:
        by_seed.setdefault(arm["seed"], {})[arm["lr"]] = arm["val_second_half"]
    rates = {arm["lr"] for arm in arms}
    seed = min(s for s, runs in by_seed.items() if runs.keys() == rates)
    val = dict(sorted(by_seed[seed].items()))
    return max(val, key=lambda lr: (val[lr], -lr)), val


def arm_overrides(
    task: str,
    method: str,
    seed: int,
    minutes: float,
    name: str,
    data_seed: int = 0,
    lr: float | None = None,
) -> list[str]:
    """The config overrides of one arm."""
    return [
        *task_overrides(task, data_seed),
        f"seed={seed}",
        "rl.steps=100000",
        f"rl.time_limit_s={minutes * 60}",
        "rl.eval_split=val",
        "rl.final_test=true",
        f"run_dir=runs/bench_{name}/{arm_name(task_label(task, data_seed), method, seed, lr)}",
        *METHODS[method],
        *lr_override(method, lr),
    ]


def second_half_mean(evals: list[dict[str, Any]]) -> float:
    """The mean accuracy of the evaluations in the second half of the run (by step); the last
    evaluation's when there is no step (a ``start`` arm)."""
    last = evals[-1]["step"]
    later = [e["accuracy"] for e in evals if e["step"] > last / 2] or [evals[-1]["accuracy"]]
    return statistics.mean(later)


def loop_signal(run_dir: str | Path) -> dict[str, float]:
    """How much the RL updates had to learn from, from the run's ``metrics.jsonl``: the fraction of
    groups skipped as all-tied (no ordering: every answer equal), the second half's mean sampled
    accuracy, KL to the warm start and answer length, and the Oracle's top-1 agreement with the
    reference over the run (groups with a reference and both right and wrong answers whose
    best-ranked answers are all right; 1.0 for the ground truth)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    later = records[len(records) // 2 :]
    ranker = records[-1]["ranker"]
    return {
        "groups_tied_fraction": sum(r["learner"]["groups_skipped_tied"] for r in records)
        / max(1, sum(r["learner"]["groups"] for r in records)),
        "sampled_accuracy_second_half": statistics.mean(r["sampled_accuracy"] for r in later),
        "kl_second_half": statistics.mean(r["learner"].get("kl", 0.0) for r in later),
        "answer_tokens_second_half": statistics.mean(r["answer_tokens_mean"] for r in later),
        "oracle_top1_agreement": ranker["top1_agrees"] / ranker["top1_checked"]
        if ranker.get("top1_checked")
        else float("nan"),
    }


def warm_start_record(cfg: Any) -> dict[str, Any]:
    """The task's SFT warm start as ``sft_state.json`` describes it: steps, the step saved (the
    best on val under ``sft.keep_best``), training time and its val curve."""
    state = finished_checkpoint(cfg.sft.output_dir)
    assert state is not None, cfg.sft.output_dir
    return {key: state.get(key) for key in ("steps", "saved_step", "train_s", "wall_s", "history")}


def arm_record(
    task: str,
    method: str,
    seed: int,
    minutes: float,
    overrides: list[str],
    steps: int,
    train_s: float,
    evals: list[dict[str, Any]],
    test: dict[str, Any],
    lr: float | None = None,
) -> dict[str, Any]:
    """One arm's result: val before (``evals[0]``), at the end (``evals[-1]``) and over the second
    half of its evaluations, and the final test evaluation."""
    return {
        "task": task,
        "method": method,
        "seed": seed,
        **({} if lr is None else {"lr": lr}),
        "minutes": minutes,
        "overrides": overrides,
        "steps": steps,
        "train_s": train_s,
        "val_before": evals[0]["accuracy"],
        "val_after": evals[-1]["accuracy"],
        "val_second_half": second_half_mean(evals),
        "test_accuracy": test["accuracy"],
        "test_part_accuracy": test["part_accuracy"],
        "test_per_type": test["per_type"],
        "test_examples": test["n"],
        "evals": evals,
    }


def write_arm(path: Path, arm: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(arm, indent=2) + "\n")
    tmp.replace(path)  # an arm's file exists only once the arm is whole


def run_arm(
    args: argparse.Namespace, task: str, method: str, seed: int, path: Path, lr: float | None = None
) -> None:
    overrides = [
        *args.overrides,
        *arm_overrides(task, method, seed, args.minutes, args.name, args.data_seed, lr),
    ]
    cfg = load_config(args.config, overrides)
    summary = run(cfg)
    record = arm_record(
        task_label(task, args.data_seed),
        method,
        seed,
        args.minutes,
        overrides,
        summary["steps"],
        summary["rl_wall_s"],
        summary["evals"],
        summary["test"],
        lr,
    )
    record.update(loop_signal(cfg.run_dir) if summary["steps"] else {"warm_start": warm_start_record(cfg)})
    write_arm(path, record)


def run_sft_arm(
    args: argparse.Namespace, task: str, method: str, seed: int, path: Path, lr: float | None = None
) -> None:
    """More SFT from the task's warm start for ``--minutes`` of training time, then the test split:
    on the task's training lines (``sft``), or on them with the judge's answers where they had
    none (``distill``, rlaif)."""
    overrides = [*args.overrides, *task_overrides(task, args.data_seed)]
    cfg = load_config(args.config, overrides)
    label = task_label(task, args.data_seed)
    start = RESULTS / args.name / f"{label}-start-seed0.json"
    if not start.exists():  # the warm start made (or reused) as an RL arm makes it, and evaluated
        run_arm(args, task, "start", 0, start)
    warm = finished_checkpoint(cfg.sft.output_dir)
    differences = fingerprint_differences(warm and warm.get("fingerprint"), fingerprint(cfg, cfg.model.path))
    if differences:
        raise SystemExit(
            f"{cfg.sft.output_dir} is not this task's warm start ({'; '.join(differences)}): "
            f"remove it and {start}, then run the arm again"
        )
    train = []
    if method == "distill":
        distilled = Path(cfg.data.train).with_name("train_distill.jsonl")
        if not distilled.is_file():
            prepare = [sys.executable, "-m", "rlaif_ray.prepare", "distill", "--config", args.config]
            subprocess.run([*prepare, "--out", str(distilled), *overrides], check=True, cwd=ROOT)
        train = [f"data.train={distilled}"]
    folder = Path(f"runs/bench_{args.name}/{arm_name(label, method, seed, lr)}")
    overrides = [
        *overrides,
        *train,
        *lr_override(method, lr),
        f"seed={seed}",
        f"sft.init_from={cfg.sft.output_dir}",
        f"sft.output_dir={folder / 'sft'}",
        "sft.steps=100000000",
        f"sft.time_limit_s={args.minutes * 60}",
        f"sft.eval_every={SFT_EVAL_EVERY}",
        "sft.keep_best=false",
    ]
    subprocess.run(
        [sys.executable, "-m", "rlaif_ray.sft", "--config", args.config, *overrides], check=True, cwd=ROOT
    )
    state = finished_checkpoint(folder / "sft")
    assert state is not None, folder
    test = evaluate_checkpoint(folder / "sft", cfg.data.test, folder / "test.json")
    start_step = warm.get("saved_step", warm["steps"])
    before = next(h for h in warm["history"] if h["step"] == start_step)
    evals = [{"step": 0, "accuracy": before["val_accuracy"]}] + [
        {"step": h["step"], "accuracy": h["val_accuracy"], "part_accuracy": h["val_part_accuracy"]}
        for h in state["history"]
    ]
    write_arm(
        path,
        arm_record(
            label, method, seed, args.minutes, overrides, state["steps"], state["train_s"], evals, test, lr
        ),
    )


def evaluate_checkpoint(checkpoint: Path, data: str, out: Path) -> dict[str, Any]:
    """``python -m rlaif_ray.evaluate`` of ``checkpoint`` on ``data`` (greedy exact match), kept in ``out``."""
    subprocess.run(
        [sys.executable, "-m", "rlaif_ray.evaluate", "--checkpoint", str(checkpoint), "--data", data]
        + ["--out", str(out)],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((ROOT / out).read_text())


def run_judge_arm(args: argparse.Namespace, task: str, path: Path) -> None:
    """The rlaif task's judge (built when missing) evaluated like a policy: val, then test."""
    overrides = [*args.overrides, *task_overrides(task, args.data_seed)]
    cfg = load_config(args.config, overrides)
    prepare = [sys.executable, "-m", "rlaif_ray.prepare", "judge", "--config", args.config]
    subprocess.run([*prepare, *overrides], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    folder = Path(f"runs/bench_{args.name}/{task_label(task, args.data_seed)}-judge-seed0")
    folder.mkdir(parents=True, exist_ok=True)
    judge = Path(cfg.ranker.judge_path)
    val = evaluate_checkpoint(judge, cfg.data.val, folder / "val.json")
    test = evaluate_checkpoint(judge, cfg.data.test, folder / "test.json")
    evals = [{"step": 0, "accuracy": val["accuracy"]}]
    write_arm(
        path, arm_record(task_label(task, args.data_seed), "judge", 0, 0.0, overrides, 0, 0.0, evals, test)
    )


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_difference(arms: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """``arm[key] - base[key]`` for each seed both have: per seed, and mean ± sd. The seeds share
    the data, the warm start and the prompt order, so the paired difference is less noisy than the
    difference of two means."""
    ours, theirs = {a["seed"]: a[key] for a in arms}, {a["seed"]: a[key] for a in base}
    seeds = sorted(ours.keys() & theirs.keys())
    diffs = [ours[s] - theirs[s] for s in seeds]
    return {"seeds": seeds, "per_seed": diffs, **(mean_sd(diffs) if diffs else {})}


def report(name: str) -> dict[str, Any]:
    """Mean ± sd over seeds per (task, method) of every arm file under bench/results/<name>/, the
    binomial standard error of one test evaluation, and each method's paired difference from
    ``dcg`` (GRPO_rank) on the same task and seeds."""
    arms = [json.loads(p.read_text()) for p in sorted((RESULTS / name).glob("*.json"))]
    if not arms:
        raise SystemExit(f"no arm results under {RESULTS / name}/: run some arms first (see --help)")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for arm in arms:
        groups.setdefault((arm["task"], arm["method"]), []).append(arm)
    selections = {}
    for key, group in groups.items():
        chosen = [a for a in group if "lr" in a]  # arms run with --lrs (others are left out)
        if chosen:
            lr, val = chosen_lr(chosen)
            groups[key] = [a for a in chosen if a["lr"] == lr]
            selections[key] = {"chosen": lr, "val_second_half": {f"{r:g}": v for r, v in val.items()}}
    table = []

    def order(item: tuple[tuple[str, str], Any]) -> tuple[int, str, int]:
        task, method = item[0]
        known = list(TASKS).index(task) if task in TASKS else len(TASKS)
        return known, task, list(METHODS).index(method)

    for (task, method), group in sorted(groups.items(), key=order):
        table.append(
            {
                "task": task,
                "method": method,
                "seeds": sorted(a["seed"] for a in group),
                **({"lr_selection": selections[(task, method)]} if (task, method) in selections else {}),
                "steps": mean_sd([a["steps"] for a in group]),
                **{
                    key: mean_sd([a[key] for a in group])
                    for key in (
                        "test_accuracy",
                        "test_part_accuracy",
                        "val_after",
                        "val_second_half",
                        "val_before",
                    )
                },
            }
        )
        for key in (
            "groups_tied_fraction",
            "sampled_accuracy_second_half",
            "kl_second_half",
            "answer_tokens_second_half",
            "oracle_top1_agreement",
        ):
            if all(key in a for a in group):
                table[-1][key] = mean_sd([a[key] for a in group])
        p, n = table[-1]["test_accuracy"]["mean"], group[0]["test_examples"]
        table[-1]["test_standard_error"] = math.sqrt(p * (1 - p) / n)
        if method not in ("dcg", "start") and (task, "dcg") in groups:
            table[-1]["minus_dcg"] = {
                key: paired_difference(group, groups[(task, "dcg")], key)
                for key in ("test_accuracy", "test_part_accuracy", "val_second_half")
            }
    rows = [
        [
            r["task"],
            r["method"],
            len(r["seeds"]),
            round(r["steps"]["mean"]),
            f"{r['test_standard_error']:.3f}",
        ]
        + [
            f"{r[k]['mean']:.3f} ± {r[k]['sd']:.3f}"
            for k in ("test_accuracy", "test_part_accuracy", "val_after", "val_second_half")
        ]
        for r in table
    ]
    print_table(
        ["task", "method", "seeds", "steps", "test_se", "test_acc", "test_parts", "val_end", "val_2nd_half"],
        rows,
    )
    diffs = [
        [r["task"], r["method"], len(r["minus_dcg"]["test_accuracy"]["seeds"])]
        + [
            f"{d['mean']:+.3f} ± {d['sd']:.3f}"
            for d in (r["minus_dcg"][k] for k in ("test_accuracy", "test_part_accuracy", "val_second_half"))
        ]
        for r in table
        if r.get("minus_dcg") and r["minus_dcg"]["test_accuracy"]["seeds"]
    ]
    if selections:
        print("\nlearning rate chosen on val (val accuracy over the second half, first seed):")
        print_table(
            [
                "task",
                "method",
                "chosen",
                *(f"lr {r}" for r in next(iter(selections.values()))["val_second_half"]),
            ],
            [
                [task, method, f"{s['chosen']:g}", *(f"{v:.3f}" for v in s["val_second_half"].values())]
                for (task, method), s in selections.items()
            ],
        )
    if diffs:
        print("\nminus dcg, paired by seed (mean ± sd of the per-seed differences):")
        print_table(["task", "method", "seeds", "test_acc", "test_parts", "val_2nd_half"], diffs)
    targets = {task: rlaif_targets(groups, task) for task, _ in groups if task.startswith("rlaif")}
    for task, checks in targets.items():
        print(f"\n{task}: targets on test accuracy (paired by seed: mean ± sd of the differences)")
        print_table(
            ["target", "seeds", "difference", "met"],
            [
                [name, len(d["seeds"]), f"{d['mean']:+.3f} ± {d['sd']:.3f}", d["met"]]
                for name, d in checks.items()
                if d["seeds"]
            ],
        )
    return {"arms": len(arms), "table": table, "rlaif_targets": targets}


def rlaif_targets(groups: dict[tuple[str, str], list[dict[str, Any]]], task: str) -> dict[str, Any]:
    """The rlaif comparison's targets on ``task``, each a paired difference of test accuracy over the
    seeds that both arms have (the judge's one arm is every seed's baseline): ``dcg - sft >= 0.05``,
    ``dcg - distill >= 0``, ``dcg - score >= 0``, ``dcg - judge > 0``."""
    dcg = groups.get((task, "dcg"), [])
    out = {}
    for other, threshold in (("sft", 0.05), ("distill", 0.0), ("score", 0.0), ("judge", 0.0)):
        base = groups.get((task, other), [])
        if other == "judge":
            base = [{**base[0], "seed": a["seed"]} for a in dcg] if base else []
        diff = paired_difference(dcg, base, "test_accuracy")
        met = bool(diff["seeds"]) and (
            diff["mean"] > threshold if other == "judge" else diff["mean"] >= threshold
        )
        out[f"dcg - {other} {'>' if other == 'judge' else '>='} {threshold:+.2f}"] = {**diff, "met": met}
    return out


def arm_rates(args: argparse.Namespace, task: str, method: str, seed: int) -> list[float | None]:
    """The learning rates an arm runs with: the config's (``None``) without ``--lrs`` or for an arm
    that does not train; every rate on the first seed; on later seeds the rate chosen on val."""
    if not args.lrs or method in ("start", "judge"):
        return [None]
    if seed == args.seeds[0]:
        return list(args.lrs)
    label = task_label(task, args.data_seed)
    first = [RESULTS / args.name / f"{arm_name(label, method, args.seeds[0], lr)}.json" for lr in args.lrs]
    missing = [str(p) for p in first if not p.exists()]
    if missing:
        raise SystemExit(f"cannot choose {method}'s learning rate on val: missing {', '.join(missing)}")
    return [chosen_lr([json.loads(p.read_text()) for p in first])[0]]


def run_one(args: argparse.Namespace, task: str, method: str, seed: int, lr: float | None) -> None:
    """One arm, unless its result file exists already."""
    label = task_label(task, args.data_seed)
    path = RESULTS / args.name / f"{arm_name(label, method, seed, lr)}.json"
    if path.exists():
        print(f"== {path.name}: done already", flush=True)
        return
    print(f"== arm {path.stem}", flush=True)
    if method in ("sft", "distill"):
        run_sft_arm(args, task, method, seed, path, lr)
    elif method == "judge":
        run_judge_arm(args, task, path)
    else:
        run_arm(args, task, method, seed, path, lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--tasks", nargs="+", choices=[*TASKS, "rlaif"], default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=10.0, help="RL wall time per arm")
    parser.add_argument(
        "--data-seed", type=int, default=0, help="rlaif: data, label split, judge and warm start of this seed"
    )
    parser.add_argument(
        "--name", default="learning", help="arms under bench/results/<name>/, report <name>.json"
    )
    parser.add_argument(
        "--lrs", type=float, nargs="+", help="learning rates to choose from on val (the first seed runs each)"
    )
    parser.add_argument("--report-only", action="store_true", help="only report the arms already run")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every arm")
    args = parser.parse_args()
    if not args.report_only:
        for task in args.tasks:
            for seed in args.seeds:
                for method in args.methods:
                    if (
                        method in RLAIF_ONLY
                        and task != "rlaif"
                        or (method in ("start", "judge") and seed != args.seeds[0])
                    ):
                        continue
                    for lr in arm_rates(args, task, method, seed):
                        run_one(args, task, method, seed, lr)
    result = {"config": args.config, "overrides": args.overrides, **report(args.name)}
    previous = RESULTS / f"{args.name}.json"
    if args.report_only and previous.is_file():
        # The arms ran earlier: keep their machine (and date) and the config they ran with.
        earlier = json.loads(previous.read_text())
        result.update({k: earlier[k] for k in ("machine", "config", "overrides") if k in earlier})
        result["reported"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = write_result(args.name, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
