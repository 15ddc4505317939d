"""GPU check: the project's torch + DeepSpeed path on one GPU with the tiny model, without Ray or vLLM.

Run it through ``bench/gpu_check.sh``, which installs the missing packages offline first::

    bash bench/gpu_check.sh [REPORT.json]                         # on a GPU machine: cuda, bf16, nccl
    GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh                  # dry run here: cpu, float32, gloo

It drives the plain classes that the Ray actors wrap, in one process, on small sizes:

1. ``env``: versions, the GPU's name, DeepSpeed's accelerator; no module imports ray or vllm.
2. ``data``/``model``: a few dozen synthetic videos and the tiny model, built into a temp folder.
3. ``policy``: ``VideoLMPolicy`` moved to the device; the devices and dtypes of its parts; a
   training forward/backward (the SFT path), the learner's shared prefix against every answer's
   full sequence (log-probs and gradients, the dtype's tolerance) and sampling (the rollout
   path) on the device.
4. ``sft``: ``run_sft`` through DeepSpeed (world size 1, ``model.dtype``); the loss falls.
5. ``rl``: ``RolloutWorker`` (transformers engine) samples groups, ``RankerWorker`` ranks them
   with the ground-truth backend, ``LearnerWorker.setup()`` + ``train_step`` a few times; the
   version advances, the importance ratio starts at 1, the step favours each group's best answer,
   the exported weights change, load into the rollout worker and reload from a saved checkpoint.

Every check prints PASS, FAIL or SKIP (CUDA-only checks on the CPU); a crash is a FAIL naming
the exception and the innermost ``rlaif_ray/`` frame (file:line). The JSON report is rewritten
after every check, so that a killed run leaves what it found. Exit status: 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [
    "torch",
    "torchvision",
    "transformers",
    "peft",
    "deepspeed",
    "open_clip_torch",
    "timm",
    "decord",
    "av",
    "openai",
    "numpy",
]
# What the check imports from the project (none of them may need ray or vllm).
MODULES = [
    "rlaif_ray.config",
    "rlaif_ray.data.synthetic",
    "rlaif_ray.data.frames",
    "rlaif_ray.models.tiny",
    "rlaif_ray.models.policy",
    "rlaif_ray.sft",
    "rlaif_ray.learner.engine",
    "rlaif_ray.learner.worker",
    "rlaif_ray.rollout.engine",
    "rlaif_ray.rollout.worker",
    "rlaif_ray.ranker.worker",
]


class Stage:
    """The outcome of one ``with checker.stage(...)`` block."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ok = True


class Checker:
    """Collects checks, timings and facts; rewrites the JSON report after every change."""

    def __init__(self, report_path: Path | None, device: str, meta: dict[str, Any]) -> None:
        self.report_path = report_path
        self.on_cuda = device == "cuda"
        self.data: dict[str, Any] = {**meta, "checks": [], "timings_s": {}, "info": {}}
        self.current = "start"
        self.lock = threading.Lock()

    def check(self, name: str, ok: bool, detail: Any = "", cuda_only: bool = False) -> bool:
        status = "PASS" if ok else "FAIL"
        if cuda_only and not self.on_cuda:
            status, detail = "SKIP", f"not on CUDA ({detail})" if detail else "not on CUDA"
        self._add(name, status, detail)
        return ok

    def skip(self, name: str, why: str) -> None:
        self._add(name, "SKIP", why)

    def info(self, key: str, value: Any) -> None:
        with self.lock:
            self.data["info"][key] = value
        print(f"      {key}: {value}", flush=True)
        self.save()

    def _add(self, name: str, status: str, detail: Any) -> None:
        text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
        with self.lock:
            self.data["checks"].append({"name": name, "status": status, "detail": text})
        print(f"{status:4}  {name}" + (f"  [{text}]" if text else ""), flush=True)
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        """Time a stage; an exception in it becomes a FAIL ``<name>.crashed`` and ends the stage."""
        self.current = name
        result = Stage(name)
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield result
        except Exception as exc:  # the check goes on with the next stage
            result.ok = False
            traceback.print_exc()
            self._add(f"{name}.crashed", "FAIL", where(exc))
        finally:
            with self.lock:
                self.data["timings_s"][name] = round(time.perf_counter() - start, 2)
            self.save()

    def failed(self) -> list[str]:
        return [c["name"] for c in self.data["checks"] if c["status"] == "FAIL"]

    def save(self) -> None:
        if self.report_path is None:
            return
        with self.lock:
            text = json.dumps(self.data, indent=2, default=str)
        tmp = self.report_path.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(self.report_path)


