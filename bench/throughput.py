"""Answers per second of our whole loop vs TRL's ``GRPOTrainer`` on the same tiny text-only task.

    python bench/throughput.py [key=value ...] [--batches 8 64 256] [--steps 60 24 8]
        [--group-size 4] [--staleness 0 1] [--threads 1 2] [--async-threads 1] [--warmup 1]
        [--pin ROLLOUT_CORE LEARNER_CORE] [--seed 0] [--quick] [--name NAME]

(config overrides for our arms first: the list options would take them as their values)

Needs the ``bench`` extra (``pip install -e ".[bench]"``, which ``make bench`` does): TRL.

The task is the synthetic task's questions without their videos (text-only prompts); the model
is the tiny default's language model (``checkpoints/tiny/lm``, randomly initialised, built when
missing) with a fresh LoRA of the config's rank, alpha and target modules (``lm_head`` left out:
TRL refuses an adapter there, so our arms leave it out too). No SFT warm start on either side:
both start from the same policy (a fresh LoRA is zero, so both sample from the base model).

For each answers-per-step size B in ``--batches`` (``B / group size`` prompts per step):

* ``ours-k<K>-t<T>``: the whole loop (``rlaif_ray.launch.run``: real Ray, one rollout actor with
  the ``hf`` engine, the ground-truth ranker pool, one DeepSpeed learner) at ``rl.max_staleness``
  K for each K in ``--staleness``; at K = 0 rollout and learner take turns, each with T torch
  threads, for each T in ``--threads``; at K > 0 they run at the same time, each with
  T = ``--async-threads`` (with ``--pin R L``, the rollout actor on core R and the learner on core
  L: stages on cores of their own). Our ranker pool starts at its size (``ranker.min_actors`` =
  ``ranker.max_actors``), so that no ranker actor starts during the measured steps;
* ``trl-t<T>``: ``trl.GRPOTrainer`` in this process on the CPU with T torch threads for each T
  in ``--threads``, no vLLM, same LoRA, ``num_generations`` = group size, a generation batch of
  B answers learned in one optimizer step (micro-batches of ``learner.micro_batch_size``, as our
  learner), the same
  ``max_completion_length`` (``rollout.max_new_tokens``), temperature, clip range, KL coefficient
  (``beta`` = ``algo.kl_coef``; both use the k3 estimator against the adapter-free model),
  learning rate (constant) and gradient clipping, no gradient checkpointing, a reward of 1 for
  an exact match of the reference (the ground-truth ranker's correctness, ``scores``).

Each arm runs ``--warmup`` + the B's ``--steps`` updates; its answers per second are the answers
of the updates after the warm-up over their wall time (ours: the summary's ``rl_wall_s``, which
leaves out the evaluations, minus the warm-up steps' ``time.step_s``; TRL: from the end of the
last warm-up step to the end of the last step, ``on_step_end``). Also reported: the same from
the median step time (robust to a noisy neighbour), each arm's start-up time (not counted), and
where a step's time goes: ours, the learner's wait for ranked groups (``time.wait_s``: sampling,
ranking and transfers not hidden behind learning) and its update (``time.learn_s``); TRL, its
``_generate_and_score_completions`` (sampling, reward, reference log-probs) and the rest.
Each of our arms is compared with TRL at the same threads per process and with TRL's fastest
arm of that B (the targets are judged on the latter: on a small shared machine one thread can
beat two). The arms of one B run back to back, TRL's and ours of one thread count side by side,
and the order reverses from one B to the next so that a slow spell of a shared machine does not
fall on one side only. All our arms share one local Ray instance, up during the TRL arms too.
Prints two tables and writes ``bench/results/<name>.json`` after every arm.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from bench.common import prefix_token_fraction, print_table, write_result  # noqa: E402
from rlaif_ray.config import Config, load_config, with_absolute_paths  # noqa: E402
from rlaif_ray.data.dataset import load_jsonl  # noqa: E402
from rlaif_ray.data.synthetic import ensure_data  # noqa: E402
from rlaif_ray.launch import init_ray, run  # noqa: E402
from rlaif_ray.logs import setup_logging  # noqa: E402
from rlaif_ray.models.policy import VideoInputs, read_policy_spec  # noqa: E402
from rlaif_ray.models.tiny import ensure_model  # noqa: E402
from rlaif_ray.ranker.backends import GroundTruthRanker, RankPrompt  # noqa: E402

# bench/async.py: "async" is a keyword, so the module is reached by name.
clear_named_actors = importlib.import_module("bench.async").clear_named_actors

# TRL cannot train a LoRA on lm_head (it reads lm_head.weight directly): neither side adapts it.
UNSUPPORTED_BY_TRL = ("lm_head",)
# The targets, ours / TRL: at least 1x at every B, at least 1.5x from 64 answers per step on.
TARGETS = {"at_least_trl": 1.0, "large_batch": 1.5, "large_batch_from": 64}


# --------------------------------------------------------------------------- the task


def text_only_split(src: str, out: Path) -> str:
    """The questions of the JSONL split ``src`` without their videos (text-only prompts)."""
    rows = [json.loads(line) for line in Path(src).read_text().splitlines() if line.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "video"}) + "\n" for r in rows))
    return str(out)


def trl_prompt(spec: dict[str, Any], bos: str | None, question: str) -> str:
    """The text of our text-only prompt (template without the video placeholder, BOS first), which
    TRL tokenizes itself: :func:`check_prompts` checks that it gets our ids."""
    text = spec["prompt_template"].replace(spec["video_token"], "").strip().format(question=question)
    return f"{bos} {text}" if bos else text


def check_prompts(
    spec: dict[str, Any], cfg: Config, tokenizer: Any, prompts: list[str], questions: list[str]
) -> None:
    """Raise unless TRL's tokenization of each prompt text equals our text-only prompt ids."""
    ours = VideoInputs(spec, cfg.model)
    for prompt, question in zip(prompts, questions, strict=True):
        theirs = tokenizer(text=[prompt])["input_ids"][0]
        expected = ours.prompt_ids(question, video=False)
        if theirs != expected:
            raise RuntimeError(
                f"TRL's prompt {prompt!r} tokenizes to {theirs}, our prompt for {question!r} is {expected}: "
                "the two sides would not see the same prompts"
            )


