"""The report's statistics (`flows.stats`) on hand-computable inputs, the closing statements
of `ipr report` read off them, and its queries on hand-written stores."""

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.report import (
    Commit,
    analysis,
    coverage_statement,
    episode_mismatches,
    paired_statements,
    rft_statement,
    run_query,
    settled_statements,
)
from flows.stats import (
    hierarchical_bootstrap,
    paired_comparisons,
    sign_flip_p,
    verdict,
)
from ipr_core.run.experiment import load_experiment_config
from ipr_core.store.report_queries import DEV_ACTIONS_SQL, METHOD_COSTS_SQL, TRAINING_DATA_SQL
from ipr_core.store.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_exact_permutation_p_on_five_games():
    # 32 sign vectors; only all-plus and all-minus reach |mean| 1: p = 2/32, so five games
    # can never give p < 0.05
    assert sign_flip_p([1.0, 1.0, 1.0, 1.0, 1.0]) == 0.0625
    # a zero difference flips to itself: 2 of 16 sign vectors of the rest, times 2
    assert sign_flip_p([1.0, 1.0, 1.0, 1.0, 0.0]) == 0.125
    # observed |2 + 1 - 1 + 1 + 1| = 4: with the 2 signed +, the four 1s must sum to 2 or 4
    # (4 + 1 of their 16 sign vectors); mirrored for the 2 signed -: 10 of 32
    assert sign_flip_p([2.0, 1.0, -1.0, 1.0, 1.0]) == 10 / 32


def test_monte_carlo_p_is_seeded_and_close_to_the_exact_one():
    diffs = np.random.default_rng(4).normal(0.3, 1.0, 18)
    exact = sign_flip_p(diffs, max_exact=18)
    sampled = sign_flip_p(diffs, n_permutations=20_000, max_exact=16)
    assert sampled == sign_flip_p(diffs, n_permutations=20_000, max_exact=16)
    assert sampled == pytest.approx(exact, abs=0.01)
    assert sign_flip_p(diffs, n_permutations=20_000, seed=1) != sampled


def test_a_constant_difference_gives_exactly_that_difference():
    assert hierarchical_bootstrap([[0.25, 0.25], [0.25], [0.25, 0.25, 0.25]]) == (
        0.25,
        0.25,
        0.25,
    )


def test_the_bootstrap_resamples_seeds_within_games():
    # one game, seeds 0 and 1: resampling games alone would give [0.5, 0.5]; resampling its
    # two seeds gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    mean, low, high = hierarchical_bootstrap([[0.0, 1.0]])
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_the_mean_is_over_games_of_the_mean_over_seeds():
    mean, low, high = hierarchical_bootstrap([[1.0, 0.0, 0.0], [0.5]], n_resamples=2000)
    assert mean == pytest.approx((1 / 3 + 0.5) / 2)
    assert low < mean < high


def test_the_verdict_needs_the_interval_and_the_test():
    assert verdict(0.01, 0.09, 0.03) == "A better"
    assert verdict(0.01, 0.09, 0.06) == "not shown"  # interval above 0, p too large
    assert verdict(-0.01, 0.09, 0.01) == "not shown"  # p small, interval contains 0
    assert verdict(-0.09, -0.01, 0.01) == "B better"
    assert verdict(-0.5, -0.1, 0.01, lower_is_better=True) == "A better"  # fewer steps


def _episodes(rows):
    frame = pd.DataFrame(rows, columns=["method", "seed", "game_id", "reward", "steps", "failed"])
    frame["success"] = (frame["reward"] >= 1.0).astype(float)
    return frame


