"""Measure ScienceWorld gold paths: per task, the steps each sampled gold path takes to finish
the task and the reward it reaches (one JSON line per variation, then a summary per task).

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
    lengths: list[int] = []
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
                    lengths.append(steps)
    finally:
        env.close()
    longest = max(lengths, default=0)
    return {
        "task": task,
        "solved": len(lengths),
        "longest": longest,
        "max_steps": 5 * math.ceil(1.5 * longest / 5),
    }


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
