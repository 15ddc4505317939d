"""The video-language policy on the tiny model: visual tokens, prompts, sampling vs scoring, the
reference policy, which tensors train, and saving/loading/moving the trainable weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlaif_ray.config import ModelConfig, load_config
from rlaif_ray.evaluate import main as evaluate_main
from rlaif_ray.models.policy import (
    ADAPTER_DIR,
    POLICY_ADAPTER,
    POLICY_FILE,
    PROJECTOR_FILE,
    REFERENCE_ADAPTER,
    VideoLMPolicy,
    nucleus_sample,
    spatio_temporal_motion_pool,
    spatio_temporal_pool,
)

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
NUM_FRAMES = 4
# The tiny ViT: 64x64 images, 16x16 patches -> 16 patch tokens per frame.
NUM_PATCHES = 16
QUESTIONS = [
    "what colour is the circle ?",
    "how many shapes are there ?",
    "which direction do the squares move ?",
]


@pytest.fixture(scope="module")
def model_cfg() -> ModelConfig:
    """The default config's model section (LoRA r=16 on every linear layer and lm_head)."""
    return load_config(DEFAULT).model


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path, model_cfg: ModelConfig) -> VideoLMPolicy:
    """A shared policy that tests must not modify (build a fresh one to modify)."""
    return VideoLMPolicy.from_folder(tiny_model_dir, model_cfg).eval()


@pytest.fixture
def fresh(tiny_model_dir: Path, model_cfg: ModelConfig):
    """Build a new policy (for tests that change weights)."""

    def build(seed: int = 0, **overrides) -> VideoLMPolicy:
        cfg = dataclasses.replace(model_cfg, **overrides)
        return VideoLMPolicy.from_folder(tiny_model_dir, cfg, seed=seed).eval()

    return build


def random_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(NUM_FRAMES, 48, 48, 3), dtype=np.uint8) for _ in range(n)]


def batch(policy: VideoLMPolicy) -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
    """Pixels, prompts and answers of three examples; answers of different lengths."""
    pixels = torch.stack([policy.preprocess(f) for f in random_frames(len(QUESTIONS))])
    prompts = [policy.prompt_ids(q) for q in QUESTIONS]
    answers = [policy.answer_ids("red"), policy.answer_ids("two three one"), policy.answer_ids("left up")]
    return pixels, prompts, answers


def logprobs(policy: VideoLMPolicy, reference: bool = False) -> torch.Tensor:
    pixels, prompts, answers = batch(policy)
    with torch.no_grad():
        lp, _, _ = policy.answer_logprobs(pixels, prompts, answers, reference=reference)
    return lp