def test_comparisons_pair_by_game_and_seed_and_drop_failed_episodes():
    episodes = _episodes(
        [
            ("sft", 0, "g1", 0.0, 10, False),
            ("sft", 1, "g1", 0.5, 8, False),
            ("sft", 0, "g2", 1.0, 4, False),
            ("sft", 1, "g2", 1.0, 4, False),
            ("ipr", 1, "g1", 1.0, 6, False),  # listed in another order: paired by game, seed
            ("ipr", 0, "g1", 0.5, 9, True),  # failed: seed 0 of g1 drops out, not a 0
            ("ipr", 0, "g2", 1.0, 3, False),
            ("ipr", 1, "g2", 1.0, 3, False),
        ]
    )
    paired = paired_comparisons(episodes, [("ipr", "sft"), ("ipr", "eto")], n_resamples=200)
    assert set(paired["comparison"]) == {"ipr - sft"}  # eto was not run
    rows = {r.metric: r for r in paired.itertuples()}
    reward = rows["reward"]
    assert (reward.games, reward.a_mean, reward.b_mean, reward.mean_diff) == (2, 1.0, 0.75, 0.25)
    assert (reward.a_higher, reward.a_lower, reward.equal) == (1, 0, 1)
    # game differences 0.5 and 0: every sign vector is as extreme as the observed one
    assert (reward.ci_low, reward.ci_high, reward.p) == (0.0, 0.5, 1.0)
    assert reward.verdict == "not shown"
    assert (rows["steps"].mean_diff, rows["steps"].ci_high) == (-1.5, -1.0)


def test_statements_say_plainly_which_comparisons_ipr_wins():
    def row(comparison, metric, diff, low, high, p):
        return {"comparison": comparison, "metric": metric, "games": 50, "a_mean": 0.45,
                "b_mean": 0.45 - diff, "mean_diff": diff, "ci_low": low, "ci_high": high,
                "ci": "above 0" if low > 0 else "below 0" if high < 0 else "contains 0",
                "p": p, "verdict": verdict(low, high, p, metric == "steps"),
                "a_higher": 20, "a_lower": 10, "equal": 20}  # fmt: skip

    paired = pd.DataFrame(
        [
            row("ipr - sft", "reward", 0.05, 0.01, 0.09, 0.004),
            row("ipr - eto", "reward", 0.01, -0.03, 0.04, 0.4),
            row("ipr - rft", "reward", 0.03, 0.001, 0.06, 0.07),  # interval alone is not enough
            row("ipr - sft", "steps", -0.4, -0.7, -0.1, 0.00001),
            row("ipr - ipr-no-odpo", "reward", 0.06, 0.02, 0.1, 0.01),
            row("ipr - ipr-no-sft", "reward", -0.02, -0.05, 0.01, 0.3),
        ]
    )
    text = "\n".join(paired_statements(paired))
    assert (
        "- IPR beats SFT: IPR 0.450 vs SFT 0.400, IPR - SFT test reward = +0.050, "
        "95% CI [0.010, 0.090] (above 0), p = 0.0040 over 50 games (IPR higher on 20, "
        "lower on 10, equal on 20)." in text
    )
    assert "- IPR does not beat ETO: " in text and "[-0.030, 0.040]" in text
    assert "- IPR does not beat RFT: " in text and "p = 0.0700" in text
    assert "ETO - SFT" not in text  # no row, no claim
    assert "IPR - SFT average steps = -0.400" in text and "p < 0.0001" in text
    assert "(IPR needs fewer steps)" in text
    assert "IPR wins against: SFT, IPR-NO-ODPO; not shown against: ETO, RFT, IPR-NO-SFT." in text
    assert "removing o-DPO costs reward, as in the paper" in text
    assert "no evidence here that the SFT term matters" in text
    assert paired_statements(pd.DataFrame()) == [
        "- Paired comparisons on test games: none computed."
    ]


def test_episode_mismatches_name_methods_with_too_many_or_too_few_episodes():
    rows = [("sft", s, f"g{i}", 0.0, 1, False) for i in range(3) for s in (0, 1)]
    episodes = _episodes([*rows, ("sft", 0, "dev-7", 0.0, 1, False)])  # a dev task let in
    results = pd.DataFrame({"method": ["sft", "ipr"], "seeds": [2, 2], "test_tasks": [3, 3]})
    assert episode_mismatches(episodes, results) == [
        "sft: 7 test episodes, expected 6",
        "ipr: 0 test episodes, expected 6",
    ]


