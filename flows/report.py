"""`ipr report`: an experiment's results as markdown, generated from SQL over the store.

Every table in the report is the result of the query printed under it, run as printed
(the experiment id is written into the SQL text, not bound as a parameter), so a reader
can paste any query into `ipr sql` and get the same numbers. The one exception, the
paired bootstrap intervals, is computed in Python from a printed query's output, and the
report names the function, its seed and resamples. The closing analysis is computed from
those tables, never written by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flows.plots import plot_dev_curve
from ipr_core.run.experiment import METHODS, ensure_known
from ipr_core.store.store import Store
from ipr_core.types import FAILED_STATUSES

PAPER_ORDER = "[" + ", ".join(f"'{m}'" for m in METHODS) + "]"
"""Rows in the order of the paper's table: SFT, ETO, IPR, then the ablations."""

SETTINGS_SQL = f"""
SELECT json_extract_string(e.config, '$.run.env') AS env,
       json_extract_string(e.config, '$.run.model') AS model,
       (SELECT string_agg(method, ', ' ORDER BY list_position({PAPER_ORDER}, method))
        FROM (SELECT DISTINCT method FROM experiment_runs
              WHERE experiment_id = e.experiment_id)) AS methods,
       (SELECT string_agg(CAST(seed AS VARCHAR), ', ' ORDER BY seed)
        FROM (SELECT DISTINCT seed FROM experiment_runs
              WHERE experiment_id = e.experiment_id)) AS seeds,
       CAST(json_extract(e.config, '$.run.iterations') AS INTEGER) AS iterations,
       CAST(json_extract(e.config, '$.run.train_limit') AS INTEGER) AS sft_tasks,
       coalesce(CAST(json_extract(e.config, '$.run.explore_limit') AS INTEGER),
                CAST(json_extract(e.config, '$.run.train_limit') AS INTEGER)) AS explored_tasks,
       CAST(json_extract(e.config, '$.run.dev_limit') AS INTEGER) AS dev_tasks,
       CAST(json_extract(e.config, '$.test_limit') AS INTEGER) AS test_tasks,
       CAST(json_extract(e.config, '$.run.monte_carlo.n_samples') AS INTEGER) AS mc_samples,
       (SELECT round(avg(outcome_reward), 3) FROM expert_trajectories
        WHERE env_id = json_extract_string(e.config, '$.run.env')
          AND split = json_extract_string(e.config, '$.run.train_split')) AS expert_reward
FROM experiments e
WHERE e.experiment_id = {{exp}}
"""

RUN_ROWS = """
    SELECT x.method, x.seed, x.best_iteration,
           d.avg_reward AS dev_reward, t.avg_reward AS test_reward,
           t.success_rate AS test_success, t.avg_steps AS test_steps,
           t.n_tasks AS test_tasks, t.n_failed AS test_failed
    FROM experiment_runs x
    JOIN experiments e USING (experiment_id)
    JOIN evaluations d ON d.run_id = x.run_id AND d.iteration = x.best_iteration
         AND d.policy_id = x.test_policy_id
         AND d.split = json_extract_string(e.config, '$.run.dev_split')
    JOIN evaluations t ON t.run_id = x.run_id AND t.iteration = x.best_iteration
         AND t.policy_id = x.test_policy_id
         AND t.split = json_extract_string(e.config, '$.test_split')
    WHERE x.experiment_id = {exp} AND x.status = 'finished'"""

RESULTS_SQL = f"""
WITH chosen AS ({RUN_ROWS})
SELECT method, count(*) AS seeds,
       round(avg(test_reward), 3) AS reward_mean, round(stddev_samp(test_reward), 3) AS reward_std,
       round(min(test_reward), 3) AS reward_min, round(max(test_reward), 3) AS reward_max,
       round(avg(test_success), 3) AS success_mean,
       round(stddev_samp(test_success), 3) AS success_std,
       round(avg(test_steps), 2) AS steps_mean, round(stddev_samp(test_steps), 2) AS steps_std,
       max(test_tasks) AS test_tasks, sum(test_failed) AS failed_episodes
FROM chosen
GROUP BY method
ORDER BY list_position({PAPER_ORDER}, method)
"""

PER_SEED_SQL = f"""
WITH chosen AS ({RUN_ROWS})
SELECT method, seed, best_iteration, round(dev_reward, 3) AS dev_reward,
       round(test_reward, 3) AS test_reward, round(test_success, 3) AS test_success,
       round(test_steps, 2) AS test_steps
FROM chosen
ORDER BY list_position({PAPER_ORDER}, method), seed
"""

DEV_CURVE_SQL = f"""
SELECT x.method, d.iteration, count(*) AS seeds,
       round(avg(d.avg_reward), 3) AS dev_reward_mean,
       round(min(d.avg_reward), 3) AS dev_reward_min,
       round(max(d.avg_reward), 3) AS dev_reward_max
FROM experiment_runs x
JOIN experiments e USING (experiment_id)
JOIN evaluations d ON d.run_id = x.run_id
     AND d.split = json_extract_string(e.config, '$.run.dev_split')
WHERE x.experiment_id = {{exp}} AND x.status = 'finished'
GROUP BY x.method, d.iteration
ORDER BY list_position({PAPER_ORDER}, x.method), d.iteration
"""

