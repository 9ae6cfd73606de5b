"""`ipr report`: an experiment's results as markdown, generated from SQL over the store.

Every table in the report is the result of the query printed under it, run as printed
(the experiment id is written into the SQL text, not bound as a parameter), so a reader
can paste any query into `ipr sql` and get the same numbers. The exceptions: the paired
statistics, computed by `flows.stats` (pure functions) from a printed query's output, with
the function, seeds and resamples named; and the config's commits, read from git. The
closing analysis is computed from those tables, never written by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from flows.plots import plot_dev_curve
from flows.stats import (
    ALPHA,
    BOOTSTRAP_SEED,
    MAX_EXACT_GAMES,
    N_PERMUTATIONS,
    N_RESAMPLES,
    PERMUTATION_SEED,
    paired_comparisons,
)
from ipr_core.config import read_yaml_mapping
from ipr_core.errors import InputError
from ipr_core.run.experiment import ensure_known
from ipr_core.store.store import Store
from ipr_core.training.methods import COMPARISONS, ETO, IPR, REGISTRY, SFT
from ipr_core.types import FAILED_STATUSES

PAPER_ORDER = "[" + ", ".join(f"'{m}'" for m in REGISTRY) + "]"
"""Rows in the registry's order: SFT, ETO, IPR, the ablations, then the other baselines."""
COMPARED = tuple((a.name, b.name) for a, b in COMPARISONS)

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
       coalesce(CAST(json_extract(e.config, '$.fallback_to_sft') AS BOOLEAN), false)
           AS fallback_to_sft,
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
tested AS (
    SELECT m.method, m.seed, r.*
    FROM member m
    JOIN rollouts r ON r.run_id = m.run_id AND r.iteration = m.best_iteration
         AND r.policy_id = m.test_policy_id AND r.kind = 'eval'
    WHERE r.task_id NOT IN (SELECT task_id FROM dev_tasks)),
games AS (
    SELECT task_id, min(task_id) OVER (PARTITION BY transcripts) AS game_id
    FROM (SELECT task_id,
                 string_agg(policy_id || md5(steps), ',' ORDER BY policy_id || md5(steps))
                     AS transcripts
          FROM tested GROUP BY task_id)),
episodes AS (
    SELECT t.method, t.seed, t.task_id, g.game_id, t.status IN {FAILED_LIST} AS failed,
           coalesce(t.outcome_reward, 0) AS reward, t.n_steps AS steps
    FROM tested t JOIN games g USING (task_id))"""
"""The test episodes of each finished run's tested model, with their game. Rollouts carry
no split and a model's dev and test episodes share (run, iteration, policy), so the dev
tasks are learnt from dev evaluations with no test evaluation beside them (a trained run's
iteration 0); `episode_mismatches` checks the result against the evaluations. A game is a
set of test tasks on which every tested model wrote the same transcript (actions and
observations): the seeds of a split made one game twice before splits were deduplicated
(`ipr_core.envs`); such a game counts once, named by its first task id."""

EPISODES_SQL = f"""
WITH {TEST_EPISODES_CTES.strip()}
SELECT method, seed, game_id, count(*) AS tasks,
       bool_and(failed) AS failed,
       round(avg(reward) FILTER (WHERE NOT failed), 4) AS reward,
       round(avg(CAST(reward >= 1.0 AS DOUBLE)) FILTER (WHERE NOT failed), 4) AS success,
       round(avg(steps) FILTER (WHERE NOT failed), 4) AS steps
