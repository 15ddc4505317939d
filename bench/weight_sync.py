"""Weight sync: time per version to publish the trainable tensors and have 2 rollout actors serve them.

    python bench/weight_sync.py [key=value ...] [--cases tiny_hf tiny_vllm lora7b_hf lora7b_hf_separate]
        [--reps 10] [--lora-layers 32] [--lora-dtype bfloat16] [--quick] [--name NAME]

(config overrides first: the list options would take them as their values)

Every case runs on a local Ray cluster started here: one learner actor and ``--rollouts`` (2)
rollout actors, real Ray actors. Each version is published along the path of
``rlaif_ray.launch.Trainer.sync_weights``: the learner's ``export_weights`` returns its trainable
tensors as a ``WeightsMessage`` (numpy views of the parameters' storages, no copy), which Ray
writes once into the object store; every rollout actor's ``update_weights`` is handed that
reference and reads the arrays as views of the store's shared memory (read-only), which the
transformers engine on the CPU keeps as its parameters (``load_trainable_state_dict(share=True)``:
no copy; vLLM writes an adapter); ``sync_s`` is the time until every rollout actor has returned,
``export_s`` the part until the export was in the object store. The cases:

* ``tiny_hf``: the built-in tiny default policy (``configs/default.yaml``, SFT warm start): the
  real ``LearnerWorker`` (DeepSpeed) and ``RolloutWorker`` with the transformers engine, whose
  ``load_weights`` is ``VideoLMPolicy.load_trainable_state_dict`` (the store's views become the
  parameters).
* ``tiny_vllm``: the same with ``rollout.engine=vllm`` (vLLM's CPU build, eager mode): each
  version is written to disk as a peft adapter, loaded by vLLM as a new ``LoRARequest``, and the
  projector is copied in.
* ``lora7b_hf``: a LoRA of the paper's size, with no 7B model: r = 64 on q, k, v, o, gate, up and
  down of a 32-layer LM of hidden size 4096 and MLP size 11008 (Vicuna-7B), 159.9M parameters in
  the learner's export dtype (``--lora-dtype``: bfloat16, what the learner exports under
  ``model.dtype=bfloat16`` as in ``configs/paper_7b.yaml``: DeepSpeed casts the module). The
  stand-ins subclass the real classes and replace only their constructors: the learner holds a
  module whose parameters carry peft's names and shapes (``lm.base_model.model.model.layers.<i>
  .self_attn.q_proj.lora_A.default.weight``: [64, 4096], ...) and exports it with
  ``LearnerWorker.export_weights``; each rollout actor's engine is an ``HFEngine`` holding the
  same module, so ``RolloutWorker.update_weights`` -> ``HFEngine.load_weights`` ->
  ``VideoLMPolicy.load_trainable_state_dict`` runs unchanged. Its "sampling" is a forward of a
  fixed input through every LoRA pair (``x @ A.T @ B.T``), checked against the learner's. The
  learner's parameters are views of one flat buffer, as DeepSpeed ZeRO-1/2 keeps a parameter
  group (``tests/test_learner.py`` asserts that the real learner's export is one buffer), so the
  export travels as one array.
* ``lora7b_hf_separate``: the same with the learner's parameters as 448 separate tensors (a
  learner without a flat buffer): 448 arrays through the object store.

Before each version the learner's trainable tensors change (untimed), so that every version
differs. After each sync (untimed) every rollout actor samples once (1 prompt, a group; the
stand-in: its forward), the served version and, for the transformers engine, the served tensors
are checked against the learner's, and the same sample is timed again (``first_sample_s`` vs
``steady_sample_s``: what the first sample after a swap pays, e.g. vLLM activating the adapter).
Also per case the reference, ``copy_s``: one in-process ``copy_`` of the same tensors into preallocated tensors of the same
shapes in this process, on one torch thread (the limit on one machine, at one core), timed right
before each version's sync, so that both see the same load on a shared machine
(``sync_over_copy``: the ratio of the medians; ``sync_over_copy_per_version``: of each
version's pair). Median, min and max over ``--reps``
versions (after one untimed warm-up version), and the machine's 1-minute load average meanwhile.
Prints a table and writes ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from rlaif_ray.config import Config, load_config, with_absolute_paths  # noqa: E402
from rlaif_ray.data.dataset import load_jsonl  # noqa: E402
from rlaif_ray.data.synthetic import ensure_data  # noqa: E402
from rlaif_ray.launch import start_learners, start_rollouts, warm_start  # noqa: E402
from rlaif_ray.learner.worker import LearnerWorker  # noqa: E402
from rlaif_ray.models.policy import POLICY_ADAPTER, VideoLMPolicy  # noqa: E402
from rlaif_ray.models.tiny import ensure_model  # noqa: E402
from rlaif_ray.rollout.engine import HFEngine  # noqa: E402
from rlaif_ray.rollout.worker import RolloutWorker  # noqa: E402
from rlaif_ray.telemetry import Telemetry  # noqa: E402

# bench/async.py's name is a keyword: import its helper by name.
clear_named_actors = importlib.import_module("bench.async").clear_named_actors

CASES = ("tiny_hf", "tiny_vllm", "lora7b_hf", "lora7b_hf_separate")
STAND_IN_CASES = ("lora7b_hf", "lora7b_hf_separate")
# Vicuna-7B (Llama): hidden size, MLP size; the paper's LoRA rank and target modules.
LLAMA_7B = {"hidden": 4096, "mlp": 11008, "rank": 64}
# One thread, as each stand-in actor runs with: on a shared machine a 2-thread copy_ stalls at
# every tensor whenever one of its threads is descheduled (0.5-1 s instead of 60 ms for 320 MB).
COPY_THREADS = 1
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def lora_shapes(layers: int, hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of every LoRA target of a Llama LM, by peft's module path."""
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(layers):
        for name in ATTENTION:
            shapes[f"base_model.model.model.layers.{i}.self_attn.{name}"] = (hidden, hidden)
        shapes[f"base_model.model.model.layers.{i}.mlp.gate_proj"] = (hidden, mlp)
        shapes[f"base_model.model.model.layers.{i}.mlp.up_proj"] = (hidden, mlp)
        shapes[f"base_model.model.model.layers.{i}.mlp.down_proj"] = (mlp, hidden)
    return shapes


