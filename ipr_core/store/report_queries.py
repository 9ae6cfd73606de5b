"""The queries `ipr report` runs and prints, each as it is pasted into `ipr sql`: the
experiment id is written into the text (`{exp}`), not bound, so a reader reruns a printed
query as it stands. They live with the store's other SQL; `flows/report.py` renders them."""

from collections.abc import Sequence

from ipr_core.training.methods import COMPARISONS, REGISTRY
from ipr_core.types import FAILED_STATUSES, SUCCESS_REWARD, StageName

COMPARED = tuple((a.name, b.name) for a, b in COMPARISONS)


PAPER_ORDER = "[" + ", ".join(f"'{m}'" for m in REGISTRY) + "]"
"""Rows in the registry's order: SFT, ETO, IPR, the ablations, then the other baselines."""


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
       coalesce(CAST(json_extract(e.config, '$.sft_per_seed') AS BOOLEAN), false)
           AS sft_per_seed,
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


FAILED_LIST = "(" + ", ".join(f"'{s}'" for s in sorted(FAILED_STATUSES)) + ")"
"""The rollout statuses of failed episodes (no outcome; left out, never scored 0)."""


TRAINED_PAIRS_SQL = f"""
SELECT s.run_id, s.iteration,
       CASE WHEN json_valid(c.metrics)
            THEN TRY_CAST(c.metrics->>'n_pairs' AS INTEGER) END AS n_pairs,
       CASE WHEN json_valid(c.metrics)
            THEN TRY_CAST(c.metrics->>'n_dropped' AS INTEGER) END AS n_dropped
FROM stage_runs s JOIN checkpoints c ON c.checkpoint_id = s.result->>'checkpoint_id'
WHERE s.stage = '{StageName.TRAIN_MIXTURE}'
"""
"""The pairs each completed mixture stage trained on, and those it dropped as longer than
`max_length` even without their oldest turns, from the metrics of the checkpoint its record
names (NULL where an older store's metrics do not count them, or are not JSON)."""


TRAINING_DATA_SQL = f"""
WITH iterations AS (
    SELECT x.method, x.run_id, g.iteration
    FROM experiment_runs x
    JOIN experiments e USING (experiment_id)
    JOIN stage_runs g ON g.run_id = x.run_id AND g.iteration >= 1
         AND g.stage = '{StageName.EVALUATE}-' || json_extract_string(e.config, '$.run.dev_split')
    WHERE x.experiment_id = {{exp}} AND x.status = 'finished'),
mined AS (
    SELECT run_id, iteration,
           count(*) FILTER (WHERE level = 'trajectory') AS trajectory_pairs,
           count(*) FILTER (WHERE level = 'step') AS step_pairs
    FROM pairs GROUP BY run_id, iteration),
successes AS (
    SELECT run_id, iteration, count(*) AS successes
    FROM rollouts
    WHERE kind = 'explore' AND prefix_len = 0 AND status NOT IN {FAILED_LIST}
      AND outcome_reward >= {SUCCESS_REWARD}
    GROUP BY run_id, iteration),
trained AS ({TRAINED_PAIRS_SQL})
SELECT i.method, i.iteration, count(*) AS seeds,
       sum(coalesce(w.successes, 0)) AS successful_explorations,
       sum(coalesce(m.trajectory_pairs, 0)) AS trajectory_pairs,
       sum(coalesce(m.step_pairs, 0)) AS step_pairs,
       sum(coalesce(t.n_pairs, 0)) AS pairs_trained_on,
       sum(coalesce(t.n_dropped, 0)) AS pairs_dropped
FROM iterations i
LEFT JOIN successes w USING (run_id, iteration)
LEFT JOIN mined m USING (run_id, iteration)
LEFT JOIN trained t USING (run_id, iteration)
GROUP BY i.method, i.iteration
ORDER BY list_position({PAPER_ORDER}, i.method), i.iteration
"""
"""Per method and iteration, summed over seeds: what its training read. Explorations from a
task's start that completed it (RFT's additions to the expert data), the pairs mined, and
those the mixture trained on and dropped (`TRAINED_PAIRS_SQL`)."""


TRAINING_STEPS_SQL = f"""
SELECT x.method, s.iteration, count(DISTINCT x.seed) AS seeds, count(*) AS steps,
       round(avg(t.loss), 3) AS loss, round(avg(t.sft_loss), 3) AS sft_loss,
       round(avg(t.o_dpo_accuracy), 3) AS o_dpo_accuracy,
       round(avg(t.o_dpo_margin), 3) AS o_dpo_margin,
       round(avg(t.s_dpo_accuracy), 3) AS s_dpo_accuracy,
       round(avg(t.s_dpo_margin), 3) AS s_dpo_margin,
       round(avg(t.s_dpo_chosen_logratio), 3) AS s_dpo_chosen_logratio,
       round(avg(t.s_dpo_rejected_logratio), 3) AS s_dpo_rejected_logratio
FROM experiment_runs x
JOIN stage_runs s ON s.run_id = x.run_id AND s.iteration >= 1
     AND s.stage IN ('{StageName.TRAIN_MIXTURE}', '{StageName.TRAIN_RFT}')
JOIN training_steps t ON t.checkpoint_id = s.result->>'checkpoint_id'
WHERE x.experiment_id = {{exp}} AND x.status = 'finished'
GROUP BY x.method, s.iteration
ORDER BY list_position({PAPER_ORDER}, x.method), s.iteration
"""
"""Each iteration's training steps (`training_steps`), averaged over its steps and seeds:
whether the step term (s-DPO) learns anything the trajectory term (o-DPO) does not. A run's
steps are those of the checkpoint its training stage names (a stage redone with other
inputs leaves its old checkpoint's steps in the store)."""