FROM episodes
GROUP BY method, seed, game_id
ORDER BY list_position({PAPER_ORDER}, method), seed, game_id
"""
"""Per (method, seed, test game): the tested model's outcome (over the game's tasks, which
are the same game); `failed`: every episode of it failed (left out, never scored 0)."""

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
    episodes = run_query(store, EPISODES_SQL, experiment_id)
    manifests = run_query(store, MANIFESTS_SQL, experiment_id).markdown()
    tests = run_query(store, TEST_EVALUATIONS_SQL, experiment_id)
    diffs = run_query(store, per_game_diff_sql(list(episodes.frame["method"])), experiment_id)
    mismatches = episode_mismatches(episodes.frame, results.frame)
    paired = pd.DataFrame() if mismatches else paired_comparisons(episodes.frame, COMPARED)
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
        "Each run picks its best iteration on the dev split (highest dev reward) and that "
        "model is evaluated once on the test split; SFT is iteration 0. "
        + iteration_rule(settings.frame)
        + " Mean, sample standard deviation and min-max over seeds.",
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
        "## Paired comparisons on the test games",
        paired_section(store, experiment_id, episodes.frame, paired, mismatches),
        "### Per-game reward differences",
        "Test reward per game, averaged over the seeds whose episode finished, and the "
        "per-game differences of the comparisons.",
        diffs.markdown(),
        "### Per-episode outcomes",
        "The source of the paired statistics: per method, seed and test game, the tested "
        "model's outcome (`tasks`: the game's test task ids, more than one where seeds made "
        "the same game); `failed`: the episode failed (left out, never scored 0).",
        f"<details><summary>{len(episodes.frame)} rows</summary>\n\n{episodes.markdown()}"
        "\n\n</details>",
        "## Settled before test",
        settled_section(experiment_id, tests),
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


# -- the rule and the settings ---------------------------------------------------------------
def iteration_rule(settings: pd.DataFrame) -> str:
    """The iteration-0 rule of the experiment (`fallback_to_sft`), one for every method."""
    fallback = bool(settings["fallback_to_sft"].iloc[0]) if not settings.empty else False
    if fallback:
        return (
            "Iteration-0 rule (`fallback_to_sft: true`, the same for every method): a trained "
            "method may pick iteration 0, its SFT model, when dev says so."
        )
    return (
        "Iteration-0 rule (`fallback_to_sft: false`, the same for every method): a trained "
        "method picks among its trained iterations (>= 1), even where dev prefers the SFT "
        "model."
    )


# -- paired comparisons over test games -----------------------------------------------------
def per_game_diff_sql(methods: Sequence[str]) -> str:
    """The per-game reward of each method (seed-averaged, failed episodes left out) and the
    paired differences of the comparisons, one row per test game; built for the methods run
    so the printed query has no empty columns."""
    ordered = [m for m in REGISTRY if m in methods]
    reward = "max(reward) FILTER (WHERE method = '{}')"
    columns = [f'round({reward.format(m)}, 3) AS "{m}"' for m in ordered]
    columns += [
        f'round({reward.format(a)} - {reward.format(b)}, 3) AS "{a} - {b}"'
        for a, b in COMPARED
        if a in ordered and b in ordered
    ]
    select = ",\n       ".join(["game_id", *columns])
    return f"""
WITH {TEST_EPISODES_CTES.strip()},
per_game AS (
    SELECT method, game_id, avg(reward) FILTER (WHERE NOT failed) AS reward
    FROM episodes GROUP BY method, game_id)
