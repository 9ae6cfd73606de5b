"""`ipr estimate`'s plan of a run: the work it expects each stage to do."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from ipr_core.config import load_config
from ipr_core.envs.base import EnvTask
from ipr_core.run.costs import Scale, estimate, planned_work
from ipr_core.run.experiment import estimate_experiment, load_experiment_config
from ipr_core.store.store import StageRecord, Store, expert_to_row, partial_name
from ipr_core.types import Step, Trajectory

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
REPRO = DEMO.parent / "repro-full-sft.yaml"


def _units(overrides: dict) -> dict[str, float]:
    config = load_config(DEMO, overrides)
    return {work.stage: work.units for work in planned_work(config, Scale(5.0))}


def test_explore_limit_scales_exploration_monte_carlo_and_mixture_not_sft():
    every = _units({"train_limit": 16, "explore_limit": None})
    first_three = _units({"train_limit": 16, "explore_limit": 3})
    assert first_three["sft"] == every["sft"] == 16  # one epoch over every SFT task
    for stage in ("expert-step-rewards", "explore", "agent-step-rewards", "train-mixture"):
        assert first_three[stage] * 16 == every[stage] * 3, stage
    # A limit above the SFT tasks explores them all, never more.
    assert _units({"train_limit": 4, "explore_limit": 10})["explore"] == 4 * 5.0


def test_eto_plans_no_step_rewards_and_explores_each_task_from_its_start_only():
    eto = _units({"train_limit": 16, "explore_limit": 4, "method": "eto"})
    assert "expert-step-rewards" not in eto and "agent-step-rewards" not in eto
    assert eto["explore"] == 4  # one episode per task, not one per expert step
    ipr = _units({"train_limit": 16, "explore_limit": 4, "method": "ipr"})
    assert ipr["explore"] == 4 * 5.0 and ipr["agent-step-rewards"] > 0


def test_compared_expert_steps_are_planned_per_iteration_at_the_scored_share():
    """`expert_steps: compared` scores, after each exploration, at most the steps whose agent
    step is scored; `all` scores every expert step once."""
    overrides = {"train_limit": 16, "explore_limit": 4, "iterations": 3}
    scale = Scale(5.0, scored_share=0.25)

    def expert(config_overrides: dict) -> tuple[int, float]:
        [work] = [
            w
            for w in planned_work(load_config(DEMO, config_overrides), scale)
            if w.stage == "expert-step-rewards"
        ]
        return work.runs, work.units

    samples = load_config(DEMO, overrides).monte_carlo.n_samples
    assert expert(overrides) == (1, 4 * 5.0 * samples)
    compared = {**overrides, "monte_carlo.expert_steps": "compared"}
    assert expert(compared) == (3, 4 * 5.0 * samples * 0.25)


def test_an_experiment_estimate_counts_what_a_seed_shares_once_and_adds_its_test(tmp_path):
    """Measured rates: the committed store of the iteration-1 stage benchmark. A method of
    a seed finds done what an earlier method of the seed ran with the same inputs (the runs
    copy it by fingerprint): the ingest, the SFT model and its dev evaluation, the expert
    step rewards, and iteration 1's exploration (from the same starts) and agent step
    rewards; a tuning experiment has no test evaluation."""
    store_path = tmp_path / "rates.duckdb"
    shutil.copy(DEMO.parents[1] / "docs" / "results" / "bench-stages.duckdb", store_path)
    store = Store(store_path)
    methods = ("sft", "eto", "ipr", "ipr-no-sdpo", "rft")
    experiment = load_experiment_config(
        REPRO, ["seeds=[0, 1]", f"methods=[{', '.join(methods)}]"], store_path
    ).model_copy(update={"sft_per_seed": True})
    runs = estimate_experiment(store, experiment).set_index("run_id")["predicted_s"]
    assert list(runs.index) == [f"repro-full-sft-{m}-s{s}" for s in (0, 1) for m in methods]

    def alone(method: str) -> tuple[float, dict[str, float]]:
        """The run's own prediction and the seconds of one run of each of its stages."""
        table = estimate(store, experiment.run_config(method, 0)).table.set_index("stage")
        once = (table["units"] * table["rate_s"]).fillna(0.0)
        return table["seconds"].fillna(0.0).sum(), {
            **once.to_dict(),
            "test": experiment.test_limit * table.loc["evaluate", "rate_s"],
        }

    def predicted(method: str) -> float:
        return runs[f"repro-full-sft-{method}-s0"]

    sft_model = ("ingest", "sft", "evaluate")  # the SFT run's: the SFT model's dev evaluation
    total, eto = alone("eto")
    assert all(eto[s] > 0 for s in (*sft_model, "explore", "test"))
    assert predicted("eto") == pytest.approx(total - sum(eto[s] for s in sft_model) + eto["test"])
    total, ipr = alone("ipr")  # explores along expert steps, not from the start as ETO did
    assert predicted("ipr") == pytest.approx(total - sum(ipr[s] for s in sft_model) + ipr["test"])
    total, no_sdpo = alone("ipr-no-sdpo")  # after ipr: its expert and iteration-1 MC are done
    shared = (*sft_model, "expert-step-rewards", "explore", "agent-step-rewards")
    assert no_sdpo["agent-step-rewards"] > 0
    assert predicted("ipr-no-sdpo") == pytest.approx(
        total - sum(no_sdpo[s] for s in shared) + no_sdpo["test"]
    )
    total, rft = alone("rft")  # iteration 1 explores from the start, as ETO's did
    assert predicted("rft") == pytest.approx(
        total - sum(rft[s] for s in (*sft_model, "explore")) + rft["test"]
    )
    for method in methods:  # seed 1 trains its own SFT model: the same cost again
        key = f"repro-full-sft-{method}-s"
        assert runs[key + "1"] == pytest.approx(runs[key + "0"])

    tuning = estimate_experiment(store, experiment.model_copy(update={"tuning": True}))
    assert tuning["predicted_s"].sum() == pytest.approx(runs.sum() - 10 * ipr["test"])

    # One SFT model for every seed: seed 1's SFT run is seed 0's (its test evaluation too),
    # and its IPR explores as seed 0's did but samples its agent steps with its own seed.
    one = estimate_experiment(store, experiment.model_copy(update={"sft_per_seed": False}))
    one = one.set_index("run_id")["predicted_s"]
    assert one["repro-full-sft-sft-s1"] == pytest.approx(0.0)
    assert one["repro-full-sft-ipr-s1"] == pytest.approx(
        predicted("ipr") - ipr["explore"] - ipr["expert-step-rewards"]
    )