class LoraPair(nn.Module):
    """The LoRA half of a peft ``LoraLayer`` (no base weight): ``lora_A.<adapter>``, ``lora_B.<adapter>``."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict({POLICY_ADAPTER: nn.Linear(in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({POLICY_ADAPTER: nn.Linear(rank, out_features, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B[POLICY_ADAPTER](self.lora_A[POLICY_ADAPTER](x))


class LoraStandIn(nn.Module):
    """The trainable part of a LoRA policy without its base model: ``lm`` holds a ``LoraPair`` at
    every peft module path, ``projector`` is empty. It loads and exports with the policy's own
    ``trainable_tensors`` / ``trainable_state_dict`` / ``load_trainable_state_dict`` (the
    functions, not copies, with the lookup they share)."""

    trainable_tensors = VideoLMPolicy.trainable_tensors
    _trainable_parameters = VideoLMPolicy._trainable_parameters
    trainable_state_dict = VideoLMPolicy.trainable_state_dict
    load_trainable_state_dict = VideoLMPolicy.load_trainable_state_dict
    shares_weights = VideoLMPolicy.shares_weights

    def __init__(self, layers: int, dtype: str, seed: int | None) -> None:
        super().__init__()
        self.lm = nn.Module()
        self.projector = nn.Module()
        self._trainable_cache = None
        for path, (n_in, n_out) in lora_shapes(layers, LLAMA_7B["hidden"], LLAMA_7B["mlp"]).items():
            parent = self.lm
            *parents, leaf = path.split(".")
            for part in parents:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, LoraPair(n_in, n_out, LLAMA_7B["rank"]))
        self.to(getattr(torch, dtype))
        generator = torch.Generator().manual_seed(seed or 0)
        with torch.no_grad():
            for param in self.parameters():  # random (B too: a zero B would make the check vacuous)
                if seed is None:
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)

    @torch.no_grad()
    def checksum(self) -> float:
        """A forward of a fixed input through every LoRA pair (what sampling would compute with them)."""
        total = 0.0
        for module in self.lm.modules():
            if isinstance(module, LoraPair):
                weight = module.lora_A[POLICY_ADAPTER].weight
                x = torch.linspace(-1.0, 1.0, weight.shape[1], dtype=weight.dtype)
                total += float(module(x).double().sum())
        return total


def bump_trainable(policy: nn.Module, version: int) -> None:
    """Change every trainable tensor (the policy's or the stand-in's), so that versions differ."""
    with torch.no_grad():
        for param in policy.parameters():
            if param.requires_grad:
                param.add_(1e-3 * (1 if version % 2 else -1))


def flatten_parameters(module: nn.Module) -> None:
    """Make ``module``'s parameters views of one flat buffer, as DeepSpeed ZeRO-1/2 does with a
    parameter group."""
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for param in params:
        param.data = flat[offset : offset + param.numel()].view_as(param)
        offset += param.numel()


class StandInLearner(LearnerWorker):
    """``LearnerWorker`` whose policy is a :class:`LoraStandIn` (its parameters in one flat
    buffer with ``flat``); ``export_weights`` is inherited."""

    def __init__(self, cfg: Config, layers: int, dtype: str, threads: int, flat: bool) -> None:
        torch.set_num_threads(threads)
        self.cfg, self.rank, self.world_size, self.version = cfg, 0, 1, 0
        self.policy = LoraStandIn(layers, dtype, seed=0)
        if flat:
            flatten_parameters(self.policy)

    def bump(self, version: int) -> None:
        """Change the trainable tensors (a new version to publish)."""
        bump_trainable(self.policy, version)

    def checksum(self) -> float:
        """The stand-in's forward with the learner's own tensors."""
        return self.policy.checksum()


class StandInEngine(HFEngine):
    """``HFEngine`` holding a :class:`LoraStandIn`: ``load_weights`` is inherited."""

    def __init__(self, layers: int, dtype: str) -> None:
        self.policy = LoraStandIn(layers, dtype, seed=None)
        self.version = 0


class StandInRollout(RolloutWorker):
    """``RolloutWorker`` around a :class:`StandInEngine`; ``update_weights`` is inherited."""

    def __init__(self, cfg: Config, rank: int, layers: int, dtype: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.cfg, self.rank = cfg, rank
        self.engine = StandInEngine(layers, dtype)
        self.telemetry = Telemetry("rollout")

    def sample_once(self) -> tuple[int, float]:
        """(version served, the stand-in's forward with the served tensors)."""
        return self.engine.version, self.engine.policy.checksum()


def served_state(worker: RolloutWorker) -> dict[str, torch.Tensor]:
    """The trainable tensors a transformers-engine rollout actor serves (run inside the actor)."""
    return worker.engine.policy.trainable_state_dict()


def bump_learner(worker: LearnerWorker, version: int) -> None:
    """Run inside a learner actor: change its policy's trainable tensors."""
    bump_trainable(worker.policy, version)


def summary(values: list[float]) -> dict[str, float | int | None]:
    """Median, min and max (and n) of a list of timings."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def copy_once(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> float:
    """Seconds of one in-process ``copy_`` of ``src`` into the preallocated tensors ``dst``, on
    COPY_THREADS torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(COPY_THREADS)
    try:
        start = time.perf_counter()
        for key, value in src.items():
            dst[key].copy_(value)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def sync_version(learners: list[Any], rollouts: list[Any], version: int) -> tuple[float, float]:
    """Publish ``version`` along ``Trainer.sync_weights``' path (every learner exports, learner 0's
    result goes once into the object store, every rollout actor's ``update_weights`` reads it from
    there) and wait until every rollout actor serves it. Returns (seconds until learner 0's export
    was in the object store, seconds until every rollout actor returned)."""
    start = time.perf_counter()
    state_ref, *others = [learner.export_weights.remote() for learner in learners]
    updates = [actor.update_weights.remote(version, state_ref) for actor in rollouts]
    ray.wait([state_ref], fetch_local=False)
    exported = time.perf_counter() - start
    served = ray.get(updates)
    ray.get(others)
    elapsed = time.perf_counter() - start
    if served != [version] * len(rollouts):
        raise RuntimeError(f"rollout actors serve versions {served} after publishing {version}")
    return exported, elapsed


def state_bytes(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Tensor count, parameters, bytes and dtypes of a state dict."""
    return {
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "bytes": sum(v.numel() * v.element_size() for v in state.values()),
        "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in state.values()}),
    }


def tiny_actors(cfg: Config, policy_dir: str) -> tuple[list[Any], list[Any], list[Any]]:
    """The real learner and rollout actors of ``cfg`` (the launch helpers) and one prompt to sample."""
    learners = start_learners(cfg, policy_dir)
    rollouts = start_rollouts(cfg, policy_dir)
    ray.get([r.version.remote() for r in rollouts])  # built
    return learners, rollouts, load_jsonl(cfg.data.train)[:1]


def sample_all(rollouts: list[Any], prompt: list[Any], version: int, stand_in: bool) -> float:
    """Every rollout actor samples once (in parallel); checks the served version; returns seconds."""
    start = time.perf_counter()
    if stand_in:
        results = ray.get([r.sample_once.remote() for r in rollouts])
        versions = [v for v, _ in results]
    else:
        groups = ray.get([r.rollout.remote(prompt, version) for r in rollouts])
        versions = [g.weight_version for gs in groups for g in gs]
        if len(versions) != len(rollouts):
            raise RuntimeError(f"expected one group per rollout actor, got {len(versions)}")
    elapsed = time.perf_counter() - start
    if set(versions) != {version}:
        raise RuntimeError(f"sampled with versions {versions}, expected {version}")
    return elapsed


def check_served(learner: Any, rollouts: list[Any], stand_in: bool, hf: bool) -> None:
    """The rollout actors serve exactly the learner's tensors (the stand-in: the same forward;
    vLLM: nothing to compare in torch, its served version is checked when it samples)."""
    if stand_in:
        expected = ray.get(learner.checksum.remote())
        got = [c for _, c in ray.get([r.sample_once.remote() for r in rollouts])]
        if not all(math.isclose(c, expected, rel_tol=1e-9, abs_tol=1e-9) for c in got):
            raise RuntimeError(f"served forward {got} != the learner's {expected}")
        return
    if not hf:
        return
    expected = ray.get(learner.export_weights.remote()).tensors()
    for state in ray.get([r.__ray_call__.remote(served_state) for r in rollouts]):
        bad = [k for k in expected if not torch.equal(expected[k], state[k])]
        if bad:
            raise RuntimeError(f"served tensors differ from the learner's: {bad[:3]}")


def run_case(case: str, cfg: Config, policy_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``args.reps`` versions of one case on the running Ray cluster."""
    stand_in = case in STAND_IN_CASES
    hf = case != "tiny_vllm"
    if stand_in:
        opts = {"num_cpus": 1}
        flat = case == "lora7b_hf"
        learners = [
            ray.remote(StandInLearner).options(**opts).remote(cfg, args.lora_layers, args.lora_dtype, 1, flat)
        ]
        rollouts = [
            ray.remote(StandInRollout).options(**opts).remote(cfg, rank, args.lora_layers, args.lora_dtype, 1)
            for rank in range(args.rollouts)
        ]
        prompt: list[Any] = []
        ray.get([r.version.remote() for r in rollouts] + [learners[0].checksum.remote()])
    else:
        clear_named_actors()
        learners, rollouts, prompt = tiny_actors(cfg, policy_dir)
    learner = learners[0]
    # A fetched export: the tensors the in-process baseline copies (same shapes, dtypes, bytes).
    export = ray.get(learner.export_weights.remote())
    state = {k: v.clone() for k, v in export.tensors().items()}
    row: dict[str, Any] = {"case": case, **state_bytes(state), "buffers": len(export.buffers)}
    del export
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    sync_s, export_s, copy_s, first_s, steady_s, load = [], [], [], [], [], []
    for version in range(1, args.reps + 2):  # version 1 is the untimed warm-up
        ray.get(
            learner.bump.remote(version) if stand_in else learner.__ray_call__.remote(bump_learner, version)
        )
        # The reference right before the sync, so that both see the same load on a shared machine.
        copied = copy_once(state, dst)
        exported, elapsed = sync_version(learners, rollouts, version)
        first = sample_all(rollouts, prompt, version, stand_in)
        steady = sample_all(rollouts, prompt, version, stand_in)
        if version == 1 or version == args.reps + 1:
            check_served(learner, rollouts, stand_in, hf)
        if version > 1:
            sync_s.append(elapsed)
            export_s.append(exported)
            copy_s.append(copied)
            load.append(os.getloadavg()[0])
            first_s.append(first)
            steady_s.append(steady)
    row.update(
        {
            "rollout_actors": len(rollouts),
            "engine": "vllm" if case == "tiny_vllm" else "hf",
            "sync_s": summary(sync_s),
            "export_s": summary(export_s),
            "copy_s": summary(copy_s),
            "sync_over_copy": statistics.median(sync_s) / statistics.median(copy_s),
            "sync_over_copy_per_version": summary([a / b for a, b in zip(sync_s, copy_s, strict=True)]),
            "load_avg_1min": summary(load),
            "first_sample_s": summary(first_s),
            "steady_sample_s": summary(steady_s),
            "sync_s_all": sync_s,
            "copy_s_all": copy_s,
        }
    )
    for actor in learners + rollouts:
        ray.kill(actor)
    del state, dst
    return row


def start_ray(cfg: Config, rollouts: int) -> None:
    """A local Ray cluster with a CPU for every actor."""
    needed = cfg.learner.num_cpus_per_actor + rollouts * cfg.rollout.num_cpus_per_actor + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)))