def where(exc: BaseException) -> str:
    """``Type: message`` plus the innermost rlaif_ray frame and the innermost frame overall."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "rlaif_ray" in Path(f.filename).parts]
    message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    parts = [message[:600]]
    if ours:
        f = ours[-1]
        parts.append(f"at {_short(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()[:160]}")
    if frames and (not ours or frames[-1] is not ours[-1]):
        f = frames[-1]
        parts.append(f"innermost {_short(f.filename)}:{f.lineno} in {f.name}")
    return " | ".join(parts)


def _short(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        parts = path.parts
        for anchor in ("site-packages", "dist-packages"):
            if anchor in parts:
                return "/".join(parts[parts.index(anchor) + 1 :])
        return filename


# --------------------------------------------------------------------------- tensor helpers
def off_device(named: list[tuple[str, Any]], device: str) -> list[str]:
    return [name for name, t in named if t.device.type != device]


def dtype_counts(tensors: Any) -> dict[str, int]:
    return dict(Counter(str(t.dtype).replace("torch.", "") for t in tensors))


def module_tensors(module: Any) -> list[tuple[str, Any]]:
    return [*module.named_parameters(), *module.named_buffers()]


def describe_policy(c: Checker, prefix: str, policy: Any, device: str, want_dtype: Any) -> None:
    """Devices and dtypes of a policy's parts: everything on ``device``, the base LM in ``want_dtype``."""
    tensors = module_tensors(policy)
    wrong = off_device(tensors, device)
    c.check(
        f"{prefix}.on_{device}",
        not wrong,
        f"{len(wrong)}/{len(tensors)} tensors elsewhere, e.g. {wrong[:3]}"
        if wrong
        else f"{len(tensors)} tensors",
    )
    lm = list(policy.lm.named_parameters())
    base = [p for n, p in lm if "lora_" not in n]
    lora = [p for n, p in lm if "lora_" in n]
    c.check(f"{prefix}.lm_dtype", all(p.dtype == want_dtype for p in base), dtype_counts(base))
    c.info(
        f"{prefix}.dtypes",
        {
            "lm_base": dtype_counts(base),
            "lora": dtype_counts(lora),
            "projector": dtype_counts(policy.projector.parameters()),
            "vision": dtype_counts(policy.vision.parameters()),
            "trainable": dtype_counts(p for p in policy.parameters() if p.requires_grad),
        },
    )


def check_samples(c: Checker, name: str, token_ids: list, logprobs: list, vocab: int, rows: int) -> None:
    """Sampled answers as plain Python: int ids in the vocabulary, finite float log-probs <= 0."""
    problems = []
    if len(token_ids) != rows or len(logprobs) != rows:
        problems.append(f"{len(token_ids)} rows, expected {rows}")
    for ids, lps in zip(token_ids, logprobs, strict=False):
        if len(ids) != len(lps) or not ids:
            problems.append(f"{len(ids)} ids vs {len(lps)} log-probs")
        if not all(type(i) is int and 0 <= i < vocab for i in ids):
            problems.append(f"ids not plain ints in [0, {vocab}): {[type(i).__name__ for i in ids][:3]}")
        if not all(type(v) is float and math.isfinite(v) and v <= 1e-4 for v in lps):
            problems.append(f"log-probs not finite floats <= 0: {lps[:3]}")
    c.check(name, not problems, problems[:3] or f"{rows} answers")


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --------------------------------------------------------------------------- the stages
def stage_env(c: Checker, args: argparse.Namespace) -> None:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    c.data["versions"] = {"python": platform.python_version(), **versions, "cuda": torch.version.cuda}
    print(f"      versions: {c.data['versions']}", flush=True)
    if args.device == "cuda":
        available = torch.cuda.is_available()
        c.check("env.cuda_available", available, f"torch {torch.__version__}, CUDA {torch.version.cuda}")
        if available:
            c.data["gpu"] = torch.cuda.get_device_name(0)
            c.info("gpu", c.data["gpu"])
            c.check("env.bf16_supported", torch.cuda.is_bf16_supported(), cuda_only=True)
    else:
        c.data["gpu"] = None
    missing = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing.append(f"{module}: {where(exc)}")
    c.check("env.imports", not missing, missing or f"{len(MODULES)} modules")
    loaded = [m for m in ("ray", "vllm") if m in sys.modules]
    c.check("env.no_ray_or_vllm_imported", not loaded, loaded or "neither ray nor vllm was imported")
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()._name
    c.check(
        "env.deepspeed_accelerator",
        accel == args.device,
        f"{accel} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')})",
    )