def test_ipr_estimate_of_an_experiment_config_prints_every_run_and_the_total(tmp_path):
    store_path = tmp_path / "rates.duckdb"
    shutil.copy(DEMO.parents[1] / "docs" / "results" / "bench-stages.duckdb", store_path)
    before = store_path.read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "flows.commands", "estimate", "--config", REPRO,
         "--store", store_path, "--set", "seeds=[0, 1]"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "experiment 'repro-full-sft': predicted " in done.stdout
    assert "predicted for the 6 unfinished runs" in done.stdout  # none has run
    for run in ("sft-s0", "eto-s1", "ipr-s1"):
        assert f"repro-full-sft-{run}" in done.stdout
    assert store_path.read_bytes() == before  # it reads the rates: a committed store stays as it is


def test_expert_steps_per_task_are_the_mean_of_every_stored_expert_of_the_split(tmp_path):
    """Which experts a run trains on follows the split's order, not task ids
    ('train-10' < 'train-2'); the estimate does not guess that order: it takes the mean
    over every stored expert of the split, and names how many."""
    config = load_config(DEMO, {"train_limit": 2, "store": str(tmp_path / "s.duckdb")})
    store = Store(config.store)

    def expert(task_id: str, split: str, n_steps: int) -> dict:
        task = EnvTask(config.env, task_id, split, "Do it.", "A room.")
        steps = tuple(Step("Thought: go.\nAction: look", "look", "Seen.") for _ in range(n_steps))
        return expert_to_row(Trajectory(task, steps, 1.0), "gold")

    lengths = {"train-10": 2, "train-11": 2, "train-2": 8, "train-3": 8}
    rows = [expert(task_id, "train", n) for task_id, n in lengths.items()]
    store.write({"expert_trajectories": [*rows, expert("dev-0", "dev", 30)]})
    result = estimate(store, config)
    assert result.scale.steps_source == "5.0 expert steps per task (mean of 4 stored experts)"


