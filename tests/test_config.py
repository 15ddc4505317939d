"""The typed config: the shipped YAML files load, ``key=value`` overrides parse, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlaif_ray.config import Config, ConfigError, config_from_dict, flat_keys, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT = CONFIGS / "default.yaml"
PAPER = CONFIGS / "paper_7b.yaml"
RLAIF = CONFIGS / "rlaif.yaml"


# --------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("path", [DEFAULT, PAPER, RLAIF], ids=["default", "paper_7b", "rlaif"])
def test_shipped_config_loads_with_every_value_from_the_file(path: Path):
    """Every key written in the file reaches the Config (numbers compared as numbers)."""
    cfg = load_config(path)
    written = flat_keys(yaml.safe_load(path.read_text()))
    loaded = flat_keys(cfg.to_dict())
    assert written and set(written) <= set(loaded)
    for key, value in written.items():
        if isinstance(value, str) and isinstance(loaded[key], float):
            value = float(value)  # YAML 1.1 reads exponent floats without a dot as strings
        assert loaded[key] == value, key
    # Keys the file leaves out keep the dataclass defaults.
    defaults = flat_keys(Config().to_dict())
    for key in set(loaded) - set(written):
        assert loaded[key] == defaults[key], key


def test_default_yaml_is_the_tiny_cpu_setup():
    cfg = load_config(DEFAULT)
    assert isinstance(cfg, Config)
    assert cfg.model.path == "checkpoints/tiny" and cfg.model.build_tiny_if_missing is True
    assert cfg.model.visual_tokens == "motion" and cfg.model.dtype == "float32"
    assert "lm_head" in cfg.model.lora_target_modules  # the tiny LM is trained from scratch
    assert isinstance(cfg.sft.lr, float) and isinstance(cfg.learner.lr, float)
    assert cfg.rollout.engine == "hf" and cfg.learner.backend == "gloo"
    assert cfg.ranker.backend == "ground_truth"
    assert cfg.rl.group_size >= 2
    assert cfg.run_dir is None


def test_paper_yaml_loads_with_its_gpu_settings():
    cfg = load_config(PAPER)
    assert cfg.model.lora_r == 64 and cfg.model.lora_alpha == 16
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.num_frames == 50
    assert cfg.model.build_tiny_if_missing is False
    assert cfg.data.synthetic_dir is None
    assert cfg.rollout.engine == "vllm"
    assert cfg.rollout.top_p == 1.0
    assert cfg.rollout.vllm_max_lora_rank >= cfg.model.lora_r
    assert cfg.ranker.backend == "openai"
    assert cfg.learner.backend == "nccl" and cfg.learner.zero_stage == 3
    assert cfg.algo.eps_high == pytest.approx(0.28)
    # YAML ints for float keys become floats.
    assert isinstance(cfg.ranker.num_cpus_per_actor, float)
    assert isinstance(cfg.ranker.openai_timeout_s, float)
    # The learner shards must divide the batch (validate() checks it; the file must satisfy it).
    assert cfg.rl.prompts_per_step * cfg.rl.group_size % cfg.learner.num_actors == 0


def test_no_path_gives_the_dataclass_defaults():
    assert load_config(None) == Config()
    assert load_config() == Config()


def test_to_dict_round_trips():
    cfg = load_config(PAPER, ["rl.steps=3"])
    assert config_from_dict(cfg.to_dict()) == cfg


# --------------------------------------------------------------------------- overrides
def test_overrides_nested_scalars_bools_null_and_exponent_floats():
    cfg = load_config(
        DEFAULT,
        [
            "rl.steps=7",
            "seed=3",
            "sft.lr=5e-4",
            "learner.lr=1E-5",
            "algo.kl_coef=0",
            "model.build_tiny_if_missing=false",
            "sft.enabled=true",
            "data.synthetic_dir=null",
            "run_dir=/tmp/some run",
            "rollout.temperature=0.7",
        ],
    )
    assert cfg.rl.steps == 7 and cfg.seed == 3
    assert cfg.sft.lr == pytest.approx(5e-4) and isinstance(cfg.sft.lr, float)
    assert cfg.learner.lr == pytest.approx(1e-5) and isinstance(cfg.learner.lr, float)
    assert cfg.algo.kl_coef == 0.0 and isinstance(cfg.algo.kl_coef, float)
    assert cfg.model.build_tiny_if_missing is False
    assert cfg.sft.enabled is True
    assert cfg.data.synthetic_dir is None
    assert cfg.run_dir == "/tmp/some run"
    assert cfg.rollout.temperature == pytest.approx(0.7)
    # Untouched keys keep the file's values.
    assert cfg.rl.group_size == 5 and cfg.sft.batch_size == 32


def test_override_list_value():
    cfg = load_config(DEFAULT, ["model.lora_target_modules=[q_proj,v_proj]"])
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]


def test_later_override_wins_and_value_may_contain_equals():
    cfg = load_config(DEFAULT, ["rl.steps=1", "rl.steps=2", "ranker.openai_base_url=http://h:1/v1?a=b"])
    assert cfg.rl.steps == 2
    assert cfg.ranker.openai_base_url == "http://h:1/v1?a=b"


def test_overrides_do_not_mutate_defaults():
    load_config(DEFAULT, ["model.lora_target_modules=[q_proj]"])
    assert load_config(None).model.lora_target_modules == Config().model.lora_target_modules
    assert len(Config().model.lora_target_modules) == 7


def test_override_without_a_file():
    cfg = load_config(None, ["rollout.num_actors=3", "data.on_bad_line=raise"])
    assert cfg.rollout.num_actors == 3 and cfg.data.on_bad_line == "raise"


# --------------------------------------------------------------------------- errors
def _error(overrides: list[str], path: Path | None = DEFAULT) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_unknown_top_level_key():
    msg = _error(["sed=1"])
    assert "'sed'" in msg and "unknown" in msg
    assert "seed" in msg  # the known keys are listed


def test_unknown_nested_key():
    msg = _error(["rl.stepz=10"])
    assert "rl.stepz" in msg and "unknown" in msg
    assert "steps" in msg


def test_unknown_section_key_in_a_yaml_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  lora_rank: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "model.lora_rank" in msg and str(path) in msg


@pytest.mark.parametrize(
    ("override", "key", "value", "expected"),
    [
        ("rl.steps=ten", "rl.steps", "'ten'", "integer"),
        ("rl.steps=true", "rl.steps", "True", "integer"),
        ("sft.batch_size=2.5", "sft.batch_size", "2.5", "integer"),
        ("sft.lr=fast", "sft.lr", "'fast'", "number"),
        ("sft.enabled=1", "sft.enabled", "1", "true or false"),
        ("model.path=3", "model.path", "3", "string"),
        ("model.lora_target_modules=q_proj", "model.lora_target_modules", "'q_proj'", "list"),
        ("model.lora_target_modules=[q_proj,7]", "model.lora_target_modules[1]", "7", "string"),
        ("rl=5", "rl", "5", "mapping"),
        ("run_dir=5", "run_dir", "5", "str"),
    ],
)
def test_wrong_type_names_key_value_and_expectation(override: str, key: str, value: str, expected: str):
    msg = _error([override])
    assert f"'{key}'" in msg
    assert value in msg
    assert expected in msg
    assert str(DEFAULT) in msg  # the file is named too


@pytest.mark.parametrize(
    ("override", "key", "value", "expected"),
    [
        ("rl.group_size=1", "rl.group_size", "1", ">= 2"),
        ("learner.lr=-1", "learner.lr", "-1", "> 0"),
        ("sft.lr=0", "sft.lr", "0", "> 0"),
        ("algo.eps_low=1.5", "algo.eps_low", "1.5", "(0, 1)"),
        ("algo.eps_high=0", "algo.eps_high", "0", "> 0"),
        ("rollout.top_p=0.9", "rollout.top_p", "0.9", "nucleus"),
        ("rollout.top_p=1.5", "rollout.top_p", "1.5", "1.0"),
        ("learner.zero3_persistence_threshold=-1", "learner.zero3_persistence_threshold", "-1", ">= 0"),
        ("learner.warmup_steps=-2", "learner.warmup_steps", "-2", ">= 0"),
        ("rollout.temperature=0", "rollout.temperature", "0", "> 0"),
        ("ranker.max_actors=0", "ranker.max_actors", "0", ">= 1"),
        ("sft.zero_stage=5", "sft.zero_stage", "5", "ZeRO stage"),
        ("learner.zero_stage=-1", "learner.zero_stage", "-1", "ZeRO stage"),
        ("rl.steps=-1", "rl.steps", "-1", ">= 0"),
        ("learner.collective_timeout_s=0", "learner.collective_timeout_s", "0", "> 0"),
        ("model.lora_dropout=1.0", "model.lora_dropout", "1.0", "[0, 1)"),
        ("rollout.vllm_gpu_memory_utilization=1.2", "rollout.vllm_gpu_memory_utilization", "1.2", "(0, 1]"),
        ("algo.advantage=foo", "algo.advantage", "'foo'", "'dcg'"),
        ("algo.kl_estimator=k2", "algo.kl_estimator", "'k2'", "'k3'"),
        ("model.visual_tokens=cls", "model.visual_tokens", "'cls'", "'patch'"),
        ("rollout.engine=sglang", "rollout.engine", "'sglang'", "'vllm'"),
        ("ranker.backend=oracle", "ranker.backend", "'oracle'", "'video_judge'"),
        ("ranker.backend=video_judge", "ranker.judge_path", "None", "policy format"),
        ("data.synthetic_label_fraction=1.5", "data.synthetic_label_fraction", "1.5", "[0, 1]"),
        ("rollout.cpu_cores=[0,0]", "rollout.cpu_cores", "[0, 0]", "distinct core"),
        ("learner.cpu_cores=[-1]", "learner.cpu_cores", "[-1]", "core numbers >= 0"),
    ],
)
def test_impossible_value_names_key_value_and_expectation(override: str, key: str, value: str, expected: str):
    msg = _error([override])
    assert f"'{key}'" in msg
    assert f"= {value}" in msg
    assert expected in msg


def test_literal_error_lists_every_choice():
    msg = _error(["algo.advantage=foo"])
    for choice in ("dcg", "dcg_std", "linear", "score"):
        assert f"'{choice}'" in msg


def test_ranker_max_below_min():
    msg = _error(["ranker.min_actors=3", "ranker.max_actors=2"])
    assert "'ranker.max_actors'" in msg and "= 2" in msg
    assert "ranker.min_actors (3)" in msg


def test_judge_backend_needs_a_model_path():
    msg = _error(["ranker.backend=judge"])
    assert "'ranker.judge_model_path'" in msg and "None" in msg
    cfg = load_config(DEFAULT, ["ranker.backend=judge", "ranker.judge_model_path=/models/judge"])
    assert cfg.ranker.judge_model_path == "/models/judge"


def test_learners_must_divide_the_batch():
    # 16 prompts x 5 answers = 80 rows: 3 learners cannot share them equally, 4 can.
    msg = _error(["rl.prompts_per_step=16", "learner.num_actors=3"])
    assert "'learner.num_actors'" in msg and "= 3" in msg and "80" in msg
    assert load_config(DEFAULT, ["rl.prompts_per_step=16", "learner.num_actors=4"]).learner.num_actors == 4


def test_vllm_lora_rank_must_cover_the_adapter():
    msg = _error(["rollout.engine=vllm", "model.lora_r=128", "rollout.vllm_max_lora_rank=64"])
    assert "'rollout.vllm_max_lora_rank'" in msg and "= 64" in msg and "128" in msg
    # Only checked for the vLLM engine.
    assert load_config(DEFAULT, ["model.lora_r=128", "rollout.vllm_max_lora_rank=64"]).model.lora_r == 128


def test_only_the_hf_engine_scores_the_reference_on_the_rollout():
    msg = _error(["rollout.engine=vllm", "rollout.reference_logprobs=true"])
    assert "'rollout.reference_logprobs'" in msg and "= True" in msg and "'vllm'" in msg
    assert load_config(DEFAULT, ["rollout.reference_logprobs=true"]).rollout.reference_logprobs


@pytest.mark.parametrize("override", ["rl.steps", "rl.steps 10", "", "  "])
def test_malformed_override_without_equals(override: str):
    msg = _error([override])
    assert repr(override) in msg
    assert "key=value" in msg


@pytest.mark.parametrize("override", ["=3", "rl.=3", ".steps=3", "rl..steps=3"])
def test_override_with_empty_key(override: str):
    msg = _error([override])
    assert repr(override) in msg and "empty key" in msg


def test_override_into_a_scalar_is_not_a_section():
    msg = _error(["seed.value=1"])
    assert "'seed' is not a section" in msg


def test_override_with_invalid_yaml_value():
    msg = _error(["model.lora_target_modules=[q_proj"])
    assert "model.lora_target_modules" in msg and "not valid YAML" in msg


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"), [("rl: [steps: 1\n", "not valid YAML"), ("- 1\n- 2\n", "mapping")]
)
def test_bad_yaml_file(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_empty_yaml_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- one-GPU config
GPU_1X = CONFIGS / "gpu_1x.yaml"


def test_gpu_1x_yaml_loads_with_every_value_from_the_file():
    test_shipped_config_loads_with_every_value_from_the_file(GPU_1X)


def test_gpu_1x_yaml_shares_one_gpu_between_rollout_and_learner():
    cfg = load_config(GPU_1X)
    assert cfg.rollout.engine == "vllm" and cfg.learner.backend == "nccl"
    assert cfg.model.dtype == "bfloat16"
    rollout, learner = cfg.rollout.num_gpus_per_actor, cfg.learner.num_gpus_per_actor
    # Fractional requests, so that Ray places both actors on the one GPU ...
    assert 0 < rollout < 1 and 0 < learner < 1
    # ... and together they ask for no more than that GPU.
    assert cfg.rollout.num_actors * rollout + cfg.learner.num_actors * learner <= 1
    # vLLM's share of the GPU's memory leaves the learner room on the same card.
    assert cfg.rollout.vllm_gpu_memory_utilization <= 0.5
    assert cfg.rollout.vllm_max_lora_rank >= cfg.model.lora_r


def test_rlaif_yaml_ranks_with_the_video_judge_on_mostly_unlabelled_prompts():
    cfg = load_config(RLAIF)
    assert cfg.ranker.backend == "video_judge" and cfg.ranker.judge_path
    assert cfg.data.synthetic_label_fraction == 0.2 and cfg.judge.seed != cfg.data.synthetic_seed
    assert cfg.data.synthetic_dir != load_config(DEFAULT).data.synthetic_dir  # its own data
