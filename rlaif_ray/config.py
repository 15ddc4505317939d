"""One typed configuration for every stage, loaded from YAML with ``key=value`` overrides.

``load_config("configs/default.yaml", ["rl.steps=5", "rollout.num_actors=2"])`` reads the file,
applies the overrides (nested keys with dots, values parsed as YAML scalars), checks every key
and type against the dataclasses below and validates the values. Any mistake raises
:class:`ConfigError` naming the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlaif_ray.registry import PLUGINS_HINT, REGISTRIES, import_plugins


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used."""


@dataclass
class DataConfig:
    """Where the video-QA data lives (JSONL files, see ``rlaif_ray.data.dataset``)."""

    train: str = "data/synthetic/train.jsonl"
    val: str = "data/synthetic/val.jsonl"
    test: str = "data/synthetic/test.jsonl"
    # When the files are missing, generate the synthetic task into this folder (None: never).
    synthetic_dir: str | None = "data/synthetic"
    synthetic_videos: int = 400
    synthetic_seed: int = 0
    # Fraction of the synthetic training videos whose lines keep their answers; the others are
    # written without one (prompts nobody labelled: SFT skips them, RL samples them and needs a
    # ranker that looks at the video, e.g. ranker.backend=video_judge).
    synthetic_label_fraction: float = 1.0
    # Fractions of the videos in val and test (each video's questions stay in one split).
    synthetic_val_frac: float = 0.1
    synthetic_test_frac: float = 0.1
    # One question of each type per video: colour, shape, direction, count (one-word answers)
    # and describe (graded: "red circle up", see rlaif_ray.data.synthetic).
    synthetic_question_types: list[str] = field(
        default_factory=lambda: ["colour", "shape", "direction", "count"]
    )
    # A bad JSONL line (bad JSON, missing or unknown key, wrong type, repeated id): "skip"
    # (default) drops it with a warning naming its file and line, and counts it; "raise" stops
    # the run at the first one, before SFT or any actor starts.
    on_bad_line: Literal["raise", "skip"] = "skip"
    # A video with more pixels per frame (height x width) is refused before decoding, skipped and
    # counted as too_large (FFmpeg decodes every frame at full size, whatever model size).
    # Default: DCI 4K, 4096 x 2160.
    max_video_pixels: int = 4096 * 2160
    # Stop the run when more than this fraction of the prompts a rollout actor was last given (its
    # share of one step: rl.prompts_per_step / rollout.num_actors) have a video that cannot be
    # used (missing, broken, too large...); 1.0 never stops, 0.0 stops at the first bad video.
    max_bad_video_fraction: float = 0.5


@dataclass
class ModelConfig:
    """The policy: frozen open_clip encoder -> projector -> causal LM with LoRA adapters."""

    # A folder written by ``python -m rlaif_ray.models.tiny`` or laid out the same way for real
    # checkpoints (see README). Built on first use when missing and ``build_tiny_if_missing``.
    path: str = "checkpoints/tiny"
    build_tiny_if_missing: bool = True
    num_frames: int = 8
    # "patch": VLM-RLAIF spatio-temporal pooling (T frame tokens + P patch tokens);
    # "motion": those plus P motion tokens (each patch's second-half minus first-half mean: where
    # and when, so the direction of motion is visible); "pooled": one pooled embedding per frame.
    visual_tokens: Literal["patch", "motion", "pooled"] = "patch"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_prompt_tokens: int = 64


@dataclass
class SFTConfig:
    """Supervised warm start of projector + LoRA on the train split."""

    enabled: bool = True
    output_dir: str = "checkpoints/sft"
    # Reuse ``output_dir`` when it already holds a finished checkpoint.
    reuse: bool = True
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    zero_stage: int = 2
    eval_every: int = 100
    log_every: int = 20
    # Continue from this finished SFT checkpoint (its adapter and projector) instead of the base
    # model: "more SFT" from a warm start, against RL from the same one (docs/BENCHMARKS.md).
    init_from: str | None = None
    # Stop once training has taken this many seconds (evaluations excluded); 0: no limit, steps rule.
    time_limit_s: float = 0.0
    # Save the evaluated state with the best val accuracy (evaluated every eval_every steps and at
    # the end) instead of the last: a converged SFT chosen on val.
    keep_best: bool = False