def make_config(args: argparse.Namespace, work: Path, data_dir: Path, model_dir: Path) -> Any:
    from rlaif_ray.config import load_config

    threads = 0 if args.device == "cuda" else 2
    return load_config(
        ROOT / "configs" / "default.yaml",
        [
            f"data.train={data_dir / 'train.jsonl'}",
            f"data.val={data_dir / 'val.jsonl'}",
            f"data.test={data_dir / 'test.jsonl'}",
            "data.synthetic_dir=null",
            f"model.path={model_dir}",
            "model.build_tiny_if_missing=false",
            f"model.dtype={args.dtype}",
            f"sft.output_dir={work / 'sft'}",
            f"sft.steps={args.sft_steps}",
            "sft.batch_size=16",
            "sft.lr=1.0e-3",
            "sft.warmup_steps=5",
            f"sft.eval_every={args.sft_steps}",
            "sft.log_every=5",
            f"sft.zero_stage={args.zero_stage}",
            "rollout.engine=hf",
            f"rollout.num_threads={threads}",
            f"learner.num_threads={threads}",
            f"learner.backend={'nccl' if args.device == 'cuda' else 'gloo'}",
            f"learner.zero_stage={args.zero_stage}",
            "learner.lr=2.0e-3",
            f"learner.micro_batch_size={args.prompts * args.group_size}",
            f"rl.prompts_per_step={args.prompts}",
            f"rl.group_size={args.group_size}",
            f"run_dir={work / 'run'}",
        ],
    )


