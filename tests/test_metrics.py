"""Live metrics: declared once, checked on every call, and read back from a real local Ray node's
Prometheus endpoint (its metrics export port) after a few steps of the real loop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from bench.gpu_check import MODULES
from rlaif_ray.config import Config
from rlaif_ray.launch import run
from rlaif_ray.learner.engine import free_port
from rlaif_ray.ledger import OUTCOMES
from rlaif_ray.telemetry import METRICS, LoopMetrics, Telemetry

REPO = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def test_a_call_that_does_not_match_the_declaration_fails_loudly() -> None:
    telemetry = Telemetry("driver", "driver")
    with pytest.raises(KeyError, match="rlaif_typo"):
        telemetry.count("rlaif_typo")
    with pytest.raises(TypeError, match="is a gauge"):
        telemetry.count("rlaif_loss")
    with pytest.raises(ValueError, match="takes the tags"):
        telemetry.observe("rlaif_stage_s", 1.0)
    with pytest.raises(ValueError, match="cannot decrease"):
        telemetry.count("rlaif_groups_learned", -1)
    telemetry.count_to("rlaif_groups_dropped", 3, reason="stale")  # outside Ray: nothing recorded
    with pytest.raises(ValueError, match="cannot decrease"):
        telemetry.count_to("rlaif_groups_dropped", 2, reason="stale")


def test_loop_counters_keep_the_groups_of_an_update_a_restore_undid() -> None:
    """A learner restore moves groups from ``learned`` to ``rolled_back`` (learned 8 -> 0, then 4
    after the next update): the learned counter, which may never go down, counts them all."""
    metrics = LoopMetrics()

    def record(learned: int, rolled_back: int, restores: int) -> dict:
        pipeline = {**dict.fromkeys(OUTCOMES, 0), "learned": learned, "rolled_back": rolled_back}
        return {
            "learner": {"loss": 0.1},
            "pipeline": pipeline,
            "faults": {"learner_restores": restores, "rollout_restarts": 0},
            "weight_version": 1,
            "time": {f"{stage}_s": 0.1 for stage in ("wait", "learn", "sync", "step")},
        }

    metrics.publish(record(8, 0, 0))
    metrics.publish(record(4, 8, 1))
    assert metrics.learner._totals[("rlaif_groups_learned", ())] == 12


def test_the_plain_classes_import_and_record_without_ray() -> None:
    """The GPU check's machine has no Ray: SFT, the workers and the learner must import, and record
    metrics, without importing it (telemetry once imported Ray at the top and broke that)."""
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "from rlaif_ray.telemetry import Telemetry\n"
        "Telemetry('rollout', 'rollout-0').count('rlaif_groups_sampled')\n"
        "print(sorted(m for m in ('ray', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_every_metric_is_named_in_the_readme_and_the_grafana_dashboard() -> None:
    readme = (REPO / "README.md").read_text()
    dashboard = (REPO / "cluster" / "grafana" / "rlaif_ray.json").read_text()
    json.loads(dashboard)
    for name in METRICS:
        assert f"`{name}`" in readme, name
        assert f"ray_{name}" in dashboard, name


def scrape(port: int) -> Samples:
    """Every ``ray_rlaif_*`` sample the node's metrics agent serves now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ray_rlaif_")
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` whose labels include ``labels`` (None if there is none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(found) if found else None


def test_metrics_of_a_run_reach_the_nodes_prometheus_endpoint(small_config: Config) -> None:
    cfg = small_config
    cfg.model.visual_tokens = "motion"  # the default's tokens, through the whole loop once
    cfg.sft.enabled = False
    cfg.rl.steps, cfg.rl.prompts_per_step, cfg.rl.group_size = 3, 8, 4
    cfg.rl.eval_every, cfg.rl.eval_examples = 2, 16
    cfg.ranker.min_actors, cfg.ranker.max_actors, cfg.ranker.scale_up_backlog = 1, 2, 1
    # Shorter than a learner step: the second ranker actor retires while the driver waits for
    # the learner (its wait ends on the pool's retirement time), and comes back for the next burst.
    cfg.ranker.idle_grace_s = 0.2
    port = free_port()
    ray.init(
        num_cpus=4,
        resources={"ranker": 2},
        include_dashboard=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        summary = run(cfg)
        records = [
            json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
        ]
        last = records[-1]
        rollout_groups = summary["groups"]["sampled"]
        expected = {
            ("ray_rlaif_groups_learned_total", ()): summary["groups"]["learned"],
            ("ray_rlaif_groups_sampled_total", (("role", "rollout"),)): rollout_groups,
            ("ray_rlaif_groups_ranked_total", (("role", "ranker"),)): summary["ranker"]["groups"],
            ("ray_rlaif_weight_version", (("actor", "learner-0"),)): summary["weight_version"],
            ("ray_rlaif_weight_version", (("actor", "rollout-0"),)): summary["weight_version"],
            ("ray_rlaif_heldout_accuracy", ()): summary["accuracy_after"],
            ("ray_rlaif_loss", (("role", "learner"),)): last["learner"]["loss"],
            ("ray_rlaif_kl", (("role", "learner"),)): last["learner"]["kl"],
            ("ray_rlaif_ranker_pool_size", (("actor", "pool"),)): summary["ranker"]["actors"],
            ("ray_rlaif_stage_s_count", (("stage", "step"),)): 3,
            ("ray_rlaif_ranker_group_latency_s_count", ()): summary["ranker"]["groups"],
        }
        deadline, samples, got = time.monotonic() + 60, {}, {}
        while time.monotonic() < deadline:  # the agent exports what the workers reported last
            samples = scrape(port)
            got = {key: value(samples, key[0], **dict(key[1])) for key in expected}
            if all(got[key] is not None and got[key] == pytest.approx(v) for key, v in expected.items()):
                break
            time.sleep(1)
        assert got == pytest.approx(expected), sorted(samples)
        # Tagged by role and actor: the ranker's series name the ranker actors.
        ranker_actors = {dict(ls)["actor"] for n, ls in samples if n == "ray_rlaif_groups_ranked_total"}
        assert ranker_actors and all(a.startswith("ranker-") for a in ranker_actors)
        assert summary["groups"]["learned"] == 3 * 8 and rollout_groups >= 3 * 8
        assert summary["ranker"]["scale_downs"] >= 1 and summary["ranker"]["scale_ups"] >= 2
    finally:
        ray.shutdown()
