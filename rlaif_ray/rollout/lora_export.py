"""LoRA weights as peft adapter folders on node-local disk, for engines that load adapters from a directory.

vLLM loads a LoRA adapter from a folder laid out the way peft's ``save_pretrained`` writes it:
``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are peft's parameter names
without the adapter name, ``base_model.model.<module path>.lora_A.weight`` (and ``lora_B``). The
policy's ``trainable_state_dict`` names the same tensors ``lm.base_model.model.<module
path>.lora_A.<adapter>.weight``; :func:`write_peft_adapter` maps one to the other and
:func:`read_peft_adapter` maps back. Pure torch/peft/safetensors: runs on the CPU, no vLLM.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from rlaif_ray.models.policy import POLICY_ADAPTER

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# "lm." + a peft LoRA parameter name: lm.base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight
_POLICY_KEY = re.compile(
    r"lm\.(?P<module>base_model\.model\..+)\.(?P<ab>lora_[AB])\.(?P<adapter>[^.]+)\.weight"
)
# What peft's save_pretrained writes for the same tensor: base_model.model.<module path>.lora_A.weight
_FILE_KEY = re.compile(r"(?P<module>base_model\.model\..+)\.(?P<ab>lora_[AB])\.weight")


def peft_file_tensors(
    state: dict[str, torch.Tensor], adapter_name: str = POLICY_ADAPTER
) -> dict[str, torch.Tensor]:
    """The ``lm.*`` entries of a trainable state dict under the names peft's ``save_pretrained`` writes.

    Other entries (``projector.*``) are left out. Raises ValueError naming the first ``lm.*`` key
    that is not a LoRA A/B weight of ``adapter_name``, or when there is no ``lm.*`` entry at all.
    """
    out = {}
    for key, value in state.items():
        if not key.startswith("lm."):
            continue
        match = _POLICY_KEY.fullmatch(key)
        if match is None or match["adapter"] != adapter_name:
            raise ValueError(
                f"{key!r} is not a LoRA A/B weight of adapter {adapter_name!r}: expected "
                f"lm.base_model.model.<module>.lora_A|lora_B.{adapter_name}.weight"
            )
        out[f"{match['module']}.{match['ab']}.weight"] = value
    if not out:
        raise ValueError("the state holds no LoRA tensors (no 'lm.' entries)")
    return out


def write_peft_adapter(
    state: dict[str, torch.Tensor],
    lora_config: dict[str, Any] | LoraConfig,
    out_dir: str | Path,
    dtype: torch.dtype,
) -> Path:
    """Write the LoRA tensors of ``state`` as a peft adapter folder, cast to ``dtype``; return the folder.

    ``dtype`` is the serving engine's: peft trains in fp32 while vLLM runs bf16, and handing it
    fp32 tensors fails with "mismatch dtype". ``lora_config`` is written as adapter_config.json
    (r, lora_alpha, target_modules, base_model_name_or_path, peft_type "LORA", task_type, ...).
    """
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in peft_file_tensors(state).items()}
    config = lora_config if isinstance(lora_config, LoraConfig) else LoraConfig(**lora_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    return out_dir


def read_peft_adapter(
    folder: str | Path, adapter_name: str = POLICY_ADAPTER
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """Read a peft adapter folder back as ``lm.*`` entries of a trainable state dict, and its config."""
    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{folder / ADAPTER_WEIGHTS} not found: expected a peft adapter saved as safetensors"
        )
    state = {}
    for key, value in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        match = _FILE_KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: {key!r} is not a LoRA A/B weight")
        state[f"lm.{match['module']}.{match['ab']}.{adapter_name}.weight"] = value
    return state, LoraConfig.from_pretrained(str(folder))


class AdapterVersions:
    """The adapter folders of the versions an engine serves, on node-local disk.

    Each instance writes into a fresh folder of its own under ``root`` (several rollout actors may
    share a node), one subfolder ``v{version}`` per version, and keeps the newest ``keep`` of them
    (``keep = max_staleness + 1``: a rollout started under an older version can still be served).
    Each version gets a new integer id, strictly increasing from 1: vLLM needs ``lora_int_id > 0``
    and caches adapters by id, so a reused id would silently serve stale weights. The folder is
    removed when the instance is collected or its process exits (not when the process is killed).
    """

    def __init__(
        self, root: str | Path, lora_config: dict[str, Any] | LoraConfig, dtype: torch.dtype, keep: int
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        Path(root).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=root))
        self.lora_config = lora_config
        self.dtype = dtype
        self.keep = keep
        self._kept: list[tuple[int, int, Path]] = []  # (version, integer id, folder), oldest first
        self._evicted: list[int] = []
        self._next_id = 1
        self._remove = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    def close(self) -> None:
        """Remove this instance's folder and every adapter in it."""
        self._remove()

    def add(self, version: int, state: dict[str, torch.Tensor]) -> tuple[str, int, Path]:
        """Write ``version``; return (adapter name, integer id, folder) to serve it under."""
        if self._kept and version <= self._kept[-1][0]:
            raise ValueError(
                f"version {version} is not newer than the last one written ({self._kept[-1][0]})"
            )
        path = write_peft_adapter(state, self.lora_config, self.dir / f"v{version}", self.dtype)
        int_id = self._next_id
        self._next_id += 1
        self._kept.append((version, int_id, path))
        while len(self._kept) > self.keep:
            _, old_id, old_path = self._kept.pop(0)
            shutil.rmtree(old_path)
            self._evicted.append(old_id)
        return f"v{version}", int_id, path

    def pop_evicted(self) -> list[int]:
        """Integer ids of the versions whose folders were deleted since the last call (to unload them)."""
        evicted, self._evicted = self._evicted, []
        return evicted