def stage_policy(c: Checker, cfg: Any, args: argparse.Namespace, examples: list) -> None:
    """The policy alone on the device: parts, SFT-path forward/backward, rollout-path sampling."""
    import torch

    from rlaif_ray.data.frames import FrameStore
    from rlaif_ray.models.policy import VideoLMPolicy
    from rlaif_ray.sft import sft_loss

    want = getattr(torch, args.dtype)
    with c.stage("policy.load") as st:
        policy = VideoLMPolicy.from_folder(cfg.model.path, cfg.model, seed=cfg.seed)
        c.info("policy.devices_after_load", sorted({t.device.type for _, t in module_tensors(policy)}))
        policy.to(args.device)
        describe_policy(c, "policy", policy, args.device, want)
        store = FrameStore(cfg.model.num_frames, policy.image_size)
        batch = examples[:4]
        frames = [store.get(ex.video) for ex in batch]
    if not st.ok:
        c.skip("policy.forward", "policy.load failed")
        c.skip("policy.sample", "policy.load failed")
        return
    with c.stage("policy.forward"):
        pixels = torch.stack([policy.preprocess(f) for f in frames])
        c.info("policy.preprocess_output", f"{pixels.device.type} {pixels.dtype} {tuple(pixels.shape)}")
        prompts = [policy.prompt_ids(ex.question) for ex in batch]
        answers = [policy.answer_ids(ex.answer) for ex in batch]
        with torch.no_grad():
            visual = policy.encode_video(pixels)
        emb_dtype = policy.lm.get_input_embeddings().weight.dtype
        c.check(
            "policy.visual_tokens",
            visual.device.type == args.device and visual.dtype == emb_dtype,
            f"{visual.device.type} {visual.dtype} {tuple(visual.shape)}; LM embeddings {emb_dtype}",
        )
        policy.train()
        policy.zero_grad(set_to_none=True)
        logprobs, mask, _ = policy.answer_logprobs(pixels, prompts, answers)
        c.check(
            "policy.logprobs",
            logprobs.device.type == args.device
            and logprobs.dtype == torch.float32
            and bool(torch.isfinite(logprobs).all())
            and bool((logprobs <= 1e-4).all()),
            f"{logprobs.device.type} {logprobs.dtype} {tuple(logprobs.shape)}; mask {mask.device.type} {mask.dtype}",
        )
        loss = sft_loss(logprobs, mask)
        loss.backward()
        trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        no_grad = [n for n, p in trainable if p.grad is None]
        bad = [n for n, p in trainable if p.grad is not None and (p.grad.device.type != args.device)]
        frozen_grads = [n for n, p in policy.vision.named_parameters() if p.grad is not None]
        c.check(
            "policy.backward",
            math.isfinite(loss.item()) and not no_grad and not bad and not frozen_grads,
            {
                "loss": round(loss.item(), 4),
                "trainable": len(trainable),
                "without_grad": no_grad[:3],
                "grad_off_device": bad[:3],
                "frozen_with_grad": frozen_grads[:3],
            },
        )
        policy.zero_grad(set_to_none=True)
    with c.stage("policy.shared_prefix"):
        # The learner's shared prefix on the device: two groups (sizes 3 and 2, answers of
        # different lengths) give the full-sequence log-probs and gradients within the dtype's
        # tolerance (tests/test_shared_prefix.py checks 1e-5 in float32 on the CPU).
        sizes = [3, 2]
        base = [policy.answer_ids(ex.answer) for ex in batch]
        answers = [base[0], base[0][:1], base[1], base[2], base[3][:2]]

        def logprobs_and_grads(pol: Any, shared: bool) -> tuple[Any, dict[str, Any]]:
            kwargs: dict[str, Any] = (
                {"prompts": prompts[:2], "pixels": pixels[:2], "group_sizes": sizes}
                if shared
                else {
                    "prompts": [p for p, n in zip(prompts[:2], sizes, strict=True) for _ in range(n)],
                    "pixels": pixels[:2].repeat_interleave(torch.tensor(sizes, device=pixels.device), dim=0),
                }
            )
            pol.zero_grad(set_to_none=True)
            lp, mask, _ = pol.answer_logprobs(answers=answers, **kwargs)
            sft_loss(lp, mask).backward()
            grads = {n: p.grad.float().clone() for n, p in pol.named_parameters() if p.grad is not None}
            return lp.detach().float(), grads

        full, shared = logprobs_and_grads(policy, False), logprobs_and_grads(policy, True)
        lp_diff = (full[0] - shared[0]).abs().max().item()
        grad_rel = max(
            ((full[1][n] - shared[1][n]).norm() / full[1][n].norm().clamp_min(1e-12)).item() for n in full[1]
        )
        tol = 1e-4 if want == torch.float32 else 5e-2
        c.check(
            "policy.shared_prefix",
            full[1].keys() == shared[1].keys() and lp_diff <= tol and grad_rel <= tol,
            {
                "max_logprob_diff": lp_diff,
                "max_relative_grad_diff": grad_rel,
                "tolerance": tol,
                "tensors": len(full[1]),
            },
        )
        policy.zero_grad(set_to_none=True)
    with c.stage("policy.sample"):
        policy.eval()
        samples = policy.sample_frames(
            frames[:2], [ex.question for ex in batch[:2]], 3, 1.0, 1.0, cfg.rollout.max_new_tokens
        )
        check_samples(c, "policy.samples", samples.token_ids, samples.logprobs, len(policy.tokenizer), 6)
    del policy
    if args.device == "cuda":
        torch.cuda.empty_cache()