def require_trl() -> None:
    """Stop with what to install when TRL (the ``bench`` extra) is missing."""
    if importlib.util.find_spec("trl") is None:
        raise SystemExit(
            "bench/throughput.py needs TRL, not installed: pip install -e '.[bench]' (make bench does)"
        )


# --------------------------------------------------------------------------- our loop


def our_config(args: argparse.Namespace, batch: int, steps: int, staleness: int, threads: int) -> Config:
    """One arm of ours: the whole loop on the text-only task, no SFT, no evaluation in the loop."""
    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"seed={args.seed}",
            f"data.train={args.text_train}",
            f"data.test={args.text_test}",
            "sft.enabled=false",
            f"rl.group_size={args.group_size}",
            f"rl.prompts_per_step={batch // args.group_size}",
            f"rl.steps={steps}",
            f"rl.max_staleness={staleness}",
            f"rl.eval_every={steps + 1}",  # evaluate before and after only
            f"rl.checkpoint_every={steps + 1}",
            f"rl.eval_examples={args.eval_examples}",
            "rl.final_test=false",
            "rl.time_limit_s=0",
            "ranker.backend=ground_truth",
            "rollout.engine=hf",
            "rollout.num_actors=1",
            "learner.num_actors=1",
            f"rollout.num_threads={threads}",
            f"learner.num_threads={threads}",
            f"run_dir=runs/bench_{args.name}/ours-k{staleness}-t{threads}-b{batch}",
            *(
                [f"rollout.cpu_cores=[{args.pin[0]}]", f"learner.cpu_cores=[{args.pin[1]}]"]
                if args.pin and staleness > 0
                else []
            ),
        ],
    )
    # The ranker pool starts at its size: a pool that grows during the measured steps would count
    # a ranker actor's start-up (about 2 s here) as a step, which a run long enough to matter pays once.
    cfg.ranker.min_actors = cfg.ranker.max_actors
    cfg.model.lora_target_modules = [m for m in cfg.model.lora_target_modules if m not in UNSUPPORTED_BY_TRL]
    return cfg