def fmt(stat: dict[str, Any], scale: float = 1000.0) -> str:
    """``median [min, max]`` in milliseconds."""
    if stat["median"] is None:
        return "-"
    return f"{stat['median'] * scale:.1f} [{stat['min'] * scale:.1f}, {stat['max'] * scale:.1f}]"


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The results table (times in ms: median [min, max])."""
    print_table(
        [
            "case",
            "MB",
            "buffers",
            "dtype",
            "sync ms (median [min, max])",
            "copy ms",
            "sync/copy",
            "export ms",
            "1st sample ms",
            "next sample ms",
            "load avg",
        ],
        [
            [
                r["case"],
                f"{r['bytes'] / 1e6:.1f}",
                str(r["buffers"]),
                "/".join(r["dtypes"]),
                fmt(r["sync_s"]),
                fmt(r["copy_s"]),
                f"{r['sync_over_copy']:.1f}x",
                fmt(r["export_s"]),
                fmt(r["first_sample_s"]),
                fmt(r["steady_sample_s"]),
                f"{r['load_avg_1min']['median']:.1f}",
            ]
            for r in rows
        ],
    )


def main() -> None:
    """Parse the options, run every case on one local Ray cluster, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--reps", type=int, default=10, help="timed versions per case (after one warm-up)")
    parser.add_argument("--rollouts", type=int, default=2, help="rollout actors")
    parser.add_argument("--lora-layers", type=int, default=32, help="layers of the 7B-size LoRA")
    parser.add_argument("--lora-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 versions, a 4-layer LoRA, no vLLM")
    parser.add_argument("--name", help="bench/results/<name>.json (weight_sync, or weight_sync_quick)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides of the tiny cases")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.lora_layers = 3, 4
        args.cases = [c for c in args.cases if c != "tiny_vllm"]
    if args.reps < 1 or args.rollouts < 1 or args.lora_layers < 1:
        parser.error("--reps, --rollouts and --lora-layers must be at least 1")
    args.name = args.name or ("weight_sync_quick" if args.quick else "weight_sync")
    adapter_root = Path(f"runs/bench_{args.name}/adapters").absolute()
    overrides = [
        f"rollout.num_actors={args.rollouts}",
        "rollout.vllm_enforce_eager=true",
        f"rollout.adapter_dir={adapter_root}",
        *args.overrides,
    ]
    cfg = with_absolute_paths(load_config(args.config, overrides))
    ensure_data(cfg)
    result: dict[str, Any] = {
        "config": args.config,
        "overrides": overrides,
        "quick": args.quick,
        "reps": args.reps,
        "rollout_actors": args.rollouts,
        "lora7b": {**LLAMA_7B, "layers": args.lora_layers, "dtype": args.lora_dtype},
        "copy_threads": COPY_THREADS,
        "rows": [],
        "complete": False,
    }
    started = time.time()
    policy_dir = ""
    start_ray(cfg, args.rollouts)
    try:
        if any(c not in STAND_IN_CASES for c in args.cases):
            policy_dir = warm_start(cfg, ensure_model(cfg))
            result["policy_dir"] = policy_dir
        for case in args.cases:
            t = time.time()
            print(f"== {case}", flush=True)
            vcfg = (
                load_config(args.config, [*overrides, "rollout.engine=vllm"]) if case == "tiny_vllm" else cfg
            )
            row = run_case(case, with_absolute_paths(vcfg), policy_dir, args)
            row["wall_s"] = time.time() - t
            result["rows"].append(row)
            result["total_wall_s"] = time.time() - started
            write_result(args.name, result)
            print_rows([row])
    finally:
        ray.shutdown()
    # The vLLM actors' adapter folders (one per version kept): not worth keeping.
    shutil.rmtree(adapter_root, ignore_errors=True)
    result["complete"] = True
    result["total_wall_s"] = time.time() - started
    path = write_result(args.name, result)
    print()
    print_rows(result["rows"])
    print(f"total {result['total_wall_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
