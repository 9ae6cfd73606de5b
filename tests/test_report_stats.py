"""The paired statistics of `ipr report` on known inputs: the bootstrap interval, the
per-task pairing and the closing statements read off the intervals."""

import numpy as np
import pandas as pd
import pytest

from flows.report import (
    analysis,
    episode_mismatches,
    paired_bootstrap,
    paired_comparisons,
    paired_counts,
    paired_statements,
)


def test_identical_arrays_give_a_zero_interval():
    a = np.array([0.0, 0.5, 1.0, 0.25, 0.75])
    assert paired_bootstrap(a, a.copy()) == (0.0, 0.0, 0.0)


def test_a_constant_shift_gives_exactly_the_shift():
    b = np.arange(40) / 64  # exact in binary, so b + d - b is exactly d
    assert paired_bootstrap(b + 0.25, b) == (0.25, 0.25, 0.25)
    assert paired_bootstrap(b, b + 0.25) == (-0.25, -0.25, -0.25)


def test_interval_contains_the_mean_difference_and_has_the_normal_width():
    rng = np.random.default_rng(7)
    b = rng.uniform(0, 1, 400)
    a = b + rng.normal(0.05, 0.2, 400)
    diff, low, high = paired_bootstrap(a, b)
    assert diff == pytest.approx(float(np.mean(a - b)))
    assert low < diff < high
    # for a mean of 400 differences the percentile interval is close to +-1.96 standard errors
    half_width = 1.96 * np.std(a - b, ddof=1) / np.sqrt(400)
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)


def test_pairing_is_what_narrows_the_interval():
    """Task difficulty varies a lot, the methods' gap little: paired, the gap is clear."""
    rng = np.random.default_rng(3)
    difficulty = rng.uniform(0, 1, 60)
    a, b = difficulty + 0.05, difficulty + rng.normal(0, 0.01, 60)
    _, low, high = paired_bootstrap(a, b)
    assert 0.03 < low < high < 0.07
    _, low_unpaired, _ = paired_bootstrap(a, rng.permutation(b))
    assert low_unpaired < 0  # the same numbers with the pairing broken tell nothing


def test_bootstrap_is_deterministic_given_its_seed():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 1, 30), rng.uniform(0, 1, 30)
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)
    assert paired_bootstrap(a, b, seed=5)[1:] != paired_bootstrap(a, b, seed=6)[1:]
    assert paired_bootstrap(a, b, n_resamples=500)[1:] != paired_bootstrap(a, b)[1:]


@pytest.mark.parametrize("a, b", [([1.0, 2.0], [1.0]), ([], []), ([[1.0]], [[1.0]])])
def test_bootstrap_refuses_unpaired_input(a, b):
    with pytest.raises(ValueError, match="same, non-zero length"):
        paired_bootstrap(a, b)


def test_paired_counts_compare_task_by_task():
    a = np.array([0.5, 0.2, 0.1 + 0.2, 1.0])
    b = np.array([0.25, 0.4, 0.3, 1.0])  # 0.1 + 0.2 != 0.3 in floats, but they are equal
    assert paired_counts(a, b) == (1, 1, 2)