PAIRS_SQL = f"""
WITH iterations AS (
    SELECT x.method, x.run_id, d.iteration
    FROM experiment_runs x
    JOIN experiments e USING (experiment_id)
    JOIN evaluations d ON d.run_id = x.run_id AND d.iteration >= 1
         AND d.split = json_extract_string(e.config, '$.run.dev_split')
    WHERE x.experiment_id = {{exp}} AND x.status = 'finished'),
mined AS (
    SELECT run_id, iteration,
           count(*) FILTER (WHERE level = 'trajectory') AS trajectory_pairs,
           count(*) FILTER (WHERE level = 'step') AS step_pairs
    FROM pairs GROUP BY run_id, iteration),
trained AS (
    SELECT run_id, iteration, CAST(json_extract(metrics, '$.n_pairs') AS INTEGER) AS n_pairs
    FROM checkpoints WHERE kind = 'mixture')
SELECT i.method, i.iteration, count(*) AS seeds,
       sum(coalesce(m.trajectory_pairs, 0)) AS trajectory_pairs,
       sum(coalesce(m.step_pairs, 0)) AS step_pairs,
       sum(coalesce(t.n_pairs, 0)) AS pairs_trained_on
FROM iterations i
LEFT JOIN mined m USING (run_id, iteration)
LEFT JOIN trained t USING (run_id, iteration)
GROUP BY i.method, i.iteration
ORDER BY list_position({PAPER_ORDER}, i.method), i.iteration
"""

COSTS_SQL = f"""
WITH member AS (
    SELECT x.method, x.run_id, json_extract_string(e.config, '$.run.dev_split') AS dev_split
    FROM experiment_runs x JOIN experiments e USING (experiment_id)
    WHERE x.experiment_id = {{exp}} AND x.status = 'finished'),
c AS (
    SELECT m.method, m.run_id, s.wall_s, s.cpu_s, s.donor_run_id IS NOT NULL AS copied,
           s.cost_iteration AS iteration, s.work
    FROM member m JOIN stage_work s USING (run_id)),
cost AS (
    SELECT method, iteration, count(DISTINCT run_id) AS seeds, sum(wall_s) AS wall_s,
           sum(cpu_s) AS cpu_s, count(*) FILTER (WHERE copied) AS copied_stages,
           sum(wall_s) FILTER (WHERE work = 'mc') AS mc_s,
           sum(wall_s) FILTER (WHERE work = 'explore') AS explore_s,
           sum(wall_s) FILTER (WHERE work = 'train') AS train_s,
           sum(wall_s) FILTER (WHERE work = 'eval') AS eval_s
    FROM c GROUP BY method, iteration),
mined AS (
    SELECT m.method, p.iteration, count(*) AS pairs
    FROM member m JOIN pairs p USING (run_id) GROUP BY m.method, p.iteration),
dev AS (
    SELECT m.method, m.run_id, d.iteration, d.avg_reward
    FROM member m JOIN evaluations d ON d.run_id = m.run_id AND d.split = m.dev_split),
gain AS (
    SELECT method, iteration,
           sum(avg_reward - prev) AS dev_gain_sum, avg(avg_reward - prev) AS dev_gain
    FROM (SELECT *, lag(avg_reward) OVER (PARTITION BY run_id ORDER BY iteration) AS prev
          FROM dev)
    GROUP BY method, iteration)
SELECT k.method, k.iteration, k.seeds, round(k.wall_s, 1) AS wall_s, round(k.cpu_s, 1) AS cpu_s,
       coalesce(p.pairs, 0) AS pairs, round(k.wall_s / nullif(p.pairs, 0), 2) AS s_per_pair,
       round(g.dev_gain, 3) AS dev_gain,
       CASE WHEN g.dev_gain_sum > 0 THEN round(k.wall_s / (100 * g.dev_gain_sum), 1) END
           AS s_per_dev_point,
       round(100 * coalesce(k.mc_s, 0) / nullif(k.wall_s, 0)) AS mc_pct,
       round(100 * coalesce(k.explore_s, 0) / nullif(k.wall_s, 0)) AS explore_pct,
       round(100 * coalesce(k.train_s, 0) / nullif(k.wall_s, 0)) AS train_pct,
       round(100 * coalesce(k.eval_s, 0) / nullif(k.wall_s, 0)) AS eval_pct,
       k.copied_stages
FROM cost k
LEFT JOIN mined p USING (method, iteration)
LEFT JOIN gain g USING (method, iteration)
ORDER BY list_position({PAPER_ORDER}, k.method), k.iteration
"""

