"""Your own pairs (`ipr import-pairs`, `ipr export pairs`), the cost of every stage
(`stage_costs`, `ipr estimate`) and readable episodes (`ipr show`)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.commands import main
from ipr_core.agent.react import parse_react
from ipr_core.store.store import Store

ROOT = Path(__file__).resolve().parents[1]
PAIR_COLUMNS = (
    "level, task_id, prefix_len, env_id, mode, prompt, chosen, rejected, chosen_actor, "
    "chosen_reward, rejected_reward, chosen_outcome, rejected_outcome"
)
TASK = "You are in the kitchen. Your task is to put the apple in the fridge."
AUTHORS_PAIRS = [
    {  # the IPR repo's step-level pairs: turn lists, a prompt that ends with an observation
        "id": "twc_3_step_2",
        "prompt": [
            {"from": "human", "value": TASK},
            {"from": "gpt", "value": "Thought: I need the apple.\nAction: take apple"},
            {"from": "human", "value": "Observation: You take the apple."},
        ],
        "chosen": [{"from": "gpt", "value": "Thought: Now the fridge.\nAction: open fridge"}],
        "rejected": [{"from": "gpt", "value": "Thought: Look around.\nAction: look"}],
    },
    {  # ETO's trajectory pairs: a string prompt and string sides
        "id": 7,
        "prompt": TASK,
        "chosen": "Thought: Get it.\nAction: take apple",
        "rejected": "Thought: Wait.\nAction: inventory",
    },
]


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_config(tmp_path: Path, model: Path, store: Path, cache: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config.update(store=str(store), cache_dir=str(cache), model=str(model))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def run_store(smoke_run, tmp_path) -> Store:
    """A copy of the smoke run's store, so a test may write to it."""
    _, store, _ = smoke_run
    copy = tmp_path / "copy.duckdb"
    shutil.copy(store.path, copy)
    return Store(copy)


def test_authors_pair_file_imports_and_trains(tmp_path, tiny_model_path, capsys):
    source = write_json(tmp_path / "ipr_pairs.json", AUTHORS_PAIRS)
    store = Store(tmp_path / "s.duckdb")
    args = ["import-pairs", str(source), "--run-id", "mine", "--iteration", "1"]
    assert main([*args, "--env", "twx/twc", "--store", str(store.path)]) == 0
    assert "imported 2 pairs" in capsys.readouterr().out
    found = store.query("SELECT level, task_id, prefix_len, env_id FROM pairs ORDER BY level")
    twc = "twx/twc?locations=2&items=2&doors=0&inventory_limit=0"  # every parameter spelt
    assert found.values.tolist() == [
        ["step", "twc_3_step_2", 1, twc],
        ["trajectory", "7", 0, twc],
    ]
    config = write_config(tmp_path, tiny_model_path, store.path, tmp_path / "cache")
    train = ["train", "mixture", "--config", str(config), "--run-id", "mine", "--iteration", "1"]
    assert main([*train, "--sft-model", str(tiny_model_path)]) == 0
    [metrics] = store.query("SELECT metrics FROM checkpoints WHERE kind = 'mixture'")["metrics"]
    assert json.loads(metrics)["n_pairs"] == 2 and json.loads(metrics)["steps"] >= 1