def run_ours(
    args: argparse.Namespace, batch: int, steps: int, staleness: int, threads: int
) -> dict[str, Any]:
    """Run one arm of ours and measure it from its run folder."""
    clear_named_actors()
    cfg = our_config(args, batch, steps, staleness, threads)
    t = time.time()
    summary = run(cfg)
    wall_s = time.time() - t
    run_dir = Path(cfg.run_dir).absolute()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    step_s = [r["time"]["step_s"] for r in records]
    answers = [r["samples"] for r in records]
    w = args.warmup
    measured_s = summary["rl_wall_s"] - sum(step_s[:w])
    return {
        **rates(answers[w:], measured_s, step_s[w:]),
        "warmup_s": sum(step_s[:w]),
        "startup_and_eval_s": wall_s - summary["rl_wall_s"],
        "step_s": step_s,
        "answers": answers,
        # Per measured step: waiting for ranked groups (sampling + ranking + transfers), the
        # rollout actor's sampling call, learning, weight sync; rank_s is per group.
        "time_means": {
            **{
                key: statistics.mean(r["time"][key] for r in records[w:])
                for key in ("wait_s", "learn_s", "sync_s", "rank_s")
            },
            "rollout_s": statistics.mean(r["time"]["rollout_s"] * r["groups"] for r in records[w:]),
        },
        # The limit beside the rate: the LM token positions the shared prefix removes per pass,
        # from the split's mean prompt length and the measured steps' mean answer length.
        "prefix_token_fraction": prefix_token_fraction(
            [args.prompt_tokens_mean],
            [[statistics.mean(r["answer_tokens_mean"] for r in records[w:])] * args.group_size],
        ),
        "lag_max": max((lag for r in records for lag in r["group_lags"]), default=0),
        # Answers the learner trained on (all-tied groups carry no signal and are skipped).
        "learned_answers": int(sum(r["learner"].get("rows", 0) for r in records)),
        "groups": summary["groups"],
        "rollout_torch_threads": [r.get("torch_threads") for r in summary["rollout"]],
        "lora_target_modules": cfg.model.lora_target_modules,
        "run_dir": str(run_dir),
    }


# --------------------------------------------------------------------------- TRL