STEP_REWARD_DISTRIBUTION_SQL = f"""
WITH member AS (
    SELECT method, run_id FROM experiment_runs
    WHERE experiment_id = {{exp}} AND status = 'finished'),
expert AS (
    SELECT m.method, s.* FROM member m
    JOIN step_rewards s ON s.run_id = m.run_id AND s.actor = 'expert' AND s.iteration = 0),
agent AS (
    SELECT m.method, a.mean_reward AS agent, e.mean_reward AS expert FROM member m
    JOIN step_rewards a ON a.run_id = m.run_id AND a.actor = 'agent'
    JOIN expert e ON e.run_id = a.run_id AND e.scorer_id = a.scorer_id
         AND e.task_id = a.task_id AND e.prefix_len = a.prefix_len),
v AS (
    SELECT method, 'expert' AS reward, mean_reward AS value FROM expert
    UNION ALL SELECT method, 'agent', agent FROM agent
    UNION ALL SELECT method, 'margin', expert - agent FROM agent)
SELECT method, reward, count(value) AS n, round(quantile_cont(value, 0.1), 3) AS p10,
       round(quantile_cont(value, 0.25), 3) AS p25, round(median(value), 3) AS p50,
       round(quantile_cont(value, 0.75), 3) AS p75, round(quantile_cont(value, 0.9), 3) AS p90,
       round(avg(value), 3) AS mean
FROM v GROUP BY method, reward
ORDER BY list_position({PAPER_ORDER}, method), list_position(['expert', 'agent', 'margin'], reward)
"""


STEP_ACCURACY_SQL = f"""
WITH member AS (
    SELECT method, run_id FROM experiment_runs
    WHERE experiment_id = {{exp}} AND status = 'finished'),
gold AS (
    SELECT s.run_id, s.scorer_id, s.task_id, s.prefix_len, s.mean_reward AS gold_reward
    FROM step_rewards s
    JOIN expert_trajectories g USING (env_id, task_id)
    WHERE s.actor = 'expert' AND s.iteration = 0 AND g.source = 'gold'),
compared AS (
    SELECT m.method, a.iteration, g.gold_reward, a.mean_reward AS agent_reward
    FROM member m
    JOIN step_rewards a ON a.run_id = m.run_id AND a.actor = 'agent'
    JOIN gold g ON g.run_id = a.run_id AND g.scorer_id = a.scorer_id
         AND g.task_id = a.task_id AND g.prefix_len = a.prefix_len
    WHERE a.mean_reward IS NOT NULL AND g.gold_reward IS NOT NULL),
ranked AS (
    SELECT method, iteration, count(*) AS compared_steps,
           count(*) FILTER (WHERE gold_reward > agent_reward) AS gold_higher,
           count(*) FILTER (WHERE gold_reward = agent_reward) AS tied,
           count(*) FILTER (WHERE gold_reward < agent_reward) AS gold_lower
    FROM compared GROUP BY method, iteration),
step_pairs AS (
    SELECT m.method, p.iteration, count(*) AS step_pairs,
           count(*) FILTER (WHERE p.chosen_actor = 'expert') AS chosen_is_gold
    FROM member m
    JOIN pairs p ON p.run_id = m.run_id AND p.level = 'step'
    JOIN expert_trajectories g ON g.env_id = p.env_id AND g.task_id = p.task_id
         AND g.source = 'gold'
    GROUP BY m.method, p.iteration)
SELECT method, iteration, compared_steps, gold_higher, tied, gold_lower,
       round(gold_higher / compared_steps, 3) AS step_reward_accuracy,
       coalesce(step_pairs, 0) AS step_pairs, coalesce(chosen_is_gold, 0) AS chosen_is_gold,
       round(chosen_is_gold / step_pairs, 3) AS pairs_chosen_gold_share
FROM ranked LEFT JOIN step_pairs USING (method, iteration)
ORDER BY list_position({PAPER_ORDER}, method), iteration
"""


STEP_ACCURACY_OVERALL_SQL = """
WITH compared AS (
    SELECT DISTINCT x.seed, a.iteration, a.task_id, a.prefix_len, a.action,
           g.mean_reward AS gold_reward, a.mean_reward AS agent_reward
    FROM experiment_runs x
    JOIN step_rewards a ON a.run_id = x.run_id AND a.actor = 'agent'
    JOIN step_rewards g ON g.run_id = a.run_id AND g.scorer_id = a.scorer_id
         AND g.task_id = a.task_id AND g.prefix_len = a.prefix_len
         AND g.actor = 'expert' AND g.iteration = 0
    JOIN expert_trajectories t ON t.env_id = g.env_id AND t.task_id = g.task_id
         AND t.source = 'gold'
    WHERE x.experiment_id = {exp} AND x.status = 'finished'
      AND a.mean_reward IS NOT NULL AND g.mean_reward IS NOT NULL)
SELECT count(*) AS compared_steps,
       count(*) FILTER (WHERE gold_reward > agent_reward) AS gold_higher,
       count(*) FILTER (WHERE gold_reward = agent_reward) AS tied,
       count(*) FILTER (WHERE gold_reward < agent_reward) AS gold_lower,
       round(gold_higher / compared_steps, 3) AS step_reward_accuracy
FROM compared
"""

FAILED_LIST = "(" + ", ".join(f"'{s}'" for s in sorted(FAILED_STATUSES)) + ")"
"""The rollout statuses of failed episodes (no outcome; left out, never scored 0)."""

