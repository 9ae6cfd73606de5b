"""The lock-step rollout engine.

Many episodes advance together: each round makes ONE batched generate call for every
live episode, then steps each episode's environment. An episode may start from a
replayed prefix of assistant turns (an expert prefix, or a prefix plus the action
whose step reward is being estimated). Finished episodes free their slot at once, so
up to `max_live` episodes are always in flight.

Environment steps of one round run concurrently in a thread pool (slow environments,
such as a SQL server or a JVM, overlap), and each is bounded by `step_timeout_s`: a hung
step ends its episode as `env_error`, and the engine carries on with a fresh env instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ipr_core.agent.prompts import (
    INVALID_TURN_OBSERVATION,
    STOP_STRINGS,
    PromptFormat,
    build_conversation,
)
from ipr_core.agent.react import parse_react
from ipr_core.engine.backends.base import Completion, PolicyBackend, SamplingParams
from ipr_core.engine.progress import ProgressFn
from ipr_core.envs import Env, EnvTask, StepResult, make_env
from ipr_core.types import (
    NO_OUTCOME_STATUSES,
    Message,
    RolloutStatus,
    Step,
    Trajectory,
    same_action,
)


@dataclass(frozen=True)
class RolloutSpec:
    task_id: str
    prefix: tuple[str, ...] = ()
    """Assistant turns replayed in the environment before the policy acts."""
    sample_idx: int = 0
    cut_if_action: str | None = None
    """End the episode after the policy's first action when it is this one (`same_action`):
    status `cut`, no outcome."""


@dataclass
class RolloutResult:
    spec: RolloutSpec
    trajectory: Trajectory
    """All steps, the replayed prefix included."""
    prefill_tokens: int = 0
    generated_tokens: int = 0
    env_steps: int = 0
    parse_failures: int = 0
    error: str | None = None

    @property
    def status(self) -> RolloutStatus:
        return self.trajectory.status

    @property
    def outcome_reward(self) -> float | None:
        return self.trajectory.outcome_reward

    @property
    def policy_steps(self) -> tuple[Step, ...]:
        """The steps the policy took after the replayed prefix."""
        return self.trajectory.steps[len(self.spec.prefix) :]


@dataclass
class _Episode:
    spec: RolloutSpec
    env: Env | None = None
    task: EnvTask | None = None
    steps: list[Step] = field(default_factory=list)
    reward: float = 0.0
    status: RolloutStatus | None = None
    """Set when the episode ends."""
    prefill_tokens: int = 0
    generated_tokens: int = 0
    env_steps: int = 0
    parse_failures: int = 0
    error: str | None = None


@dataclass(frozen=True)
class EpisodeConfig:
    """How an engine runs its episodes."""

    max_live: int = 32
    """Episodes in lock-step: one batched generate call per round for all of them."""
    max_new_tokens: int = 96
    max_steps: int | None = None
    """The step bound; the env's own bound when unset or lower."""
    step_timeout_s: float = 60.0
    """An env step running longer fails its rollout (env_error)."""
    history_window: int | None = None
    """Prompts show the last k turns (None: the whole history)."""


