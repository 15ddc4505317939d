"""Ranker backends: the oracles that order a group of candidate answers, registered by name.

Every backend answers ``rank(prompt, candidates) -> ordering`` (tiers best first, see
:mod:`rlaif_ray.ranker.prompting`), where the :class:`RankPrompt` is the group's whole prompt: the
question, its type, the reference when there is one, and the video (its path, and its frames
decoded by the ranker when the backend declares ``needs_video``). Backends are built from the
config with :func:`make_backend`:

* ``ground_truth``: compares each answer with the reference answer (the synthetic task's oracle);
* ``video_judge``: a video-language model in this project's policy format that looks at the video
  (:mod:`rlaif_ray.ranker.video_judge`);
* ``judge``: a local causal language model prompted listwise (transformers, CPU);
* ``openai``: any OpenAI-compatible chat-completions endpoint.

Backends may raise (invalid answer, transport error); :class:`rlaif_ray.ranker.worker.RankerWorker`
counts that as a failed attempt, retries and falls back. A backend's ``concurrency`` says how many
groups the worker may rank at once with it (threads calling ``rank``).
"""

from __future__ import annotations

import abc
import base64
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import torch

from rlaif_ray.answers import normalize_answer, part_accuracy, token_f1
from rlaif_ray.config import RankerConfig
from rlaif_ray.ranker.prompting import (
    Ordering,
    build_ranking_prompt,
    parse_ordering,
    structured_output_constraint,
)
from rlaif_ray.registry import RANKER_BACKENDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankPrompt:
    """What a backend is shown of a group's prompt.

    ``video`` is the path the data names (None: a text-only question); ``frames`` are its frames,
    uint8 ``[T, H, W, 3]`` sampled as the policy samples them (``model.num_frames``), decoded by
    the ranker only for a backend that ``needs_video``. ``reference`` is None for a prompt nobody
    labelled.
    """

    question: str
    reference: str | None = None
    question_type: str | None = None
    video: str | None = None
    frames: np.ndarray | None = None


class NoReference(ValueError):
    """A backend that ranks against the reference was given a group that has none."""


class RankerBackend(abc.ABC):
    """The interface every backend implements; ``name`` is set by :func:`register_backend`.

    ``concurrency``: how many threads may call :meth:`rank` at once (1 unless a backend can
    overlap calls). ``transport_retries``: requests the backend itself retried (0 if it never does).
    ``prompt_tokens`` / ``completion_tokens``: tokens a server reported for this backend's requests
    (0 for backends that run no server).
    ``needs_video``: the ranker decodes each group's video for :attr:`RankPrompt.frames`.
    ``needs_reference``: the backend cannot rank a group without a reference answer.
    """

    name: str = ""
    concurrency: int = 1
    transport_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    needs_video: bool = False
    needs_reference: bool = False

    @classmethod
    def concurrency_for(cls, cfg: RankerConfig) -> int:
        """How many groups one backend built from ``cfg`` ranks at once (its ``concurrency``),
        known before it is built: the ranker pool sizes its calls by it."""
        return 1

    @abc.abstractmethod
    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        """Order ``candidates`` best first (ties allowed); raise when no ordering can be given."""

    def scores(self, prompt: RankPrompt, candidates: list[str]) -> list[float] | None:
        """Per-candidate scalar scores (higher is better), or None for backends that only rank."""
        return None


def register_backend(name: str) -> Callable[[type[RankerBackend]], type[RankerBackend]]:
    """Class decorator: make a backend buildable as ``ranker.backend: <name>`` (in
    :data:`rlaif_ray.registry.RANKER_BACKENDS`)."""

    def decorator(cls: type[RankerBackend]) -> type[RankerBackend]:
        cls.name = name
        return RANKER_BACKENDS.register(name)(cls)

    return decorator


def backend_class(name: str) -> type[RankerBackend]:
    """The backend registered as ``name`` (ValueError naming the registered ones when none is)."""
    return RANKER_BACKENDS.get(name)


def make_backend(cfg: RankerConfig) -> RankerBackend:
    """Build the backend named by ``cfg.backend``."""
    return backend_class(cfg.backend)(cfg)


# --------------------------------------------------------------------------- ground truth