TRAINING_CURVE_SQL = f"""
SELECT x.method AS label, s.iteration, t.step, count(*) AS seeds,
       avg(t.o_dpo_accuracy) AS o_dpo_accuracy, avg(t.s_dpo_accuracy) AS s_dpo_accuracy,
       avg(t.o_dpo_margin) AS o_dpo_margin, avg(t.s_dpo_margin) AS s_dpo_margin,
       avg(t.o_dpo_loss) AS o_dpo_loss, avg(t.s_dpo_loss) AS s_dpo_loss
FROM experiment_runs x
JOIN stage_runs s ON s.run_id = x.run_id AND s.stage = '{StageName.TRAIN_MIXTURE}'
JOIN training_steps t ON t.checkpoint_id = s.result->>'checkpoint_id'
WHERE x.experiment_id = {{exp}} AND x.status = 'finished'
GROUP BY x.method, s.iteration, t.step
ORDER BY list_position({PAPER_ORDER}, x.method), s.iteration, t.step
"""
"""Every optimizer step of the mixture, averaged over seeds: the training-steps figure (the
steps of the checkpoint each mixture stage names, as in `TRAINING_STEPS_SQL`)."""

METHOD_COSTS_SQL = f"""
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
dev AS (  -- per iteration, the evaluation of the model its stage record names
    SELECT m.method, m.run_id, d.iteration, d.avg_reward
    FROM member m
    JOIN stage_runs g ON g.run_id = m.run_id AND g.stage = '{StageName.EVALUATE}-' || m.dev_split
    JOIN evaluations d ON d.run_id = m.run_id AND d.iteration = g.iteration
         AND d.split = m.dev_split AND d.policy_id = g.result->>'policy_id'),
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
    JOIN step_rewards s ON s.run_id = m.run_id AND s.actor = 'expert'),
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
    WHERE s.actor = 'expert' AND g.source = 'gold'),
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
         AND g.actor = 'expert'
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


DEV_TASKS_CTE = """
dev_tasks AS (
    SELECT DISTINCT r.task_id
    FROM experiment_runs x JOIN experiments e USING (experiment_id)
    JOIN evaluations d ON d.run_id = x.run_id
         AND d.split = json_extract_string(e.config, '$.run.dev_split')
    JOIN rollouts r ON r.run_id = d.run_id AND r.iteration = d.iteration
         AND r.policy_id = d.policy_id AND r.kind = 'eval'
    WHERE NOT EXISTS (
        SELECT 1 FROM evaluations t
        WHERE t.run_id = d.run_id AND t.iteration = d.iteration
          AND t.policy_id = d.policy_id
          AND t.split = json_extract_string(e.config, '$.test_split'))
      AND x.experiment_id = {exp})"""
"""The tasks of the experiment's dev split. Rollouts carry no split and a model's dev and
test episodes share (run, iteration, policy), so the dev tasks are learnt from dev
evaluations with no test evaluation beside them (a trained run's iteration 0, in any run of
the experiment, finished or not)."""


TEST_EPISODES_CTES = f"""
member AS (
    SELECT method, seed, run_id, best_iteration, test_policy_id FROM experiment_runs
    WHERE experiment_id = {{exp}} AND status = 'finished'),
{DEV_TASKS_CTE},
tested AS (
    SELECT m.method, m.seed, r.*
    FROM member m
    JOIN rollouts r ON r.run_id = m.run_id AND r.iteration = m.best_iteration
         AND r.policy_id = m.test_policy_id AND r.kind = 'eval'
    WHERE r.task_id NOT IN (SELECT task_id FROM dev_tasks)),
episodes AS (
    SELECT method, seed, task_id AS game_id, status IN {FAILED_LIST} AS failed,
           coalesce(outcome_reward, 0) AS reward, n_steps AS steps
    FROM tested)"""
"""The test episodes of each finished run's tested model: its episodes outside the dev
tasks (`DEV_TASKS_CTE`); `episode_mismatches` checks the result against the evaluations.
Each test task is a game: splits hold each game once, by the game's content
(`ipr_core.envs.games`). Transcripts cannot tell games apart (an agent that never
leaves the first room writes the same transcript in two games that differ beyond it), so
they are only checked (`SAME_TRANSCRIPTS_SQL`), never used to merge tasks."""


EPISODES_SQL = f"""
WITH {TEST_EPISODES_CTES.strip()}
SELECT method, seed, game_id, failed,
       CASE WHEN NOT failed THEN reward END AS reward,
       CASE WHEN NOT failed THEN CAST(reward >= {SUCCESS_REWARD} AS DOUBLE) END AS success,
       CASE WHEN NOT failed THEN steps END AS steps