TEST_EPISODES_CTES = f"""
member AS (
    SELECT x.method, x.seed, x.run_id, x.best_iteration, x.test_policy_id,
           json_extract_string(e.config, '$.run.dev_split') AS dev_split,
           json_extract_string(e.config, '$.test_split') AS test_split
    FROM experiment_runs x JOIN experiments e USING (experiment_id)
    WHERE x.experiment_id = {{exp}} AND x.status = 'finished'),
dev_tasks AS (
    SELECT DISTINCT r.task_id
    FROM member m
    JOIN evaluations d ON d.run_id = m.run_id AND d.split = m.dev_split
    JOIN rollouts r ON r.run_id = d.run_id AND r.iteration = d.iteration
         AND r.policy_id = d.policy_id AND r.kind = 'eval'
    WHERE NOT EXISTS (
        SELECT 1 FROM evaluations t
        WHERE t.run_id = d.run_id AND t.iteration = d.iteration
          AND t.policy_id = d.policy_id AND t.split = m.test_split)),
episodes AS (
    SELECT m.method, m.seed, r.task_id, r.status IN {FAILED_LIST} AS failed,
           coalesce(r.outcome_reward, 0) AS reward, r.n_steps AS steps
    FROM member m
    JOIN rollouts r ON r.run_id = m.run_id AND r.iteration = m.best_iteration
         AND r.policy_id = m.test_policy_id AND r.kind = 'eval'
    WHERE r.task_id NOT IN (SELECT task_id FROM dev_tasks))"""
"""The test episodes of each finished run's tested model. Rollouts carry no split and a
model's dev and test episodes share (run, iteration, policy), so the dev tasks are learnt
from dev evaluations with no test evaluation beside them (a trained run's iteration 0);
`episode_mismatches` checks the result against the evaluations."""

PER_TASK_SQL = f"""
WITH {TEST_EPISODES_CTES.strip()}
SELECT method, task_id,
       count(*) FILTER (WHERE NOT failed) AS seeds,
       count(*) FILTER (WHERE failed) AS failed,
       round(avg(reward) FILTER (WHERE NOT failed), 4) AS reward,
       round(avg(CAST(reward >= 1.0 AS DOUBLE)) FILTER (WHERE NOT failed), 4) AS success,
       round(avg(steps) FILTER (WHERE NOT failed), 4) AS steps
FROM episodes
GROUP BY method, task_id
ORDER BY list_position({PAPER_ORDER}, method), task_id
"""
"""Per (method, test task): outcomes of the tested model averaged over the seeds whose
episode finished; `failed` counts the seeds whose episode failed (left out, not 0)."""

MANIFESTS_SQL = f"""
SELECT x.method, x.seed, x.run_id,
       strftime(m.created_at, '%Y-%m-%d %H:%M') AS recorded,
       json_extract_string(m.manifest, '$.model_id') AS model_id,
       CAST(json_extract(m.manifest, '$.packages') AS VARCHAR) AS packages,
       CAST(json_extract(m.manifest, '$.splits') AS VARCHAR) AS splits,
       json_extract_string(m.manifest, '$.prompt_hash') AS prompt_hash,
       CAST(json_extract(m.manifest, '$.machine') AS VARCHAR) AS machine,
       json_extract_string(m.manifest, '$.git_commit') AS git_commit
FROM experiment_runs x
JOIN run_manifests m USING (run_id)
WHERE x.experiment_id = {{exp}}
ORDER BY list_position({PAPER_ORDER}, x.method), x.seed, m.created_at
"""
"""Each run's manifests (`ipr_core.run.manifest`): one row per distinct setup it ran with, so a
run resumed with `--allow-manifest-change` shows both."""

COMPARISONS: tuple[tuple[str, str], ...] = (
    ("ipr", "sft"),
    ("ipr", "eto"),
    ("eto", "sft"),
    ("ipr-no-odpo", "ipr"),
    ("ipr-no-sdpo", "ipr"),
    ("ipr-no-sft", "ipr"),
)
"""Paired comparisons (A, B) reported as A - B: the paper's main claims, then each ablation
against full IPR."""

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
METRICS = ("reward", "success", "steps")


@dataclass(frozen=True)
class Table:
    """A query as run and shown, and its result."""

    sql: str
    frame: pd.DataFrame

    def markdown(self) -> str:
        return f"{markdown_table(self.frame)}\n\n```sql\n{self.sql.strip()}\n```"


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_query(store: Store, template: str, experiment_id: str) -> Table:
    sql = template.replace("{exp}", sql_literal(experiment_id))
    return Table(sql=sql, frame=store.query(sql))