SETTINGS = pd.DataFrame({"expert_reward": [1.0], "sft_tasks": [64]})
ACCURACY = pd.DataFrame(
    {"compared_steps": [10], "gold_higher": [7], "tied": [2], "gold_lower": [1],
     "step_reward_accuracy": [0.7]}
)  # fmt: skip


def statements(
    rewards: dict[str, list[float]],
    success: dict[str, float],
    tasks: int,
    paired: pd.DataFrame | None = None,
) -> str:
    """The report's closing statements for these per-seed test rewards of each method."""
    results = pd.DataFrame(
        {
            "method": list(rewards),
            "seeds": [len(r) for r in rewards.values()],
            "reward_mean": [float(np.mean(r)) for r in rewards.values()],
            "reward_std": [float(np.std(r, ddof=1)) for r in rewards.values()],
            "reward_min": [min(r) for r in rewards.values()],
            "reward_max": [max(r) for r in rewards.values()],
            "success_mean": [success[m] for m in rewards],
            "test_tasks": [tasks] * len(rewards),
        }
    )
    per_seed = pd.DataFrame(
        [
            {"method": method, "seed": seed, "test_reward": reward}
            for method, by_seed in rewards.items()
            for seed, reward in enumerate(by_seed)
        ]
    )
    return analysis(SETTINGS, results, per_seed, ACCURACY, _training_data({}), paired)


def _training_data(successes: dict[int, list[int]]) -> pd.DataFrame:
    """RFT's rows of the training-data table: per iteration, its successes on each seed."""
    return pd.DataFrame(
        [
            {"method": "rft", "iteration": it, "seeds": len(s), "successful_explorations": sum(s)}
            for it, s in successes.items()
        ],
        columns=["method", "iteration", "seeds", "successful_explorations"],
    )


def test_the_rft_statement_counts_its_own_successes_against_the_expert_data():
    few = rft_statement(_training_data({1: [1, 0], 2: [0, 0]}), SETTINGS)
    assert few == (
        "- RFT's own successes: 1 of its explorations completed their task, over 2 "
        "iteration(s) and 2 seed(s), beside the 64 expert trajectories each iteration trains "
        "on again (0.4% of what it trained on). With so few, RFT here is mostly SFT trained "
        "further on the same data, and IPR - RFT compares IPR with that."
    )
    many = rft_statement(_training_data({1: [20], 2: [30]}), SETTINGS)
    assert "(28.1% of what it trained on)." in many and "mostly SFT" not in many
    assert rft_statement(_training_data({}), SETTINGS) is None  # no finished RFT run
    every_task = rft_statement(_training_data({1: [2]}), SETTINGS.assign(sft_tasks=[None]))
    assert every_task.endswith("beside the expert trajectories each iteration trains on again.")


def test_analysis_answers_from_the_numbers():
    text = statements(
        {"sft": [0.2, 0.2], "eto": [0.3, 0.5], "ipr": [0.3, 0.4]},
        {"sft": 0.0, "eto": 0.25, "ipr": 0.25},
        tasks=4,
    )
    assert "Is IPR's mean test reward above ETO's? no: 0.350 vs 0.400 (-0.050)" in text
    assert "higher on 0 of 2 seeds (1 tied)" in text
    assert "Is ETO's mean test reward above SFT's? yes: 0.400 vs 0.200 (+0.200)" in text
    assert "IPR > ETO > SFT on mean test reward holds here: no." in text
    assert "The SFT row is the same on every seed" in text  # std 0: one model, greedy
    assert "Success rate (share of test games completed, mean over seeds): sft 0.000, eto " in text
    assert "No method completes a single test game" not in text
    assert "moves a run's success rate by 0.250" in text
    assert "ranked the gold action higher in 7 (0.700), tied in 2 and ranked it lower in 1" in text
    per_seed_sft = statements({"sft": [0.2, 0.3], "ipr": [0.3, 0.4]}, {"sft": 0, "ipr": 0}, 4)
    assert "The SFT row is the same on every seed" not in per_seed_sft
    one_seed = statements({"sft": [0.2], "ipr": [0.3]}, {"sft": 0, "ipr": 0}, 4)
    assert "The SFT row is the same on every seed" not in one_seed
    assert "higher on 1 of 1 seeds (0 tied); one seed: no seed range to compare." in one_seed
    assert "No method completes a single test game: every reward difference" in one_seed
    unknown = statements({"sft": [0.2], "ipr": [0.3]}, {"sft": None, "ipr": None}, 4)
    assert "No method completes a single test game" not in unknown  # no success measured


