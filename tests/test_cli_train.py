"""`ipr train sft|mixture` and `ipr evaluate` on the tiny model, through the CLI."""

from pathlib import Path

import yaml

from flows.commands import main
from ipr_core.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
ENV = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())["env"]


def write_config(tmp_path: Path, tiny_model_path: Path, **changes) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config.update(store=str(tmp_path / "s.duckdb"), cache_dir=str(tmp_path / "cache"))
    config.update(model=str(tiny_model_path), **changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_sft_then_evaluate(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path)
    store = Store(tmp_path / "s.duckdb")
    assert main(["train", "sft", "--config", str(config)]) == 2  # nothing ingested yet
    assert "ipr ingest" in capsys.readouterr().err
    ingest = ["ingest", "--env", ENV, "--limit", "2", "--store", str(store.path)]
    assert main(ingest) == 0
    assert main(["train", "sft", "--config", str(config)]) == 0
    sft_path = capsys.readouterr().out.strip().split(": ")[-1]
    [kind] = store.query("SELECT kind FROM checkpoints")["kind"]
    assert kind == "sft"
    evaluate = ["evaluate", "--config", str(config), "--model", sft_path, "--split", "test"]
    assert main([*evaluate, "--limit", "2"]) == 0
    row = store.query("SELECT split, n_tasks, iteration FROM evaluations")
    assert row.to_dict("records") == [{"split": "test", "n_tasks": 2, "iteration": 0}]


def test_train_mixture_without_pairs_is_a_clear_error(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path)
    Store(tmp_path / "s.duckdb").write({"runs": [{"run_id": "smoke", "config": "{}"}]})
    args = ["train", "mixture", "--config", str(config), "--iteration", "1"]
    assert main([*args, "--sft-model", str(tiny_model_path)]) == 2
    assert "no pairs" in capsys.readouterr().err


def test_sft_method_trains_no_mixture(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path, method="sft")
    args = ["train", "mixture", "--config", str(config), "--iteration", "1"]
    assert main([*args, "--sft-model", str(tiny_model_path)]) == 2
    assert "trains no mixture" in capsys.readouterr().err


def test_train_reward_model_from_stored_step_rewards(tmp_path, tiny_model_path, capsys):
    config = write_config(tmp_path, tiny_model_path)
    store = Store(tmp_path / "s.duckdb")
    ingest = ["ingest", "--env", ENV, "--limit", "3", "--store", str(store.path)]
    assert main(ingest) == 0
    rows = [
        {
            "run_id": "smoke",
            "scorer_id": "sft-x",
            "iteration": 0,
            "env_id": ENV,
            "task_id": expert.task.task_id,
            "prefix_len": t,
            "actor": "expert",
            "action": step.action,
            "step_text": step.text,
            "mean_reward": 1.0 if t == len(expert.steps) - 1 else 0.0,
            "n_samples": 2,
            "n_ok": 2,
            "n_failed": 0,
            "terminal": t == len(expert.steps) - 1,
        }  # fmt: skip
        for expert in store.expert_trajectories(ENV)
        for t, step in enumerate(expert.steps)
    ]
    store.write({"step_rewards": rows})
    capsys.readouterr()
    assert main(["train", "reward-model", "--config", str(config), "--epochs", "1"]) == 0
    assert "held-out MSE" in capsys.readouterr().out
    [kind] = store.query("SELECT kind FROM checkpoints")["kind"]
    assert kind == "reward_model"