@dataclass
class JudgeConfig:
    """How the video judge (``ranker.judge_path``) is built when that folder holds no checkpoint:
    ``python -m rlaif_ray.prepare judge``, or a ``ranker.backend=video_judge`` run before it starts.
    The policy's base model is trained by SFT (``sft.*`` settings, best on val kept) on synthetic
    data of its own, generated from another seed than the policy's, so that the judge never saw
    the policy's val or test videos; then measured on the policy's test split
    (``judge_state.json``: greedy accuracy and top-1 ranking accuracy)."""

    build_if_missing: bool = True
    data_dir: str = "data/synthetic_judge"
    seed: int = 1  # its data's seed: must differ from data.synthetic_seed
    videos: int = 400
    sft_steps: int = 1200
    eval_every: int = 200


@dataclass
class RolloutConfig:
    """Rollout actors that sample a group of answers per prompt."""

    # A registered rollout engine (rlaif_ray.registry.ROLLOUT_ENGINES): hf (transformers) or vllm.
    engine: str = "hf"
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    # torch CPU threads in this process; 0 keeps Ray's default (one per requested CPU). The loop
    # runs rollout and learning in turn, so on a small machine each may use every core.
    num_threads: int = 0
    # Cores every rollout actor's process runs on (os.sched_setaffinity), empty: anywhere. On one
    # node this gives the rollout cores of its own, as a node of its own would (Ray's num_cpus
    # only counts, it pins nothing).
    cpu_cores: list[int] = field(default_factory=list)
    # The rollout actor also scores each sampled answer under the reference policy (the KL
    # penalty's, when algo.kl_coef > 0) and sends those log-probs with the group, so that the
    # learner skips its reference pass: with rl.max_staleness > 0 that work moves off the
    # learner, the slowest stage (docs/BENCHMARKS.md). The hf engine only.
    reference_logprobs: bool = False
    temperature: float = 1.0
    # Must stay 1.0 for training rollouts: vLLM renormalises log-probs over the nucleus, the
    # learner does not, so top_p < 1 would start every importance ratio below 1 (rejected).
    top_p: float = 1.0
    max_new_tokens: int = 6
    # vLLM only: see rlaif_ray/rollout/vllm_engine.py. The GPU build takes a share of the GPU's
    # memory; the CPU build a KV cache of this many GiB (VLLM_CPU_KVCACHE_SPACE).
    vllm_gpu_memory_utilization: float = 0.85
    vllm_cpu_kvcache_gib: int = 1
    vllm_max_lora_rank: int = 64
    vllm_tensor_parallel_size: int = 1
    vllm_enforce_eager: bool = False
    # Node-local folder where each weight version is written as a peft adapter for vLLM.
    adapter_dir: str = "/tmp/rlaif_ray_adapters"
    # Times Ray restarts a dead rollout actor (it then loads the newest weights and samples its
    # prompts again); -1: without limit.
    max_restarts: int = 3