def test_while_an_experiment_runs_means_are_compared_on_the_seeds_every_method_finished():
    # sft has finished seeds 0 and 1, eto and ipr seed 0 only: each seed has its own SFT
    # model, so sft's mean over two seeds does not compare with the others' over one
    text = statements(
        {"sft": [0.2, 0.6], "eto": [0.25], "ipr": [0.45]}, {"sft": 0, "eto": 0, "ipr": 0}, 4
    )
    scope = "over seed(s) 0 (those every method finished)"
    assert f"- Ranking by mean test reward {scope}: ipr 0.450, eto 0.250, sft 0.200." in text
    assert f"IPR > ETO > SFT on mean test reward {scope} holds here: yes" in text
    assert (
        "Is ETO's mean test reward above SFT's? yes: 0.250 vs 0.200 (+0.050) (means over the "
        "seeds both finished); higher on 1 of 1 seeds (0 tied); one seed" in text
    )
    assert "The SFT agent's test reward is 0.400" in text  # its own row: both its seeds
    finished = statements({"sft": [0.2, 0.6], "ipr": [0.45, 0.5]}, {"sft": 0, "ipr": 0}, 4)
    assert "- Ranking by mean test reward: ipr 0.475, sft 0.400." in finished
    assert "both finished" not in finished


def test_the_ordering_statement_says_which_of_its_steps_the_two_test_rule_shows():
    def row(comparison, low, high, p):
        return {"comparison": comparison, "metric": "reward", "games": 50, "a_mean": 0.47,
                "b_mean": 0.45, "mean_diff": 0.02, "ci_low": low, "ci_high": high,
                "ci": "above 0" if low > 0 else "contains 0", "p": p,
                "verdict": verdict(low, high, p), "a_higher": 11, "a_lower": 11,
                "equal": 28}  # fmt: skip

    rewards = {"sft": [0.41] * 3, "eto": [0.465, 0.445, 0.46], "ipr": [0.455, 0.49, 0.465]}
    success = {"sft": 0.22, "eto": 0.207, "ipr": 0.2}
    weak = pd.DataFrame([row("ipr - eto", -0.015, 0.043, 0.4), row("eto - sft", 0.01, 0.098, 0.2)])
    assert (
        "holds here: yes on the means, but the two-test rule does not show IPR - ETO nor "
        "ETO - SFT above 0." in statements(rewards, success, 50, weak)
    )
    strong = pd.DataFrame([row("ipr - eto", 0.07, 0.15, 0.001), row("eto - sft", 0.01, 0.08, 0.02)])
    assert "holds here: yes (both steps shown under the two-test rule)." in statements(
        rewards, success, 50, strong
    )


def _at(hour: int) -> datetime:
    return datetime(2026, 12, 5, hour, tzinfo=UTC)


