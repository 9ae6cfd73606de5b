"""Monte Carlo step rewards (docs/method.md, stage 2).

r_s(e_{t-1}, a_t) is the mean outcome reward of N scorer rollouts that replay the
history e_{t-1}, execute a_t, then sample the scorer to the end at temperature 1.
When a_t ends the episode, the step reward is that outcome itself and nothing is
sampled. Failed rollouts are counted as failed and left out of the mean; a query
whose every rollout failed has no step reward (None), never 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ipr_core.agent.react import parse_react
from ipr_core.engine.rollout import RolloutEngine, RolloutResult, RolloutSpec
from ipr_core.types import Actor, Message, Trajectory, is_failed


@dataclass(frozen=True)
class StepQuery:
    """Asks for the step reward of taking `step_text` after the assistant turns `history`."""

    task_id: str
    actor: Actor
    history: tuple[str, ...]
    step_text: str

    @property
    def prefix_len(self) -> int:
        return len(self.history)


@dataclass(frozen=True)
class StepReward:
    query: StepQuery
    action: str
    mean_reward: float | None
    n_samples: int
    n_ok: int
    n_failed: int
    terminal: bool


SampleStop = Callable[[Sequence[float], int], bool]
"""Given a query's outcomes so far (failed samples left out) and how many samples are left,
whether the rest can be skipped (`mining.pair_decided`: they cannot change its pair)."""


def estimate_step_rewards(
    engine: RolloutEngine,
    queries: Sequence[StepQuery],
    n_samples: int,
    temperature: float = 1.0,
    seed: int = 0,
    stops: Sequence[SampleStop | None] | None = None,
) -> tuple[list[StepReward], list[list[RolloutResult]]]:
    """Step rewards for `queries`, and the rollouts behind each (all sampled in lock-step).

    With `stops` (one per query), samples run in waves, sample k of every query still open
    in wave k, and a query closes once its stop says the rest cannot matter. A rollout is
    seeded by its query and sample index, so a query's first k samples are the ones a full
    run draws: early stopping changes how many are drawn, never what they are.
    """
    rollouts: list[list[RolloutResult]] = [[] for _ in queries]
    terminal: list[bool] = []
    prefixes = [(*query.history, query.step_text) for query in queries]
    for i, query in enumerate(queries):
        replayed, ended = engine.replay(query.task_id, prefixes[i])
        terminal.append(ended)
        if ended:  # the action ended the episode (or the replay failed): nothing to sample
            rollouts[i].append(replayed)
    sampled = [i for i, ended in enumerate(terminal) if not ended]
    waves = [range(n_samples)] if stops is None else [range(k, k + 1) for k in range(n_samples)]
    for wave in waves:
        specs = [
            RolloutSpec(task_id=queries[i].task_id, prefix=prefixes[i], sample_idx=k)
            for i in sampled
            for k in wave
        ]
        owners = [i for i in sampled for _ in wave]
        for owner, result in zip(owners, engine.run(specs, temperature, seed), strict=True):
            rollouts[owner].append(result)
        if stops is not None:
            left = n_samples - wave.stop
            sampled = [
                i
                for i in sampled
                if (stop := stops[i]) is None or not stop(_outcomes(rollouts[i]), left)
            ]
    rewards = [
        summarize(query, results, is_terminal)
        for query, results, is_terminal in zip(queries, rollouts, terminal, strict=True)
    ]
    return rewards, rollouts


class StepRewardModel(Protocol):
    """A learned step reward: the predicted value of a conversation's last assistant turn."""

    def score(self, conversations: Sequence[Sequence[Message]]) -> list[float]: ...


def predict_step_rewards(
    engine: RolloutEngine, scorer: StepRewardModel, queries: Sequence[StepQuery]
) -> tuple[list[StepReward], list[list[RolloutResult]]]:
    """Step rewards from a trained step reward model (paper 5.5) instead of MC rollouts.

    Each step is still replayed: a step that ends the episode gets its outcome, as with MC,
    and a replay that fails has no step reward. Only the replays are returned as rollouts.
    """
    rewards: list[StepReward | None] = [None] * len(queries)
    rollouts: list[list[RolloutResult]] = [[] for _ in queries]
    to_score: list[tuple[int, list[Message]]] = []
    for i, query in enumerate(queries):
        replayed, ended = engine.replay(query.task_id, (*query.history, query.step_text))
        if ended:
            rollouts[i].append(replayed)
            rewards[i] = summarize(query, [replayed], terminal=True)
            continue
        trajectory = replayed.trajectory
        history = engine.conversation(trajectory.task, trajectory.steps[: query.prefix_len])
        to_score.append((i, [*history, {"role": "assistant", "content": query.step_text}]))
    predictions = scorer.score([messages for _, messages in to_score]) if to_score else []
    for (i, _), predicted in zip(to_score, predictions, strict=True):
        query = queries[i]
        action = parse_react(query.step_text).action
        rewards[i] = StepReward(query, action, predicted, 0, 0, 0, terminal=False)
    return [reward for reward in rewards if reward is not None], rollouts


def _outcomes(results: Sequence[RolloutResult]) -> list[float]:
    """The outcomes of the rollouts that did not fail."""
    outcomes = [r.outcome_reward for r in results if not is_failed(r.status)]
    return [o for o in outcomes if o is not None]


def summarize(query: StepQuery, results: Sequence[RolloutResult], terminal: bool) -> StepReward:
    """The MC average over the rollouts that did not fail."""
    outcomes = _outcomes(results)
    return StepReward(
        query=query,
        action=parse_react(query.step_text).action,
        mean_reward=sum(outcomes) / len(outcomes) if outcomes else None,
        n_samples=len(results),
        n_ok=len(outcomes),
        n_failed=len(results) - len(outcomes),
        terminal=terminal,
    )


def expert_queries(expert: Trajectory) -> list[StepQuery]:
    """One query per expert step t: the expert action a_t after the expert history e_{t-1}."""
    texts = tuple(step.text for step in expert.steps)
    return [
        StepQuery(expert.task.task_id, "expert", texts[:t], texts[t]) for t in range(len(texts))
    ]