def stage_sft(c: Checker, cfg: Any, args: argparse.Namespace) -> bool:
    import torch

    from rlaif_ray.sft import run_sft

    with c.stage("sft") as st:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        state = run_sft(cfg)
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        c.check("sft.backend", backend == cfg.learner.backend, f"{backend}")
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            c.check("sft.used_gpu", peak > 1, f"peak {peak:.0f} MiB allocated", cuda_only=True)
        out = Path(cfg.sft.output_dir)
        records = [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records]
        c.info("sft.losses", [round(x, 3) for x in losses])
        c.check(
            "sft.finished",
            bool(state.get("finished")) and len(losses) == cfg.sft.steps,
            f"{len(losses)} steps",
        )
        c.check("sft.loss_finite", all(math.isfinite(x) for x in losses))
        head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        c.check("sft.loss_falls", tail < 0.8 * head, f"first 3 steps {head:.3f} -> last 3 {tail:.3f}")
        val = records[-1].get("val", {})
        c.info("sft.val_accuracy", val.get("accuracy"))
        saved = [
            (out / "adapter" / "adapter_config.json").is_file(),
            (out / "projector.safetensors").is_file(),
        ]
        c.check("sft.checkpoint_saved", all(saved), str(out))
    return st.ok


def seq_logprobs(learner: Any, groups: list) -> Any:
    """Summed token log-probs [groups, G] of every sampled answer under the learner's policy."""
    import torch

    # Each group brings its video's frozen-encoder output from the rollout (Group.visual_features).
    rows = [(g.visual_features, g.question, ids) for g in groups for ids in g.completion_ids]
    with torch.no_grad():
        device = learner.policy.device
        features = torch.stack([f for f, _, _ in rows]).to(device)
        prompts = [learner.policy.prompt_ids(question) for _, question, _ in rows]
        logprobs, mask, _ = learner.policy.answer_logprobs(
            None, prompts, [ids for *_, ids in rows], features=features
        )
    return (logprobs.float() * mask).sum(-1).view(len(groups), -1).cpu()


def best_over_worst(groups: list, before: Any, after: Any) -> tuple[float, int]:
    """Mean change, over groups whose answers are not all tied, of the best-minus-worst margin."""

    def margin(t: Any, i: int, best: list[int], worst: list[int]) -> float:
        return float(t[i, best].mean() - t[i, worst].mean())

    gains = []
    for i, g in enumerate(groups):
        lo, hi = min(g.ranks), max(g.ranks)
        if lo == hi:
            continue
        best = [j for j, r in enumerate(g.ranks) if r == lo]
        worst = [j for j, r in enumerate(g.ranks) if r == hi]
        gains.append(margin(after, i, best, worst) - margin(before, i, best, worst))
    return (sum(gains) / len(gains) if gains else 0.0), len(gains)


