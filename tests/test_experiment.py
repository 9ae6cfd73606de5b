"""A micro reproduction experiment on the tiny local Llama: SFT, ETO and IPR x 2 seeds x 1
iteration, then `ipr report`, whose every table must be what its printed query returns."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from flows.cli import main as cli_main
from flows.commands import main
from flows.report import COMPARED, EPISODES_SQL, SAME_TRANSCRIPTS_SQL, markdown_table, run_query
from flows.stats import paired_comparisons
from ipr_core.errors import InputError, IprError
from ipr_core.run.experiment import load_experiment_config, run_experiment
from ipr_core.run.manifest import ManifestChanged
from ipr_core.store.store import Store, manifest_row

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "experiment-smoke.yaml"
TABLES = ["runs", "rollouts", "step_rewards", "pairs", "checkpoints", "evaluations"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tiny_model_path):
    """The smoke experiment, run twice: the second run must find everything finished."""
    cache = tmp_path_factory.mktemp("ipr")
    (cache / "models").mkdir()
    (cache / "models" / "tiny-llama").symlink_to(tiny_model_path)
    config = load_experiment_config(CONFIG, store=cache / "x.duckdb")
    config = config.model_copy(update={"run": config.run.model_copy(update={"cache_dir": cache})})
    first_log: list[str] = []
    runs = run_experiment(config, log=first_log.append)
    store = Store(config.run.store)
    counts = {t: store.count(t) for t in TABLES}
    second_log: list[str] = []
    rerun = run_experiment(config, log=second_log.append)
    return config, store, runs, rerun, counts, first_log, second_log


def test_every_method_and_seed_finishes_with_a_test_evaluation(experiment):
    config, store, runs, *_ = experiment
    assert len(runs) == 6 and set(runs["status"]) == {"finished"}
    assert set(zip(runs["method"], runs["seed"], strict=True)) == {
        (m, s) for m in ("sft", "eto", "ipr") for s in (0, 1)
    }
    best = dict(zip(runs["method"] + runs["seed"].astype(str), runs["best_iteration"], strict=True))
    assert best["sft0"] == best["sft1"] == 0  # the SFT row trains nothing after stage 1
    assert {best[k] for k in ("eto0", "eto1", "ipr0", "ipr1")} == {1}
    dev = store.query(
        "SELECT run_id, list(iteration ORDER BY iteration) AS its FROM evaluations "
        "WHERE split = 'dev' GROUP BY run_id"
    )
    by_run = {r.run_id: list(r.its) for r in dev.itertuples()}
    assert by_run["smoke-ipr-s0"] == [0, 1] and by_run["smoke-sft-s1"] == [0]
    test = store.query(
        "SELECT x.method, x.seed, e.n_tasks FROM experiment_runs x JOIN evaluations e "
        "ON e.run_id = x.run_id AND e.iteration = x.best_iteration AND e.split = 'test' "
        "AND e.policy_id = x.test_policy_id"
    )
    assert len(test) == 6 and set(test["n_tasks"]) == {2}
    assert not runs["test_reward"].isna().any()


def test_each_seed_trains_one_sft_model_its_methods_share(experiment):
    config, store, _, _, _, first_log, _ = experiment
    assert config.sft_per_seed and store.count("checkpoints", "kind = 'sft'") == 2
    # the SFT model is a stage of every run, with its completion record and its cost
    assert store.count("stage_runs", "stage = 'sft'") == 6
    assert store.count("stage_costs", "stage = 'sft'") == 6
    trained = [line for line in first_log if "SFT checkpoint" in line]
    assert len(trained) == 6 and sum("(reused)" in line for line in trained) == 4
    # every run's iteration 0 is its seed's SFT model, evaluated once per seed
    policies = store.query(
        "SELECT DISTINCT x.seed, e.policy_id, c.kind FROM evaluations e "
        "JOIN checkpoints c ON c.checkpoint_id = e.policy_id "
        "JOIN experiment_runs x ON x.run_id = e.run_id WHERE e.iteration = 0"
    )
    assert sorted(policies["seed"]) == [0, 1] and set(policies["kind"]) == {"sft"}
    copied = [line for line in first_log if "evaluate-dev [iteration 0]: rows of" in line]
    assert len(copied) == 4 and all("copied: same inputs" in line for line in copied)


def test_one_sft_model_for_all_seeds_and_one_fixed_scorer_are_options():
    config = load_experiment_config(CONFIG)
    assert {config.run_config("ipr", s).sft.seed for s in (0, 1)} == {0, 1}
    assert config.scorer_config() is None
    shared = config.model_copy(update={"sft_per_seed": False})
    assert {shared.run_config("ipr", s).sft.seed for s in (0, 1)} == {config.run.sft.seed}
    fixed = config.model_copy(update={"fixed_scorer": True}).scorer_config()
    assert fixed is not None and fixed.run_id == "smoke-scorer"
    assert fixed.sft == config.run.sft


def test_runs_share_what_their_inputs_decide_and_eto_scores_no_steps(experiment):
    _, store, _, _, _, first_log, _ = experiment

    def donors(stage: str) -> dict[str, str]:
        """run -> the run whose rows of `stage` it copied."""
        lines = [line for line in first_log if f"{stage}: rows of run" in line]
        return {line.split("]")[0][1:]: line.split("rows of run ")[1].split()[0] for line in lines}

    # each seed has its own SFT model, so its own scorer and explorer: nothing is copied
    # across seeds (ETO explores from the start of each task only, IPR from every step)
    assert donors("expert-step-rewards [iteration 0]") == {}
    assert donors("explore [iteration 1]") == {}
    # the agent steps are sampled with the run's seed: each IPR run scores its own
    assert donors("agent-step-rewards [iteration 1]") == {}
    scored = store.query("SELECT DISTINCT run_id FROM step_rewards ORDER BY run_id")
    assert scored["run_id"].tolist() == ["smoke-ipr-s0", "smoke-ipr-s1"]
    # ETO trains on trajectory pairs only: it explores each task from the start, and its
    # pairs are exactly IPR's trajectory pairs of the same seed
    prefixes = store.query(
        "SELECT DISTINCT prefix_len FROM rollouts WHERE kind = 'explore' AND run_id LIKE '%eto%'"
    )
    assert prefixes["prefix_len"].tolist() == [0]
    pairs = store.query(
        "SELECT run_id, level, count(*) AS n, md5(string_agg(concat_ws('|', task_id, "
        "prefix_len, prompt, chosen, rejected), '#' ORDER BY task_id, prefix_len)) AS h "
        "FROM pairs WHERE iteration = 1 GROUP BY run_id, level"
    )
    by_run = {(r.run_id, r.level): (r.n, r.h) for r in pairs.itertuples()}
    assert by_run[("smoke-eto-s0", "trajectory")][0] > 0
    assert by_run[("smoke-ipr-s0", "step")][0] > 0
    for seed in (0, 1):
        eto, ipr = f"smoke-eto-s{seed}", f"smoke-ipr-s{seed}"
        assert by_run[(eto, "trajectory")] == by_run[(ipr, "trajectory")]
        assert (eto, "step") not in by_run
    assert store.count("pairs", "run_id LIKE 'smoke-sft-%'") == 0
    mixtures = store.query(
        "SELECT run_id, json_extract(config, '$.weights.step_dpo')::DOUBLE AS w_step, "
        "json_extract(config, '$.seed')::INTEGER AS seed FROM checkpoints WHERE kind = 'mixture'"
    )
    assert len(mixtures) == 4  # eto and ipr, two seeds each: four distinct checkpoints
    weights = dict(zip(mixtures["run_id"], mixtures["w_step"], strict=True))
    assert weights["smoke-eto-s0"] == 0.0 and weights["smoke-ipr-s0"] == 1.0
    seeds = dict(zip(mixtures["run_id"], mixtures["seed"], strict=True))
    assert seeds["smoke-ipr-s1"] == 1


def test_rerun_skips_finished_runs_and_writes_nothing(experiment):
    _, store, runs, rerun, counts, _, second_log = experiment
    assert {t: store.count(t) for t in TABLES} == counts
    assert sum("finished before; skipped" in line for line in second_log) == 6
    assert rerun.equals(runs)


def test_ipr_experiment_no_prefect_finds_every_run_finished(experiment, capsys):
    """The command CI runs: the same runs, as plain calls; a finished experiment exits 0."""
    config, store, runs, *_ = experiment
    args = ["experiment", "--config", str(CONFIG), "--store", str(store.path), "--no-prefect"]
    assert cli_main([*args, "--set", f"run.cache_dir={config.run.cache_dir}"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished before; skipped") == len(runs) == 6


def test_changed_shared_settings_are_refused(experiment):
    config, *_ = experiment
    changed = config.model_copy(update={"test_limit": 3})
    with pytest.raises(IprError, match=r"\(test_limit\)"):
        run_experiment(changed, log=lambda _: None)
    run = config.run.model_copy(update={"dev_limit": 1})
    with pytest.raises(IprError, match=r"\(run\.dev_limit\)"):
        run_experiment(config.model_copy(update={"run": run}), log=lambda _: None)


def test_report_tables_are_what_their_queries_return(experiment, tmp_path, capsys):
    config, store, runs, *_ = experiment
    out = tmp_path / "docs" / "results.md"
    args = ["report", "--experiment", "smoke", "--out", str(out), "--store", str(store.path)]
    assert main(args) == 0
    text = out.read_text()
    assert (tmp_path / "docs" / "results-dev-reward.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "docs" / "results-training-steps.png").read_bytes()[:4] == b"\x89PNG"
    # the training-steps figure plots its query's rows: every mixture step, per method
    [curve_sql] = re.findall(r"\(results-training-steps.png\)\n\n```sql\n(.*?)\n```", text, re.S)
    curve = store.query(curve_sql)
    assert set(curve["label"]) == {"eto", "ipr"} and curve["seeds"].eq(2).all()
    assert curve.loc[curve["label"] == "ipr", "s_dpo_accuracy"].notna().all()
    assert curve.loc[curve["label"] == "eto", "s_dpo_accuracy"].isna().all()
    blocks = re.findall(r"((?:^\|[^\n]*\|\n)+)\n```sql\n(.*?)\n```", text, flags=re.M | re.S)
    # settings, results, per seed, dev curve, dev actions, training data, training steps,
    # costs, step reward distribution, 2 x step accuracy, per-game differences, actions,
    # episodes, test evaluations, manifests
    assert len(blocks) == 16
    for table, sql in blocks:
        assert markdown_table(store.query(sql)) == table.strip()
    settings = store.query(blocks[0][1])  # methods in the paper's order, seeds ascending
    assert settings[["methods", "seeds"]].values.tolist() == [["sft, eto, ipr", "0, 1"]]
    assert config.sft_per_seed and settings["sft_per_seed"].tolist() == [True]
    assert "Iteration 0 is each seed's own SFT model" in text  # not one shared model
    dev_actions = store.query(blocks[4][1])  # each iteration's dev model, by verb
    assert set(dev_actions["method"]) == {"sft", "eto", "ipr"}
    assert dev_actions["verb_shares"].str.fullmatch(r"(\S+ [01]\.\d\d)(, \S+ [01]\.\d\d)*").all()
    training_data = store.query(blocks[5][1])
    assert set(training_data["method"]) == {"eto", "ipr"}
    assert (training_data["pairs_trained_on"] > 0).all()
    training = store.query(blocks[6][1])
    assert set(training["method"]) == {"eto", "ipr"}  # the trained methods, every iteration
    step_accuracy = training.groupby("method")["s_dpo_accuracy"]
    assert step_accuracy.count()["ipr"] == (training["method"] == "ipr").sum()
    assert step_accuracy.count()["eto"] == 0  # ETO's loss has no step term
    costs = store.query(blocks[7][1])
    assert set(costs["method"]) == {"sft", "eto", "ipr"}
    # a seed's later methods copy the dev evaluation of the seed's SFT model
    assert costs.loc[costs["iteration"] == 0, "copied_stages"].sum() > 0
    distribution = store.query(blocks[8][1])
    assert set(distribution["reward"]) == {"expert", "agent", "margin"}
    actions = store.query(blocks[12][1])  # every action of every tested model, by verb
    assert list(actions["method"].unique()) == ["sft", "eto", "ipr"]
    assert actions.groupby("method")["share"].sum().round(2).eq(1.0).all()
    tested_steps = store.query(
        "SELECT sum(n_steps) FROM rollouts r JOIN experiment_runs x ON x.run_id = r.run_id "
        "AND r.iteration = x.best_iteration AND r.policy_id = x.test_policy_id "
        "WHERE x.experiment_id = 'smoke' AND r.kind = 'eval' AND r.task_id LIKE 'test-%'"
    ).iloc[0, 0]
    assert actions["actions"].sum() == tested_steps
    results_table = blocks[1][0]
    rows = [line.split("|")[1].strip() for line in results_table.strip().splitlines()[2:]]
    assert rows == ["sft", "eto", "ipr"]
    # the results table's mean is the mean over seeds of the per-run test rewards
    ipr = runs[runs["method"] == "ipr"]["test_reward"].mean()
    ipr_row = next(line for line in results_table.splitlines() if line.startswith("| ipr |"))
    assert float(ipr_row.split("|")[3]) == pytest.approx(ipr, abs=1e-3)
    assert "Is IPR's mean test reward above ETO's? " in text
    manifests = blocks[-1][0].strip().splitlines()
    assert manifests[0].startswith("| method | seed | run_id | recorded | model_id | packages")
    assert len(manifests) == 2 + 6  # one manifest per run
    assert all('"torch":' in line and '"test":' in line for line in manifests[2:])


def test_a_run_resumed_with_another_package_version_is_refused(experiment, tmp_path):
    config, store, *_ = experiment
    copy = Store(shutil.copy(store.path, tmp_path / "x.duckdb"))
    [stored] = copy.run_manifests("smoke-ipr-s0")
    stored["packages"]["transformers"] = "4.0.0"
    with duckdb.connect(str(copy.path)) as con:
        con.execute("DELETE FROM run_manifests WHERE run_id = 'smoke-ipr-s0'")
        con.execute("UPDATE experiment_runs SET status = 'running' WHERE run_id = 'smoke-ipr-s0'")
    resumed = config.model_copy(update={"run": config.run.model_copy(update={"store": copy.path})})
    moved = {"experiment_id": "smoke", "config": resumed.shared_settings()}  # the copy's path
    copy.write({"run_manifests": [manifest_row("smoke-ipr-s0", stored)], "experiments": [moved]})
    with pytest.raises(
        ManifestChanged, match=r"'smoke-ipr-s0'.*packages\.transformers: 4\.0\.0 -> "
    ):
        run_experiment(resumed, log=lambda _: None)
    assert copy.run_manifests("smoke-ipr-s0") == [stored]


def test_report_pairs_methods_on_the_test_games_from_the_episodes_sql(experiment, tmp_path):
    _, store, runs, *_ = experiment
    out = tmp_path / "results.md"
    args = ["report", "--experiment", "smoke", "--out", str(out), "--store", str(store.path)]
    assert main(args) == 0
    text = out.read_text()
    section = text.split("## Paired comparisons on the test games")[1].split("## Settled")[0]
    episodes_table, episodes_sql = re.search(
        r"### Per-episode outcomes.*?((?:^\|[^\n]*\|\n)+)\n```sql\n(.*?)\n```", section, re.M | re.S
    ).groups()
    assert "'smoke'" in episodes_sql
    episodes = store.query(episodes_sql)
    assert markdown_table(episodes) == episodes_table.strip()
    # exactly the test episodes: 6 runs x 2 test tasks, no dev task among them
    assert len(episodes) == 12
    assert set(episodes["game_id"]) <= {"test-20000", "test-20001"}
    # the printed comparison table is paired_comparisons of that query's output
    paired = paired_comparisons(episodes, COMPARED)
    assert markdown_table(paired) in section
    assert list(paired["comparison"].unique()) == ["ipr - sft", "ipr - eto", "eto - sft"]
    assert "`flows.stats.paired_comparisons`" in section and "10000 resamples" in section
    claim = re.search(r"^- (IPR beats ETO|ETO beats IPR|IPR does not beat ETO): .*$", text, re.M)
    ipr_eto = paired[(paired["comparison"] == "ipr - eto") & (paired["metric"] == "reward")]
    assert f"[{ipr_eto['ci_low'].iloc[0]:.3f}, {ipr_eto['ci_high'].iloc[0]:.3f}]" in claim.group(0)
    assert ("does not beat" in claim.group(0)) == (ipr_eto["verdict"].iloc[0] == "not shown")
    assert "0 of 12 test episodes failed" in section
    # the printed code regenerates the comparison table and is as ruff formats it
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ipr - sft" in ran.stdout
    ruff = [str(Path(sys.executable).with_name("ruff")), "format", "--diff", "-"]
    subprocess.run(ruff, input=code, capture_output=True, text=True, check=True)
    # the test evaluations are listed with their times (the smoke config is not committed
    # under this experiment id's name elsewhere, so it is found and compared)
    settled = text.split("## Settled before test")[1].split("## What the")[0]
    assert settled.count("| smoke-") == 6


def test_episodes_sql_leaves_failed_episodes_out_and_averages_the_rest(experiment, tmp_path):
    _, store, *_ = experiment
    copy = Store(tmp_path / "copy.duckdb")
    copy.path.write_bytes(store.path.read_bytes())
    with copy.transaction() as con:  # seed 0's IPR episode on test-20000 failed, seed 1 solved it
        con.execute(
            "UPDATE rollouts SET status = 'env_error', outcome_reward = NULL "
            "WHERE run_id = 'smoke-ipr-s0' AND kind = 'eval' AND task_id = 'test-20000'"
        )
        con.execute(
            "UPDATE rollouts SET outcome_reward = 1.0, n_steps = 3 "
            "WHERE run_id = 'smoke-ipr-s1' AND kind = 'eval' AND task_id = 'test-20000'"
        )
    frame = run_query(copy, EPISODES_SQL, "smoke").frame
    ipr = frame[(frame["method"] == "ipr") & (frame["game_id"] == "test-20000")]
    failed = ipr[ipr["seed"] == 0].iloc[0]
    solved = ipr[ipr["seed"] == 1].iloc[0]
    assert bool(failed.failed) and pd.isna(failed.reward)
    assert (solved.failed, solved.reward, solved.success, solved.steps) == (False, 1.0, 1.0, 3.0)
    # the dev episodes of the same model are not test episodes
    assert set(frame["game_id"]) == {"test-20000", "test-20001"} and len(frame) == 12
    paired = paired_comparisons(frame, COMPARED, n_resamples=100)
    reward = paired[(paired["comparison"] == "ipr - sft") & (paired["metric"] == "reward")].iloc[0]
    assert reward.games == 2


def test_tasks_with_the_same_transcripts_stay_two_games_and_are_listed(experiment, tmp_path):
    """Splits hold distinct games by content, so two test tasks are two games even where
    every tested model wrote the same transcript (an agent that never leaves the first
    room cannot tell games apart); the report lists such tasks instead of merging them."""
    _, store, *_ = experiment
    copy = Store(tmp_path / "copy.duckdb")
    copy.path.write_bytes(store.path.read_bytes())
    with copy.transaction() as con:  # every tested model writes test-20000's transcript twice
        con.execute(
            "UPDATE rollouts r SET steps = (SELECT s.steps FROM rollouts s "
            "WHERE s.run_id = r.run_id AND s.iteration = r.iteration "
            "AND s.policy_id = r.policy_id AND s.kind = 'eval' AND s.task_id = 'test-20000') "
            "WHERE r.kind = 'eval' AND r.task_id = 'test-20001'"
        )
    episodes = run_query(copy, EPISODES_SQL, "smoke").frame
    assert set(episodes["game_id"]) == {"test-20000", "test-20001"} and len(episodes) == 12
    same = run_query(copy, SAME_TRANSCRIPTS_SQL, "smoke").frame
    assert same.to_dict("records") == [{"test_tasks": "test-20000, test-20001", "tasks": 2}]
    assert run_query(store, SAME_TRANSCRIPTS_SQL, "smoke").frame.empty


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda t: t.replace("methods: [sft, eto, ipr]", "methods: [sft, dpo]"), "methods.1"),
        (lambda t: t.replace("seeds: [0, 1]", "seeds: [0, 0]"), "seeds"),
        (lambda t: t.replace("  model: tiny-llama", "  model: tiny-llama\n  seed: 3"), "run.seed"),
        (lambda t: t.replace("test_limit: 2", "test_limit: 0"), "test_limit"),
    ],
)
def test_bad_experiment_config_names_file_and_field(tmp_path, edit, field):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(CONFIG.read_text()))
    with pytest.raises(InputError) as info:
        load_experiment_config(path)
    assert "bad.yaml" in str(info.value)
    assert field in str(info.value)


def test_report_of_unknown_experiment_is_a_clear_error(experiment, tmp_path, capsys):
    _, store, *_ = experiment
    args = ["report", "--experiment", "nope", "--out", str(tmp_path / "r.md")]
    assert main([*args, "--store", str(store.path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_an_experiment_recorded_before_sft_per_seed_resumes_with_one_sft_model(tmp_path):
    """Its recorded settings lack `sft_per_seed` (and the later `tuning`, `fallback_to_sft`):
    it ran with one SFT model for all seeds, a test evaluation and trained models picked."""
    from ipr_core.run.experiment import register

    config = load_experiment_config(CONFIG, store=tmp_path / "x.duckdb")
    recorded = json.loads(config.shared_settings())
    for later in ("sft_per_seed", "fixed_scorer", "tuning", "fallback_to_sft"):
        del recorded[later]
    store = Store(config.run.store)
    store.write({"experiments": [{"experiment_id": "smoke", "config": json.dumps(recorded)}]})
    register(store, config.model_copy(update={"sft_per_seed": False}))
    with pytest.raises(IprError, match=r"\(sft_per_seed\)"):
        register(store, config)


def test_an_experiment_recorded_before_later_run_settings_resumes_at_their_old_value(tmp_path):
    """Its recorded run settings lack `monte_carlo.expert_steps` and `cut_explorations`
    (`ADDED_AFTER_STORES`): it ran with `all` and no cut, so those resume; others do not."""
    from ipr_core.run.experiment import register

    config = load_experiment_config(CONFIG, store=tmp_path / "x.duckdb")
    recorded = json.loads(config.shared_settings())
    del recorded["run"]["monte_carlo"]["expert_steps"], recorded["run"]["cut_explorations"]
    store = Store(config.run.store)
    store.write({"experiments": [{"experiment_id": "smoke", "config": json.dumps(recorded)}]})
    register(store, config)
    run = config.run.model_copy(update={"cut_explorations": True})
    with pytest.raises(IprError, match=r"\(run.cut_explorations\)"):
        register(store, config.model_copy(update={"run": run}))


def test_a_tuning_experiment_never_evaluates_a_test_task(experiment, tmp_path):
    config, store, *_ = experiment
    copy = Path(shutil.copy(store.path, tmp_path / "tune.duckdb"))
    run = config.run.model_copy(update={"store": copy})
    tuning = config.model_copy(
        update={"experiment_id": "tune", "methods": ["sft"], "tuning": True, "run": run}
    )
    runs = run_experiment(tuning, log=lambda _: None)
    assert runs["status"].tolist() == ["finished", "finished"]
    assert runs["test_reward"].isna().all()
    tested = Store(copy).query(
        "SELECT count(*) AS n FROM evaluations WHERE run_id LIKE 'tune-%' AND split = 'test'"
    )
    assert int(tested["n"].iloc[0]) == 0
    [manifest] = Store(copy).run_manifests("tune-sft-s0")
    assert set(manifest["splits"]) == {"train", "dev"}