@dataclass
class RankerConfig:
    """The Oracle-ranker pool and its backend."""

    # A registered backend (rlaif_ray.ranker.backends.register_backend): ground_truth (against the
    # reference answer), video_judge (a video-language model that looks at the video), judge (a
    # local text LM prompted listwise), openai (an OpenAI-compatible endpoint).
    backend: str = "ground_truth"
    # The ground-truth oracle's scalar score of an answer (the ``score`` advantage, sampled
    # accuracy): "binary" correctness, or "parts", the fraction of the answer's parts right
    # (graded answers; see rlaif_ray.ranker.backends.part_accuracy).
    score: Literal["binary", "parts"] = "binary"
    min_actors: int = 1
    max_actors: int = 2
    # Groups waiting per ranker actor above which the pool grows by one actor.
    scale_up_backlog: int = 4
    # Seconds a ranker actor may have nothing to do before the pool retires it (down to
    # min_actors): a steady backlog holds the pool's size, and between bursts the idle actors go,
    # so that the autoscaler can release their nodes.
    idle_grace_s: float = 30.0
    num_cpus_per_actor: float = 0.5
    # Cores every ranker actor's process runs on, empty: anywhere; see rollout.cpu_cores (e.g.
    # the rollout's, so that on one machine the learner keeps a core of its own).
    cpu_cores: list[int] = field(default_factory=list)
    # GPUs per ranker actor: a video_judge runs on the GPU it is given, else on the CPU.
    num_gpus_per_actor: float = 0.0
    # Custom resource each ranker actor asks for, so the autoscaler can add ranker nodes.
    resource: str = "ranker"
    max_retries: int = 2
    # When every attempt returned an invalid ordering: "tie" ranks the group all-tied (zero
    # advantage, it is skipped and counted); "drop" discards the group (also counted).
    fallback: Literal["tie", "drop"] = "tie"
    # Wall seconds a group may spend being ranked (every attempt and back-off together); then
    # it gets the fallback, is counted as deadline_expired, and the ranker moves on.
    group_deadline_s: float = 120.0
    # video_judge backend: a checkpoint in this project's policy format (policy.json, adapter/,
    # projector.safetensors; e.g. what `python -m rlaif_ray.sft` writes) that orders a group's
    # answers by its length-normalised log-likelihood of each, given the video and the question.
    judge_path: str | None = None
    # judge backend: a local causal LM folder (transformers).
    judge_model_path: str | None = None
    judge_max_new_tokens: int = 24
    # openai backend: any OpenAI-compatible chat-completions endpoint.
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_model: str = "judge"
    # The API key: read from the file openai_api_key_file when set (its first line), else from
    # the environment variable named here; never stored in the config, logs or messages.
    openai_api_key_env: str = "OPENAI_API_KEY"
    openai_api_key_file: str | None = None
    openai_timeout_s: float = 30.0
    openai_max_concurrency: int = 4
    openai_backoff_s: float = 0.5
    # Back-off retries of one request on transport errors, timeouts, 408/429/5xx. They sit inside
    # each of the 1 + max_retries attempts at a valid ordering: at most
    # (1 + max_retries) * (1 + openai_max_retries) requests per group.
    openai_max_retries: int = 2
    openai_temperature: float = 0.0
    # Ask the server for structured output (vLLM's ``structured_outputs``): the judge can only
    # answer a valid ordering line, so even a small judge never answers out of format.
    openai_structured_output: bool = False
    # Frames of the group's video sent to the judge as images (base64 PNG parts of the chat
    # message, before the text: what vLLM's OpenAI server takes for a vision-language model),
    # evenly spaced among the model.num_frames the ranker decodes; 0 sends the text alone.
    openai_frames: int = 8


@dataclass
class AlgoConfig:
    """GRPO_rank: advantage mapping and the clipped, KL-regularised loss."""

    # A registered advantage estimator (rlaif_ray.registry.ADVANTAGES): dcg, dcg_std and linear
    # take the ranker's orderings, score (plain GRPO) the oracle's scores.
    advantage: str = "dcg"
    scale_by_std: bool = False
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.02
    # k3 regularises; k1 as a loss term has zero expected gradient on on-policy samples (see kl_k1).
    kl_estimator: str = "k3"  # a registered KL estimator (rlaif_ray.registry.KL_ESTIMATORS)
    entropy_coef: float = 0.0
    # A registered loss aggregation (rlaif_ray.registry.AGGREGATIONS): token_mean, seq_mean_token_mean.
    aggregation: str = "token_mean"
    # Drop groups whose advantages are all zero (all-tied): they carry no signal.
    skip_tied_groups: bool = True
    # Cap of the truncated importance weight pi_prox / mu of answers sampled by an older weight
    # version (rl.max_staleness > 0; see rlaif_ray/algo/losses.py, grpo_loss).
    is_cap: float = 2.0