def _per_task(rows: list[tuple[str, str, float | None, float | None]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["method", "task_id", "reward", "steps"])
    frame["success"] = (frame["reward"] >= 1.0).astype(float).where(frame["reward"].notna())
    frame["seeds"], frame["failed"] = 2, 0
    return frame


def test_comparisons_pair_by_task_id_and_drop_tasks_without_a_finished_episode():
    per_task = _per_task(
        [
            ("sft", "t1", 0.0, 10.0),
            ("sft", "t2", 0.5, 8.0),
            ("sft", "t3", 1.0, 4.0),
            ("ipr", "t3", 1.0, 3.0),  # listed in another order: pairing is by task id
            ("ipr", "t2", 1.0, 6.0),
            ("ipr", "t1", None, None),  # every seed's episode failed: not a 0
        ]
    )
    paired = paired_comparisons(per_task, n_resamples=200)
    assert set(paired["comparison"]) == {"ipr - sft"}  # eto and the ablations were not run
    rows = {r.metric: r for r in paired.itertuples()}
    reward = rows["reward"]
    assert (reward.tasks, reward.a_mean, reward.b_mean, reward.mean_diff) == (2, 1.0, 0.75, 0.25)
    assert (reward.a_higher, reward.a_lower, reward.equal) == (1, 0, 1)
    assert reward.ci_low == 0.0 and reward.ci_high == 0.5 and reward.ci == "contains 0"
    steps = rows["steps"]
    assert (steps.mean_diff, steps.ci_high, steps.ci) == (-1.5, -1.0, "below 0")
    assert rows["success"].a_mean == 1.0 and rows["success"].b_mean == 0.5


def test_statements_say_plainly_whether_ipr_beats_each_baseline():
    def row(comparison, metric, diff, low, high):
        ci = "above 0" if low > 0 else "below 0" if high < 0 else "contains 0"
        return {"comparison": comparison, "metric": metric, "tasks": 50, "a_mean": 0.45,
                "b_mean": 0.45 - diff, "mean_diff": diff, "ci_low": low, "ci_high": high,
                "ci": ci, "a_higher": 20, "a_lower": 10, "equal": 20}  # fmt: skip

    paired = pd.DataFrame(
        [
            row("ipr - sft", "reward", 0.05, 0.01, 0.09),
            row("ipr - eto", "reward", 0.01, -0.03, 0.04),
            row("ipr - sft", "steps", -0.4, -0.7, -0.1),
            row("ipr-no-odpo - ipr", "reward", -0.06, -0.1, -0.02),
            row("ipr-no-sft - ipr", "reward", 0.02, -0.01, 0.05),
        ]
    )
    text = "\n".join(paired_statements(paired))
    assert (
        "- IPR beats SFT: IPR 0.450 vs SFT 0.400, IPR - SFT test reward = +0.050, "
        "95% CI [0.010, 0.090] over 50 tasks (IPR higher on 20, lower on 10, equal on 20): "
        "above 0." in text
    )
    assert "- IPR does not beat ETO: " in text and "[-0.030, 0.040]" in text
    assert "ETO - SFT" not in text  # no row, no claim
    assert "IPR - SFT average steps = -0.400" in text and "(IPR needs fewer steps)" in text
    assert "removing o-DPO costs reward, as in the paper" in text
    assert "no evidence here that the SFT term matters" in text
    assert paired_statements(pd.DataFrame()) == [
        "- Paired comparisons on test tasks: none computed."
    ]


def test_episode_mismatches_name_methods_with_too_many_or_too_few_episodes():
    per_task = _per_task([("sft", f"t{i}", 0.0, 1.0) for i in range(3)])
    per_task.loc[0, ["seeds", "failed"]] = [1, 1]  # a failed episode still is an episode
    results = pd.DataFrame({"method": ["sft", "ipr"], "seeds": [2, 2], "test_tasks": [3, 3]})
    assert episode_mismatches(per_task, results) == ["ipr: 0 test episodes, expected 6"]
    results["test_tasks"] = 2
    assert episode_mismatches(per_task, results)[0] == "sft: 6 test episodes, expected 4"


SETTINGS = pd.DataFrame({"expert_reward": [1.0]})
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
    return analysis(SETTINGS, results, per_seed, ACCURACY, paired)


def test_analysis_answers_from_the_numbers():
    text = statements(
        {"sft": [0.2, 0.2], "eto": [0.3, 0.5], "ipr": [0.3, 0.4]},
        {"sft": 0.0, "eto": 0.25, "ipr": 0.25},
        tasks=4,
    )
    assert "Does IPR beat ETO on mean test reward? no: 0.350 vs 0.400 (-0.050)" in text
    assert "higher on 0 of 2 seeds (1 tied)" in text
    assert "Does ETO beat SFT on mean test reward? yes: 0.400 vs 0.200 (+0.200)" in text
    assert "IPR > ETO > SFT on mean test reward holds here: no." in text
    assert "moves a run's success rate by 0.250" in text
    assert "ranked the gold action higher in 7 (0.700), tied in 2 and ranked it lower in 1" in text


def test_the_ordering_statement_says_which_of_its_steps_the_intervals_show():
    def row(comparison, low, high):
        ci = "above 0" if low > 0 else "below 0" if high < 0 else "contains 0"
        return {"comparison": comparison, "metric": "reward", "tasks": 50, "a_mean": 0.47,
                "b_mean": 0.45, "mean_diff": 0.02, "ci_low": low, "ci_high": high,
                "ci": ci, "a_higher": 11, "a_lower": 11, "equal": 28}  # fmt: skip

    rewards = {"sft": [0.41] * 3, "eto": [0.465, 0.445, 0.46], "ipr": [0.455, 0.49, 0.465]}
    success = {"sft": 0.22, "eto": 0.207, "ipr": 0.2}
    weak = pd.DataFrame([row("ipr - eto", -0.015, 0.043), row("eto - sft", -0.005, 0.098)])
    assert (
        "holds here: yes on the means, but the paired interval of IPR - ETO and of ETO - SFT "
        "contains or is below 0." in statements(rewards, success, 50, weak)
    )
    strong = pd.DataFrame([row("ipr - eto", 0.07, 0.15), row("eto - sft", 0.01, 0.08)])
    assert "holds here: yes (both steps with paired intervals above 0)." in statements(
        rewards, success, 50, strong
    )