def format_value(value: object) -> str:
    """One cell: NULL for missing values, floats without trailing zeros."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "NULL"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no rows)"
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.astype(object).itertuples(index=False):
        lines.append("| " + " | ".join(format_value(v) for v in row) + " |")
    return "\n".join(lines)


def write_report(store: Store, experiment_id: str, out: Path) -> Path:
    """Write the markdown report (and its dev-reward plot beside it); returns the plot path."""
    ensure_known(store, experiment_id)
    settings = run_query(store, SETTINGS_SQL, experiment_id)
    results = run_query(store, RESULTS_SQL, experiment_id)
    per_seed = run_query(store, PER_SEED_SQL, experiment_id)
    curve = run_query(store, DEV_CURVE_SQL, experiment_id)
    pairs = run_query(store, PAIRS_SQL, experiment_id)
    accuracy = run_query(store, STEP_ACCURACY_SQL, experiment_id)
    costs = run_query(store, COSTS_SQL, experiment_id)
    distribution = run_query(store, STEP_REWARD_DISTRIBUTION_SQL, experiment_id)
    overall = run_query(store, STEP_ACCURACY_OVERALL_SQL, experiment_id)
    per_task = run_query(store, PER_TASK_SQL, experiment_id)
    manifests = run_query(store, MANIFESTS_SQL, experiment_id).markdown()
    diffs = run_query(store, per_task_diff_sql(list(per_task.frame["method"])), experiment_id)
    mismatches = episode_mismatches(per_task.frame, results.frame)
    paired = pd.DataFrame() if mismatches else paired_comparisons(per_task.frame)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_name(f"{out.stem}-dev-reward.png")
    plot_dev_curve(curve.frame, plot, experiment_id)
    sections = [
        f"# Results of experiment `{experiment_id}`",
        f"Generated by `ipr report --experiment {experiment_id}` from the store "
        f"`{store.path}`. Every table is the result of the SQL query printed under it, "
        'exactly as it was run; paste one into `ipr sql "..." --store '
        f"{store.path}` to check it.",
        "## Settings",
        settings.markdown(),
        "## Test results per method",
        "Each run picks its best iteration on the dev split (highest dev reward; IPR, ETO "
        "and the ablations choose among their trained iterations, SFT is iteration 0); "
        "that model is evaluated once on the test split. Mean, sample standard deviation "
        "and min-max over seeds.",
        results.markdown(),
        "## Per seed",
        per_seed.markdown(),
        "## Dev reward by iteration",
        "Iteration 0 is the shared SFT model (iteration -1 the base model, if evaluated); "
        "error bars span min-max over seeds.",
        f"![dev reward by iteration]({plot.name})",
        curve.markdown(),
        "## Pairs per iteration",
        "Pairs mined per iteration, summed over seeds; `pairs_trained_on` counts those the "
        "method's loss used (ETO drops step pairs, as its loss has no step term). Iteration "
        "1's pairs are shared by every method of a seed.",
        pairs.markdown(),
        "## Cost per iteration",
        "Wall and CPU seconds of the stages (`stage_costs`, summed over seeds), per pair "
        "mined and per point (0.01) of mean dev reward gained over the previous iteration, "
        "and the shares of the time spent on Monte Carlo step rewards, exploration, "
        "training and evaluation. The expert steps' Monte Carlo scoring, stored under "
        "iteration 0, counts in iteration 1. `copied_stages` were copied from another "
        "run with the same inputs (the expert steps' scoring and iteration 1's exploration "
        "from any run, iteration 1's agent steps and pairs from the same seed's): their "
        "cost is the donor's, counted once.",
        costs.markdown(),
        "## Step rewards: expert, agent and margin",
        "Quantiles of the Monte Carlo step rewards of the expert steps and of the agent's "
        "first own actions, and of the margin between them at the same prefix (expert "
        "minus agent), which mining compares with the step margin. "
        "`ipr show pair ID` prints a pair and the samples behind its two rewards.",
        distribution.markdown(),
        "## Step-reward accuracy against gold actions",
        "Where the env gives gold actions: for every step at which the agent's action "
        "differed from the gold action after the same gold history, does the Monte Carlo "
        "step reward rank the gold action higher? Ties count as misses. Gold actions are "
        "one good path, not the only one, so this is a lower bound on agreement. "
        "`pairs_chosen_gold_share` is the share of mined step pairs whose chosen side is "
        "the gold action.",
        accuracy.markdown(),
        "Over the whole experiment, each comparison counted once (the methods of a seed "
        "share iteration 1's step rewards, so the rows above repeat them):",
        overall.markdown(),
        "## Paired comparisons on the test tasks",
        paired_section(store, experiment_id, per_task.frame, paired, mismatches),
        "### Per-task reward differences",
        "Test reward per task, averaged over the seeds whose episode finished, and the "
        "per-task differences the intervals above resample.",
        diffs.markdown(),
        "### Per-task outcomes",
        "The source of the paired statistics: per method and test task, the tested model's "
        "outcomes averaged over the seeds whose episode finished (`seeds`); `failed` counts "
        "the seeds whose episode failed.",
        f"<details><summary>{len(per_task.frame)} rows</summary>\n\n{per_task.markdown()}"
        "\n\n</details>",
        "## What the numbers show",
        analysis(settings.frame, results.frame, per_seed.frame, overall.frame, paired),
        "## Run manifests",
        "What shaped each run's numbers besides its config: package versions, the base "
        "model's content id, the task ids of each split (count and hash), the prompt "
        "builder's output for a fixed probe (hash), the machine and the project's commit.",
        manifests,
    ]
    out.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return plot


# -- paired statistics over test tasks ------------------------------------------------------
def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """Mean of a - b over paired tasks and its percentile-bootstrap 95% interval.

    `a[i]` and `b[i]` are two methods' outcomes on task i (each averaged over seeds). Tasks
    are the resampling unit because they are what varies between this test set and the
    next one drawn from the env: every method meets the same tasks, so resampling the
    per-task differences keeps the pairing (a hard task is hard for both) and leaves out
    the task-to-task variance a two-sample interval would wrongly add. Seeds are averaged
    first: with 2-3 of them they are too few to resample, and greedy evaluation makes the
    SFT row identical across seeds anyway.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
        raise ValueError("paired_bootstrap needs two 1-d arrays of the same, non-zero length")
    diff = x - y
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diff), size=(n_resamples, len(diff)))
    means = diff[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def paired_counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    """Tasks where A > B, A < B and A = B (differences within 1e-9 count as equal)."""
    diff = np.round(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), 9)
    return int((diff > 0).sum()), int((diff < 0).sum()), int((diff == 0).sum())