SELECT {select}
FROM per_game
GROUP BY game_id
ORDER BY game_id
"""


def episode_mismatches(episodes: pd.DataFrame, results: pd.DataFrame) -> list[str]:
    """Methods whose test episodes are not seeds x test tasks: the dev/test separation of
    the episodes query failed (e.g. no dev-only evaluation to learn the dev tasks from)."""
    found_by_method = episodes.groupby("method")["tasks"].sum()
    problems = []
    for row in results.itertuples():
        expected = int(row.seeds) * int(row.test_tasks)
        found = int(found_by_method.get(row.method, 0))
        if found != expected:
            problems.append(f"{row.method}: {found} test episodes, expected {expected}")
    return problems


def paired_section(
    store: Store,
    experiment_id: str,
    episodes: pd.DataFrame,
    paired: pd.DataFrame,
    mismatches: Sequence[str],
) -> str:
    """The paired-comparison table with how it was computed and how to recompute it."""
    tasks = int(episodes["tasks"].sum()) if not episodes.empty else 0
    failed = int((episodes["tasks"] * episodes["failed"].astype(int)).sum()) if tasks else 0
    n_games = episodes["game_id"].nunique() if tasks else 0
    per_run = episodes.groupby(["method", "seed"])["tasks"].sum().max() if tasks else 0
    code = f"{paired_comparisons.__module__}.{paired_comparisons.__qualname__}"
    text = [
        f"Each run is tested on {per_run} test tasks, which are {n_games} distinct games (a "
        "game: every tested model wrote the same transcript on its tasks; splits now hold "
        "each game once, older stores may hold one twice). Methods are "
        "compared game by game and, within a game, seed by seed (the methods of a seed share "
        "its SFT model and data). A - B is the mean over games of the game's mean over seeds "
        "of A - B. Its 95% interval is a hierarchical percentile bootstrap (games resampled "
        "with replacement, then seeds within each drawn game); `p` is a two-sided paired "
        "sign-flip permutation test over games (exact over every sign vector up to "
        f"{MAX_EXACT_GAMES} games, else {N_PERMUTATIONS} random ones). `verdict` applies the "
        f"two-test rule: A is better only when the interval excludes 0 AND p < {ALPHA} "
        "(else `not shown`). `a_higher`, `a_lower` and `equal` count games. Reward and "
        "success: higher is better; steps: fewer is better (the paper's action-efficiency "
        "claim).",
        f"Failed episodes (status {', '.join(sorted(FAILED_STATUSES))}) are excluded, never "
        f"scored 0: {failed} of {tasks} test episodes failed. A game with no seed on which "
        "both methods finished drops out of that comparison (`games`).",
        "Rollouts carry no split, and a model's dev and test episodes share its run and "
        "iteration, so the per-game queries leave out the dev tasks, found as those of dev "
        "evaluations with no test evaluation of the same model beside them (a trained "
        "run's iteration 0); the episodes found are checked against seeds x test tasks.",
    ]
    if mismatches:
        text.append(
            "Not computed: the test episodes do not match the evaluations ("
            + "; ".join(mismatches)
            + "), so the test tasks could not be told apart from the dev tasks."
        )
        return "\n\n".join(text)
    text.append(
        f"Computed in Python by `{code}` (bootstrap: {N_RESAMPLES} resamples, "
        f"`numpy.random.default_rng({BOOTSTRAP_SEED})`, 2.5/97.5 percentiles; permutations: "
        f"`numpy.random.default_rng({PERMUTATION_SEED})`) from the output of the episodes "
        "query under *Per-episode outcomes*; this regenerates it:"
    )
    text.append(markdown_table(paired))
    text.append(
        "```python\n"
        f"from {__name__} import COMPARED, EPISODES_SQL, run_query\n"
        f"from {paired_comparisons.__module__} import paired_comparisons\n"
        "from ipr_core.store.store import Store\n\n"
        f"store_path = {_literal(str(store.path))}\n"
        f"experiment_id = {_literal(experiment_id)}\n"
        "episodes = run_query(Store(store_path), EPISODES_SQL, experiment_id)\n"
        "print(paired_comparisons(episodes.frame, COMPARED))\n```"
    )
    return "\n\n".join(text)


def _literal(text: str) -> str:
    """A double-quoted string literal: the printed code is as ruff formats it, and a literal
    assigned alone stays on its line however long the path is."""
    return json.dumps(text)


# -- settled before test ----------------------------------------------------------------------
TEST_EVALUATIONS_SQL = f"""
SELECT x.method, x.seed, x.run_id,
       strftime(t.created_at, '%Y-%m-%d %H:%M:%S') AS tested_at,
       (SELECT json_extract_string(m.manifest, '$.git_commit') FROM run_manifests m
        WHERE m.run_id = x.run_id AND m.created_at <= t.created_at
        ORDER BY m.created_at DESC LIMIT 1) AS code_commit
FROM experiment_runs x
JOIN experiments e USING (experiment_id)
JOIN evaluations t ON t.run_id = x.run_id AND t.iteration = x.best_iteration
     AND t.policy_id = x.test_policy_id
     AND t.split = json_extract_string(e.config, '$.test_split')
