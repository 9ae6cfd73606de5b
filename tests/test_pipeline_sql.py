"""Integration: the whole IPR loop on InterCode-SQL, changing only the env of the smoke config
(and the step bound: the gold trajectories are 2 steps, the tiny model only babbles)."""

from pathlib import Path

from ipr_core.config import load_config
from ipr_core.run.direct import run_pipeline
from ipr_core.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
ENV = "intercode-sql"


def test_smoke_pipeline_runs_on_intercode_sql(tmp_path, tiny_model_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-llama").symlink_to(tiny_model_path)
    overrides = {
        "env": ENV,
        "max_steps": 4,
        "store": str(tmp_path / "run.duckdb"),
        "cache_dir": str(tmp_path),
    }
    config = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    summary = run_pipeline(config, log=lambda _: None)
    store = Store(config.store)

    assert list(summary["iteration"]) == [-1, 0, 1]
    experts = store.expert_trajectories(ENV, "train")
    assert len(experts) == 2
    assert all(e.outcome_reward == 1.0 and e.steps[-1].action == "submit" for e in experts)
    evaluations = store.query("SELECT iteration, split FROM evaluations ORDER BY iteration")
    assert list(evaluations["iteration"]) == [-1, 0, 1]
    assert set(evaluations["split"]) == {"dev"}
    # Every rollout reached the database and ended normally: none is an env failure.
    statuses = store.query("SELECT DISTINCT status FROM rollouts")
    assert set(statuses["status"]) <= {"ok", "max_steps"}
    terminal = store.query(
        "SELECT mean_reward FROM step_rewards WHERE actor = 'expert' AND terminal"
    )
    assert len(terminal) == 2 and (terminal["mean_reward"] == 1.0).all()