def test_a_stage_still_computing_is_measured_from_its_chunks_and_stands_in_for_its_kind(tmp_path):
    """Hours into a Monte Carlo stage, its committed chunks are a measurement: the estimate
    reads their seconds per rollout (from the partial record), and uses the same rate for
    the step scoring nothing has measured yet, naming where each rate came from."""
    config = load_config(DEMO, {"store": str(tmp_path / "s.duckdb")})
    store = Store(config.store)
    chunks = {"wall_s": 600.0, "rollouts": 120, "env_steps": 900, "units": 30}
    store.save_chunk(StageRecord("r", 0, partial_name("expert-step-rewards"), "f", chunks, []), {})
    zero = dict.fromkeys(("prefill_tokens", "generated_tokens", "rollouts", "env_steps"), 0)
    sft = {"run_id": "r", "iteration": 0, "stage": "sft", "wall_s": 40.0, "cpu_s": 40.0}
    sft |= zero | {"trained_tokens": 1000}
    store.write({"runs": [{"run_id": "r", "config": config.model_dump_json()}]})
    store.write({"stage_costs": [sft]})
    table = estimate(store, config).table.set_index("stage")
    for stage in ("expert-step-rewards", "agent-step-rewards"):
        assert table.loc[stage, "rate_s"] == pytest.approx(5.0)
        assert table.loc[stage, "rate_of"] == "expert-step-rewards"
    assert pd.isna(table.loc["explore", "rate_s"]) and pd.isna(table.loc["explore", "rate_of"])
    assert "explore" in estimate(store, config).unmeasured  # nothing measured does its work
    rft = estimate(store, load_config(DEMO, {"store": config.store, "method": "rft"}))
    assert rft.table.set_index("stage").loc["train-rft", "rate_of"] == "sft"


def test_an_experiment_estimate_shows_each_runs_status_and_wall_time_so_far(tmp_path):
    """The prediction is checked on what the runs have measured: every stage cost (copies
    included, at their own cost) and the committed chunks of a stage still computing."""
    store_path = tmp_path / "rates.duckdb"
    shutil.copy(DEMO.parents[1] / "docs" / "results" / "bench-stages.duckdb", store_path)
    store = Store(store_path)
    experiment = load_experiment_config(REPRO, ["seeds=[0]", "methods=[sft, ipr]"], store_path)
    run_id = experiment.run_id("ipr", 0)
    counts = ("prefill_tokens", "generated_tokens", "trained_tokens", "rollouts", "env_steps")
    cost = {"run_id": run_id, "iteration": 0, "stage": "sft", "wall_s": 30.0, "cpu_s": 30.0}
    copied = cost | {"stage": "ingest", "wall_s": 0.5, "donor_run_id": "elsewhere"}
    run = {"experiment_id": experiment.experiment_id, "method": "ipr", "seed": 0,
           "run_id": run_id, "status": "running"}  # fmt: skip
    store.write(
        {
            "experiment_runs": [run],
            "stage_costs": [row | dict.fromkeys(counts, 0) for row in (cost, copied)],
        }
    )
    chunks = {"wall_s": 100.0, "rollouts": 8, "env_steps": 40}
    partial = StageRecord(run_id, 0, partial_name("expert-step-rewards"), "f", chunks, [])
    store.save_chunk(partial, {})
    runs = estimate_experiment(store, experiment).set_index("run_id")
    assert runs.loc[run_id, "status"] == "running"
    assert runs.loc[run_id, "measured_s"] == pytest.approx(130.5)
    sft = experiment.run_id("sft", 0)
    assert runs.loc[sft, "status"] == "not started" and runs.loc[sft, "measured_s"] == 0