def run_trl(args: argparse.Namespace, batch: int, steps: int, threads: int, base: Config) -> dict[str, Any]:
    """Run one TRL ``GRPOTrainer`` arm in this process and time its optimizer steps."""
    with warnings.catch_warnings():  # TRL warns about the vLLM CPU build it does not use here
        warnings.simplefilter("ignore")
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

    class StepClock(TrainerCallback):
        """Wall-clock time at the start and at the end of every optimizer step."""

        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.begin.append(time.time())

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.end.append(time.time())

    t = time.time()
    torch.set_num_threads(threads)
    spec = read_policy_spec(base.model.path)
    tokenizer = AutoTokenizer.from_pretrained(spec["lm"])
    ranker = GroundTruthRanker()
    examples = [json.loads(line) for line in Path(args.text_train).read_text().splitlines() if line.strip()]
    prompts = [trl_prompt(spec, tokenizer.bos_token, e["question"]) for e in examples]
    check_prompts(spec, base, tokenizer, prompts[:16], [e["question"] for e in examples[:16]])
    dataset = Dataset.from_list(
        [{"prompt": p, "answer": e["answer"]} for p, e in zip(prompts, examples, strict=True)]
    )

    def exact_match(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [
            ranker.scores(RankPrompt("", ref), [c])[0] for c, ref in zip(completions, answer, strict=True)
        ]

    micro = min(batch, base.learner.micro_batch_size)
    if batch % micro:
        raise ValueError(f"--batches {batch} is not a multiple of learner.micro_batch_size {micro}")
    algo = base.algo
    config = GRPOConfig(
        output_dir=f"runs/bench_{args.name}/trl-t{threads}-b{batch}",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        max_steps=steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,  # one generation batch of B answers per step
        num_generations=args.group_size,
        max_completion_length=base.rollout.max_new_tokens,
        temperature=base.rollout.temperature,
        top_p=base.rollout.top_p,
        top_k=0,
        beta=algo.kl_coef,
        epsilon=algo.eps_low,
        epsilon_high=algo.eps_high,
        loss_type="dapo",  # token mean over the batch, as algo.aggregation=token_mean
        num_iterations=base.learner.epochs_per_batch,
        learning_rate=base.learner.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=base.learner.grad_clip,
        weight_decay=base.learner.weight_decay,
        gradient_checkpointing=False,
        disable_dropout=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=base.model.lora_r,
        lora_alpha=base.model.lora_alpha,
        lora_dropout=base.model.lora_dropout,
        target_modules=[m for m in base.model.lora_target_modules if m not in UNSUPPORTED_BY_TRL],
        task_type="CAUSAL_LM",
    )
    trainer = GRPOTrainer(
        model=spec["lm"],
        reward_funcs=exact_match,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
    )
    clock = StepClock()
    trainer.add_callback(clock)
    # Once per step (a generation batch is one step): sampling, reward, reference log-probs.
    generate_s: list[float] = []
    generate = trainer._generate_and_score_completions

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.time()
        out = generate(*a, **k)
        generate_s.append(time.time() - t0)
        return out

    trainer._generate_and_score_completions = timed_generate
    startup_s = time.time() - t
    trainer.train()
    step_s = [e - b for b, e in zip(clock.begin, clock.end, strict=True)]
    w = args.warmup
    if len(generate_s) != len(step_s):
        raise RuntimeError(
            f"TRL generated {len(generate_s)} times in {len(step_s)} steps: expected once a step"
        )
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    lengths = [entry["completions/mean_length"] for entry in logs]
    return {
        **rates([batch] * (steps - w), clock.end[-1] - clock.end[w - 1], step_s[w:]),
        "warmup_s": clock.end[w - 1] - clock.begin[0],
        "startup_s": startup_s,
        "step_s": step_s,
        "time_means": {
            "generate_and_score_s": statistics.mean(generate_s[w:]),
            "learn_s": statistics.mean(s - g for s, g in zip(step_s[w:], generate_s[w:], strict=True)),
        },
        "completion_mean_length": statistics.mean(lengths) if lengths else None,
        "torch_threads": torch.get_num_threads(),
        "micro_batch": micro,
        "generation_batch_size": config.generation_batch_size,
    }


# --------------------------------------------------------------------------- measuring


def rates(answers: list[int], wall_s: float, step_s: list[float]) -> dict[str, Any]:
    """Answers per second over ``wall_s`` and from the median step time."""
    median = statistics.median(step_s) if step_s else 0.0
    return {
        "measured_steps": len(answers),
        "measured_answers": sum(answers),
        "measured_s": wall_s,
        "answers_per_s": sum(answers) / wall_s if wall_s > 0 else 0.0,
        "answers_per_s_median_step": statistics.mean(answers) / median if median > 0 else 0.0,
    }


def summarise(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per B and per arm of ours: the ratio ours / TRL at the same threads per process and ours /
    TRL's fastest arm of that B, and the targets of that B judged on the latter (None: the 1.5x
    target does not apply below ``large_batch_from`` answers per step)."""
    rows = []
    for b in dict.fromkeys(a["batch"] for a in arms):
        trl = {a["threads"]: a for a in arms if a["batch"] == b and a["system"] == "trl"}
        if not trl:
            continue
        best = max(trl.values(), key=lambda a: a["answers_per_s"])
        for ours in (a for a in arms if a["batch"] == b and a["system"] == "ours"):
            same = trl.get(ours["threads"])
            ratio_best = ours["answers_per_s"] / best["answers_per_s"]
            rows.append(
                {
                    "batch": b,
                    "ours": ours["arm"],
                    "ours_answers_per_s": ours["answers_per_s"],
                    "trl_same_threads": same["arm"] if same else None,
                    "ratio_same_threads": ours["answers_per_s"] / same["answers_per_s"] if same else None,
                    "ratio_same_threads_median_step": (
                        ours["answers_per_s_median_step"] / same["answers_per_s_median_step"]
                        if same
                        else None
                    ),
                    "trl_best": best["arm"],
                    "trl_best_answers_per_s": best["answers_per_s"],
                    "ratio_vs_best_trl": ratio_best,
                    "at_least_trl_met": ratio_best >= TARGETS["at_least_trl"],
                    "large_batch_met": (
                        ratio_best >= TARGETS["large_batch"] if b >= TARGETS["large_batch_from"] else None
                    ),
                }
            )
    return rows


def print_summary(rows: list[dict[str, Any]], arms: list[dict[str, Any]]) -> None:
    """The arms' figures, then ours / TRL per B with the targets."""

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    def met(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "NO")

    print()
    print_table(
        [
            "B",
            "arm",
            "answers/s",
            "answers/s (median step)",
            "sample s/step",
            "learn s/step",
            "warm-up s",
            "start-up s",
            "dropped stale",
            "prefix removes",
        ],
        [
            [
                a["batch"],
                a["arm"],
                a["answers_per_s"],
                a["answers_per_s_median_step"],
                a["time_means"].get("wait_s", a["time_means"].get("generate_and_score_s")),
                a["time_means"]["learn_s"],
                a["warmup_s"],
                a.get("startup_s", a.get("startup_and_eval_s")),
                a["groups"]["dropped_stale"] if "groups" in a else "-",
                f"{a['prefix_token_fraction']:.1%}" if "prefix_token_fraction" in a else "-",
            ]
            for a in arms
        ],
    )
    print()
    print_table(
        [
            "B",
            "ours",
            "ans/s",
            "/ TRL same threads",
            "(median step)",
            "/ best TRL",
            "best TRL",
            ">= 1x best TRL",
            ">= 1.5x (B >= 64)",
        ],
        [
            [
                r["batch"],
                r["ours"],
                r["ours_answers_per_s"],
                f"{fmt(r['ratio_same_threads'])} ({r['trl_same_threads'] or '-'})",
                fmt(r["ratio_same_threads_median_step"]),
                fmt(r["ratio_vs_best_trl"]),
                f"{r['trl_best']} {r['trl_best_answers_per_s']:.1f}",
                met(r["at_least_trl_met"]),
                met(r["large_batch_met"]),
            ]
            for r in rows
        ],
    )


def plan(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(system, staleness, threads, B) in run order: the arms of one B together, ours and TRL of
    one thread count side by side; the order reverses from one B to the next."""
    out = []
    for i, b in enumerate(args.batches):
        arms = []
        for t in args.threads:
            arms += [("ours", 0, t, b)] if 0 in args.staleness else []
            arms += [("trl", 0, t, b)]
        arms += [("ours", k, args.async_threads, b) for k in args.staleness if k > 0]
        out += arms if i % 2 == 0 else arms[::-1]
    return out


def arm_name(system: str, staleness: int, threads: int) -> str:
    return f"trl-t{threads}" if system == "trl" else f"ours-k{staleness}-t{threads}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256], help="answers per step")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[60, 24, 8],
        help="measured updates per arm, one per --batches",
    )
    parser.add_argument("--warmup", type=int, default=1, help="updates per arm not measured (>= 1)")
    parser.add_argument("--group-size", type=int, default=4, help="answers per prompt (both sides)")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1], help="our rl.max_staleness arms")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="torch threads per process: TRL and ours at staleness 0",
    )
    parser.add_argument(
        "--async-threads",
        type=int,
        default=1,
        help="torch threads of our rollout and learner at staleness > 0",
    )
    parser.add_argument(
        "--pin",
        type=int,
        nargs=2,
        metavar=("ROLLOUT_CORE", "LEARNER_CORE"),
        help="our arms at staleness > 0: the rollout actor on one core, the learner on another "
        "(rollout.cpu_cores / learner.cpu_cores), as stages on nodes of their own",
    )
    parser.add_argument(
        "--eval-examples", type=int, default=16, help="our before/after evaluation (not timed)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: B=8, 1 + 2 updates, 1 thread, staleness 0 and 1"
    )
    parser.add_argument("--name", help="bench/results/<name>.json, runs/bench_<name>/ (throughput[_quick])")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for our arms")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.steps, args.threads, args.eval_examples = [8], [2], [1], 8
    if len(args.steps) == 1:
        args.steps = args.steps * len(args.batches)
    if len(args.steps) != len(args.batches):
        parser.error(f"--steps {args.steps}: give one count for all --batches or one per B ({args.batches})")
    if args.warmup < 1 or min(args.steps) < 1 or min(args.threads) < 1 or args.async_threads < 1:
        parser.error("--warmup, every --steps, every --threads and --async-threads must be >= 1")
    bad = [b for b in args.batches if b % args.group_size]
    if bad:
        parser.error(
            f"--batches {bad}: answers per step must be a multiple of --group-size {args.group_size}"
        )
    args.name = args.name or ("throughput_quick" if args.quick else "throughput")
    return args


def main() -> None:
    args = parse_args()
    require_trl()
    base = with_absolute_paths(load_config(args.config, args.overrides))
    setup_logging(base.log_level)
    ensure_data(base)
    ensure_model(base)
    data_dir = Path(f"runs/bench_{args.name}/data").absolute()
    args.text_train = text_only_split(base.data.train, data_dir / "train.jsonl")
    args.text_test = text_only_split(base.data.test, data_dir / "test.jsonl")
    steps = dict(zip(args.batches, args.steps, strict=True))
    inputs = VideoInputs(read_policy_spec(base.model.path), base.model)
    questions = [e.question for e in load_jsonl(args.text_train)]
    args.prompt_tokens_mean = statistics.mean(len(inputs.prompt_ids(q, video=False)) for q in questions)
    order = plan(args)
    print(
        f"{len(order)} arms, G={args.group_size}, answers per step {args.batches}, "
        f"{args.warmup} warm-up + {args.steps} measured updates, threads {args.threads} "
        f"(ours at staleness > 0: {args.async_threads} per actor), max_new_tokens {base.rollout.max_new_tokens}",
        flush=True,
    )
    result: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "quick": args.quick,
        "task": "synthetic questions without videos (text-only), exact-match reference",
        "model": str(Path(base.model.path) / "lm"),
        "group_size": args.group_size,
        "batches": args.batches,
        "warmup_steps": args.warmup,
        "measured_steps": steps,
        "staleness": args.staleness,
        "threads": args.threads,
        "async_threads": args.async_threads,
        "pin": {"rollout_core": args.pin[0], "learner_core": args.pin[1]} if args.pin else None,
        "max_new_tokens": base.rollout.max_new_tokens,
        "targets": TARGETS,
        "order": [f"{arm_name(s, k, t)}@{b}" for s, k, t, b in order],
        "arms": [],
        "complete": False,
    }
    started = time.time()
    init_ray(base)
    try:
        for system, k, t, b in order:
            name = arm_name(system, k, t)
            print(f"== {name} B={b}: {args.warmup} + {steps[b]} updates", flush=True)
            n = args.warmup + steps[b]
            arm = run_trl(args, b, n, t, base) if system == "trl" else run_ours(args, b, n, k, t)
            result["arms"].append(
                {"arm": name, "system": system, "batch": b, "staleness": k, "threads": t, **arm}
            )
            result["summary"] = summarise(result["arms"])
            result["total_wall_s"] = time.time() - started
            write_result(args.name, result)
            print(
                f"== {name} B={b}: {arm['answers_per_s']:.1f} answers/s "
                f"({arm['answers_per_s_median_step']:.1f} from the median step)",
                flush=True,
            )
    finally:
        ray.shutdown()
    result["complete"] = True
    result["total_wall_s"] = time.time() - started
    path = write_result(args.name, result)
    print_summary(result["summary"], result["arms"])
    print(f"total {result['total_wall_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