def test_settled_statements_name_the_commit_before_test_and_flag_later_changes():
    commits = [Commit("b" * 40, _at(12), "header"), Commit("a" * 40, _at(9), "settings")]
    settled = settled_statements("configs/x.yaml", commits[1:], [_at(10), _at(11)])
    assert settled == [
        "Config `configs/x.yaml`: the commit that last changed it before the first test "
        'evaluation (2026-12-05 10:00 UTC) is aaaaaaaaaaaa (2026-12-05 09:00 UTC, "settings").',
        "Every test evaluation is newer than the config's last change (aaaaaaaaaaaa, "
        "2026-12-05 09:00 UTC).",
    ]
    changed = settled_statements("configs/x.yaml", commits, [_at(10), _at(13)])
    assert changed[1].startswith(
        "**Flag:** 1 of 2 test evaluations are older than the config's last change, bbbbbbbbbbbb"
    )
    late = settled_statements("configs/x.yaml", commits, [_at(8)])
    assert late[0].startswith("**Flag:** config `configs/x.yaml` had no commit before the first")
    assert settled_statements("configs/x.yaml", None, [_at(8)]) == [
        "`configs/x.yaml` has no commit in git (or git is absent)."
    ]


def test_a_report_of_a_running_experiment_says_which_planned_runs_it_lacks():
    config = load_experiment_config(ROOT / "configs" / "decisive.yaml")
    planned = [(m, s) for s in config.seeds for m in config.methods]
    assert len(planned) == 15
    finished = pd.DataFrame({"method": ["sft", "eto"], "seed": [0, 0]})
    partial = coverage_statement("configs/decisive.yaml", config, finished)
    assert partial.startswith(
        "**In progress: 2 of the 15 runs `configs/decisive.yaml` plans are finished** "
        "(not yet: ipr seed 0, ipr-no-sdpo seed 0, rft seed 0, sft seed 1,"
    )
    assert "none of it is the experiment's result" in partial
    every = pd.DataFrame(planned, columns=["method", "seed"])
    assert coverage_statement("c.yaml", config, every) == (
        "Every run `c.yaml` plans (15: methods x seeds) is finished."
    )


def _finished_run(tmp_path, tables: dict[str, list[dict]]) -> Store:
    """A store holding experiment `x` whose one finished run `r` (ipr, seed 0) has `tables`."""
    store = Store(tmp_path / "x.duckdb")
    config = json.dumps({"run": {"dev_split": "dev"}, "test_split": "test"})
    run = {"experiment_id": "x", "method": "ipr", "seed": 0, "run_id": "r", "status": "finished"}
    experiment = {"experiments": [{"experiment_id": "x", "config": config}]}
    store.write(experiment | {"experiment_runs": [run]} | tables)
    return store


def _stage_record(iteration: int, stage: str, result: dict) -> dict:
    return {"run_id": "r", "iteration": iteration, "stage": stage, "fingerprint": "f",
            "result": json.dumps(result), "row_counts": "[]"}  # fmt: skip


def _rollout(
    kind: str,
    iteration: int,
    task_id: str,
    actions: list[str],
    *,
    prefix_len: int = 0,
    policy_id: str = "p",
    status: str = "ok",
    reward: float | None = None,
) -> dict:
    steps = json.dumps([{"action": a} for a in actions])
    return {"run_id": "r", "iteration": iteration, "kind": kind, "env_id": "e",
            "task_id": task_id, "prefix_len": prefix_len, "actor": "agent", "sample_idx": 0,
            "policy_id": policy_id, "status": status, "outcome_reward": reward,
            "n_steps": len(actions), "steps": steps, "prefill_tokens": 0,
            "generated_tokens": 0, "env_steps": 0, "parse_failures": 0}  # fmt: skip


def _dev_evaluation(iteration: int, policy_id: str, reward: float) -> dict:
    return {"run_id": "r", "iteration": iteration, "split": "dev", "policy_id": policy_id,
            "n_tasks": 1, "n_failed": 0, "avg_reward": reward}  # fmt: skip