def test_agent_step_scoring_is_planned_for_the_measured_share_of_explored_steps(tmp_path):
    """Only an explored action that differs from the expert's is scored, so the plan takes
    the share of explored steps scored in the store's completed iterations (agent-step
    rollouts over explorations x N), and every step, an upper bound, when none is stored; a
    stage still computing does not count (its rollouts so far are not its share)."""
    config = load_config(DEMO, {"store": str(tmp_path / "s.duckdb")})
    store = Store(config.store)
    planned = estimate(store, config).table.set_index("stage").loc["agent-step-rewards", "units"]
    counts = ("prefill_tokens", "generated_tokens", "trained_tokens", "env_steps")
    cost = {"run_id": "r", "iteration": 1, "wall_s": 1.0, "cpu_s": 1.0} | dict.fromkeys(counts, 0)
    n = config.monte_carlo.n_samples
    store.write(
        {
            "runs": [{"run_id": "r", "config": config.model_dump_json()}],
            "stage_costs": [
                cost | {"stage": "explore", "rollouts": 10},
                cost | {"stage": "agent-step-rewards", "rollouts": 4 * n},  # 4 of 10 steps
            ],
        }
    )
    chunks = {"wall_s": 1.0, "rollouts": 1, "env_steps": 1}  # iteration 2, still running
    store.save_chunk(StageRecord("r", 2, partial_name("agent-step-rewards"), "f", chunks, []), {})
    store.write({"stage_costs": [cost | {"iteration": 2, "stage": "explore", "rollouts": 10}]})
    made = estimate(store, config)
    assert made.table.set_index("stage").loc["agent-step-rewards", "units"] == pytest.approx(
        0.4 * planned
    )
    assert made.scale.share_source.startswith("40% of explored steps")


def test_the_mixture_is_planned_per_pair_from_the_pairs_runs_mining_the_same_kinds_trained_on(
    tmp_path,
):
    """A mixture step is a batch of pairs, and IPR mines step pairs beside its trajectory
    pairs (decisive seed 0: 116 pairs of 32 explored tasks against ETO's 31), so a mixture's
    seconds are per pair x epoch, and a plan takes the pairs per explored task that runs
    mining the same kinds of pairs trained on (one per task when none did)."""
    store = Store(tmp_path / "s.duckdb")
    configs = {
        m: load_config(DEMO, {"store": str(store.path), "method": m, "explore_limit": 4})
        for m in ("ipr", "eto")
    }
    ipr_before = estimate(store, configs["ipr"]).table.set_index("stage").loc["train-mixture"]
    assert ipr_before["units"] == 4 * configs["ipr"].mixture_settings.epochs
    assert ipr_before["unit"] == "pair x epoch"
    counts = ("prefill_tokens", "generated_tokens", "trained_tokens", "rollouts", "env_steps")
    # a third mixture's metrics are not JSON (a hand-edited store): it sets no rate
    for name, metrics, wall_s in (
        ("ipr", json.dumps({"n_pairs": 12}), 240.0),
        ("eto", json.dumps({"n_pairs": 4}), 80.0),
        ("bad", "{not json", 1000.0),
    ):
        run_id, config = f"r-{name}", configs["eto" if name == "eto" else "ipr"]
        record = StageRecord(run_id, 1, "train-mixture", "f", {"checkpoint_id": name}, [])
        checkpoint = {"checkpoint_id": name, "kind": "lora", "path": ".", "config": "{}",
                      "metrics": metrics}  # fmt: skip
        cost = {"run_id": run_id, "iteration": 1, "stage": "train-mixture", "wall_s": wall_s}
        store.write(
            {
                "runs": [{"run_id": run_id, "config": config.model_dump_json()}],
                "checkpoints": [checkpoint],
                "stage_costs": [cost | {"cpu_s": wall_s} | dict.fromkeys(counts, 0)],
            }
        )
        store.commit_stage(record, [], {}, replace=False)
    epochs = configs["ipr"].mixture_settings.epochs
    ipr = estimate(store, configs["ipr"])
    mixture = ipr.table.set_index("stage").loc["train-mixture"]
    assert mixture["units"] == pytest.approx(4 * (12 / 4) * epochs)  # IPR's 3 pairs per task
    assert mixture["rate_s"] == pytest.approx((240 + 80) / ((12 + 4) * epochs))
    assert ipr.scale.pairs_source == "3.00 pairs per explored task (1 mixtures measured)"
    eto = estimate(store, configs["eto"]).table.set_index("stage").loc["train-mixture"]
    assert eto["units"] == pytest.approx(4 * 1.0 * epochs)