WHERE x.experiment_id = {{exp}} AND x.status = 'finished'
ORDER BY t.created_at, list_position({PAPER_ORDER}, x.method), x.seed
"""
"""Each finished run's test evaluation, when it was written and the project commit the run
recorded (in its manifest) when it last started before that evaluation."""


@dataclass(frozen=True)
class Commit:
    sha: str
    when: datetime
    subject: str


REPO = Path(__file__).resolve().parents[1]
"""The project checkout whose `configs/` and git history the report reads."""


def experiment_config_file(experiment_id: str, root: Path = REPO) -> Path | None:
    """The committed config under `configs/` whose experiment_id is `experiment_id`."""
    for path in sorted((root / "configs").glob("*.yaml")):
        try:
            if read_yaml_mapping(path).get("experiment_id") == experiment_id:
                return path
        except InputError:
            continue
    return None


def config_commits(path: Path, root: Path = REPO) -> list[Commit] | None:
    """The commits that changed `path`, newest first (None: no git history to read)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "log", "--format=%H%x09%cI%x09%s", "--", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    commits = []
    for line in out.splitlines():
        sha, when, subject = line.split("\t", 2)
        commits.append(Commit(sha, datetime.fromisoformat(when).astimezone(UTC), subject))
    return commits


def settled_section(experiment_id: str, tests: Table) -> str:
    """The config's commit before the first test evaluation and each test evaluation's
    time, flagging any test evaluation older than the config's last change."""
    text = [
        "Tuning never evaluates a test task (a config with `tuning: true` stops at dev). "
        "The experiment's settings must be committed before its first test evaluation: "
        "each test evaluation below (time in UTC, as the store wrote it; `code_commit` is "
        "the project commit the run's manifest recorded) is compared with the commits of "
        "the experiment's config file."
    ]
    path = experiment_config_file(experiment_id)
    times = [
        datetime.strptime(t, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        for t in tests.frame["tested_at"]
    ]
    if path is None:
        text.append(f"No config under `configs/` has `experiment_id: {experiment_id}`.")
    else:
        shown = str(path.relative_to(REPO))
        text += settled_statements(shown, config_commits(path), times)
    text.append(tests.markdown())
    return "\n\n".join(text)


def settled_statements(
    config: str, commits: Sequence[Commit] | None, tested: Sequence[datetime]
) -> list[str]:
    """What the config's commits (newest first) say of the test evaluations' times."""
    if not commits:
        return [f"`{config}` has no commit in git (or git is absent)."]
    last = commits[0]
    if not tested:
        return [f"No test evaluation yet; `{config}` was last changed in {last.sha[:12]} "
                f"({_when(last.when)})."]  # fmt: skip
    first = min(tested)
    before = [c for c in commits if c.when <= first]
    if before:
        lines = [
            f"Config `{config}`: the commit that last changed it before the first test "
            f"evaluation ({_when(first)}) is {before[0].sha[:12]} ({_when(before[0].when)}, "
            f'"{before[0].subject}").'
        ]
    else:
        lines = [
            f"**Flag:** config `{config}` had no commit before the first test evaluation "
            f"({_when(first)}): its first commit is {commits[-1].sha[:12]} "
            f"({_when(commits[-1].when)})."
        ]
    older = sum(t < last.when for t in tested)
    if older:
        lines.append(
            f"**Flag:** {older} of {len(tested)} test evaluations are older than the config's "
            f'last change, {last.sha[:12]} ({_when(last.when)}, "{last.subject}"): the '
            "settings that produced them are not the committed ones."
        )
    else:
        lines.append(
            f"Every test evaluation is newer than the config's last change "
            f"({last.sha[:12]}, {_when(last.when)})."
        )
    return lines


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


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
    for better, worse in ((IPR.name, ETO.name), (ETO.name, SFT.name), (IPR.name, SFT.name)):
        lines.append("- " + compare(better, worse, results, per_seed))
    paper = (IPR.name, ETO.name, SFT.name)
    if all(m in means and means[m] is not None for m in paper):
        holds = means[IPR.name] > means[ETO.name] > means[SFT.name]
        lines.append(
            "- The paper's ordering IPR > ETO > SFT on mean test reward holds here: "
            + ("yes" if holds else "no")
            + _ordering_evidence(paired)
            + "."
        )
    if SFT.name in means and means[SFT.name] is not None:
        sft_row = results[results["method"] == SFT.name].iloc[0]
        expert = _num(settings["expert_reward"].iloc[0]) if not settings.empty else None
        spread = _num(getattr(sft_row, "reward_std", None))
        same = spread == 0.0 or int(sft_row.seeds) == 1
        lines.append(
            f"- The SFT agent's test reward is {_fmt(means[SFT.name])} (success "
            f"{_fmt(_num(sft_row.success_mean))}); the expert trajectories it learned from "
            f"reach {_fmt(expert)}."
            + (
                " The SFT row is the same on every seed (one SFT model, evaluated greedily), "
                "so its seeds are not independent samples of SFT training."
                if same
                else ""
            )
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


def _ordering_evidence(paired: pd.DataFrame | None) -> str:
    """Which steps of IPR > ETO > SFT the two-test rule shows (means alone can be noise)."""
    if paired is None or paired.empty:
        return ""
    rows = {(r.comparison, r.metric): r for r in paired.itertuples()}
    steps = [rows.get((f"{a.name} - {b.name}", "reward")) for a, b in ((IPR, ETO), (ETO, SFT))]
    if any(row is None for row in steps):
        return ""
    weak = [row.comparison.upper() for row in steps if row.verdict != "A better"]
    if not weak:
        return " (both steps shown under the two-test rule)"
    return f" on the means, but the two-test rule does not show {' nor '.join(weak)} above 0"


def paired_statements(paired: pd.DataFrame) -> list[str]:
    """The comparisons as claims under the two-test rule, then which of them IPR wins."""
    if paired.empty:
        return ["- Paired comparisons on test games: none computed."]
    rows = {(r.comparison, r.metric): r for r in paired.itertuples()}
    lines, wins, not_shown = [], [], []
    for a, b in COMPARED:
        row = rows.get((f"{a} - {b}", "reward"))
        if row is None:
            continue
        big_a, big_b = a.upper(), b.upper()
        claim = {
            "A better": f"{big_a} beats {big_b}",
            "B better": f"{big_b} beats {big_a}",
            "not shown": f"{big_a} does not beat {big_b}",
        }[row.verdict]
        lines.append(f"- {claim}: {_interval(row, big_a, big_b, 'test reward')}.")
        if a == IPR.name:
            (wins if row.verdict == "A better" else not_shown).append(big_b)
    for a, b in COMPARED[:2]:
        row = rows.get((f"{a} - {b}", "steps"))
        if row is not None:
            reading = {
                "A better": f"{a.upper()} needs fewer steps",
                "B better": f"{a.upper()} takes more steps",
                "not shown": "no difference in steps shown",
            }[row.verdict]
            lines.append(
                f"- Action efficiency: {_interval(row, a.upper(), b.upper(), 'average steps')}"
                f" ({reading})."
            )
    if wins or not_shown:
        lines.append(
            "- Under the two-test rule (interval above 0 and p < 0.05) IPR wins against: "
            + (", ".join(wins) if wins else "none")
            + "; not shown against: "
            + (", ".join(not_shown) if not_shown else "none")
            + "."
        )
    for ablated in (m for m in REGISTRY.values() if m.ablates):
        row = rows.get((f"{IPR.name} - {ablated.name}", "reward"))
        if row is not None:
            reading = {
                "A better": f"removing {ablated.ablates} costs reward, as in the paper",
                "not shown": f"no evidence here that {ablated.ablates} matters",
                "B better": f"better without {ablated.ablates}, against the paper",
            }[row.verdict]
            lines.append(f"- Without {ablated.ablates} ({ablated.name}): {reading}.")
    return lines


def _interval(row: Any, a: str, b: str, what: str) -> str:
    """'IPR 0.450 vs SFT 0.400, IPR - SFT test reward = +0.050, 95% CI [0.010, 0.090],
    p = 0.012 over 50 games (...)'."""
    return (
        f"{a} {row.a_mean:.3f} vs {b} {row.b_mean:.3f}, {a} - {b} {what} = "
        f"{_signed(row.mean_diff)}, 95% CI [{row.ci_low:.3f}, {row.ci_high:.3f}] "
        f"({row.ci}), {_p(row.p)} over {row.games} games ({a} higher on {row.a_higher}, "
        f"lower on {row.a_lower}, equal on {row.equal})"
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


def _p(value: float) -> str:
    return f"p = {value:.4f}" if value >= 1e-4 else "p < 0.0001"


def _signed(value: float) -> str:
    return f"{value:+.3f}"