@register_backend("ground_truth")
class GroundTruthRanker(RankerBackend):
    """Orders answers against the reference: more parts right first (:func:`part_accuracy`: a
    correct answer, the reference's words in any order, has them all), then closer (token F1),
    then shorter.

    For a one-word reference this is: correct first, then the wrong answers by closeness, then by
    concision. An empty answer is the worst of all: were concision to reward it, the policy would
    learn to say nothing. Answers with equal keys (same parts right, closeness and word count; in
    particular the same normalised text) tie. ``scores`` are binary correctness, or the part
    accuracy itself with ``ranker.score=parts`` (a graded scalar reward).
    """

    needs_reference = True

    def __init__(self, cfg: RankerConfig | None = None) -> None:
        self.score = cfg.score if cfg is not None else "binary"
        if self.score not in ("binary", "parts"):
            raise ValueError(f"ranker.score must be 'binary' or 'parts', got {self.score!r}")

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        if prompt.reference is None:
            raise NoReference(
                "the ground_truth ranker needs a reference answer and this prompt has none: rank "
                "prompts nobody labelled with a judge that looks at the video (ranker.backend=video_judge)"
            )
        ref = normalize_answer(prompt.reference)
        keys = []
        for candidate in candidates:
            norm = normalize_answer(candidate)
            keys.append((-part_accuracy(norm, ref), not norm, -token_f1(norm, ref), len(norm.split())))
        ordering: Ordering = []
        for key in sorted(set(keys)):
            tier = [i for i, k in enumerate(keys) if k == key]
            ordering.append(tier[0] if len(tier) == 1 else tier)
        return ordering

    def scores(self, prompt: RankPrompt, candidates: list[str]) -> list[float] | None:
        """Per answer: 1.0 when correct (:func:`is_correct`) else 0.0; with ``score="parts"``, its
        :func:`part_accuracy`. None without a reference."""
        if prompt.reference is None:
            return None
        ref = normalize_answer(prompt.reference)
        parts = [part_accuracy(normalize_answer(candidate), ref) for candidate in candidates]
        return parts if self.score == "parts" else [float(p == 1.0) for p in parts]


# --------------------------------------------------------------------------- local judge


@register_backend("judge")
class JudgeRanker(RankerBackend):
    """A local causal LM (``cfg.judge_model_path``) prompted listwise, decoded greedily on the CPU.

    transformers is imported here, not at module import, so that other backends do not pay for it.
    """

    def __init__(self, cfg: RankerConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not cfg.judge_model_path:
            raise ValueError("ranker.judge_model_path must name a local model folder for the judge backend")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.judge_model_path)
        self.model = AutoModelForCausalLM.from_pretrained(cfg.judge_model_path)
        self.model.eval()
        self.max_new_tokens = cfg.judge_max_new_tokens

    def generate(self, prompt: str) -> str:
        """The judge's greedy continuation of ``prompt`` (chat template applied when it has one)."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            inputs = self.tokenizer(prompt, return_tensors="pt")
        pad_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True)

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        answer = self.generate(build_ranking_prompt(prompt.question, prompt.reference, candidates))
        return parse_ordering(answer, len(candidates))


# --------------------------------------------------------------------------- OpenAI-compatible API

_RETRY_STATUS = {408, 429}
_NO_KEY = "EMPTY"  # what local servers (vLLM) accept when they were started without a key


def read_api_key(cfg: RankerConfig) -> str:
    """The API key: the first line of ``cfg.openai_api_key_file`` when set, else the environment
    variable ``cfg.openai_api_key_env``, else ``"EMPTY"`` (local servers). Errors name the file or
    the variable, never the key."""
    if cfg.openai_api_key_file:
        path = Path(cfg.openai_api_key_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ValueError(
                f"ranker.openai_api_key_file: cannot read {path}: {exc.strerror or type(exc).__name__}"
            ) from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ValueError(f"ranker.openai_api_key_file: {path} is empty (its first line must be the key)")
        return key
    key = os.environ.get(cfg.openai_api_key_env, "").strip()
    if not key:
        log.warning(
            "openai ranker: environment variable %s is not set and ranker.openai_api_key_file is not "
            "given: sending no API key (fine for a local server started without one)",
            cfg.openai_api_key_env,
        )
        return _NO_KEY
    return key


def redact(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``."""
    return text.replace(secret, "***") if secret and secret != _NO_KEY else text


def _clean(exc: openai.APIError, secret: str) -> openai.APIError:
    """``exc`` made fit to log (in place): a transport error's message gains its cause ("Connection
    error." says too little), and ``secret`` is removed from its message, arguments and body (a
    server or proxy may echo the key it was sent; the worker logs and counts the exception)."""
    cause = exc.__cause__
    if isinstance(exc, openai.APIConnectionError) and cause is not None and str(cause) not in exc.message:
        exc.message = f"{exc.message} ({type(cause).__name__}: {cause})"
        exc.args = (exc.message, *exc.args[1:])
    exc.message = redact(exc.message, secret)
    exc.args = tuple(redact(a, secret) if isinstance(a, str) else a for a in exc.args)
    if exc.body is not None and redact(str(exc.body), secret) != str(exc.body):
        exc.body = redact(str(exc.body), secret)
    return exc