def test_importing_into_an_iteration_with_pairs_needs_replace(tmp_path, capsys):
    source = write_json(tmp_path / "p.json", AUTHORS_PAIRS)
    args = ["import-pairs", str(source), "--run-id", "r", "--iteration", "1", "--env", "twx/twc"]
    store = ["--store", str(tmp_path / "s.duckdb")]
    assert main([*args, *store]) == 0
    assert main([*args, *store]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main([*args, *store, "--replace"]) == 0
    assert "(replaced 2)" in capsys.readouterr().out
    assert Store(tmp_path / "s.duckdb").count("pairs") == 2


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"chosen": [{"from": "human", "value": "x"}]}, ["field 'chosen'", "'gpt' turn"]),
        ({"level": "turn"}, ["field 'level'", "'turn'"]),
        ({"chosen_reward": True}, ["field 'chosen_reward'", "a boolean"]),
        ({"prefix_len": -1}, ["field 'prefix_len'"]),
        ({"id": "twc_3_step_2", "prompt": AUTHORS_PAIRS[0]["prompt"]}, ["duplicate id"]),
    ],
)
def test_a_bad_pair_file_is_a_named_error_and_writes_nothing(tmp_path, capsys, change, fragments):
    bad = {**AUTHORS_PAIRS[1], **change}
    source = write_json(tmp_path / "bad-pairs.json", [AUTHORS_PAIRS[0], bad])
    store = tmp_path / "s.duckdb"
    args = ["import-pairs", str(source), "--run-id", "r", "--iteration", "1", "--env", "twx/twc"]
    assert main([*args, "--store", str(store)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "bad-pairs.json" in line and all(fragment in line for fragment in fragments)
    assert not store.exists()


def test_a_pair_file_without_env_needs_env(tmp_path, capsys):
    source = write_json(tmp_path / "p.json", AUTHORS_PAIRS)
    store = tmp_path / "s.duckdb"
    args = ["import-pairs", str(source), "--run-id", "r", "--iteration", "1"]
    assert main([*args, "--store", str(store)]) == 2
    assert "field 'env_id'" in capsys.readouterr().err and not store.exists()


def test_export_then_import_gives_the_same_pairs(smoke_run, tmp_path):
    config, store, _ = smoke_run
    out = tmp_path / "pairs.json"
    export = ["export", "pairs", "--out", str(out), "--store", str(store.path)]
    assert main([*export, "--run-id", config.run_id, "--iteration", "1"]) == 0
    copy = Store(tmp_path / "new.duckdb")
    args = ["import-pairs", str(out), "--run-id", config.run_id, "--iteration", "1"]
    assert main([*args, "--store", str(copy.path)]) == 0
    sql = f"SELECT {PAIR_COLUMNS} FROM pairs WHERE iteration = 1 ORDER BY ALL"
    original = store.query(sql)
    assert len(original) > 0
    assert copy.query(sql).equals(original)
    assert copy.pairs(config.run_id, 1) == store.pairs(config.run_id, 1)


def test_every_stage_records_its_cost_in_its_commit(smoke_run):
    config, store, _ = smoke_run
    key = "SELECT run_id, iteration, stage FROM {} ORDER BY ALL"
    assert store.query(key.format("stage_costs")).equals(store.query(key.format("stage_runs")))
    costs = store.query("SELECT * FROM stage_costs").set_index("stage")
    assert (costs["wall_s"] > 0).all() and (costs["cpu_s"] >= 0).all()
    assert costs["gpu_s"].isna().all()  # the tests run on CPU
    mc = store.query(
        "SELECT sum(prefill_tokens) AS p, sum(env_steps) AS e, count(*) AS n FROM rollouts "
        "WHERE kind = 'mc' AND actor = 'agent'"
    ).iloc[0]
    agent = costs.loc["agent-step-rewards"]
    assert (agent["prefill_tokens"], agent["env_steps"], agent["rollouts"]) == (mc.p, mc.e, mc.n)
    [tokens] = store.query("SELECT metrics FROM checkpoints WHERE kind = 'sft'")["metrics"]
    assert costs.loc["sft", "trained_tokens"] == json.loads(tokens)["tokens"] > 0
    assert costs["donor_run_id"].isna().all()


def test_the_run_cost_table_shows_cost_per_pair_and_shares(smoke_run):
    config, store, _ = smoke_run
    costs = store.iteration_costs(config.run_id).set_index("iteration")
    pairs = store.count("pairs", "run_id = ? AND iteration = 1", [config.run_id])
    assert costs.loc["1", "pairs"] == pairs > 0
    # from the iteration's unrounded wall time (the table shows wall_s rounded to 0.1 s)
    per_pair = store.query(
        "SELECT round(sum(wall_s) / ?, 2) AS s FROM stage_work "
        "WHERE run_id = ? AND cost_iteration = 1",
        [pairs, config.run_id],
    )["s"].iloc[0]
    assert costs.loc["1", "s_per_pair"] == per_pair
    shares = costs.loc["1", ["mc_pct", "explore_pct", "train_pct", "eval_pct"]]
    assert shares.min() > 0 and shares.sum() <= 101
    total = store.query("SELECT sum(wall_s) AS s FROM stage_costs")["s"].iloc[0]
    assert costs.loc["total", "wall_s"] == round(total, 1)


def test_a_copied_stage_records_its_own_cost_and_names_the_donor(run_store, smoke_run, tmp_path):
    config, _, _ = smoke_run
    [result] = run_store.query(
        "SELECT result FROM stage_runs WHERE stage = 'sft' AND run_id = ?", [config.run_id]
    )["result"]
    sft_path = json.loads(result)["path"]
    config_file = write_config(tmp_path, Path(config.model), run_store.path, config.cache_dir)
    evaluate = ["evaluate", "--config", str(config_file), "--model", sft_path, "--split", "dev"]
    assert main([*evaluate, "--limit", str(config.dev_limit), "--iteration", "7"]) == 0
    [row] = run_store.query("SELECT * FROM stage_costs WHERE iteration = 7").to_dict("records")
    assert (row["donor_run_id"], row["donor_iteration"]) == (config.run_id, 0)
    assert row["rollouts"] == 0 and row["stage"] == "evaluate-dev"


def test_estimate_predicts_the_demo_run_and_compares_the_last_prediction(run_store, capsys):
    store = ["--store", str(run_store.path)]
    assert main(["estimate", "--config", str(ROOT / "configs" / "smoke.yaml"), *store]) == 0
    first = capsys.readouterr().out
    assert "no earlier prediction" in first
    assert main(["estimate", "--config", str(ROOT / "configs" / "demo.yaml"), *store]) == 0
    out = capsys.readouterr().out
    assert "run 'demo': predicted" in out
    for stage in ("sft", "explore", "expert-step-rewards", "train-mixture", "evaluate"):
        assert stage in out
    assert "last prediction of a measured run: 'smoke'" in out and "off by" in out
    [predicted] = run_store.query("SELECT predicted_s FROM estimates WHERE run_id = 'demo'")[
        "predicted_s"
    ]
    assert predicted > 0


def test_estimate_without_measurements_says_so(tmp_path, capsys):
    Store(tmp_path / "s.duckdb").write({"runs": [{"run_id": "x", "config": "{}"}]})
    config = ["estimate", "--config", str(ROOT / "configs" / "demo.yaml")]
    assert main([*config, "--store", str(tmp_path / "s.duckdb")]) == 0
    out = capsys.readouterr().out
    assert "no measurement of ingest, evaluate, sft" in out and "DEFAULT" in out


def test_show_rollout_prints_each_action_and_step_reward(smoke_run, capsys):
    _, store, _ = smoke_run
    [row] = store.query(
        "SELECT rollout_id, run_id, task_id, steps FROM rollout_ids WHERE kind = 'explore' "
        "AND prefix_len = 1 ORDER BY task_id LIMIT 1"
    ).to_dict("records")
    assert main(["show", "rollout", row["rollout_id"], "--store", str(store.path)]) == 0
    out = capsys.readouterr().out
    for step in json.loads(row["steps"]):
        assert f"-> action: {step['action']}" in out
    [expert_reward] = store.query(
        "SELECT mean_reward FROM step_rewards WHERE actor = 'expert' AND task_id = ? "
        "AND prefix_len = 0",
        [row["task_id"]],
    )["mean_reward"]
    assert f"[step 1 | expert (replayed) | step reward {expert_reward:.3f}" in out


def test_show_pair_prints_both_sides_rewards_and_mc_samples(smoke_run, capsys):
    _, store, _ = smoke_run
    found = store.query("SELECT * FROM pair_ids WHERE level = 'step' ORDER BY pair_id LIMIT 1")
    assert len(found) == 1
    pair = found.iloc[0]
    assert main(["show", "pair", pair["pair_id"], "--store", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert f"reward {pair['chosen_reward']:.3f}" in out
    assert f"reward {pair['rejected_reward']:.3f}" in out
    assert "diverge here" in out
    for side in ("chosen", "rejected"):
        for message in json.loads(pair[side]):
            if message["role"] == "assistant":  # the tiny random model's turns may not parse
                parsed = parse_react(message["content"])
                assert f"-> action: {parsed.action if parsed.ok else '(did not parse)'}" in out
    samples = store.query("SELECT * FROM pair_mc_samples WHERE pair_id = ?", [pair["pair_id"]])
    assert set(samples["actor"]) == {"expert", "agent"}
    assert "Monte Carlo samples" in out and samples["rollout_id"].iloc[0] in out


def test_unknown_id_is_a_clear_error(smoke_run, capsys):
    _, store, _ = smoke_run
    assert main(["show", "pair", "nope", "--store", str(store.path)]) == 2
    assert "no pair with id 'nope'" in capsys.readouterr().err


def test_step_reward_quantiles_cover_expert_agent_and_margin(smoke_run):
    config, store, _ = smoke_run
    table = store.step_reward_quantiles(config.run_id).set_index("reward")
    assert list(table.index) == ["expert", "agent", "margin (expert - agent)"]
    n_agent = store.count("step_rewards", "actor = 'agent' AND mean_reward IS NOT NULL")
    assert table.loc["agent", "n"] == n_agent
    assert (table["min"] <= table["p50"]).all() and (table["p50"] <= table["max"]).all()
