"""Held-out evaluation on real decoded videos: exact match (parts in any order) and part accuracy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rlaif_ray.data.dataset import load_jsonl
from rlaif_ray.data.frames import FrameStore
from rlaif_ray.data.synthetic import generate
from rlaif_ray.evaluate import evaluate


def test_exact_match_and_part_accuracy_per_type(tmp_path: Path) -> None:
    paths = generate(tmp_path, 10, seed=1, val_frac=0.1, test_frac=0.1, question_types=["describe", "colour"])
    examples = load_jsonl(paths["train"])
    missing = replace(examples[0], video=str(tmp_path / "gone.mp4"), id="gone")

    def answer(frames: list[np.ndarray], questions: list[str]) -> list[str]:
        assert all(f.shape[0] == 4 for f in frames)  # the decoded clips reach the answer function
        return ["up circle red" if q == "what is moving ?" else "red" for q in questions]

    result = evaluate(answer, [*examples, missing], FrameStore(4, 32))
    describe = [ex for ex in examples if ex.type == "describe"]
    colour = [ex for ex in examples if ex.type == "colour"]
    # By hand: the describe answer names three distinct words, each reference three distinct words.
    said = {"up", "circle", "red"}
    describe_exact = [set((ex.answer or "").split()) == said for ex in describe]
    describe_parts = [len(set((ex.answer or "").split()) & said) / 3 for ex in describe]
    colour_exact = [ex.answer == "red" for ex in colour]
    assert result["n"] == len(examples) and result["skipped_videos"] == 1
    assert result["per_type"]["describe"] == pytest.approx(np.mean(describe_exact))
    assert result["per_type_part_accuracy"]["describe"] == pytest.approx(np.mean(describe_parts))
    assert result["per_type"]["colour"] == pytest.approx(np.mean(colour_exact))
    assert result["per_type_part_accuracy"]["colour"] == pytest.approx(np.mean(colour_exact))
    assert result["accuracy"] == pytest.approx(np.mean(describe_exact + colour_exact))
    assert result["part_accuracy"] == pytest.approx(np.mean(describe_parts + colour_exact))
    assert 0 < result["part_accuracy"] < 1 and result["part_accuracy"] > result["accuracy"]
