"""Measure ScienceWorld gold paths: per task, the steps each sampled gold path takes to finish
the task, its whole length and the reward it reaches (one JSON line per variation, then a
summary per task). Samples `--per-split` evenly spaced variations of each split.

Used to set `MAX_STEPS` in ipr_core/envs/science_world.py:
    python scripts/sciworld_gold_lengths.py --per-split 5 > gold_lengths.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from ipr_core.envs.science_world import MAX_STEPS, SPLITS, ScienceWorldEnv


def evenly_spaced(items: list[str], k: int) -> list[str]:
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def measure(task: str, per_split: int) -> dict[str, object]:
    env = ScienceWorldEnv(task)
    env.max_steps = 100_000  # measure the paths, not the limit
    to_done: list[int] = []
    gold_lengths: list[int] = []
    try:
        for split in SPLITS:
            for task_id in evenly_spaced(env.task_ids(split), per_split):
                started = time.perf_counter()
                env.reset(task_id)
                gold = env.gold_actions() or []
                steps, result = 0, None
                for action in gold:
                    result = env.step(action)
                    steps += 1
                    if result.done:
                        break
                reward = result.reward if result else 0.0
                print(
                    json.dumps(
                        {
                            "task": task,
                            "task_id": task_id,
                            "gold_length": len(gold),
                            "steps_to_done": steps,
                            "reward": reward,
                            "seconds": round(time.perf_counter() - started, 2),
                        }
                    ),
                    flush=True,
                )
                if reward == 1.0:
                    to_done.append(steps)
                    gold_lengths.append(len(gold))
    finally:
        env.close()
    longest = max(to_done, default=0)
    longest_gold = max(gold_lengths, default=0)
    return {
        "task": task,
        "solved": len(to_done),
        "longest_to_done": longest,
        "longest_gold": longest_gold,
        "max_steps": max_steps_for(longest, longest_gold),
    }


def max_steps_for(longest_to_done: int, longest_gold: int) -> int:
    """1.5x the longest path to completion, and room for a whole gold path (some go on after
    the task is done), rounded up to a multiple of 5."""
    return 5 * math.ceil(max(1.5 * longest_to_done, longest_gold) / 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-split", type=int, default=5)
    parser.add_argument("tasks", nargs="*", default=sorted(MAX_STEPS))
    args = parser.parse_args()
    for task in args.tasks:
        print(json.dumps({"summary": measure(task, args.per_split)}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