def perturb(policy: VideoLMPolicy, seed: int, scale: float = 0.05) -> None:
    """Move the policy adapter's LoRA weights (B included, so the adapter matters) and the projector.

    The scale keeps the weight deltas comparable to the base weights, as after training; much larger
    adapters blow up activations and with them float32 round-off.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.lm.named_parameters():
            if "lora_" in name and f".{POLICY_ADAPTER}." in name:
                param.add_(scale * torch.randn(param.shape, generator=gen))
        for param in policy.projector.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def assert_trainable_is_policy_lora_and_projector(policy: VideoLMPolicy) -> None:
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for name in trainable:
        is_policy_lora = name.startswith("lm.") and "lora_" in name and f".{POLICY_ADAPTER}." in name
        assert is_policy_lora or name.startswith("projector."), name
    assert {n for n, _ in policy.projector.named_parameters()} == {
        n[len("projector.") :] for n in trainable if n.startswith("projector.")
    }
    policy_lora = [n for n, _ in policy.lm.named_parameters() if "lora_" in n and f".{POLICY_ADAPTER}." in n]
    assert policy_lora and all(f"lm.{n}" in trainable for n in policy_lora)
    assert not any(p.requires_grad for p in policy.vision.parameters())
    if policy.reference_projector is not None:
        assert not any(p.requires_grad for p in policy.reference_projector.parameters())


# --------------------------------------------------------------------------- visual tokens and prompts
def test_spatio_temporal_pool_on_a_hand_tensor():
    # [B=1, T=2, P=3, D=1]
    tokens = torch.tensor([[[[1.0], [2.0], [3.0]], [[5.0], [7.0], [9.0]]]])
    pooled = spatio_temporal_pool(tokens)
    assert pooled.shape == (1, 2 + 3, 1)
    temporal = [2.0, 7.0]  # mean over patches of each frame
    spatial = [3.0, 4.5, 6.0]  # mean over frames of each patch
    assert pooled[0, :, 0].tolist() == temporal + spatial


def test_spatio_temporal_pool_batches_independently():
    tokens = torch.randn(3, 5, 4, 2, generator=torch.Generator().manual_seed(0))
    pooled = spatio_temporal_pool(tokens)
    assert pooled.shape == (3, 5 + 4, 2)
    for b in range(3):
        torch.testing.assert_close(pooled[b : b + 1], spatio_temporal_pool(tokens[b : b + 1]))
    torch.testing.assert_close(pooled[1, 2], tokens[1, 2].mean(dim=0))
    torch.testing.assert_close(pooled[2, 5 + 3], tokens[2, :, 3].mean(dim=0))


def test_motion_pool_on_a_hand_tensor():
    # [B=1, T=3, P=2, D=1]: a "shape" (value 1) on patch 0 in frame 0, on patch 1 in frame 2.
    tokens = torch.tensor([[[[1.0], [0.0]], [[0.5], [0.5]], [[0.0], [1.0]]]])
    pooled = spatio_temporal_motion_pool(tokens)
    assert pooled.shape == (1, 3 + 2 + 2, 1)
    torch.testing.assert_close(pooled[:, :5], spatio_temporal_pool(tokens))
    # Second half (frame 2) minus first half (frame 0; the middle frame is in neither): it left
    # patch 0 and reached patch 1. Its mirror image (moving the other way) flips the sign.
    assert pooled[0, 5:, 0].tolist() == [-1.0, 1.0]
    assert spatio_temporal_motion_pool(tokens.flip(1))[0, 5:, 0].tolist() == [1.0, -1.0]
    # The time-averaged tokens cannot tell the two apart.
    torch.testing.assert_close(
        spatio_temporal_pool(tokens.flip(1))[:, 3:], spatio_temporal_pool(tokens)[:, 3:]
    )
    with pytest.raises(ValueError, match="at least 2 frames"):
        spatio_temporal_motion_pool(tokens[:, :1])


def test_motion_mode_gives_frames_patches_and_motion_tokens(fresh):
    motion_policy = fresh(visual_tokens="motion")
    pixels, prompts, answers = batch(motion_policy)
    feats = motion_policy.visual_features(pixels)
    assert feats.shape[:2] == (len(QUESTIONS), NUM_FRAMES + 2 * NUM_PATCHES)
    _, tokens = motion_policy.vision(pixels.flatten(0, 1))
    expected = spatio_temporal_motion_pool(tokens.view(len(QUESTIONS), NUM_FRAMES, NUM_PATCHES, -1))
    torch.testing.assert_close(feats, expected)
    with torch.no_grad():
        lp, _, _ = motion_policy.answer_logprobs(pixels, prompts, answers)
    assert torch.isfinite(lp).all() and (lp <= 0).all()


def test_preprocess_resizes_and_normalises(policy: VideoLMPolicy):
    frames = np.full((NUM_FRAMES, 48, 32, 3), 255, dtype=np.uint8)
    pixels = policy.preprocess(frames)
    assert pixels.shape == (NUM_FRAMES, 3, policy.image_size, policy.image_size)
    expected = (1.0 - torch.tensor(policy.spec["image_mean"])) / torch.tensor(policy.spec["image_std"])
    torch.testing.assert_close(pixels[0, :, 10, 10], expected)


def test_patch_mode_gives_frames_plus_patches_visual_tokens(fresh):
    patch_policy = fresh(visual_tokens="patch")
    pixels, _, _ = batch(patch_policy)
    feats = patch_policy.visual_features(pixels)
    assert feats.shape[:2] == (len(QUESTIONS), NUM_FRAMES + NUM_PATCHES)
    # The pooling of the encoder's own patch tokens.
    _, tokens = patch_policy.vision(pixels.flatten(0, 1))
    expected = spatio_temporal_pool(tokens.view(len(QUESTIONS), NUM_FRAMES, NUM_PATCHES, -1))
    torch.testing.assert_close(feats, expected)
    embedded = patch_policy.encode_video(pixels)
    hidden = patch_policy.lm.get_input_embeddings().embedding_dim
    assert embedded.shape == (len(QUESTIONS), NUM_FRAMES + NUM_PATCHES, hidden)


def test_pooled_mode_gives_one_visual_token_per_frame(fresh):
    pooled_policy = fresh(visual_tokens="pooled")
    pixels, prompts, answers = batch(pooled_policy)
    assert pooled_policy.visual_features(pixels).shape[:2] == (len(QUESTIONS), NUM_FRAMES)
    hidden = pooled_policy.lm.get_input_embeddings().embedding_dim
    assert pooled_policy.encode_video(pixels).shape == (len(QUESTIONS), NUM_FRAMES, hidden)
    with torch.no_grad():
        lp, mask, _ = pooled_policy.answer_logprobs(pixels, prompts, answers)
    assert torch.isfinite(lp).all() and (lp <= 0).all()


def test_prompt_ids_hold_exactly_one_video_token(policy: VideoLMPolicy):
    for question in QUESTIONS:
        ids = policy.prompt_ids(question)
        assert ids.count(policy.video_token_id) == 1
        assert ids[0] == policy.tokenizer.bos_token_id
        assert policy.tokenizer.unk_token_id not in ids  # every word of the task is in the vocabulary
        text = policy.tokenizer.decode(ids, skip_special_tokens=True)
        assert question.replace(" ?", "") in text


def test_prompt_truncated_past_the_video_token_is_an_error(fresh):
    short = fresh(max_prompt_tokens=4)
    with pytest.raises(ValueError, match="exactly one"):
        short.prompt_ids(QUESTIONS[0])


def test_text_only_prompts_have_no_video_token_and_mix_with_video_prompts(policy: VideoLMPolicy):
    """A text-only question (no video) is the template without the placeholder; in a batch that
    mixes both, each video prompt takes the next video's tokens and text-only rows take none."""
    text_ids = policy.prompt_ids(QUESTIONS[0], video=False)
    assert policy.video_token_id not in text_ids and text_ids[0] == policy.tokenizer.bos_token_id
    assert text_ids[1:] == [i for i in policy.prompt_ids(QUESTIONS[0])[1:] if i != policy.video_token_id]
    pixels, prompts, answers = batch(policy)
    mixed = [prompts[0], text_ids, prompts[2]]
    with torch.no_grad():
        both, mask, _ = policy.answer_logprobs(pixels[[0, 2]], mixed, answers)
        text, _, _ = policy.answer_logprobs(None, [text_ids], answers[1:2])
        video, _, _ = policy.answer_logprobs(
            pixels[[0, 2]], [prompts[0], prompts[2]], [answers[0], answers[2]]
        )
    n = [len(a) for a in answers]
    torch.testing.assert_close(both[1, : n[1]], text[0, : n[1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[0, : n[0]], video[0, : n[0]], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[2, : n[2]], video[1, : n[2]], atol=1e-5, rtol=0)
    samples = policy.sample_frames([None, None], QUESTIONS[:2], 2, 1.0, 1.0, 4)
    assert len(samples.token_ids) == 4 and all(
        len(lp) == len(t) for lp, t in zip(samples.logprobs, samples.token_ids, strict=True)
    )


def test_answer_ids_end_with_eos(policy: VideoLMPolicy):
    ids = policy.answer_ids("  red ")
    assert ids[-1] == policy.tokenizer.eos_token_id
    assert policy.decode_answer(ids) == "red"
    assert len(policy.answer_ids("two three one")) == 4


# --------------------------------------------------------------------------- sampling vs scoring
def test_answer_logprobs_are_padding_invariant(policy: VideoLMPolicy):
    pixels, prompts, answers = batch(policy)
    with torch.no_grad():
        lp, mask, entropy = policy.answer_logprobs(pixels, prompts, answers, with_entropy=True)
    assert lp.shape == mask.shape == entropy.shape == (3, max(len(a) for a in answers))
    assert mask.sum(dim=1).tolist() == [len(a) for a in answers]
    assert (lp[mask == 0] == 0).all() and (lp[mask == 1] < 0).all()
    assert (entropy[mask == 1] > 0).all()
    for i in range(3):
        with torch.no_grad():
            alone, _, _ = policy.answer_logprobs(pixels[i : i + 1], prompts[i : i + 1], answers[i : i + 1])
        n = len(answers[i])
        torch.testing.assert_close(lp[i, :n], alone[0, :n], atol=1e-5, rtol=0)


def test_answer_logprobs_from_features_equal_from_pixels(policy: VideoLMPolicy):
    """The learner encodes each video once and passes the features: same log-probs, same gradient path."""
    pixels, prompts, answers = batch(policy)
    with torch.no_grad():
        from_pixels, _, _ = policy.answer_logprobs(pixels, prompts, answers)
        features = policy.visual_features(pixels)
        from_features, _, _ = policy.answer_logprobs(None, prompts, answers, features=features)
        shuffled, _, _ = policy.answer_logprobs(None, prompts, answers, features=features.flip(0))
    torch.testing.assert_close(from_features, from_pixels, atol=1e-6, rtol=0)
    assert not torch.allclose(shuffled, from_pixels, atol=1e-4)  # the features do matter


@pytest.mark.parametrize("temperature", [0.7, 2.5])
def test_sample_logprobs_equal_answer_logprobs(fresh, temperature: float):
    """What the rollout reports must equal what the learner recomputes for the same ids."""
    pol = fresh()
    perturb(pol, seed=1)  # a non-trivial adapter, as during RL
    group, max_new = 4, 8
    frames = random_frames(len(QUESTIONS), seed=2)
    torch.manual_seed(0)
    samples = pol.sample_frames(frames, QUESTIONS, group, temperature, 1.0, max_new)
    n = len(QUESTIONS) * group
    assert len(samples.token_ids) == len(samples.logprobs) == len(samples.texts) == n
    eos = pol.tokenizer.eos_token_id
    for ids, lps, text in zip(samples.token_ids, samples.logprobs, samples.texts, strict=True):
        assert 1 <= len(ids) <= max_new and len(lps) == len(ids)
        assert eos not in ids[:-1]
        assert ids[-1] == eos or len(ids) == max_new
        assert text == pol.decode_answer(ids)
    # Prompt-major: rows i*G .. i*G+G-1 answer prompt i.
    pixels = torch.stack([pol.preprocess(f) for f in frames]).repeat_interleave(group, dim=0)
    prompts = [pol.prompt_ids(q) for q in QUESTIONS for _ in range(group)]
    with torch.no_grad():
        lp, mask, _ = pol.answer_logprobs(pixels, prompts, samples.token_ids, temperature=temperature)
    for row, lps in enumerate(samples.logprobs):
        torch.testing.assert_close(lp[row, : len(lps)], torch.tensor(lps), atol=1e-4, rtol=0)
        assert mask[row].sum().item() == len(lps)


def test_samples_stop_at_eos_and_at_max_new_tokens(fresh):
    """At a high temperature (near-uniform over 44 tokens) some answers end at EOS, others run out."""
    pol = fresh()
    group, max_new = 16, 10
    torch.manual_seed(0)
    samples = pol.sample_frames(random_frames(len(QUESTIONS), seed=3), QUESTIONS, group, 20.0, 1.0, max_new)
    eos = pol.tokenizer.eos_token_id
    ended = [ids for ids in samples.token_ids if ids[-1] == eos]
    assert ended and any(len(ids) < max_new for ids in ended)
    assert any(len(ids) == max_new and ids[-1] != eos for ids in samples.token_ids)
    # Answers within a group differ (sampling), and differ across prompts.
    assert len({tuple(ids) for ids in samples.token_ids[:group]}) > 1


def test_sampling_is_reproducible_with_a_seed(policy: VideoLMPolicy):
    frames = random_frames(2, seed=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(policy.sample_frames(frames, QUESTIONS[:2], 3, 1.0, 0.9, 5).token_ids)
    assert runs[0] == runs[1]


def test_greedy_samples_are_identical_within_a_group_and_match_scoring(fresh):
    pol = fresh()
    perturb(pol, seed=5)
    group = 3
    frames = random_frames(2, seed=6)
    samples = pol.sample_frames(frames, QUESTIONS[:2], group, 1.0, 1.0, 6, greedy=True)
    assert samples.token_ids[0] == samples.token_ids[1] == samples.token_ids[2]
    assert samples.token_ids[3] == samples.token_ids[4] == samples.token_ids[5]
    pixels = torch.stack([pol.preprocess(f) for f in frames]).repeat_interleave(group, dim=0)
    prompts = [pol.prompt_ids(q) for q in QUESTIONS[:2] for _ in range(group)]
    with torch.no_grad():
        lp, _, _ = pol.answer_logprobs(pixels, prompts, samples.token_ids)
    for row, lps in enumerate(samples.logprobs):
        torch.testing.assert_close(lp[row, : len(lps)], torch.tensor(lps), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- the reference policy
def test_reference_before_freeze_is_the_adapter_free_model(fresh):
    pol = fresh()
    untouched = fresh()  # same seed, same projector; LoRA B starts at zero: the base model's outputs
    base_lp = logprobs(untouched)
    torch.testing.assert_close(logprobs(pol), base_lp, atol=1e-5, rtol=0)

    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in pol.lm.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    policy_lp = logprobs(pol)
    assert (policy_lp - base_lp).abs().max() > 1e-2, "perturbing LoRA B must change the policy"
    torch.testing.assert_close(logprobs(pol, reference=True), base_lp, atol=1e-5, rtol=0)
    # Leaving reference mode restores the adapter.
    torch.testing.assert_close(logprobs(pol), policy_lp, atol=0, rtol=0)
    assert_trainable_is_policy_lora_and_projector(pol)


def test_reference_after_freeze_is_fixed_at_freeze_time(fresh):
    pol = fresh()
    perturb(pol, seed=8)  # as if after SFT
    at_freeze = logprobs(pol)
    pol.freeze_reference()
    assert pol.has_reference_adapter
    assert REFERENCE_ADAPTER in pol.lm.peft_config
    torch.testing.assert_close(logprobs(pol), at_freeze, atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs(pol, reference=True), at_freeze, atol=1e-5, rtol=0)

    perturb(pol, seed=9)  # RL moves the policy (LoRA and projector)
    moved = logprobs(pol)
    assert (moved - at_freeze).abs().max() > 1e-2
    torch.testing.assert_close(logprobs(pol, reference=True), at_freeze, atol=1e-5, rtol=0)
    torch.testing.assert_close(logprobs(pol), moved, atol=0, rtol=0)
    # Not the adapter-free model either.
    base = logprobs(fresh())
    assert (logprobs(pol, reference=True) - base).abs().max() > 1e-2


def test_reference_scoring_has_no_gradient(fresh):
    pol = fresh()
    pol.freeze_reference()
    pixels, prompts, answers = batch(pol)
    lp, _, _ = pol.answer_logprobs(pixels, prompts, answers, reference=True)
    assert not lp.requires_grad
    lp, _, _ = pol.answer_logprobs(pixels, prompts, answers)
    assert lp.requires_grad


def test_only_policy_lora_and_projector_train(fresh):
    pol = fresh()
    assert_trainable_is_policy_lora_and_projector(pol)
    with pol.reference_mode():  # adapter disabled
        pass
    assert_trainable_is_policy_lora_and_projector(pol)

    pol.freeze_reference()
    assert_trainable_is_policy_lora_and_projector(pol)
    reference_lora = [p for n, p in pol.lm.named_parameters() if f".{REFERENCE_ADAPTER}." in n]
    assert reference_lora and not any(p.requires_grad for p in reference_lora)
    with pol.reference_mode():
        logprobs(pol)
    assert_trainable_is_policy_lora_and_projector(pol)
    logprobs(pol, reference=True)
    assert_trainable_is_policy_lora_and_projector(pol)
    assert pol.lm.active_adapter == POLICY_ADAPTER

    # A backward pass reaches exactly the trainable tensors.
    pol.zero_grad(set_to_none=True)
    pixels, prompts, answers = batch(pol)
    lp, mask, _ = pol.answer_logprobs(pixels, prompts, answers)
    (-(lp * mask).sum()).backward()
    with_grad = {n for n, p in pol.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in pol.named_parameters() if p.requires_grad}


def test_trainable_state_dict_excludes_the_reference_adapter(fresh):
    pol = fresh()
    keys_before = set(pol.trainable_state_dict())
    pol.freeze_reference()
    keys_after = set(pol.trainable_state_dict())
    assert keys_before == keys_after
    assert not any(REFERENCE_ADAPTER in k for k in keys_after)
    assert {k for k in keys_after if k.startswith("projector.")} == {
        f"projector.{k}" for k in pol.projector.state_dict()
    }


# --------------------------------------------------------------------------- saving and moving weights
def test_save_and_from_folder_give_identical_logprobs(fresh, model_cfg: ModelConfig, tmp_path: Path):
    pol = fresh()
    perturb(pol, seed=10)
    pol.freeze_reference()  # the saved adapter must be the policy's, not the reference's
    perturb(pol, seed=11)
    expected = logprobs(pol)
    folder = pol.save(tmp_path / "ckpt")
    assert (folder / POLICY_FILE).is_file() and (folder / PROJECTOR_FILE).is_file()
    assert (folder / ADAPTER_DIR / "adapter_config.json").is_file()
    assert (folder / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert not (folder / ADAPTER_DIR / POLICY_ADAPTER).exists()
    # policy.json points at the base model with absolute paths: the folder is self-contained.
    spec = json.loads((folder / POLICY_FILE).read_text())
    assert Path(spec["lm"]).is_absolute() and Path(spec["lm"]).is_dir()

    # A different seed: the projector must come from the file, not from a fresh initialisation.
    loaded = VideoLMPolicy.from_folder(folder, model_cfg, seed=99).eval()
    torch.testing.assert_close(logprobs(loaded), expected, atol=1e-6, rtol=0)
    assert_trainable_is_policy_lora_and_projector(loaded)
    assert (logprobs(loaded) - logprobs(fresh(seed=99))).abs().max() > 1e-2


def test_saved_adapter_loads_in_peft(fresh, tmp_path: Path):
    pol = fresh()
    perturb(pol, seed=12)
    folder = pol.save(tmp_path / "ckpt")
    ids = torch.tensor([[2, 5, 6, 30, 22, 26, 8, 7], [2, 9, 10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        expected = pol.lm(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(pol.spec["lm"], dtype=torch.float32)
        base_logits = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, str(folder / ADAPTER_DIR)).eval()
        got = loaded(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_checkpoint_keeps_its_input_settings(
    fresh, model_cfg: ModelConfig, tmp_path: Path, synthetic_dir: Path
):
    folder = fresh(num_frames=4).save(tmp_path / "ckpt")
    spec = json.loads((folder / POLICY_FILE).read_text())
    assert spec["trained_with"] == {"num_frames": 4, "visual_tokens": model_cfg.visual_tokens}
    assert model_cfg.num_frames != 4
    with pytest.raises(ValueError, match="trained with model.num_frames=4"):
        VideoLMPolicy.from_folder(folder, model_cfg)
    # Without --config the evaluation CLI takes the checkpoint's own settings.
    out = tmp_path / "eval.json"
    evaluate_main(
        ["--checkpoint", str(folder), "--data", str(synthetic_dir / "test.jsonl"), "--out", str(out)]
    )
    assert json.loads(out.read_text())["n"] > 0


def test_trainable_state_dict_moves_weights_into_another_policy(fresh):
    source = fresh(seed=0)
    perturb(source, seed=13)
    target = fresh(seed=1)  # a different projector and an untrained adapter
    assert (logprobs(target) - logprobs(source)).abs().max() > 1e-2

    state = source.trainable_state_dict()
    assert all(not v.requires_grad for v in state.values())
    target.load_trainable_state_dict(state)
    torch.testing.assert_close(logprobs(target), logprobs(source), atol=1e-6, rtol=0)
    assert_trainable_is_policy_lora_and_projector(target)

    # The dict holds copies: changing it (or the source) later does not reach the target.
    before = logprobs(target)
    for value in state.values():
        value.add_(1.0)
    perturb(source, seed=14)
    torch.testing.assert_close(logprobs(target), before, atol=0, rtol=0)


def test_shared_load_keeps_the_tensors_and_never_writes_them(fresh):
    """``share=True`` makes each CPU parameter of the same dtype the given tensor itself (no copy);
    a tensor of another dtype gives a converted copy; a later load without ``share`` gives the
    parameters copies of their own instead of writing into what they shared."""
    source = fresh(seed=0)
    perturb(source, seed=13)
    target = fresh(seed=1)
    state = source.trainable_state_dict()
    odd = next(k for k in state if k.startswith("lm."))
    state[odd] = state[odd].double()  # another dtype than the parameter's
    target.load_trainable_state_dict(state, share=True)
    served = target.trainable_tensors()
    for key, value in state.items():
        if key == odd:
            assert served[key].dtype == torch.float32 and served[key].data_ptr() != value.data_ptr()
        else:
            assert served[key].data_ptr() == value.data_ptr(), key
    assert target.shares_weights
    state[odd] = state[odd].float()
    torch.testing.assert_close(logprobs(target), logprobs(source), atol=1e-6, rtol=0)

    shared = {k: v.clone() for k, v in state.items()}
    perturb(source, seed=14)
    target.load_trainable_state_dict(source.trainable_state_dict())
    assert all(torch.equal(state[k], shared[k]) for k in state), "a shared tensor was written"
    assert not target.shares_weights
    torch.testing.assert_close(logprobs(target), logprobs(source), atol=1e-6, rtol=0)


def test_load_trainable_state_dict_rejects_a_wrong_shape(policy: VideoLMPolicy):
    state = policy.trainable_state_dict()
    key = next(k for k in state if k.startswith("lm."))
    state[key] = state[key][:1]
    with pytest.raises(ValueError, match="shape"):
        policy.load_trainable_state_dict(state, share=True)


def test_load_trainable_state_dict_rejects_mismatching_names(policy: VideoLMPolicy):
    state = policy.trainable_state_dict()
    before = logprobs(policy)
    missing = dict(state)
    dropped = next(k for k in missing if k.startswith("lm."))
    del missing[dropped]
    with pytest.raises(KeyError, match="missing"):
        policy.load_trainable_state_dict(missing)
    extra = {**state, "lm.not_a_weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="not_a_weight"):
        policy.load_trainable_state_dict(extra)
    with pytest.raises(KeyError):
        policy.load_trainable_state_dict({})
    torch.testing.assert_close(logprobs(policy), before, atol=0, rtol=0)


@pytest.mark.parametrize(("top_p", "allowed"), [(0.5, {0}), (0.8, {0, 1}), (1.0, {0, 1, 2})])
def test_nucleus_sample_draws_from_the_smallest_set_that_reaches_top_p(top_p: float, allowed: set) -> None:
    torch.manual_seed(0)
    logp = torch.tensor([[0.6, 0.3, 0.1]]).log().expand(4000, -1)
    drawn = nucleus_sample(logp, top_p)
    assert set(drawn.tolist()) == allowed
    if allowed == {0, 1}:  # renormalised within the set: 2 to 1
        assert (drawn == 0).float().mean().item() == pytest.approx(2 / 3, abs=0.03)