def stage_rl(c: Checker, cfg: Any, args: argparse.Namespace, start_dir: str) -> None:
    import torch

    from rlaif_ray.data.dataset import load_jsonl
    from rlaif_ray.learner.worker import LearnerWorker
    from rlaif_ray.models.policy import VideoLMPolicy
    from rlaif_ray.ranker.worker import RankerWorker
    from rlaif_ray.rollout.worker import RolloutWorker

    want = getattr(torch, args.dtype)
    dev = args.device
    with c.stage("rl.setup") as st:
        rollout = RolloutWorker(cfg, start_dir)
        rpolicy = rollout.engine.policy
        where_now = sorted({t.device.type for _, t in module_tensors(rpolicy)})
        if (
            c.check(
                "rollout.policy_on_device",
                where_now == [dev],
                f"the transformers engine put the policy on {where_now}"
                + ("" if where_now == [dev] else f"; the check moves it to {dev} to go on"),
            )
            is False
        ):
            rpolicy.to(dev)
        describe_policy(c, "rollout", rpolicy, dev, want)
        ranker = RankerWorker(cfg.ranker, cfg.rl.group_size)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        learner = LearnerWorker(cfg, start_dir)
        learner.setup()
        backend = torch.distributed.get_backend()
        c.check("learner.backend", backend == cfg.learner.backend, backend)
        describe_policy(c, "learner", learner.policy, dev, want)
        c.info("learner.reference_adapter", learner.policy.has_reference_adapter)
        # copied: kept across the first update
        w0 = {k: v.clone() for k, v in learner.export_weights().tensors().items()}
        bad = [k for k, v in w0.items() if v.device.type != "cpu" or not v.is_floating_point()]
        c.check("learner.export", not bad and bool(w0), bad[:3] or f"{len(w0)} tensors on cpu")
        dtypes = {v.dtype for v in w0.values()}
        c.check(
            "learner.export_dtype",
            dtypes <= {torch.float32, want},
            f"{dtype_counts(w0.values())} (float32 or model.dtype {args.dtype})",
        )
        c.check("learner.export_finite", all(bool(torch.isfinite(v).all()) for v in w0.values()))
    if not st.ok:
        c.skip("rl.steps", "rl.setup failed")
        return

    examples = [ex for ex in load_jsonl(cfg.data.train) if ex.answer]
    p, g = cfg.rl.prompts_per_step, cfg.rl.group_size
    vocab = len(rpolicy.tokenizer)
    w_prev = w0
    for step in range(1, args.rl_steps + 1):
        with c.stage(f"rl.step{step}") as st:
            batch = [examples[(i + (step - 1) * p) % len(examples)] for i in range(p)]
            t0 = time.perf_counter()
            groups = rollout.rollout(batch, step)
            c.info(f"rl.step{step}.rollout_s", round(time.perf_counter() - t0, 2))
            check_samples(
                c,
                f"rl.step{step}.samples",
                [ids for gr in groups for ids in gr.completion_ids],
                [lp for gr in groups for lp in gr.logprobs],
                vocab,
                p * g,
            )
            versions = {gr.weight_version for gr in groups}
            c.check(f"rl.step{step}.sampled_version", versions == {step - 1}, sorted(versions))
            ranker.rank_groups(groups)
            statuses = Counter(gr.rank_status for gr in groups)
            c.check(f"rl.step{step}.ranked", statuses.get("ok", 0) == len(groups), dict(statuses))
            measure = step == 1 and cfg.learner.zero_stage < 3
            before = seq_logprobs(learner, groups) if measure else None
            stats = learner.train_step(groups)
            c.info(f"rl.step{step}.stats", {k: round(v, 5) for k, v in stats.items()})
            c.check(
                f"rl.step{step}.trained",
                stats.get("skipped_step") == 0.0
                and stats.get("version") == float(step)
                and stats["rows"] > 0,
                {k: stats.get(k) for k in ("rows", "groups_skipped_tied", "version", "skipped_step")},
            )
            finite = [
                k for k in ("loss", "grad_norm", "ratio_mean", "kl") if not math.isfinite(stats.get(k, 0.0))
            ]
            c.check(f"rl.step{step}.stats_finite", not finite and stats.get("grad_norm", 0) > 0, finite)
            # Rollout and learner score the same answers under the same weights: ratio ~ 1.
            ratio = stats.get("ratio_mean", float("nan"))
            c.check(f"rl.step{step}.on_policy_ratio", abs(ratio - 1) < 0.05, f"ratio_mean {ratio:.4f}")
            if measure:
                gain, n = best_over_worst(groups, before, seq_logprobs(learner, groups))
                c.check(
                    "rl.step1.favours_best_answers",
                    n > 0 and gain > 0,
                    f"mean margin gain {gain:.4f} over {n} groups",
                )
            w = learner.policy.trainable_state_dict()  # kept across the next update
            c.check(
                f"rl.step{step}.weights_changed",
                max_abs_diff(w, w_prev) > 0,
                f"max |dw| {max_abs_diff(w, w_prev):.2e}",
            )
            served = rollout.update_weights(learner.version, learner.export_weights())
            c.check(f"rl.step{step}.rollout_serves_new_version", served == learner.version == step, served)
            mine = rollout.engine.policy.trainable_state_dict()
            diff = max(float((mine[k].float() - w[k].float()).abs().max()) for k in w)
            c.check(f"rl.step{step}.rollout_weights_match", diff == 0.0, f"max |diff| {diff:.2e}")
            w_prev = w
        if not st.ok:
            break
    if dev == "cuda":
        c.info("rl.peak_gpu_mib", round(torch.cuda.max_memory_allocated() / 2**20))

    if w_prev is w0:
        c.skip("rl.final", "no learner step finished")
        return
    with c.stage("rl.final"):
        changed = [k for k in w0 if not torch.equal(w0[k], w_prev[k])]
        c.check(
            "learner.weights_changed",
            any(k.startswith("projector.") for k in changed) and any(".lora_" in k for k in changed),
            f"{len(changed)}/{len(w0)} tensors changed",
        )
        folder = learner.save(str(Path(cfg.run_dir) / "checkpoint"))
        reloaded = VideoLMPolicy.from_folder(folder, cfg.model, seed=cfg.seed).trainable_state_dict()
        diff = max(float((reloaded[k].float() - w_prev[k].float()).abs().max()) for k in w_prev)
        tol = 0.0 if w_prev[next(iter(w_prev))].dtype == reloaded[next(iter(reloaded))].dtype else 1e-2
        c.check("learner.save_reload", set(reloaded) == set(w_prev) and diff <= tol, f"max |diff| {diff:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None)
    parser.add_argument("--report", type=Path, default=None, help="JSON report path")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--sft-steps", type=int, default=25)
    parser.add_argument("--rl-steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the check gives up")
    parser.add_argument("--install", default="not run", help="what the install step said (from gpu_check.sh)")
    parser.add_argument("--install-s", type=float, default=None)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.timeout = args.timeout or (270.0 if args.device == "cuda" else 1200.0)

    start = time.perf_counter()
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
    c = Checker(
        args.report,
        args.device,
        {
            "check": "bench/gpu_check.py",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(),
            "device": args.device,
            "dtype": args.dtype,
            "zero_stage": args.zero_stage,
            "sizes": {
                "videos": args.videos,
                "sft_steps": args.sft_steps,
                "rl_steps": args.rl_steps,
                "prompts": args.prompts,
                "group_size": args.group_size,
            },
            "install": args.install,
        },
    )
    if args.install_s is not None:
        c.data["timings_s"]["install"] = args.install_s
    c.check("install", args.install in ("ok", "not run", "skipped"), args.install)

    def give_up() -> None:
        c._add("timeout", "FAIL", f"still in stage {c.current} after {args.timeout:.0f} s; stacks on stderr")
        faulthandler.dump_traceback(all_threads=True)
        os._exit(124)

    watchdog = threading.Timer(args.timeout, give_up)
    watchdog.daemon = True
    watchdog.start()

    with c.stage("env") as env:
        stage_env(c, args)
    if env.ok and not any(n.startswith("env.imports") or n == "env.cuda_available" for n in c.failed()):
        work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
        work.mkdir(parents=True, exist_ok=True)
        c.info("work_dir", str(work))
        with c.stage("data") as data:
            from rlaif_ray.data.dataset import load_jsonl
            from rlaif_ray.data.frames import FrameStore
            from rlaif_ray.data.synthetic import generate

            paths = generate(work / "data", args.videos, seed=0)
            train = load_jsonl(paths["train"])
            frames = FrameStore(8, 64).get(train[0].video)
            c.check("data.videos_decode", frames.shape == (8, 64, 64, 3), f"{len(train)} train questions")
        with c.stage("model") as model:
            from rlaif_ray.models.tiny import build_tiny

            model_dir = build_tiny(work / "tiny", seed=0)
        if data.ok and model.ok:
            cfg = make_config(args, work, work / "data", model_dir)
            stage_policy(c, cfg, args, train)
            sft_ok = stage_sft(c, cfg, args)
            start_dir = cfg.sft.output_dir if sft_ok else str(model_dir)
            if not sft_ok:
                c.info("rl.start", "SFT failed: RL starts from the untrained tiny model")
            stage_rl(c, cfg, args, start_dir)
    watchdog.cancel()

    c.data["timings_s"]["total"] = round(time.perf_counter() - start, 2)
    failed = c.failed()
    c.data["result"] = "FAIL" if failed else "PASS"
    c.save()
    counts = Counter(ch["status"] for ch in c.data["checks"])
    print("\n==== GPU check report")
    print(
        f"device: {args.device} ({c.data.get('gpu') or 'no GPU'}), dtype {args.dtype}, ZeRO-{args.zero_stage}"
    )
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in c.data["timings_s"].items()))
    for ch in c.data["checks"]:
        if ch["status"] != "PASS":
            print(f"  {ch['status']:4} {ch['name']}: {ch['detail']}")
    print(f"{counts.get('PASS', 0)} passed, {counts.get('FAIL', 0)} failed, {counts.get('SKIP', 0)} skipped")
    print(f"RESULT: {c.data['result']}" + (f" (report: {args.report})" if args.report else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
