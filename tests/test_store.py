import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.commands import main
from ipr_core.agent.react import format_turn
from ipr_core.envs import canonical_env_id
from ipr_core.envs.base import EnvTask
from ipr_core.store.store import SCHEMA, Store, expert_to_row
from ipr_core.types import Step, Trajectory

COIN = canonical_env_id("twx/coin")
"""As the store spells it (every row goes through the canonicaliser)."""


def expert(task_id: str) -> Trajectory:
    task = EnvTask(COIN, task_id, "train", "Find the coin.", "A room.")
    steps = (Step(format_turn("it is here", "take coin"), "take coin", "Taken."),)
    return Trajectory(task, steps, 1.0)


def test_writes_are_idempotent_on_natural_keys(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    rows = [expert_to_row(expert(f"train-{i}"), "gold") for i in range(3)]
    store.write({"expert_trajectories": rows})
    store.write({"expert_trajectories": rows})
    assert store.count("expert_trajectories") == 3
    loaded = store.expert_trajectories("twx/coin", "train")
    assert [t.task.task_id for t in loaded] == ["train-0", "train-1", "train-2"]
    assert loaded[0] == expert("train-0")


def test_a_failed_transaction_writes_nothing(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    good = expert_to_row(expert("train-0"), "gold")
    bad = {**expert_to_row(expert("train-1"), "gold"), "outcome_reward": None}  # NOT NULL
    with pytest.raises(Exception, match="NOT NULL"):
        store.write({"expert_trajectories": [good, bad]})
    assert store.count("expert_trajectories") == 0


def test_sql_reads_while_another_process_writes(tmp_path, capsys):
    path = tmp_path / "s.duckdb"
    store = Store(path)
    store.write({"expert_trajectories": [expert_to_row(expert("train-0"), "gold")]})
    writer = textwrap.dedent(
        f"""
        from ipr_core.store.store import Store, expert_to_row
        from tests.test_store import expert
        store = Store({str(path)!r})
        for i in range(1, 150):
            store.write({{"expert_trajectories": [expert_to_row(expert(f"train-{{i}}"), "gold")]}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer])
    counts = []
    try:
        while proc.poll() is None:
            assert main(["sql", "SELECT count(*) AS n FROM expert_trajectories", "--store",
                         str(path)]) == 0  # fmt: skip
            counts.append(int(capsys.readouterr().out.split()[-1]))
    finally:
        proc.wait()
    assert proc.returncode == 0
    assert counts and counts == sorted(counts)
    assert store.count("expert_trajectories") == 150


def test_sql_on_missing_store_is_a_clear_error(tmp_path, capsys):
    assert main(["sql", "SELECT 1", "--store", str(tmp_path / "nope.duckdb")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_action_hint_travels_with_the_expert_rows(tmp_path, monkeypatch):
    """The prompt of a run is built from the stored experts' hint: no env is started."""
    from dataclasses import replace

    from ipr_core.config import RunConfig
    from ipr_core.run import context

    hinted = expert("train-0")
    hinted = replace(hinted, task=replace(hinted.task, action_hint="Actions: take X."))
    store = Store(tmp_path / "s.duckdb")
    store.write({"expert_trajectories": [expert_to_row(hinted, "gold")]})
    assert store.expert_trajectories("twx/coin", "train") == [hinted]

    def no_env(env_id: str):
        raise AssertionError(f"started env {env_id}")

    monkeypatch.setattr(context, "make_env", no_env)
    config = RunConfig(env="twx/coin", train_limit=1, store=store.path)
    assert context.RunContext(config, store).prompt.action_hint == "Actions: take X."


def test_explore_limit_explores_the_first_of_the_sft_experts(tmp_path):
    """SFT trains on `train_limit` experts; exploration and scoring start from the first
    `explore_limit` of them, and from all when it is unset."""
    from ipr_core.config import RunConfig
    from ipr_core.run.context import RunContext

    store = Store(tmp_path / "s.duckdb")
    store.write(
        {"expert_trajectories": [expert_to_row(expert(f"train-{i}"), "gold") for i in range(4)]}
    )
    limited = RunContext(RunConfig(env="twx/coin", train_limit=3, explore_limit=2), store)
    assert [t.task.task_id for t in limited.experts()] == ["train-0", "train-1", "train-2"]
    assert [t.task.task_id for t in limited.explored()] == ["train-0", "train-1"]
    unlimited = RunContext(RunConfig(env="twx/coin", train_limit=3), store)
    assert unlimited.explored() == unlimited.experts()


def test_a_store_from_before_the_hint_column_gets_it_on_its_first_write(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    old = ", ".join(
        line.strip().rstrip(",")
        for line in textwrap.dedent(SCHEMA["expert_trajectories"]).splitlines()
        if line.strip() and not line.strip().startswith("action_hint")
    )
    con.execute(f"CREATE TABLE expert_trajectories ({old})")
    con.close()
    store = Store(path)
    store.write({"expert_trajectories": [expert_to_row(expert("train-0"), "gold")]})
    assert store.expert_trajectories("twx/coin", "train") == [expert("train-0")]
    columns = store.query("DESCRIBE expert_trajectories")["column_name"].tolist()
    assert columns.count("action_hint") == 1


def test_a_copy_taken_while_another_process_writes_is_a_whole_store(tmp_path):
    """`Store.copy_to` while a writer commits one row per transaction: every copy opens and
    holds a prefix of the writes, none of them half-done."""
    path = tmp_path / "live.duckdb"
    Store(path).write({"expert_trajectories": [expert_to_row(expert("train-0"), "gold")]})
    writer = textwrap.dedent(
        f"""
        from tests.test_store import expert
        from ipr_core.store.store import Store, expert_to_row
        store = Store({str(path)!r})
        for i in range(1, 120):
            store.write({{"expert_trajectories": [expert_to_row(expert(f"train-{{i}}"), "gold")]}})
        """
    )
    running = subprocess.Popen([sys.executable, "-c", writer], cwd=Path(__file__).parents[1])
    counts = []
    while running.poll() is None:
        copy = Store(path, read_only=True).copy_to(tmp_path / f"copy-{len(counts)}.duckdb")
        counts.append(Store(copy, read_only=True).count("expert_trajectories"))
    assert running.returncode == 0 and counts  # copies were taken while it wrote
    final = Store(path, read_only=True).copy_to(tmp_path / "final.duckdb")
    assert Store(final, read_only=True).count("expert_trajectories") == 120
    assert counts == sorted(counts) and all(1 <= n <= 120 for n in counts)


def test_checkpoints_written_together_are_listed_parents_first(tmp_path):
    """A resume imports parents before children in `checkpoint_records` order; rows written
    in one transaction share their creation time, so the order must come from the tree."""
    store = Store(tmp_path / "run.duckdb")
    rows = [
        {"checkpoint_id": "grandchild", "parent_id": "child", "kind": "mixture"},
        {"checkpoint_id": "child", "parent_id": "base", "kind": "sft"},
        {"checkpoint_id": "orphan", "parent_id": "elsewhere", "kind": "sft"},
        {"checkpoint_id": "base", "parent_id": None, "kind": "base"},
    ]
    rows = [{**row, "path": f"/m/{row['checkpoint_id']}", "config": "{}"} for row in rows]
    store.write({"checkpoints": rows})
    listed = store.checkpoint_records()["checkpoint_id"].tolist()
    assert listed == ["base", "orphan", "child", "grandchild"]


def test_mc_samples_of_a_pair_list_each_scorer_together(tmp_path):
    """A run's steps may be scored by several scorers (rewards are stored per scorer id) whose
    sample indices coincide; `ipr show pair` lists each scorer's samples together, whatever
    order they were written in."""
    store = Store(tmp_path / "s.duckdb")
    at = {"run_id": "r", "env_id": COIN, "task_id": "t", "prefix_len": 0}
    pair = {"iteration": 1, "level": "step", "mode": "single", "chosen_actor": "expert"}
    pair |= {"prompt": "[]", "chosen": "[]", "rejected": "[]", "chosen_reward": 1.0}
    pair |= {"rejected_reward": 0.0, "chosen_outcome": 1.0, "rejected_outcome": 0.0}
    reward = {"action": "x", "step_text": "x", "mean_reward": 0.5, "n_samples": 2, "n_ok": 2}
    reward |= {"n_failed": 0, "terminal": False}
    sample = {"kind": "mc", "status": "ok", "outcome_reward": 1.0, "n_steps": 1, "steps": "[]"}
    sample |= {"prefill_tokens": 0, "generated_tokens": 0, "env_steps": 1, "parse_failures": 0}
    rewards, rollouts = [], []
    for scorer in ("b", "a"):
        for actor, iteration in (("agent", 1), ("expert", 0)):
            step = {**at, "iteration": iteration, "actor": actor}
            rewards.append({**step, **reward, "scorer_id": scorer})
            rollouts += [{**step, **sample, "policy_id": scorer, "sample_idx": k} for k in (0, 1)]
    store.write({"pairs": [{**at, **pair}], "step_rewards": rewards, "rollouts": rollouts})
    [pair_id] = store.query("SELECT pair_id FROM pair_ids")["pair_id"]
    listed = store.pair_mc_samples(pair_id)[["actor", "scorer_id", "sample_idx"]]
    assert listed.values.tolist() == [
        [actor, scorer, k] for actor in ("agent", "expert") for scorer in "ab" for k in (0, 1)
    ]


def test_an_iterations_training_steps_are_those_of_the_checkpoint_its_stage_names(tmp_path):
    """A mixture stage redone with other inputs (e.g. a resumed run with another learning
    rate) trains a new checkpoint under the same run and iteration; the old checkpoint's
    steps stay in the store (they are keyed by checkpoint) but are not the iteration's."""
    store = Store(tmp_path / "run.duckdb")
    steps = [
        {"checkpoint_id": ckpt, "step": step, "run_id": "r", "iteration": 1, "kind": "mixture",
         "loss": loss}
        for ckpt, loss in (("old", 9.0), ("new", 1.0))
        for step in (1, 2)
    ]  # fmt: skip
    record = {"run_id": "r", "iteration": 1, "stage": "train-mixture", "fingerprint": "f",
              "result": json.dumps({"checkpoint_id": "new"}), "row_counts": "[]"}  # fmt: skip
    store.write({"training_steps": steps, "stage_runs": [record]})
    found = store.mixture_steps("r", 1)
    assert found["checkpoint_id"].tolist() == ["new", "new"] and found["step"].tolist() == [1, 2]


def test_an_iteration_redone_with_another_model_shows_that_models_dev_evaluation(tmp_path):
    """Evaluations are kept per model; the run's iteration table and the experiment's run
    table show the evaluation of the model the iteration's stage record (or the run's
    chosen model) names, once, not every model ever evaluated under that iteration."""
    store = Store(tmp_path / "run.duckdb")
    evaluations = [
        {"run_id": "r", "iteration": 1, "split": "dev", "policy_id": policy, "n_tasks": 4,
         "n_failed": 0, "avg_reward": reward, "success_rate": 0.0, "avg_steps": 3.0}
        for policy, reward in (("old", 0.9), ("new", 0.1))
    ]  # fmt: skip
    record = {"run_id": "r", "iteration": 1, "stage": "evaluate-dev", "fingerprint": "f",
              "result": json.dumps({"policy_id": "new"}), "row_counts": "[]"}  # fmt: skip
    run = {"experiment_id": "x", "method": "ipr", "seed": 0, "run_id": "r",
           "status": "finished", "best_iteration": 1, "test_policy_id": "new"}  # fmt: skip
    store.write(
        {
            "evaluations": evaluations,
            "stage_runs": [record],
            "runs": [{"run_id": "r", "config": json.dumps({"dev_split": "dev"})}],
            "experiments": [{"experiment_id": "x", "config": json.dumps({"test_split": "t"})}],
            "experiment_runs": [run],
        }
    )
    summary = store.iteration_summary("r")
    assert summary["dev_reward"].tolist() == [0.1]
    assert store.experiment_runs("x")["dev_reward"].tolist() == [0.1]