def test_the_training_data_table_counts_each_iteration_once_with_the_checkpoint_its_stage_names(
    tmp_path,
):
    """An iteration evaluated with two models (its mixture redone with other inputs) is one
    iteration of one seed, and the pairs trained on (and dropped) are those of the checkpoint
    its mixture stage names; a checkpoint another run trained first (so its row names that
    run) counts for this run too. Successful explorations are those from a task's start
    that completed it (what RFT adds), not a completed one from a prefix or a failed one."""

    def checkpoint(checkpoint_id: str, run_id: str, pairs: int) -> dict:
        return {"checkpoint_id": checkpoint_id, "kind": "mixture", "path": "/m",
                "run_id": run_id, "iteration": 1, "config": "{}",
                "metrics": json.dumps({"n_pairs": pairs, "n_dropped": pairs - 5})}  # fmt: skip

    store = _finished_run(
        tmp_path,
        {
            "evaluations": [_dev_evaluation(1, p, 0.5) for p in ("old", "new")],
            "stage_runs": [
                _stage_record(1, "evaluate-dev", {"policy_id": "new"}),
                _stage_record(1, "train-mixture", {"checkpoint_id": "new"}),
            ],
            "checkpoints": [checkpoint("old", "r", 5), checkpoint("new", "other", 7)],
            "rollouts": [
                _rollout("explore", 1, "a", ["take key"], reward=1.0),
                _rollout("explore", 1, "b", ["take key"], reward=0.5),
                _rollout("explore", 1, "c", ["take key"], prefix_len=2, reward=1.0),
                _rollout("explore", 1, "d", ["take key"], status="env_error"),
                _rollout("eval", 1, "e", ["take key"], reward=1.0),
            ],
        },
    )
    data = run_query(store, TRAINING_DATA_SQL, "x").frame
    columns = ["iteration", "seeds", "successful_explorations", "pairs_trained_on", "pairs_dropped"]
    assert data[columns].values.tolist() == [[1, 1, 1, 7, 2]]


def test_the_cost_tables_dev_gain_is_that_of_the_models_the_stage_records_name(tmp_path):
    """Dev gain per iteration is the change in dev reward between the models the run's
    iterations evaluated (their stage records), not a lag over every model evaluated."""
    counts = ("prefill_tokens", "generated_tokens", "trained_tokens", "rollouts", "env_steps")
    cost = {"run_id": "r", "stage": "evaluate-dev", "wall_s": 10.0, "cpu_s": 10.0}
    cost |= dict.fromkeys(counts, 0)
    store = _finished_run(
        tmp_path,
        {
            "evaluations": [
                _dev_evaluation(0, "sft", 0.2),
                _dev_evaluation(1, "old", 0.9),
                _dev_evaluation(1, "new", 0.3),
            ],
            "stage_runs": [
                _stage_record(0, "evaluate-dev", {"policy_id": "sft"}),
                _stage_record(1, "evaluate-dev", {"policy_id": "new"}),
            ],
            "stage_costs": [cost | {"iteration": i} for i in (0, 1)],
        },
    )
    table = run_query(store, METHOD_COSTS_SQL, "x").frame.set_index("iteration")
    assert table.loc[1, "dev_gain"] == pytest.approx(0.1)


def test_the_dev_actions_table_counts_each_iterations_dev_episodes_by_verb(tmp_path):
    """Per iteration, the verbs of the dev episodes: the tested iteration's test episodes
    (same run, iteration and policy) and failed episodes are left out."""
    test = {"run_id": "r", "iteration": 1, "split": "test", "policy_id": "m1", "n_tasks": 1,
            "n_failed": 0, "avg_reward": 0.0}  # fmt: skip
    store = _finished_run(
        tmp_path,
        {
            "evaluations": [_dev_evaluation(0, "sft", 0.2), _dev_evaluation(1, "m1", 0.4), test],
            "rollouts": [
                _rollout("eval", 0, "dev-a", ["take apple", "put apple in box"], policy_id="sft"),
                _rollout("eval", 0, "dev-b", ["open door"], policy_id="sft", status="env_error"),
                _rollout("eval", 1, "dev-a", ["move north", "Move up", "take key"], policy_id="m1"),
                _rollout("eval", 1, "test-a", ["open box"], policy_id="m1"),
            ],
        },
    )
    rows = run_query(store, DEV_ACTIONS_SQL, "x").frame.values.tolist()
    assert rows == [["ipr", 0, 2, "put 0.50, take 0.50"], ["ipr", 1, 3, "move 0.67, take 0.33"]]