def _is_transient(exc: Exception) -> bool:
    """Transport errors, timeouts, 408, 429 and 5xx are worth another try; other errors are not."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(exc, openai.APIStatusError) and (
        exc.status_code in _RETRY_STATUS or exc.status_code >= 500
    )


@register_backend("openai")
class OpenAIRanker(RankerBackend):
    """Any OpenAI-compatible chat-completions endpoint, prompted listwise and parsed strictly.

    The API key comes from :func:`read_api_key` (a file or an environment variable) and is scrubbed
    from every error this backend raises or logs. Transient failures are retried here with
    exponential back-off (``cfg.openai_backoff_s * 2**k``, at most ``cfg.openai_max_retries`` times;
    the client's own retries are off). An answer that is no valid ordering is the worker's to retry
    (``cfg.max_retries``). At most ``cfg.openai_max_concurrency`` requests are in flight per
    backend (``concurrency``: the worker ranks that many groups at once).

    With ``cfg.openai_structured_output`` each request carries vLLM's ``structured_outputs`` field
    (:func:`rlaif_ray.ranker.prompting.structured_output_constraint`), so the server can only
    decode an ordering line of the group's size (servers other than vLLM may reject the field).
    """

    @classmethod
    def concurrency_for(cls, cfg: RankerConfig) -> int:
        return cfg.openai_max_concurrency

    def __init__(self, cfg: RankerConfig) -> None:
        self.model = cfg.openai_model
        self.temperature = cfg.openai_temperature
        self.max_retries = cfg.openai_max_retries
        self.backoff_s = cfg.openai_backoff_s
        self.concurrency = self.concurrency_for(cfg)
        self.structured_output = cfg.openai_structured_output
        self.frames = cfg.openai_frames
        self.needs_video = cfg.openai_frames > 0
        self._api_key = read_api_key(cfg)
        self.client = openai.OpenAI(
            api_key=self._api_key,
            base_url=cfg.openai_base_url,
            timeout=cfg.openai_timeout_s,
            max_retries=0,
        )
        self._slots = threading.BoundedSemaphore(cfg.openai_max_concurrency)
        self._lock = threading.Lock()
        self.transport_retries = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def complete(self, prompt: str | list[dict], structured_outputs: dict | None = None) -> str:
        """The assistant's reply to ``prompt`` (a text, or a list of content parts), retrying
        transient failures with back-off.

        ``structured_outputs``, when given, is sent as the request's ``structured_outputs`` field.
        """
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
        }
        if structured_outputs is not None:
            body["structured_outputs"] = structured_outputs
        attempt = 0
        while True:
            try:
                # The client's plain POST: its errors, auth and timeouts, without the typed
                # request's validation and response models (about a third of its CPU per
                # request: a ranker actor's cores are shared by several actors and their threads).
                with self._slots:
                    reply = self.client.post("/chat/completions", body=body, cast_to=object)
                if not isinstance(reply, dict):
                    raise ValueError(
                        f"{self.client.base_url} answered with no JSON object: {str(reply)[:200]!r}"
                    )
                usage = reply.get("usage")
                if usage:  # the images sent count among the prompt tokens
                    with self._lock:
                        self.prompt_tokens += usage.get("prompt_tokens", 0)
                        self.completion_tokens += usage.get("completion_tokens", 0)
                return reply["choices"][0]["message"]["content"] or ""
            except openai.APIError as exc:
                _clean(exc, self._api_key)
                if attempt >= self.max_retries or not _is_transient(exc):
                    raise
                delay = self.backoff_s * 2**attempt
                log.warning(
                    "openai ranker: request to %s failed (%s: %s); retry %d/%d in %.2fs",
                    self.client.base_url,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                with self._lock:
                    self.transport_retries += 1
                time.sleep(delay)
                attempt += 1

    def content(self, text: str, frames: np.ndarray | None) -> str | list[dict]:
        """The user message: ``text`` alone, or ``self.frames`` frames evenly spaced among ``frames``
        as base64 PNG images followed by ``text``."""
        if frames is None or not self.frames:
            return text
        from PIL import Image

        picked = np.linspace(0, len(frames) - 1, min(self.frames, len(frames))).round().astype(int)
        parts: list[dict] = []
        for index in picked:
            buffer = io.BytesIO()
            Image.fromarray(frames[index]).save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return [*parts, {"type": "text", "text": text}]

    def rank(self, prompt: RankPrompt, candidates: list[str]) -> Ordering:
        constraint = structured_output_constraint(len(candidates)) if self.structured_output else None
        text = build_ranking_prompt(prompt.question, prompt.reference, candidates)
        answer = self.complete(self.content(text, prompt.frames), constraint)
        return parse_ordering(answer, len(candidates))
