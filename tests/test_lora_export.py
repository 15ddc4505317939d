"""LoRA export for the vLLM engine: the folder peft (and vLLM) loads holds exactly the policy's adapter."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rlaif_ray.config import ModelConfig
from rlaif_ray.models.policy import VideoLMPolicy
from rlaif_ray.models.tiny import build_tiny
from rlaif_ray.rollout.lora_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterVersions,
    read_peft_adapter,
    write_peft_adapter,
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> VideoLMPolicy:
    """A tiny policy (Llama width 32, 2 layers) whose LoRA weights are perturbed away from the base."""
    folder = build_tiny(tmp_path_factory.mktemp("model") / "tiny", hidden=32, layers=2)
    pol = VideoLMPolicy.from_folder(folder, ModelConfig(lora_r=4, lora_alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in pol.lm.named_parameters():
            if "lora_" in name:
                param.add_(0.2 * torch.randn_like(param))
    return pol.eval()


def lora_config(policy: VideoLMPolicy) -> dict:
    return policy.lm.peft_config["default"].to_dict()


def lm_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 15).view(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_written_adapter_loads_in_peft_with_the_same_weights_and_outputs(
    policy: VideoLMPolicy, tmp_path: Path
):
    state = policy.trainable_state_dict()
    out = write_peft_adapter(state, lora_config(policy), tmp_path / "adapter", torch.float32)

    base = AutoModelForCausalLM.from_pretrained(policy.spec["lm"], dtype=torch.float32)
    reference = lm_logits(base)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()

    loaded_params = dict(loaded.named_parameters())
    lora_keys = [k for k in state if k.startswith("lm.")]
    assert len(lora_keys) == 2 * 7 * 2  # A and B, 7 target modules, 2 layers
    for key in lora_keys:
        torch.testing.assert_close(loaded_params[key[len("lm.") :]], state[key], rtol=0, atol=0)
    expected = lm_logits(policy.lm)
    torch.testing.assert_close(lm_logits(loaded), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(reference, expected, atol=1e-3), (
        "the perturbed adapter should change the outputs"
    )


def test_bf16_export_writes_bf16_tensors_under_peft_names_and_a_complete_config(
    policy: VideoLMPolicy, tmp_path: Path
):
    config = {**lora_config(policy), "base_model_name_or_path": policy.spec["lm"]}
    out = write_peft_adapter(policy.trainable_state_dict(), config, tmp_path / "adapter", torch.bfloat16)

    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".default." not in k and not k.startswith("lm.") for k in keys)
    written = json.loads((out / ADAPTER_CONFIG).read_text())
    assert written["r"] == 4 and written["lora_alpha"] == 8
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["base_model_name_or_path"] == policy.spec["lm"]
    assert sorted(written["target_modules"]) == sorted(ModelConfig().lora_target_modules)


def test_read_inverts_peft_save_pretrained(policy: VideoLMPolicy, tmp_path: Path):
    """An adapter written by peft itself (a model folder's adapter/) reads back in the policy's key format."""
    policy.save(tmp_path / "checkpoint")
    state, config = read_peft_adapter(tmp_path / "checkpoint" / "adapter")
    expected = {k: v for k, v in policy.trainable_state_dict().items() if k.startswith("lm.")}
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert config.r == 4


def test_versions_keep_the_newest_folders_with_increasing_ids(policy: VideoLMPolicy, tmp_path: Path):
    state = policy.trainable_state_dict()
    versions = AdapterVersions(tmp_path, policy.lm.peft_config["default"], torch.bfloat16, keep=2)
    served = [versions.add(v, state) for v in (0, 1, 3, 4)]

    assert [name for name, _, _ in served] == ["v0", "v1", "v3", "v4"]
    assert [int_id for _, int_id, _ in served] == [1, 2, 3, 4]
    assert [path.is_dir() for _, _, path in served] == [False, False, True, True]
    assert sorted(p.name for p in versions.dir.iterdir()) == ["v3", "v4"]
    with pytest.raises(ValueError, match="not newer"):
        versions.add(4, state)
    other = AdapterVersions(tmp_path, lora_config(policy), torch.bfloat16, keep=2)
    assert other.dir != versions.dir and other.dir.parent == versions.dir.parent == tmp_path
    # The engine's folder goes with it: closed, or collected when its process ends.
    versions.close()
    assert not versions.dir.exists() and other.dir.is_dir()
    folder = other.dir
    del other
    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize(
    "bad_key",
    [
        "lm.base_model.model.model.embed_tokens.weight",
        "lm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.reference.weight",
        "lm.base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight",
    ],
)
def test_a_tensor_that_is_not_a_policy_lora_weight_is_rejected_by_name(
    policy: VideoLMPolicy, tmp_path: Path, bad_key: str
):
    state = {**policy.trainable_state_dict(), bad_key: torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=bad_key.replace(".", r"\.")):
        write_peft_adapter(state, lora_config(policy), tmp_path / "adapter", torch.float32)
    assert not (tmp_path / "adapter").exists()


def test_a_state_without_lora_tensors_is_rejected(policy: VideoLMPolicy, tmp_path: Path):
    projector_only = {k: v for k, v in policy.trainable_state_dict().items() if k.startswith("projector.")}
    with pytest.raises(ValueError, match="no LoRA tensors"):
        write_peft_adapter(projector_only, lora_config(policy), tmp_path / "adapter", torch.float32)