class RolloutEngine:
    """Runs episodes of one environment with one policy backend; reuses env instances."""

    def __init__(
        self,
        env_id: str,
        backend: PolicyBackend,
        settings: EpisodeConfig = EpisodeConfig(),
        progress: ProgressFn | None = None,
    ):
        self.backend = backend
        self.max_live = settings.max_live
        self.max_new_tokens = settings.max_new_tokens
        self._idle_envs: list[Env] = [make_env(env_id)]
        self.env_id = self._idle_envs[0].env_id  # canonical, as every stored row carries it
        self.prompt = PromptFormat(self._idle_envs[0].action_hint, settings.history_window)
        env_max_steps = self._idle_envs[0].max_steps
        max_steps = settings.max_steps
        self.max_steps = min(env_max_steps, max_steps) if max_steps else env_max_steps
        self.step_timeout_s = settings.step_timeout_s
        self.progress = progress
        self._stepper = ThreadPoolExecutor(
            max_workers=settings.max_live, thread_name_prefix="env-step"
        )

    def close(self) -> None:
        for env in self._idle_envs:
            env.close()
        self._idle_envs.clear()
        self._stepper.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ----------------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        env = self._acquire_env()
        try:
            return env.task_ids(split)
        finally:
            self._idle_envs.append(env)

    def conversation(self, task: EnvTask, steps: Sequence[Step]) -> list[Message]:
        return build_conversation(task, steps, self.prompt)

    def replay(self, task_id: str, prefix: Sequence[str]) -> tuple[RolloutResult, bool]:
        """Replay assistant turns without generating; also says whether the episode ended."""
        episode = _Episode(spec=RolloutSpec(task_id=task_id, prefix=tuple(prefix)))
        self._start(episode)
        ended = episode.status is not None
        return self._finish(episode), ended

    def run(
        self, specs: Sequence[RolloutSpec], temperature: float, seed: int = 0
    ) -> list[RolloutResult]:
        """Run every spec to the end of its episode; results in the order of `specs`."""
        results: list[RolloutResult | None] = [None] * len(specs)
        pending = deque(enumerate(specs))
        live: list[tuple[int, _Episode]] = []

        finished = 0

        def finish(index: int, episode: _Episode) -> None:
            nonlocal finished
            results[index] = self._finish(episode)
            finished += 1
            if self.progress is not None:
                self.progress(finished, len(specs))

        params = SamplingParams(
            temperature=temperature, max_new_tokens=self.max_new_tokens, stop=STOP_STRINGS
        )
        while pending or live:
            while pending and len(live) < self.max_live:
                index, spec = pending.popleft()
                episode = _Episode(spec=spec)
                self._start(episode)
                if episode.status is None:
                    live.append((index, episode))
                else:
                    finish(index, episode)
            if not live:
                continue
            try:
                completions = self._generate([ep for _, ep in live], params, seed)
            except Exception as exc:  # the backend failed: every live episode failed with it
                for _, episode in live:
                    episode.status, episode.error = "generation_error", repr(exc)
            else:
                self._advance_all([ep for _, ep in live], completions)
            still_live = []
            for index, episode in live:
                if episode.status is None:
                    still_live.append((index, episode))
                else:
                    finish(index, episode)
            live = still_live
        return [result for result in results if result is not None]

    # -- episode mechanics ---------------------------------------------------------------
    def _start(self, episode: _Episode) -> None:
        """Reset the env to the task and replay the prefix; may end the episode already."""
        episode.env = self._acquire_env()
        try:
            episode.task = episode.env.reset(episode.spec.task_id)
        except Exception as exc:
            self._crash(episode, f"reset failed: {exc!r}")
            return
        for text in episode.spec.prefix:
            self._act(episode, text)
            if episode.status is not None:
                return

    def _advance_all(self, episodes: list[_Episode], completions: list[Completion]) -> None:
        turns = []
        for episode, completion in zip(episodes, completions, strict=True):
            episode.prefill_tokens += completion.prompt_tokens
            episode.generated_tokens += completion.generated_tokens
            if completion.finish_reason == "context":
                episode.status = "truncated"
                episode.error = "the conversation no longer fits the model's context"
            else:
                turns.append((episode, completion.text.strip()))
        self._act_all(turns)

    def _act(self, episode: _Episode, text: str) -> None:
        self._act_all([(episode, text)])

    def _act_all(self, turns: list[tuple[_Episode, str]]) -> None:
        """Execute one assistant turn per episode; an unparsable turn gets a corrective
        observation. The env steps run concurrently, each within `step_timeout_s`."""
        parsed = [(episode, text, parse_react(text)) for episode, text in turns]
        steps: dict[int, Future[StepResult]] = {}
        for episode, _, turn in parsed:
            if turn.ok:
                assert episode.env is not None
                steps[id(episode)] = self._stepper.submit(episode.env.step, turn.action)
        deadline = time.monotonic() + self.step_timeout_s
        for episode, text, turn in parsed:
            if not turn.ok:
                episode.parse_failures += 1
                self._record(
                    episode,
                    Step(text=text, action=turn.action, observation=INVALID_TURN_OBSERVATION),
                    done=False,
                )
                continue
            step_no = len(episode.steps) + 1
            future = steps[id(episode)]
            try:
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._abandon(
                    episode,
                    future,
                    f"step {step_no} did not finish within {self.step_timeout_s:g} s",
                )
                continue
            except Exception as exc:
                self._crash(episode, f"step {step_no} failed: {exc!r}")
                continue
            episode.env_steps += 1
            episode.reward = result.reward
            self._record(
                episode,
                Step(text=text, action=turn.action, observation=result.observation),
                result.done,
            )

    def _record(self, episode: _Episode, step: Step, done: bool) -> None:
        episode.steps.append(step)
        spec = episode.spec
        if done:
            episode.status = "ok"
        elif len(episode.steps) >= self.max_steps:
            episode.status = "max_steps"
        elif (
            spec.cut_if_action is not None
            and len(episode.steps) == len(spec.prefix) + 1
            and same_action(step.action, spec.cut_if_action)
        ):
            episode.status = "cut"

    def _abandon(self, episode: _Episode, running: Future[StepResult], error: str) -> None:
        """A hung step: the episode fails now; its env is closed once the step returns."""
        episode.status, episode.error = "env_error", error
        env, episode.env = episode.env, None
        if env is not None:
            running.add_done_callback(lambda _: _close_quietly(env))

    def _crash(self, episode: _Episode, error: str) -> None:
        episode.status, episode.error = "env_error", error
        if episode.env is not None:
            _close_quietly(episode.env)
            episode.env = None

    def _finish(self, episode: _Episode) -> RolloutResult:
        if episode.env is not None:
            self._idle_envs.append(episode.env)
        status = episode.status or "ok"
        task = episode.task or EnvTask(self.env_id, episode.spec.task_id, "", "", "")
        trajectory = Trajectory(
            task=task,
            steps=tuple(episode.steps),
            outcome_reward=None if status in NO_OUTCOME_STATUSES else episode.reward,
            status=status,
        )
        return RolloutResult(
            spec=episode.spec,
            trajectory=trajectory,
            prefill_tokens=episode.prefill_tokens,
            generated_tokens=episode.generated_tokens,
            env_steps=episode.env_steps,
            parse_failures=episode.parse_failures,
            error=episode.error,
        )

    # -- resources -----------------------------------------------------------------------
    def _acquire_env(self) -> Env:
        return self._idle_envs.pop() if self._idle_envs else make_env(self.env_id)

    def _generate(
        self, episodes: list[_Episode], params: SamplingParams, seed: int
    ) -> list[Completion]:
        """One backend call for the round.

        Sampling: every episode's turn gets its own seed, from the run seed, its spec and
        the turn number, so a rollout is the same whatever batch it runs in (and however a
        run is sharded). Greedy: identical conversations get one completion, generated once.
        """
        conversations = [self.conversation(ep.task, ep.steps) for ep in episodes]
        if params.temperature > 0:
            seeds = [turn_seed(seed, ep.spec, len(ep.steps)) for ep in episodes]
            return [out[0] for out in self.backend.generate(conversations, params, seeds)]
        keys = [json.dumps(conversation) for conversation in conversations]
        unique = {key: conversation for key, conversation in zip(keys, conversations, strict=True)}
        outputs = self.backend.generate(list(unique.values()), params)
        served = {key: out[0] for key, out in zip(unique, outputs, strict=True)}
        return [served[key] for key in keys]


def _close_quietly(env: Env) -> None:
    with contextlib.suppress(Exception):  # a failed instance is discarded either way
        env.close()


def turn_seed(seed: int, spec: RolloutSpec, turn: int) -> int:
    """The sampling seed of one turn of one rollout."""
    key = json.dumps([seed, spec.task_id, spec.prefix, spec.sample_idx, turn])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1
