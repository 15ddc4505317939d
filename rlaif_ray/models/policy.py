"""The video-language policy: frozen open_clip encoder -> trainable projector -> causal LM with LoRA.

A model folder (built by ``python -m rlaif_ray.models.tiny`` or laid out by hand for real
checkpoints) holds ``policy.json``::

    {"lm": "lm",                                   # transformers folder (weights + tokenizer)
     "vision": {"open_clip_model": "ViT-L-14-336", # any open_clip model name ...
                "open_clip_config": null,          # ... or a custom open_clip JSON config
                "pretrained": "/models/clip.bin"}, # local weights (never downloaded)
     "image_size": 336, "image_mean": [...], "image_std": [...],
     "video_token": "<video>",
     "prompt_template": "USER: <video>\\n{question} ASSISTANT:"}

Relative paths are relative to the folder. A trained checkpoint is the same folder shape plus
``adapter/`` (peft ``save_pretrained``) and ``projector.safetensors``, and its ``policy.json``
records the input settings it was trained with (``"trained_with": {"num_frames": 8,
"visual_tokens": "patch"}``): loading it with other settings is an error, since the projector and
adapter learned that exact visual input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from rlaif_ray.config import ModelConfig

log = logging.getLogger(__name__)

POLICY_FILE = "policy.json"
# Model settings that shape the visual input; a checkpoint only makes sense with the ones it was trained with.
TRAINED_WITH_KEYS = ("num_frames", "visual_tokens")
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_policy_spec(folder: str | Path) -> dict[str, Any]:
    """Read ``policy.json`` and resolve its relative paths against ``folder``."""
    folder = Path(folder)
    spec_path = folder / POLICY_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"{spec_path} not found: a model folder needs policy.json "
            "(build the default with `python -m rlaif_ray.models.tiny --out DIR`)"
        )
    spec = json.loads(spec_path.read_text())
    for key in ("lm", "vision", "image_size", "video_token", "prompt_template"):
        if key not in spec:
            raise ValueError(f"{spec_path}: missing key '{key}'")

    def resolve(p: str | None) -> str | None:
        if p is None:
            return None
        path = Path(p)
        return str(path if path.is_absolute() else (folder / path).resolve())

    spec["lm"] = resolve(spec["lm"])
    vision = dict(spec["vision"])
    vision["open_clip_config"] = resolve(vision.get("open_clip_config"))
    vision["pretrained"] = resolve(vision.get("pretrained"))
    spec["vision"] = vision
    return spec


def build_vision_encoder(vision: dict[str, Any]) -> nn.Module:
    """Create the open_clip visual tower from a local checkpoint (never a download)."""
    name = vision["open_clip_model"]
    if vision.get("open_clip_config"):
        open_clip.add_model_config(vision["open_clip_config"])
    pretrained = vision.get("pretrained")
    if pretrained and not Path(pretrained).is_file():
        raise FileNotFoundError(f"vision weights {pretrained} not found")
    clip = open_clip.create_model(name, pretrained=pretrained, load_weights=pretrained is not None)
    visual = clip.visual
    visual.output_tokens = True
    visual.requires_grad_(False)
    visual.eval()
    return visual


class Projector(nn.Module):
    """Two-layer MLP from the vision width to the LM's embedding width (LLaVA's mlp2x_gelu)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Samples:
    """G sampled answers for each of B prompts, flattened to B*G rows (prompt-major)."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    # Per prompt, the frozen encoder's output for its video [N, D] on the CPU (None: text-only).
    visual_features: list[torch.Tensor | None] | None = None
    # Per row, the answer's log-probs under the reference policy (None: not scored here).
    ref_logprobs: list[list[float]] | None = None


def spatio_temporal_pool(tokens: torch.Tensor) -> torch.Tensor:
    """VLM-RLAIF / Video-ChatGPT pooling of patch features.

    ``tokens``: [B, T, P, D] patch features of T frames. Returns [B, T + P, D]: the T temporal
    tokens ``mean_p tokens[:, t, p]`` followed by the P spatial tokens ``mean_t tokens[:, t, p]``.
    """
    return torch.cat([tokens.mean(dim=2), tokens.mean(dim=1)], dim=1)


def spatio_temporal_motion_pool(tokens: torch.Tensor) -> torch.Tensor:
    """:func:`spatio_temporal_pool` plus P motion tokens that keep where *and* when.

    ``tokens``: [B, T, P, D] patch features of T >= 2 frames. Returns [B, T + 2P, D]: the T temporal
    and P spatial tokens of :func:`spatio_temporal_pool`, then for each patch ``p`` the change of
    its feature from the first half of the clip to the second,
    ``mean_{t >= T/2} tokens[:, t, p] - mean_{t < T/2} tokens[:, t, p]`` (for odd T the middle frame
    is in neither half). Averaging over all frames smears a moving shape along its path and
    averaging over space loses its place, so neither says which way it moved; the motion tokens do:
    a shape moving right leaves a negative trace on the left patches and a positive one on the right.
    """
    t = tokens.shape[1]
    if t < 2:
        raise ValueError(f"motion tokens need at least 2 frames, got {t}")
    half = t // 2
    motion = tokens[:, t - half :].mean(dim=1) - tokens[:, :half].mean(dim=1)
    return torch.cat([spatio_temporal_pool(tokens), motion], dim=1)


def build_projector(in_dim: int, out_dim: int, seed: int, path: str | Path | None = None) -> Projector:
    """The projector: loaded from ``path`` when given, else freshly initialised from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        projector = Projector(in_dim, out_dim)
    if path is not None:
        projector.load_state_dict(load_file(str(path)))
    return projector