@dataclass
class LearnerConfig:
    """The DeepSpeed learner actor(s)."""

    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    # torch CPU threads in this process and in the SFT task; 0 keeps Ray's default (one per
    # requested CPU). The loop runs rollout and learning in turn: each may use every core.
    num_threads: int = 0
    # Cores every learner actor's process (and the SFT task) runs on, empty: anywhere; see
    # rollout.cpu_cores.
    cpu_cores: list[int] = field(default_factory=list)
    zero_stage: int = 2
    lr: float = 1e-4
    # The learning rate rises linearly to ``lr`` over this many optimizer steps (one per update
    # and pass over its batch, see epochs_per_batch), 0: none. The first steps then move the
    # weights less, so the groups sampled ahead by the old weights (rl.max_staleness > 0) stay
    # closer to the learner's policy. Restored with the optimizer from a checkpoint.
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    # Optimisation passes over each batch (1: strictly on-policy, ratio == 1 at the first step).
    epochs_per_batch: int = 1
    # Each group's prompt (visual tokens + question) runs through the LM once per pass and its G
    # answers on the prompt's keys and values, instead of G copies of prompt + answer: the same
    # log-probs and gradients (tests/test_shared_prefix.py), a fraction of the LM work when the
    # prompt is long. false: every answer its own full sequence (for a model whose forward does
    # not take a key-value cache, and for comparison). Groups are never split between learners.
    shared_prefix: bool = True
    # false (the default): each group brings the frozen encoder's output for its video from the
    # rollout actor that encoded it, and the learner neither decodes nor encodes the video (an
    # [N, D] tensor per group: 40 x 64 floats here, 626 x 1024 bf16 = 1.3 MB at the paper's
    # setting; docs/BENCHMARKS.md). true: the rollout sends none and the learner decodes and
    # encodes every video again (the video path must then be readable where the learner runs).
    reencode_videos: bool = False
    backend: Literal["gloo", "nccl"] = "gloo"
    # ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's
    # stage3_param_persistence_threshold, for SFT too); 0 partitions every parameter.
    zero3_persistence_threshold: int = 100_000
    # Times the loop restores dead learners from the last checkpoint before it gives up.
    max_restores: int = 3
    # A learner not set up within this many seconds fails the run with what it waits for (e.g. a
    # lock file left by a killed build of DeepSpeed's CPU op) instead of hanging.
    setup_timeout_s: float = 900.0
    # The learners' process-group timeout: a collective (a ZeRO-3 parameter gather, a gradient
    # reduction) that does not complete within it fails the update with an error naming the
    # learner and the update, and the loop restores the learners as after a crash, instead of
    # hanging. Size it above the longest computation between two collectives on the slowest
    # learner: a micro-batch's forward, reference pass and backward (a few seconds for the tiny
    # default on a CPU; minutes for a 7B policy on long videos: configs/paper_7b.yaml).
    collective_timeout_s: float = 1800.0


@dataclass
class RLConfig:
    """The GRPO_rank loop."""

    steps: int = 60
    prompts_per_step: int = 64
    group_size: int = 5
    eval_every: int = 20
    # The split of the evaluations during the run (before RL, every eval_every steps, after RL):
    # "val", to choose settings on; "test" is for the final report only (rl.final_test).
    eval_split: Literal["val", "test"] = "val"
    # After the run, one evaluation on data.test (summary.json "test"), when eval_split is val.
    final_test: bool = True
    # Held-out examples used by each evaluation (0: the whole split).
    eval_examples: int = 0
    # How many updates may come between the weight version that samples a group and the update
    # that learns it. 0: synchronous and on-policy. Above 0 the rollout actors sample the next
    # prompts while the learner learns, and stale answers are corrected (algo.is_cap).
    max_staleness: int = 0
    # Every this many steps a checkpoint (the learners' full state, the loop's state, the config)
    # is written to <run_dir>/checkpoints/step_<N>; the newest ``keep_checkpoints`` are kept.
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    # Stop the loop after this many seconds of RL (0: run all ``steps``).
    time_limit_s: float = 0.0
    # Seconds any call of the driver's to an actor may take before the actor is taken for stuck
    # (alive but not answering: a wedged judge client, a deadlocked collective): it is killed and
    # handled as a crash (restarted or replaced, its work asked again, faults.stuck_* counted).
    # Size it above the slowest call: a learner update (a 7B step: minutes), an evaluation of
    # rl.eval_examples questions, a checkpoint save, a rollout actor's share of a step. A ranker
    # call gets in addition ranker.group_deadline_s per group it ranks in turn (a slow judge
    # is the ranker's deadline to handle, not this one).
    actor_timeout_s: float = 600.0