def ci_verdict(low: float, high: float) -> str:
    return "above 0" if low > 0 else "below 0" if high < 0 else "contains 0"


def paired_comparisons(
    per_task: pd.DataFrame,
    comparisons: Sequence[tuple[str, str]] = COMPARISONS,
    metrics: Sequence[str] = METRICS,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """A - B per metric over the tasks both methods have a finished episode on (one row per
    comparison and metric), from PER_TASK_SQL's output; comparisons of absent methods are
    left out."""
    rows = []
    present = set(per_task["method"])
    wide = {m: per_task.pivot(index="task_id", columns="method", values=m) for m in metrics}
    for a, b in comparisons:
        if a not in present or b not in present:
            continue
        for metric in metrics:
            both = wide[metric][[a, b]].dropna()
            if both.empty:
                continue
            x, y = both[a].to_numpy(dtype=float), both[b].to_numpy(dtype=float)
            diff, low, high = paired_bootstrap(x, y, n_resamples, seed)
            higher, lower, equal = paired_counts(x, y)
            rows.append(
                {
                    "comparison": f"{a} - {b}",
                    "metric": metric,
                    "tasks": len(both),
                    "a_mean": round(float(x.mean()), 3),
                    "b_mean": round(float(y.mean()), 3),
                    "mean_diff": round(diff, 3),
                    "ci_low": round(low, 3),
                    "ci_high": round(high, 3),
                    "ci": ci_verdict(low, high),
                    "a_higher": higher,
                    "a_lower": lower,
                    "equal": equal,
                }
            )
    return pd.DataFrame(rows)


def per_task_diff_sql(methods: Sequence[str]) -> str:
    """The per-task reward of each method (seed-averaged, failed episodes left out) and the
    paired differences of COMPARISONS, one row per test task; built for the methods run so
    the printed query has no empty columns."""
    ordered = [m for m in METHODS if m in methods]
    reward = "max(reward) FILTER (WHERE method = '{}')"
    columns = [f'round({reward.format(m)}, 3) AS "{m}"' for m in ordered]
    columns += [
        f'round({reward.format(a)} - {reward.format(b)}, 3) AS "{a} - {b}"'
        for a, b in COMPARISONS
        if a in ordered and b in ordered
    ]
    select = ",\n       ".join(["task_id", *columns])
    return f"""
WITH {TEST_EPISODES_CTES.strip()},
per_task AS (
    SELECT method, task_id, avg(reward) FILTER (WHERE NOT failed) AS reward
    FROM episodes GROUP BY method, task_id)
SELECT {select}
FROM per_task
GROUP BY task_id
ORDER BY task_id
"""


def episode_mismatches(per_task: pd.DataFrame, results: pd.DataFrame) -> list[str]:
    """Methods whose per-task episodes are not seeds x test tasks: the dev/test separation
    of PER_TASK_SQL failed (e.g. no dev-only evaluation to learn the dev tasks from)."""
    episodes = (per_task["seeds"] + per_task["failed"]).groupby(per_task["method"]).sum()
    problems = []
    for row in results.itertuples():
        expected = int(row.seeds) * int(row.test_tasks)
        found = int(episodes.get(row.method, 0))
        if found != expected:
            problems.append(f"{row.method}: {found} test episodes, expected {expected}")
    return problems


def paired_section(
    store: Store,
    experiment_id: str,
    per_task: pd.DataFrame,
    paired: pd.DataFrame,
    mismatches: Sequence[str],
) -> str:
    """The paired-comparison table with how it was computed and how to recompute it."""
    episodes = int((per_task["seeds"] + per_task["failed"]).sum()) if not per_task.empty else 0
    failed = int(per_task["failed"].sum()) if not per_task.empty else 0
    code = f"{paired_comparisons.__module__}.{paired_comparisons.__qualname__}"
    text = [
        f"All methods are evaluated on the same {per_task['task_id'].nunique()} test tasks, "
        "so they are compared task by task. A - B is the mean over tasks of the per-task "
        "difference (each task's outcome averaged over seeds first); its 95% interval is a "
        "paired percentile bootstrap that resamples tasks with replacement. `a_higher`, "
        "`a_lower` and `equal` count tasks. Reward and success: higher is better; steps: "
        "fewer is the paper's action-efficiency claim.",
        f"Failed episodes (status {', '.join(sorted(FAILED_STATUSES))}) are excluded, never "
        f"scored 0: {failed} of {episodes} test episodes failed. A task with no finished "
        "episode for a method drops out of that method's comparisons (`tasks`).",
        "Rollouts carry no split, and a model's dev and test episodes share its run and "
        "iteration, so the per-task queries leave out the dev tasks, found as those of dev "
        "evaluations with no test evaluation of the same model beside them (a trained "
        "run's iteration 0); the episodes found are checked against seeds x test tasks.",
    ]
    if mismatches:
        text.append(
            "Not computed: the per-task test episodes do not match the evaluations ("
            + "; ".join(mismatches)
            + "), so the test tasks could not be told apart from the dev tasks."
        )
        return "\n\n".join(text)
    text.append(
        f"Computed in Python by `{code}` (`paired_bootstrap`: {N_RESAMPLES} resamples, "
        f"`numpy.random.default_rng({BOOTSTRAP_SEED})`, 2.5/97.5 percentiles) from the output "
        "of the per-task query under *Per-task outcomes*; this regenerates it:"
    )
    text.append(markdown_table(paired))
    text.append(
        "```python\n"
        f"from {paired_comparisons.__module__} import PER_TASK_SQL, paired_comparisons, "
        "run_query\nfrom ipr_core.store.store import Store\n\n"
        f"store_path = {_literal(str(store.path))}\n"
        f"experiment_id = {_literal(experiment_id)}\n"
        "per_task = run_query(Store(store_path), PER_TASK_SQL, experiment_id)\n"
        "print(paired_comparisons(per_task.frame))\n```"
    )
    return "\n\n".join(text)


def _literal(text: str) -> str:
    """A double-quoted string literal: the printed code is as ruff formats it, and a literal
    assigned alone stays on its line however long the path is."""
    return json.dumps(text)


# -- analysis ------------------------------------------------------------------------------
def analysis(
    settings: pd.DataFrame,
    results: pd.DataFrame,
    per_seed: pd.DataFrame,
    accuracy: pd.DataFrame,
    paired: pd.DataFrame | None = None,
) -> str:
    """Statements computed from the tables above: who beats whom, by how much, how often."""
    if results.empty:
        return "No finished run yet: nothing to compare."
    means = {row.method: _num(row.reward_mean) for row in results.itertuples()}
    lines = paired_statements(paired) if paired is not None else []
    ranking = sorted((m for m in means if means[m] is not None), key=lambda m: -means[m])
    lines.append(
        "- Ranking by mean test reward: "
        + ", ".join(f"{m} {_fmt(means[m])}" for m in ranking)
        + "."
    )
    for better, worse in (("ipr", "eto"), ("eto", "sft"), ("ipr", "sft")):
        lines.append("- " + compare(better, worse, results, per_seed))
    if all(m in means and means[m] is not None for m in ("ipr", "eto", "sft")):
        holds = means["ipr"] > means["eto"] > means["sft"]
        lines.append(
            "- The paper's ordering IPR > ETO > SFT on mean test reward holds here: "
            + ("yes" if holds else "no")
            + _ordering_evidence(paired)
            + "."
        )
    for ablation, what in (
        ("ipr-no-odpo", "without o-DPO"),
        ("ipr-no-sdpo", "without s-DPO"),
        ("ipr-no-sft", "without the SFT term"),
    ):
        if ablation in means and "ipr" in means and None not in (means[ablation], means["ipr"]):
            delta = means[ablation] - means["ipr"]
            agrees = "agrees" if delta < 0 else "disagrees"
            lines.append(
                f"- IPR {what} ({ablation}): {_fmt(means[ablation])}, {_signed(delta)} against "
                f"IPR; the paper has every ablation below IPR, so this {agrees} with it."
            )
    if "sft" in means and means["sft"] is not None:
        sft_row = results[results["method"] == "sft"].iloc[0]
        expert = _num(settings["expert_reward"].iloc[0]) if not settings.empty else None
        lines.append(
            f"- The SFT agent's test reward is {_fmt(means['sft'])} (success "
            f"{_fmt(_num(sft_row.success_mean))}); the expert trajectories it learned from "
            f"reach {_fmt(expert)}. One shared SFT checkpoint and greedy evaluation make the "
            "SFT row the same for every seed."
        )
    n_tasks = _num(results["test_tasks"].max())
    if n_tasks:
        lines.append(
            f"- Resolution: {int(n_tasks)} test tasks per run, so one task more or less "
            f"solved moves a run's success rate by {_fmt(1 / n_tasks)}; with "
            f"{int(results['seeds'].max())} seed(s), differences smaller than the seed spread "
            "are not evidence."
        )
    compared = int(accuracy["compared_steps"].iloc[0]) if not accuracy.empty else 0
    if compared:
        row = accuracy.iloc[0]
        lines.append(
            f"- Step rewards: of {compared} steps where the agent left the gold path, the "
            f"Monte Carlo estimate ranked the gold action higher in {int(row.gold_higher)} "
            f"({_fmt(_num(row.step_reward_accuracy))}), tied in {int(row.tied)} and ranked "
            f"it lower in {int(row.gold_lower)}."
        )
    else:
        lines.append("- Step rewards: no step was compared against a gold action.")
    return "\n".join(lines)


ABLATED = {"ipr-no-odpo": "o-DPO", "ipr-no-sdpo": "s-DPO", "ipr-no-sft": "the SFT term"}


def _ordering_evidence(paired: pd.DataFrame | None) -> str:
    """Which steps of IPR > ETO > SFT the paired intervals show (means alone can be noise)."""
    if paired is None or paired.empty:
        return ""
    rows = {(r.comparison, r.metric): r for r in paired.itertuples()}
    steps = [rows.get((f"{a} - {b}", "reward")) for a, b in (("ipr", "eto"), ("eto", "sft"))]
    if any(row is None for row in steps):
        return ""
    weak = [row.comparison.upper() for row in steps if row.ci != "above 0"]
    if not weak:
        return " (both steps with paired intervals above 0)"
    return (
        f" on the means, but the paired interval of {' and of '.join(weak)} contains or is below 0"
    )


def paired_statements(paired: pd.DataFrame) -> list[str]:
    """The paired intervals as claims: does A beat B on the same tasks, read off the CI."""
    if paired.empty:
        return ["- Paired comparisons on test tasks: none computed."]
    rows = {(r.comparison, r.metric): r for r in paired.itertuples()}
    lines = []
    for a, b in COMPARISONS[:3]:
        row = rows.get((f"{a} - {b}", "reward"))
        if row is None:
            continue
        claim = (
            f"{a.upper()} beats {b.upper()}"
            if row.ci == "above 0"
            else (f"{a.upper()} does not beat {b.upper()}")
        )
        lines.append(f"- {claim}: {_interval(row, a.upper(), b.upper(), 'test reward')}.")
    for a, b in COMPARISONS[:2]:
        row = rows.get((f"{a} - {b}", "steps"))
        if row is not None:
            readings = {
                "below 0": f"{a.upper()} needs fewer steps",
                "above 0": f"{a.upper()} takes more steps",
                "contains 0": "no difference in steps shown",
            }
            reading = readings[row.ci]
            lines.append(
                f"- Action efficiency: {_interval(row, a.upper(), b.upper(), 'average steps')}"
                f" ({reading})."
            )
    for ablation, term in ABLATED.items():
        row = rows.get((f"{ablation} - ipr", "reward"))
        if row is None:
            continue
        readings = {
            "below 0": f"removing {term} costs reward, as in the paper",
            "contains 0": f"no evidence here that {term} matters",
            "above 0": f"better without {term}, against the paper",
        }
        reading = readings[row.ci]
        lines.append(f"- {_interval(row, ablation, 'IPR', 'test reward')}: {reading}.")
    return lines


def _interval(row: Any, a: str, b: str, what: str) -> str:
    """'IPR 0.45 vs SFT 0.40, IPR - SFT test reward = +0.050, 95% CI [0.010, 0.090] over 50
    tasks (...): above 0'."""
    return (
        f"{a} {row.a_mean:.3f} vs {b} {row.b_mean:.3f}, {a} - {b} {what} = "
        f"{_signed(row.mean_diff)}, 95% CI [{row.ci_low:.3f}, "
        f"{row.ci_high:.3f}] over {row.tasks} tasks ({a} higher on {row.a_higher}, lower on "
        f"{row.a_lower}, equal on {row.equal}): {row.ci}"
    )


def compare(better: str, worse: str, results: pd.DataFrame, per_seed: pd.DataFrame) -> str:
    """'Does `better` beat `worse` on mean test reward', answered with the margin, the seed
    ranges and the per-seed wins (seeds pair the runs: same seed, same iteration-1 data)."""
    rows = {row.method: row for row in results.itertuples()}
    if better not in rows or worse not in rows:
        missing = [m for m in (better, worse) if m not in rows]
        return f"{better.upper()} vs {worse.upper()}: not compared ({', '.join(missing)} not run)."
    b, w = rows[better], rows[worse]
    mean_b, mean_w = _num(b.reward_mean), _num(w.reward_mean)
    if mean_b is None or mean_w is None:
        return f"{better.upper()} vs {worse.upper()}: not compared (no test reward)."
    delta = mean_b - mean_w
    verdict = "yes" if delta > 0 else "no (equal)" if delta == 0 else "no"
    overlap = _num(b.reward_min) <= _num(w.reward_max) and _num(w.reward_min) <= _num(b.reward_max)
    seeds = per_seed.pivot_table(index="seed", columns="method", values="test_reward")
    wins = ties = paired = 0
    if better in seeds and worse in seeds:
        both = seeds[[better, worse]].dropna()
        paired = len(both)
        wins = int((both[better] > both[worse]).sum())
        ties = int((both[better] == both[worse]).sum())
    return (
        f"Does {better.upper()} beat {worse.upper()} on mean test reward? {verdict}: "
        f"{_fmt(mean_b)} vs {_fmt(mean_w)} ({_signed(delta)}); higher on {wins} of {paired} "
        f"seeds ({ties} tied); the seed ranges " + ("overlap." if overlap else "do not overlap.")
    )


def _num(value: object) -> float | None:
    if value is None or value is pd.NA:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _fmt(value: float | None) -> str:
    return "NULL" if value is None else f"{value:.3f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}"
