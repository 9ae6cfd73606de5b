"""What `monte_carlo.early_stop` would have saved on a store's agent-step Monte Carlo:
`python scripts/early_stop_savings.py docs/results/repro-full-sft.duckdb`.

Exact, not a model: a rollout is seeded by its query and sample index, so an early-stopped
stage draws the first k of the samples a full stage drew (`estimate_step_rewards`). For
every agent step of every run that sampled N, this replays the waves on the stored samples:
after wave k it asks `mining.pair_decided` (the stage's own rule, with the run's mining
settings and the expert step's stored reward) whether the N - k left could change the step's
pair, and counts k. A step scored by two models (a stage redone) counts once per scorer.
Steps that ended the episode (one replay, no samples) are left out. Prints, per run and
iteration, the agent steps, rollouts drawn in full and early-stopped, and how many of the
steps a pair decision closed at each wave."""

from __future__ import annotations

import json
import sys
from collections import Counter

from ipr_core.config import MiningConfig
from ipr_core.method.mining import PairContext, pair_decided
from ipr_core.store.store import Store
from ipr_core.types import is_failed

SAMPLES_SQL = """
SELECT m.run_id, m.iteration, m.task_id, m.prefix_len, m.policy_id AS scorer_id,
       list(m.status ORDER BY m.sample_idx) AS statuses,
       list(m.outcome_reward ORDER BY m.sample_idx) AS outcomes,
       any_value(x.outcome_reward) AS agent_outcome,
       any_value(e.outcome_reward) AS expert_outcome,
       any_value(s.mean_reward) AS expert_reward,
       any_value(r.config) AS config
FROM rollouts m
JOIN runs r USING (run_id)
JOIN rollouts x ON x.run_id = m.run_id AND x.iteration = m.iteration AND x.kind = 'explore'
     AND x.task_id = m.task_id AND x.prefix_len = m.prefix_len
JOIN expert_trajectories e ON e.task_id = m.task_id AND e.env_id = m.env_id
LEFT JOIN step_rewards s ON s.run_id = m.run_id AND s.iteration = 0 AND s.actor = 'expert'
     AND s.task_id = m.task_id AND s.prefix_len = m.prefix_len
WHERE m.kind = 'mc' AND m.actor = 'agent'
GROUP BY ALL
HAVING count(*) > 1
ORDER BY ALL
"""


def drawn(
    context: PairContext, mining: MiningConfig, statuses: list[str], outcomes: list[float | None]
) -> int:
    """Samples an early-stopped stage draws for one agent step: waves until decided (the
    stage's stop sees the outcomes of the samples that did not fail, `_outcomes`)."""
    n = len(statuses)
    for k in range(1, n + 1):
        so_far = [
            outcome
            for status, outcome in zip(statuses[:k], outcomes[:k], strict=True)
            if not is_failed(status) and outcome is not None
        ]
        if pair_decided(context, mining, so_far, n - k):
            return k
    return n


def main(path: str) -> None:
    rows = Store(path, read_only=True).query(SAMPLES_SQL)
    if rows.empty:
        print(f"{path}: no agent-step Monte Carlo samples")
        return
    header = ("run", "iteration", "agent steps", "rollouts, all N", "early-stopped", "saved")
    print("| " + " | ".join((*header, "closed at wave k: steps")) + " |")
    print("|---" * (len(header) + 1) + "|")
    total = early = 0
    for (run_id, iteration), group in rows.groupby(["run_id", "iteration"], sort=True):
        mining = MiningConfig(**json.loads(group["config"].iloc[0]).get("mining", {}))
        suffix = mining.step_mode == "suffix"
        waves: Counter[int] = Counter()
        full = 0
        for row in group.itertuples():
            context = PairContext(
                expert_reward=row.expert_reward,
                expert_outcome=row.expert_outcome,
                agent_outcome=row.agent_outcome,
                makes_step_pair=not (suffix and row.prefix_len == 0),
            )
            statuses, outcomes = list(row.statuses), list(row.outcomes)
            waves[drawn(context, mining, statuses, outcomes)] += 1
            full += len(statuses)
        stopped = sum(k * count for k, count in waves.items())
        total, early = total + full, early + stopped
        closed = ", ".join(f"{k}: {waves[k]}" for k in sorted(waves))
        print(
            f"| {run_id} | {iteration} | {len(group)} | {full} | {stopped} | "
            f"{1 - stopped / full:.0%} | {closed} |"
        )
    print(f"\nall: {total} rollouts in full, {early} early-stopped ({1 - early / total:.0%} fewer)")


if __name__ == "__main__":
    for store_path in sys.argv[1:]:
        main(store_path)