@dataclass
class Config:
    """Everything a run needs; ``rlaif_ray.launch`` threads it through every actor."""

    seed: int = 0
    run_dir: str | None = None
    # A run folder to continue from its newest checkpoint (the job was stopped or its driver died).
    resume: str | None = None
    # Where the dashboard of a Ray started by the launcher listens (0.0.0.0: every interface).
    dashboard_host: str = "127.0.0.1"
    # What the job log shows (rlaif_ray/logs.py): "quiet" = our progress lines, evaluations, pool
    # events, warnings and errors, the libraries only from WARNING (transformers from ERROR, no
    # progress bars); "info" turns the libraries' INFO lines back on; "debug" shows everything.
    log_level: Literal["quiet", "info", "debug"] = "quiet"
    # Modules that register plugins of one's own (estimators, backends, engines: rlaif_ray/registry.py),
    # imported by the driver before the config is validated and by every actor as it starts.
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flat_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"rl": {"steps": 5}}`` -> ``{"rl.steps": 5}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def validate(cfg: Config) -> Config:
    """Check the values that the types alone cannot (ranges, relations between keys)."""
    positive_ints = [
        ("data.synthetic_videos", cfg.data.synthetic_videos),
        ("judge.videos", cfg.judge.videos),
        ("judge.sft_steps", cfg.judge.sft_steps),
        ("judge.eval_every", cfg.judge.eval_every),
        ("data.max_video_pixels", cfg.data.max_video_pixels),
        ("model.num_frames", cfg.model.num_frames),
        ("model.lora_r", cfg.model.lora_r),
        ("model.lora_alpha", cfg.model.lora_alpha),
        ("model.max_prompt_tokens", cfg.model.max_prompt_tokens),
        ("sft.batch_size", cfg.sft.batch_size),
        ("sft.eval_every", cfg.sft.eval_every),
        ("sft.log_every", cfg.sft.log_every),
        ("rollout.num_actors", cfg.rollout.num_actors),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
        ("rollout.vllm_max_lora_rank", cfg.rollout.vllm_max_lora_rank),
        ("rollout.vllm_tensor_parallel_size", cfg.rollout.vllm_tensor_parallel_size),
        ("rollout.vllm_cpu_kvcache_gib", cfg.rollout.vllm_cpu_kvcache_gib),
        ("ranker.min_actors", cfg.ranker.min_actors),
        ("ranker.max_actors", cfg.ranker.max_actors),
        ("ranker.scale_up_backlog", cfg.ranker.scale_up_backlog),
        ("ranker.judge_max_new_tokens", cfg.ranker.judge_max_new_tokens),
        ("ranker.openai_max_concurrency", cfg.ranker.openai_max_concurrency),
        ("learner.num_actors", cfg.learner.num_actors),
        ("learner.micro_batch_size", cfg.learner.micro_batch_size),
        ("learner.epochs_per_batch", cfg.learner.epochs_per_batch),
        ("rl.prompts_per_step", cfg.rl.prompts_per_step),
        ("rl.eval_every", cfg.rl.eval_every),
        ("rl.checkpoint_every", cfg.rl.checkpoint_every),
        ("rl.keep_checkpoints", cfg.rl.keep_checkpoints),
    ]
    for key, value in positive_ints:
        _check(value >= 1, key, value, "an integer >= 1")
    non_negative = [
        ("sft.steps", cfg.sft.steps),
        ("sft.weight_decay", cfg.sft.weight_decay),
        ("sft.warmup_steps", cfg.sft.warmup_steps),
        ("learner.warmup_steps", cfg.learner.warmup_steps),
        ("sft.grad_clip", cfg.sft.grad_clip),
        ("sft.time_limit_s", cfg.sft.time_limit_s),
        ("model.lora_dropout", cfg.model.lora_dropout),
        ("rollout.num_cpus_per_actor", cfg.rollout.num_cpus_per_actor),
        ("rollout.num_gpus_per_actor", cfg.rollout.num_gpus_per_actor),
        ("rollout.num_threads", cfg.rollout.num_threads),
        ("ranker.num_cpus_per_actor", cfg.ranker.num_cpus_per_actor),
        ("ranker.max_retries", cfg.ranker.max_retries),
        ("ranker.openai_backoff_s", cfg.ranker.openai_backoff_s),
        ("ranker.openai_max_retries", cfg.ranker.openai_max_retries),
        ("ranker.openai_temperature", cfg.ranker.openai_temperature),
        ("algo.kl_coef", cfg.algo.kl_coef),
        ("algo.entropy_coef", cfg.algo.entropy_coef),
        ("learner.num_cpus_per_actor", cfg.learner.num_cpus_per_actor),
        ("learner.num_gpus_per_actor", cfg.learner.num_gpus_per_actor),
        ("learner.num_threads", cfg.learner.num_threads),
        ("learner.zero3_persistence_threshold", cfg.learner.zero3_persistence_threshold),
        ("learner.weight_decay", cfg.learner.weight_decay),
        ("learner.grad_clip", cfg.learner.grad_clip),
        ("rl.steps", cfg.rl.steps),
        ("rl.eval_examples", cfg.rl.eval_examples),
        ("rl.max_staleness", cfg.rl.max_staleness),
        ("rl.time_limit_s", cfg.rl.time_limit_s),
        ("learner.max_restores", cfg.learner.max_restores),
        ("learner.setup_timeout_s", cfg.learner.setup_timeout_s),
    ]
    for key, value in non_negative:
        _check(value >= 0, key, value, "a value >= 0")
    for key, cores in (
        ("rollout.cpu_cores", cfg.rollout.cpu_cores),
        ("learner.cpu_cores", cfg.learner.cpu_cores),
        ("ranker.cpu_cores", cfg.ranker.cpu_cores),
    ):
        _check(
            all(c >= 0 for c in cores) and len(set(cores)) == len(cores),
            key,
            cores,
            "a list of distinct core numbers >= 0",
        )
    _check(
        cfg.learner.collective_timeout_s > 0,
        "learner.collective_timeout_s",
        cfg.learner.collective_timeout_s,
        "a number of seconds > 0",
    )
    _check(cfg.rollout.max_restarts >= -1, "rollout.max_restarts", cfg.rollout.max_restarts, "-1 or >= 0")
    for key in ("synthetic_val_frac", "synthetic_test_frac"):
        value = getattr(cfg.data, key)
        _check(0 <= value < 1, f"data.{key}", value, "a fraction in [0, 1)")
    _check(
        0 <= cfg.data.synthetic_label_fraction <= 1,
        "data.synthetic_label_fraction",
        cfg.data.synthetic_label_fraction,
        "a fraction in [0, 1]",
    )
    _check(
        0 <= cfg.data.max_bad_video_fraction <= 1,
        "data.max_bad_video_fraction",
        cfg.data.max_bad_video_fraction,
        "a fraction in [0, 1]",
    )
    for key, value in [("sft.lr", cfg.sft.lr), ("learner.lr", cfg.learner.lr)]:
        _check(value > 0, key, value, "a learning rate > 0")
    _check(cfg.algo.is_cap > 0, "algo.is_cap", cfg.algo.is_cap, "a weight cap > 0")
    for key, value in [("algo.eps_low", cfg.algo.eps_low), ("algo.eps_high", cfg.algo.eps_high)]:
        _check(0 < value, key, value, "a clip range > 0")
    _check(
        cfg.algo.eps_low < 1,
        "algo.eps_low",
        cfg.algo.eps_low,
        "a value in (0, 1): the ratio floor is 1 - eps_low",
    )
    _check(cfg.model.lora_dropout < 1, "model.lora_dropout", cfg.model.lora_dropout, "a value in [0, 1)")
    _check(
        cfg.rl.group_size >= 2,
        "rl.group_size",
        cfg.rl.group_size,
        "an integer >= 2 (a group needs two answers to rank)",
    )
    _check(cfg.rollout.temperature > 0, "rollout.temperature", cfg.rollout.temperature, "a temperature > 0")
    _check(
        cfg.rollout.top_p == 1.0,
        "rollout.top_p",
        cfg.rollout.top_p,
        "1.0: training groups are sampled from the full distribution, whose log-probs the learner "
        "recomputes (vLLM would renormalise over the nucleus and every importance ratio would start below 1)",
    )
    _check(
        0 < cfg.rollout.vllm_gpu_memory_utilization <= 1,
        "rollout.vllm_gpu_memory_utilization",
        cfg.rollout.vllm_gpu_memory_utilization,
        "a fraction in (0, 1]",
    )
    for key, value in [
        ("sft.zero_stage", cfg.sft.zero_stage),
        ("learner.zero_stage", cfg.learner.zero_stage),
    ]:
        _check(value in (0, 1, 2, 3), key, value, "a DeepSpeed ZeRO stage: 0, 1, 2 or 3")
    _check(
        cfg.ranker.max_actors >= cfg.ranker.min_actors,
        "ranker.max_actors",
        cfg.ranker.max_actors,
        f"an integer >= ranker.min_actors ({cfg.ranker.min_actors})",
    )
    _check(
        cfg.ranker.openai_timeout_s > 0, "ranker.openai_timeout_s", cfg.ranker.openai_timeout_s, "seconds > 0"
    )
    _check(
        cfg.ranker.group_deadline_s > 0, "ranker.group_deadline_s", cfg.ranker.group_deadline_s, "seconds > 0"
    )
    _check(cfg.rl.actor_timeout_s > 0, "rl.actor_timeout_s", cfg.rl.actor_timeout_s, "seconds > 0")
    _check(cfg.ranker.idle_grace_s >= 0, "ranker.idle_grace_s", cfg.ranker.idle_grace_s, "seconds >= 0")
    if not cfg.ranker.openai_api_key_env.isidentifier():  # the value is not shown: it may be a pasted key
        raise ConfigError(
            "config key 'ranker.openai_api_key_env' must be the name of an environment variable "
            "(letters, digits, _), not the key itself; put the key in that variable or in a file "
            "named by ranker.openai_api_key_file"
        )
    try:
        import_plugins(cfg.plugins)
    except ImportError as exc:
        raise ConfigError(f"config key 'plugins' = {cfg.plugins!r}: {exc}") from None
    flat = flat_keys(cfg.to_dict())
    for registry in REGISTRIES:
        value = flat[registry.key]
        _check(
            value in registry,
            registry.key,
            value,
            f"a registered {registry.kind}: "
            + ", ".join(repr(n) for n in registry.names())
            + f" ({PLUGINS_HINT})",
        )
    if cfg.ranker.backend == "video_judge":
        _check(
            bool(cfg.ranker.judge_path),
            "ranker.judge_path",
            cfg.ranker.judge_path,
            "a checkpoint folder in the policy format when ranker.backend is 'video_judge'",
        )
    if cfg.ranker.backend == "judge":
        _check(
            bool(cfg.ranker.judge_model_path),
            "ranker.judge_model_path",
            cfg.ranker.judge_model_path,
            "a local model folder when ranker.backend is 'judge'",
        )
    if cfg.learner.num_actors > 1:
        _check(
            cfg.rl.prompts_per_step * cfg.rl.group_size % cfg.learner.num_actors == 0,
            "learner.num_actors",
            cfg.learner.num_actors,
            f"a divisor of rl.prompts_per_step * rl.group_size "
            f"({cfg.rl.prompts_per_step * cfg.rl.group_size}) so that every learner gets an equal share",
        )
    _check(
        cfg.rollout.engine == "hf" or not cfg.rollout.reference_logprobs,
        "rollout.reference_logprobs",
        cfg.rollout.reference_logprobs,
        f"false with rollout.engine {cfg.rollout.engine!r}: only the hf engine scores the reference",
    )
    if cfg.rollout.engine == "vllm":
        _check(
            cfg.rollout.vllm_max_lora_rank >= cfg.model.lora_r,
            "rollout.vllm_max_lora_rank",
            cfg.rollout.vllm_max_lora_rank,
            f"at least model.lora_r ({cfg.model.lora_r})",
        )
    return cfg


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(
            f"config key '{key}' = {value!r}: expected {' or '.join(_type_name(a) for a in args)}"
        )
    if origin is Literal:
        _check(value in args, key, value, _type_name(tp))
        return value
    if origin is list:
        _check(isinstance(value, list), key, value, f"a list of {_type_name(args[0])}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, value, f"a mapping of the keys of {tp.__name__}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads exponent floats without a dot (``5e-3``) as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, int | float) and not isinstance(value, bool), key, value, "a number")
        _check(math.isfinite(value), key, value, "a finite number")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, value, "a string")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(known))}"
            )
    kwargs = {key: _coerce(prefix + key, value, hints[key]) for key, value in values.items()}
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. rl.steps=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries into a nested dict (copied)."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        path, value = _parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return result


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    return validate(_build(Config, raw))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections at the top")
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as exc:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None


def with_absolute_paths(cfg: Config) -> Config:
    """Resolve the config's relative paths against the driver's directory (actors run elsewhere)."""
    cfg = copy.deepcopy(cfg)
    for section, key in [
        ("data", "train"),
        ("data", "val"),
        ("data", "test"),
        ("data", "synthetic_dir"),
        ("model", "path"),
        ("sft", "output_dir"),
        ("ranker", "judge_model_path"),
        ("ranker", "judge_path"),
        ("ranker", "openai_api_key_file"),
        ("judge", "data_dir"),
    ]:
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, str(Path(value).absolute()))
    return cfg