FROM episodes
ORDER BY list_position({PAPER_ORDER}, method), seed, game_id
"""
"""Per (method, seed, test game): the tested model's outcome; `failed`: the episode failed
(left out, never scored 0)."""


ACTIONS = "unnest(CAST(json_extract_string(steps, '$[*].action') AS VARCHAR[]))"
"""One row per action of an episode's stored steps (JSON; check `json_valid` first)."""


VERB = "coalesce(lower(nullif(regexp_extract(action, '[A-Za-z]+'), '')), '(none)')"
"""An action's verb: its first word, lower-cased."""


ACTIONS_SQL = f"""
WITH {TEST_EPISODES_CTES.strip()},
actions AS (
    SELECT method, {ACTIONS} AS action
    FROM tested WHERE status NOT IN {FAILED_LIST} AND json_valid(steps)),
verbs AS (SELECT method, {VERB} AS verb FROM actions)
SELECT method, verb, count(*) AS actions,
       round(count(*) / sum(count(*)) OVER (PARTITION BY method), 3) AS share
FROM verbs
GROUP BY method, verb
ORDER BY list_position({PAPER_ORDER}, method), actions DESC, verb
"""
"""What the tested models do on the test games: their actions by first word (the verb), per
method over seeds, failed episodes (and any whose stored steps are not JSON) left out. A
method that gains or loses reward by acting differently shows it here (IPR's first iteration
on the decisive experiment's dev games opened containers 7x as often as its SFT model and
took items a third as often)."""


DEV_ACTIONS_SQL = f"""
WITH {DEV_TASKS_CTE.strip()},
dev AS (
    SELECT x.method, d.iteration, r.steps
    FROM experiment_runs x JOIN experiments e USING (experiment_id)
    JOIN evaluations d ON d.run_id = x.run_id
         AND d.split = json_extract_string(e.config, '$.run.dev_split')
    JOIN rollouts r ON r.run_id = d.run_id AND r.iteration = d.iteration
         AND r.policy_id = d.policy_id AND r.kind = 'eval'
    WHERE x.experiment_id = {{exp}} AND x.status = 'finished'
      AND r.task_id IN (SELECT task_id FROM dev_tasks)
      AND r.status NOT IN {FAILED_LIST} AND json_valid(r.steps)),
actions AS (
    SELECT method, iteration, {ACTIONS} AS action
    FROM dev),
verbs AS (SELECT method, iteration, {VERB} AS verb, count(*) AS n FROM actions GROUP BY ALL)
SELECT method, iteration, sum(n) AS actions,
       string_agg(verb || ' ' || printf('%.2f', n / total), ', ' ORDER BY n DESC, verb)
           AS verb_shares
FROM (SELECT *, sum(n) OVER (PARTITION BY method, iteration) AS total FROM verbs)
GROUP BY method, iteration
ORDER BY list_position({PAPER_ORDER}, method), iteration
"""
"""What each iteration's model does on the dev games: the share of its actions by verb, per
method and iteration, pooled over seeds (failed episodes left out). A dev curve that jumps
between iterations shows here whether the policy changed what it does (on the decisive
experiment's seed 0, IPR's models opened containers at iteration 1, moved and took items at
iteration 2 and put them down at iteration 3)."""


SAME_TRANSCRIPTS_SQL = f"""
WITH {TEST_EPISODES_CTES.strip()},
transcripts AS (
    SELECT task_id,
           string_agg(policy_id || md5(steps), ',' ORDER BY policy_id || md5(steps)) AS all_runs
    FROM tested GROUP BY task_id)
SELECT string_agg(task_id, ', ' ORDER BY task_id) AS test_tasks, count(*) AS tasks
FROM transcripts
GROUP BY all_runs
HAVING count(*) > 1
ORDER BY test_tasks
"""
"""Test tasks on which every tested model wrote the same transcript: distinct games no
model told apart, or, in a store made before splits were deduplicated, one game twice."""


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
ORDER BY list_position({PAPER_ORDER}, x.method), x.seed, m.created_at, m.manifest_id
"""
"""Each run's manifests (`ipr_core.run.manifest`): one row per distinct setup it ran with, so a
run resumed with `--allow-manifest-change` shows both."""


TEST_EVALUATIONS_SQL = f"""
SELECT x.method, x.seed, x.run_id,
       strftime(t.created_at, '%Y-%m-%d %H:%M:%S') AS tested_at,
       (SELECT json_extract_string(m.manifest, '$.git_commit') FROM run_manifests m
        WHERE m.run_id = x.run_id AND m.created_at <= t.created_at
        ORDER BY m.created_at DESC, m.manifest_id DESC LIMIT 1) AS code_commit
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