class VideoInputs(nn.Module):
    """What turns (frames, question) into language-model inputs, shared by the policy and the
    vLLM engine: the tokenizer and prompt template, and the frozen open_clip encoder with its
    preprocessing and spatio-temporal pooling.
    """

    def __init__(self, spec: dict[str, Any], cfg: ModelConfig) -> None:
        super().__init__()
        for key, value in spec.get("trained_with", {}).items():
            if getattr(cfg, key) != value:
                raise ValueError(
                    f"the checkpoint was trained with model.{key}={value}, but the config has "
                    f"model.{key}={getattr(cfg, key)}: pass model.{key}={value}, or train a new checkpoint"
                )
        self.spec = spec
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(spec["lm"])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(spec["video_token"])
        if self.video_token_id is None or self.video_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"tokenizer of {spec['lm']} has no token {spec['video_token']!r}")
        self.vision = build_vision_encoder(spec["vision"])
        self.image_size = int(spec["image_size"])
        self.register_buffer(
            "image_mean", torch.tensor(spec["image_mean"]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("image_std", torch.tensor(spec["image_std"]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VideoInputs:
        super().train(mode)
        self.vision.eval()  # frozen: never in training mode
        return self

    def vision_width(self) -> int:
        """Width of the visual tokens the encoder produces (what the projector takes)."""
        with torch.no_grad():
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            pooled, tokens = self.vision(dummy)
        return pooled.shape[-1] if self.cfg.visual_tokens == "pooled" else tokens.shape[-1]

    @property
    def device(self) -> torch.device:
        """Where the inputs go: the device of the frozen encoder's normalisation buffers."""
        return self.image_mean.device

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] -> normalised fp32 pixels [T, 3, S, S] at the encoder's size, on
        :attr:`device`."""
        x = torch.as_tensor(frames).to(self.device).permute(0, 3, 1, 2).float().div(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return (x - self.image_mean.float()) / self.image_std.float()

    def pixels(self, frames: list[np.ndarray | None]) -> torch.Tensor | None:
        """Preprocessed pixels [V, T, 3, S, S] of the ``frames`` that are not None (text-only
        examples have none), in order; None when every example is text-only."""
        videos = [self.preprocess(f) for f in frames if f is not None]
        return torch.stack(videos) if videos else None

    @torch.no_grad()
    def visual_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen encoder features: pixels [B, T, 3, S, S] -> [B, N, D] visual tokens (before the projector).

        The pixels are cast to the encoder's device and dtype (DeepSpeed casts the whole module to
        bf16 when ``model.dtype`` is bfloat16; the frames stay fp32 until here).
        """
        b, t = pixels.shape[:2]
        weight = next(self.vision.parameters())
        pooled, tokens = self.vision(pixels.flatten(0, 1).to(weight.device, weight.dtype))
        if self.cfg.visual_tokens == "patch":
            return spatio_temporal_pool(tokens.view(b, t, *tokens.shape[1:]))
        if self.cfg.visual_tokens == "motion":
            return spatio_temporal_motion_pool(tokens.view(b, t, *tokens.shape[1:]))
        return pooled.view(b, t, -1)

    def prompt_ids(self, question: str, video: bool = True) -> list[int]:
        """Token ids of the prompt built from the template: with exactly one video placeholder, or
        (``video=False``, a text-only question) with the placeholder taken out of the template."""
        template = self.spec["prompt_template"]
        if not video:
            template = template.replace(self.spec["video_token"], "").strip()
        ids = self.tokenizer(template.format(question=question), add_special_tokens=False)["input_ids"]
        if self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        ids = ids[-self.cfg.max_prompt_tokens :] if len(ids) > self.cfg.max_prompt_tokens else ids
        if ids.count(self.video_token_id) != int(video):
            raise ValueError(
                f"prompt for {question!r} must hold {'exactly one' if video else 'no'} "
                f"{self.spec['video_token']!r} token"
            )
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of a target answer, terminated by EOS."""
        return [
            *self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"],
            self.tokenizer.eos_token_id,
        ]

    def decode_answer(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class VideoLMPolicy(VideoInputs):
    """Frozen CLIP visual encoder, trainable projector, causal LM trained through LoRA.

    The reference policy for the KL penalty is this same network with the policy adapter swapped
    for the frozen ``reference`` adapter (the SFT adapter) when one is loaded, else with the
    adapter disabled: there is never a second copy of the language model.
    """

    # Whether trainable parameters hold tensors handed to load_trainable_state_dict(share=True).
    shares_weights = False

    def __init__(
        self,
        spec: dict[str, Any],
        cfg: ModelConfig,
        adapter_dir: str | Path | None = None,
        projector_path: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(spec, cfg)
        base = AutoModelForCausalLM.from_pretrained(spec["lm"], dtype=_DTYPES[cfg.dtype])
        hidden = base.get_input_embeddings().embedding_dim
        self.projector = build_projector(self.vision_width(), hidden, seed, projector_path)
        if adapter_dir is not None:
            self.lm = PeftModel.from_pretrained(
                base, str(adapter_dir), adapter_name=POLICY_ADAPTER, is_trainable=True
            )
        else:
            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_target_modules),
                task_type="CAUSAL_LM",
            )
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.lm = get_peft_model(base, lora, adapter_name=POLICY_ADAPTER)
        self.has_reference_adapter = False
        self.reference_projector: Projector | None = None
        self._lora_layer_cache: list[BaseTunerLayer] | None = None
        self._trainable_cache: dict[str, nn.Parameter] | None = None

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_folder(cls, folder: str | Path, cfg: ModelConfig, seed: int = 0) -> VideoLMPolicy:
        """Load a model folder: base spec plus, when present, ``adapter/`` and ``projector.safetensors``."""
        folder = Path(folder)
        adapter = folder / ADAPTER_DIR
        projector = folder / PROJECTOR_FILE
        return cls(
            read_policy_spec(folder),
            cfg,
            adapter_dir=adapter if (adapter / "adapter_config.json").is_file() else None,
            projector_path=projector if projector.is_file() else None,
            seed=seed,
        )

    def freeze_reference(self) -> None:
        """Make the current adapter and projector the frozen reference policy (call after SFT)."""
        with torch.no_grad():
            with tempfile.TemporaryDirectory() as tmp:
                self.lm.save_pretrained(tmp, selected_adapters=[POLICY_ADAPTER], save_embedding_layers=False)
                self.lm.load_adapter(tmp, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            self.lm.set_adapter(POLICY_ADAPTER)
            self.reference_projector = Projector(
                self.projector.net[0].in_features, self.projector.net[2].out_features
            )
            self.reference_projector.load_state_dict(self.projector.state_dict())
            self.reference_projector.requires_grad_(False)
        self.has_reference_adapter = True
        self._fix_requires_grad()

    def _fix_requires_grad(self) -> None:
        for name, param in self.lm.named_parameters():
            param.requires_grad = "lora_" in name and f".{POLICY_ADAPTER}." in name
        self.projector.requires_grad_(True)
        self.vision.requires_grad_(False)

    def save(self, folder: str | Path) -> Path:
        """Write ``policy.json`` (absolute base paths), ``adapter/`` and ``projector.safetensors``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec = {**self.spec, "trained_with": {key: getattr(self.cfg, key) for key in TRAINED_WITH_KEYS}}
        (folder / POLICY_FILE).write_text(json.dumps(spec, indent=2))
        # The adapter only, even when lm_head carries LoRA (peft would add the full base layer).
        self.lm.save_pretrained(
            str(folder / ADAPTER_DIR), selected_adapters=[POLICY_ADAPTER], save_embedding_layers=False
        )
        _flatten_default_adapter_dir(folder / ADAPTER_DIR)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()},
            str(folder / PROJECTOR_FILE),
        )
        return folder

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that RL changes (policy LoRA + projector) by name: the live parameters,
        detached, not copied."""
        return {name: param.detach() for name, param in self._trainable_parameters().items()}

    def _trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters :meth:`trainable_tensors` names, found once: walking every parameter
        of the LM by name on each weight version showed in a small rollout actor's profile."""
        if self._trainable_cache is None:
            found = {f"projector.{k}": v for k, v in self.projector.named_parameters()}
            for name, param in self.lm.named_parameters():
                if "lora_" in name and f".{POLICY_ADAPTER}." in name:
                    found[f"lm.{name}"] = param
            self._trainable_cache = found
        return self._trainable_cache

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """:meth:`trainable_tensors` copied to the CPU (one copy each)."""
        return {
            k: v.clone() if v.device.type == "cpu" else v.cpu() for k, v in self.trainable_tensors().items()
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], share: bool = False) -> None:
        """Load tensors named as :meth:`trainable_tensors` names them into the parameters (the names
        must match exactly; ``state`` is never written). By default each is copied into its
        parameter. With ``share``, a CPU parameter takes the given tensor itself as its data when
        their dtype and shape match (no copy: the parameter then keeps that memory, which must not
        change while served, e.g. a read-only view of Ray's object store), else a converted copy of
        it; a parameter elsewhere (a GPU) is copied into as by default. A parameter that has taken
        a tensor is never written in place afterwards: a later load without ``share`` gives it a
        copy of its own."""
        params = self._trainable_parameters()
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise KeyError(
                f"weight update does not match the policy: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        with torch.no_grad():
            for key, value in state.items():
                param = params[key]
                if value.shape != param.shape:
                    raise ValueError(
                        f"weight update: {key} has shape {tuple(value.shape)}, the policy's {tuple(param.shape)}"
                    )
                if share and param.device.type == "cpu":
                    param.data = value.to(param.dtype)  # value itself when the dtype matches
                elif self.shares_weights:
                    param.data = value.to(param.device, param.dtype, copy=True)
                else:
                    param.copy_(value)
        self.shares_weights = share

    def encode_video(
        self, pixels: torch.Tensor | None, reference: bool = False, features: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """pixels [B, T, 3, S, S] (or their ``features`` [B, N, D] from :meth:`visual_features`)
        -> projected visual embeddings [B, N, H] in the LM's dtype; None when there are neither
        (a batch of text-only prompts)."""
        if pixels is None and features is None:
            return None
        projector = (
            self.reference_projector
            if (reference and self.reference_projector is not None)
            else self.projector
        )
        feats = self.visual_features(pixels) if features is None else features
        dtype = self.lm.get_input_embeddings().weight.dtype
        return projector(feats.to(projector.net[0].weight.dtype)).to(dtype)

    def _splice(
        self,
        visual: torch.Tensor | None,
        prompts: list[list[int]],
        answers: list[list[int]] | None,
        pad_left: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Embed prompt (+ answer) ids with the visual tokens at the placeholder; pad to one length.

        ``visual`` holds one row of visual tokens per prompt *with* a placeholder, in order (text-only
        prompts take none). Returns inputs_embeds [B, L, H], attention_mask [B, L] and, per row, the
        index of the first answer position (the prompt's length after splicing, excluding padding).
        """
        device = self.device
        # Every token id of the batch goes through the embedding in one call: the modules a pass
        # runs, and how often, never depend on the rows. Under ZeRO-3 each module call is a
        # parameter fetch that every rank must make in step (and whose order ZeRO-3 traces and
        # prefetches), so a call per row would let ranks holding different numbers of rows diverge.
        pieces: list[list[int]] = []
        for i, ids in enumerate(prompts):
            if self.video_token_id in ids:
                cut = ids.index(self.video_token_id)
                pieces += [ids[:cut], ids[cut + 1 :]]
            else:
                pieces.append(ids)
            if answers is not None:
                pieces.append(answers[i])
        flat = torch.tensor([t for piece in pieces for t in piece], dtype=torch.long, device=device)
        embedded = iter(self.lm.get_input_embeddings()(flat).split([len(piece) for piece in pieces]))
        rows, prompt_lens = [], []
        videos = iter(visual if visual is not None else [])
        for ids in prompts:
            if self.video_token_id in ids:
                parts = [next(embedded), next(videos), next(embedded)]
            else:
                parts = [next(embedded)]
            prompt_lens.append(sum(part.shape[0] for part in parts))
            if answers is not None:
                parts.append(next(embedded))
            rows.append(torch.cat(parts, dim=0))
        length = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        embeds = rows[0].new_zeros(len(rows), length, hidden)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            n = row.shape[0]
            if pad_left:
                embeds[i, length - n :], mask[i, length - n :] = row, 1
            else:
                embeds[i, :n], mask[i, :n] = row, 1
        if next(videos, None) is not None:
            # Visual rows that no prompt takes (a learner's blank stand-in for a share without a
            # video) join the graph with weight zero: the projector's backward, and under ZeRO-3
            # its gradient collectives, then run on every rank alike.
            embeds = embeds + 0.0 * visual.sum()
        return embeds, mask, prompt_lens

    # ----------------------------------------------------------------- scoring and sampling
    def answer_logprobs(
        self,
        pixels: torch.Tensor | None,
        prompts: list[list[int]],
        answers: list[list[int]],
        temperature: float = 1.0,
        reference: bool = False,
        with_entropy: bool = False,
        features: torch.Tensor | None = None,
        group_sizes: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probabilities of given answers under softmax(logits / temperature).

        Returns (logprobs [B, A], mask [B, A], entropy [B, A] or None), A = longest answer; rows
        are right-padded and ``mask`` marks real answer tokens. With ``reference=True`` the
        reference policy scores them (no gradient). ``features`` (the frozen encoder's output,
        :meth:`visual_features`) replace ``pixels`` when a caller encodes each video only once.
        ``pixels``/``features`` hold one entry per prompt with a video placeholder, in order
        (both None for a batch of text-only prompts).

        ``group_sizes`` (the shared prefix): ``prompts`` (and their pixels or features) are one per
        group, and group ``k``'s ``group_sizes[k]`` answers follow one another in ``answers``. Each
        prompt then runs through the LM once and its answers on its keys and values
        (:meth:`_shared_prefix_logits`): the same log-probs and gradients as giving every answer
        its own copy of the prompt (``group_sizes=None``), with the prompt's work done once.
        """
        ctx = self.reference_mode() if reference else contextlib.nullcontext()
        with ctx, torch.no_grad() if reference else contextlib.nullcontext():
            visual = self.encode_video(pixels, reference=reference, features=features)
            if group_sizes is None:
                picked = self._full_sequence_logits(visual, prompts, answers)
            else:
                picked = self._shared_prefix_logits(visual, prompts, answers, group_sizes)
        ans_mask = torch.zeros(len(answers), picked.shape[1])
        targets = torch.zeros(len(answers), picked.shape[1], dtype=torch.long)
        for i, ans in enumerate(answers):
            ans_mask[i, : len(ans)] = 1.0
            targets[i, : len(ans)] = torch.tensor(ans, dtype=torch.long)
        ans_mask, targets = ans_mask.to(picked.device), targets.to(picked.device)
        logp_all = torch.log_softmax(picked.float() / temperature, dim=-1)
        logprobs = torch.gather(logp_all, 2, targets.unsqueeze(-1)).squeeze(-1) * ans_mask
        entropy = None
        if with_entropy:
            entropy = -(logp_all.exp() * logp_all).sum(-1) * ans_mask
        return logprobs, ans_mask, entropy

    def _full_sequence_logits(
        self, visual: torch.Tensor | None, prompts: list[list[int]], answers: list[list[int]]
    ) -> torch.Tensor:
        """Logits [B, A, V] that predict each answer's tokens, every row its own prompt + answer
        sequence through the LM."""
        embeds, mask, prompt_lens = self._splice(visual, prompts, answers, pad_left=False)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        a_len = max(len(a) for a in answers)
        # Row i's answer token j is predicted at position prompt_lens[i] - 1 + j.
        index = torch.tensor(prompt_lens).unsqueeze(1) - 1 + torch.arange(a_len).unsqueeze(0)
        index = index.clamp(max=logits.shape[1] - 1).to(logits.device)
        return torch.gather(logits, 1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def _shared_prefix_logits(
        self,
        visual: torch.Tensor | None,
        prompts: list[list[int]],
        answers: list[list[int]],
        group_sizes: list[int],
    ) -> torch.Tensor:
        """Logits [B, A, V] that predict each answer's tokens, each group's prompt run once.

        Two LM passes: the P prompts (right-padded, keeping the keys and values of every layer and
        the logits at each prompt's last position, which predict the first answer token); then the
        B answers, each on a copy of its group's keys and values (``repeat_interleave``: copies in
        the autograd graph, so every answer's gradient reaches the prompt's LoRA activations as in
        the full-sequence pass), at positions that continue its prompt. The prompt's LM work falls
        from B to P rows; the answers' attention still reads the whole prompt.
        """
        if len(group_sizes) != len(prompts) or sum(group_sizes) != len(answers):
            raise ValueError(
                f"group_sizes {group_sizes} must give one size per prompt ({len(prompts)}) and add "
                f"up to the answers ({len(answers)})"
            )
        device = self.device
        embeds, mask, prompt_lens = self._splice(visual, prompts, None, pad_left=False)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        last = torch.tensor(prompt_lens, device=device) - 1
        keep = torch.unique(last)  # the logits of these positions only (logits_to_keep)
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
        )
        sizes = torch.tensor(group_sizes, device=device)
        first = out.logits[torch.arange(len(prompts), device=device), torch.searchsorted(keep, last)]
        first = first.repeat_interleave(sizes, dim=0).unsqueeze(1)  # [B, 1, V]
        a_len = max(len(a) for a in answers)
        if a_len == 1:
            return first
        # The answers' tokens but the last of each: token j predicts token j + 1.
        inputs = [a[: a_len - 1] for a in answers]
        flat = torch.tensor([t for ids in inputs for t in ids], dtype=torch.long, device=device)
        embedded = self.lm.get_input_embeddings()(flat).split([len(ids) for ids in inputs])
        answer_embeds = embeds.new_zeros(len(answers), a_len - 1, embeds.shape[-1])
        answer_mask = torch.zeros(len(answers), a_len - 1, dtype=torch.long, device=device)
        for i, row in enumerate(embedded):
            answer_embeds[i, : row.shape[0]], answer_mask[i, : row.shape[0]] = row, 1
        cache = repeat_cache(out.past_key_values, sizes)
        answer_positions = torch.tensor(prompt_lens, device=device).repeat_interleave(sizes).unsqueeze(1)
        answer_positions = answer_positions + torch.arange(a_len - 1, device=device).unsqueeze(0)
        logits = self.lm(
            inputs_embeds=answer_embeds,
            attention_mask=torch.cat([mask.repeat_interleave(sizes, dim=0), answer_mask], dim=1),
            position_ids=answer_positions,
            past_key_values=cache,
            use_cache=True,
        ).logits
        return torch.cat([first, logits], dim=1)

    def forward(
        self,
        pixels: torch.Tensor | None,
        prompts: list[list[int]],
        answers: list[list[int]],
        temperature: float = 1.0,
        with_entropy: bool = False,
        features: torch.Tensor | None = None,
        group_sizes: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training forward (what a DeepSpeed engine calls): :meth:`answer_logprobs` of the policy."""
        return self.answer_logprobs(
            pixels,
            prompts,
            answers,
            temperature=temperature,
            with_entropy=with_entropy,
            features=features,
            group_sizes=group_sizes,
        )

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[None]:
        """Run the LM as the reference policy: the frozen reference adapter, else no adapter.

        Switched on the LoRA layers themselves, found once: peft's model-level switches walk every
        module of the LM on each call (12% of a learner step on the text-only benchmark task).
        """
        layers = self._lora_layers()
        if self.has_reference_adapter:
            for layer in layers:
                layer.set_adapter(REFERENCE_ADAPTER)
            try:
                yield
            finally:
                for layer in layers:
                    layer.set_adapter(POLICY_ADAPTER)
                self._fix_requires_grad()
        else:
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in layers:
                    layer.enable_adapters(True)

    def _lora_layers(self) -> list[BaseTunerLayer]:
        if self._lora_layer_cache is None:
            self._lora_layer_cache = [m for m in self.lm.modules() if isinstance(m, BaseTunerLayer)]
        return self._lora_layer_cache

    @torch.no_grad()
    def sample(
        self,
        pixels: torch.Tensor | None,
        prompts: list[list[int]],
        group_size: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        greedy: bool = False,
        features: torch.Tensor | None = None,
    ) -> Samples:
        """Sample ``group_size`` answers per prompt; log-probs are under softmax(logits / temperature).

        ``pixels`` (or their ``features``, :meth:`visual_features`) hold the videos of the prompts
        that have a placeholder, in order (None: none has).
        """
        visual = self.encode_video(pixels, features=features)
        embeds, mask, _ = self._splice(visual, prompts, None, pad_left=True)
        # Each prompt is prefilled once; its answers then sample from copies of its keys and values.
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
        )
        cache = repeat_cache(out.past_key_values, group_size)
        mask = mask.repeat_interleave(group_size, dim=0)
        logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)
        next_position = mask.sum(-1, keepdim=True)
        eos = self.tokenizer.eos_token_id
        embed = self.lm.get_input_embeddings()
        finished = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        tokens, token_logps = [], []
        # A plain decoding loop rather than ``generate``, whose set-up per call weighs on short
        # answers from a small model (docs/BENCHMARKS.md, the throughput against TRL).
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)
            token = logp.argmax(-1) if greedy else nucleus_sample(logp, top_p)
            tokens.append(token)
            token_logps.append(logp.gather(1, token.unsqueeze(1)).squeeze(1))
            finished |= token == eos
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            out = self.lm(
                inputs_embeds=embed(token).unsqueeze(1),
                attention_mask=mask,
                position_ids=next_position + step,
                past_key_values=cache,
                use_cache=True,
            )
            logits, cache = out.logits[:, -1], out.past_key_values
        tokens, token_logp = torch.stack(tokens, dim=1), torch.stack(token_logps, dim=1)
        ids_out, logp_out, texts = [], [], []
        for row, row_logp in zip(tokens.tolist(), token_logp.tolist(), strict=True):
            n = row.index(eos) + 1 if eos in row else len(row)
            ids_out.append(row[:n])
            logp_out.append(row_logp[:n])
            texts.append(self.decode_answer(row[:n]))
        return Samples(token_ids=ids_out, logprobs=logp_out, texts=texts)

    def sample_frames(
        self,
        frames: list[np.ndarray | None],
        questions: list[str],
        group_size: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        greedy: bool = False,
        score_reference: bool = False,
    ) -> Samples:
        """:meth:`sample` from decoded uint8 frames (None for a text-only question) and question
        texts; the samples carry each prompt's frozen-encoder features. With ``score_reference``
        they also carry each answer's log-probs under the reference policy (:meth:`answer_logprobs`
        with ``reference=True``, each prompt run once for its group), which a learner then needs
        not compute."""
        pixels = self.pixels(frames)
        features = None if pixels is None else self.visual_features(pixels)
        prompts = [self.prompt_ids(q, video=f is not None) for f, q in zip(frames, questions, strict=True)]
        samples = self.sample(
            None, prompts, group_size, temperature, top_p, max_new_tokens, greedy=greedy, features=features
        )
        samples.visual_features = per_prompt(frames, features)
        if score_reference:
            ref, _, _ = self.answer_logprobs(
                None,
                prompts,
                samples.token_ids,
                temperature=temperature,
                reference=True,
                features=features,
                group_sizes=[group_size] * len(prompts),
            )
            samples.ref_logprobs = [
                row[: len(ids)] for row, ids in zip(ref.tolist(), samples.token_ids, strict=True)
            ]
        return samples


def nucleus_sample(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """One token per row of log-probs ``logp`` [B, V], drawn from the smallest set of most likely
    tokens whose probability reaches ``top_p`` (all tokens at 1.0), renormalised."""
    probs = logp.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1).squeeze(1)


def repeat_cache(cache: DynamicCache, repeats: int | torch.Tensor) -> DynamicCache:
    """A cache whose row ``i`` is repeated ``repeats`` (or ``repeats[i]``) times, every layer's keys
    and values copied inside the autograd graph (gradients flow back to the original rows)."""
    return DynamicCache(
        [
            (layer.keys.repeat_interleave(repeats, dim=0), layer.values.repeat_interleave(repeats, dim=0))
            for layer in cache.layers
        ]
    )


def per_prompt(frames: list[Any], features: torch.Tensor | None) -> list[torch.Tensor | None]:
    """``features`` [V, N, D] of the prompts that have a video, one CPU tensor per prompt in the
    order of ``frames`` (None where a prompt's frames are None: text-only). Each is a copy, not a
    view: pickled alone (a group sent to the learner), a view would carry the whole batch."""
    rows = iter([] if features is None else [row.clone() for row in features.detach().cpu().unbind(0)])
    return [None if f is None else next(rows) for f in frames]


def _flatten_default_adapter_dir(adapter_dir: Path) -> None:
    """peft writes non-default adapter names into subfolders; keep ``adapter/`` loadable directly."""
    nested = adapter_dir / POLICY_ADAPTER
    if nested.is_dir():
        for f in nested.iterdir():
            f.replace(adapter_dir / f.name)
        nested.rmdir()
