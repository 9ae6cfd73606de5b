"""The conformance suite every environment adapter passes.

Each adapter adds an `EnvCase` to `CASES`: its env id, a way to crash its engine, and an
action that is valid to send but does not end the episode. The tests drive the adapter
directly and through the rollout engine (replaying assistant turns, no model needed), so
they check what the pipeline relies on: deterministic resets, gold actions that reach full
reward, observations (never exceptions) for bad actions, episodes that end at max steps
with their outcome, rewards in [0, 1], and crashes or hangs recorded as failed rollouts
after which the environment works again. WebShop runs against the labelled FIXTURE shop of
tests/webshop_fixture.py (its product data cannot be had here), with the fixture's gold paths.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import webshop_fixture

from ipr_core.agent.prompts import INVALID_TURN_OBSERVATION
from ipr_core.engine.rollout import EpisodeSettings, RolloutEngine
from ipr_core.envs import Env, EnvCrashed, StepResult, make_env
from ipr_core.envs import science_world as sw
from ipr_core.envs import textworld_express as twx
from ipr_core.envs.jvm import SharedJvm
from ipr_core.envs.sql_server import shared_server

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class EnvCase:
    env_id: str
    crash: Callable[[Env], None]
    """Kill the engine behind `env` (its process, server or connection)."""
    idle_action: str
    """Accepted by the env, never ends an episode (e.g. 'look around')."""
    isolate: Callable[[pytest.MonkeyPatch], None] = lambda _: None
    """Give the test its own engine process/server where adapters share one, so a crash
    stays inside the test."""
    tasks_per_split: int = 2
    locate: Callable[[pytest.FixtureRequest, pytest.MonkeyPatch], None] = lambda *_: None
    """Point `make_env` at the engine where it is configured from outside (WebShop's URL)."""
    gold: Callable[[Env, str], list[str] | None] = lambda env, _task_id: env.gold_actions()
    """The gold actions of a task the env was just reset to (WebShop has none of its own)."""

    def __str__(self) -> str:
        return self.env_id


def _kill_twx_jvm(env: Env) -> None:
    process = env._gateway.java_process  # type: ignore[attr-defined]
    process.kill()
    process.wait(timeout=10)


def _own_twx_jvm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(twx, "_JVM", SharedJvm("twx", classpath=twx.JAR_PATH, cwd=twx.BASEPATH))


def _kill_scienceworld_jvm(env: Env) -> None:
    process = env._gateway.java_process  # type: ignore[attr-defined]
    process.kill()
    process.wait(timeout=10)


def _own_scienceworld_jvms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sw, "_GROUPS", {})


def _kill_mariadb(env: Env) -> None:
    """SIGKILL the private MariaDB server (shared by the process's SQL envs; the env that
    meets the dead server starts it again, so no isolation is needed)."""
    server = shared_server()
    pid = server.pid()
    assert pid is not None, "the SQL env has no server running"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.answers(timeout=1.0) and time.monotonic() < deadline:
        time.sleep(0.05)


class _UnloadedLibrary:
    """Stands in for a fast-downward library that is gone: every call fails."""

    def __getattr__(self, name: str) -> None:
        raise OSError(f"fast-downward library unloaded (calling {name})")


def _break_alfworld_engine(env: Env) -> None:
    """ALFWorld's engine runs in-process: make its planner library fail from now on."""
    pddl_env = env._engine.unwrapped  # type: ignore[attr-defined]
    pddl_env.downward_lib = _UnloadedLibrary()
    if getattr(pddl_env, "_pddl_state", None) is not None:
        pddl_env._pddl_state.downward_lib = pddl_env.downward_lib


WEBSHOP_GOALS = 1502
"""WebShop's splits are goal ranges (test 0-499, dev 500-1499, train 1500-): two train goals."""


def _locate_fixture_shop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    url = request.getfixturevalue("fixture_shop_url")
    monkeypatch.setenv("WEBSHOP_URL", url)
    monkeypatch.setenv("WEBSHOP_NUM_GOALS", str(WEBSHOP_GOALS))


def _crash_fixture_shop(env: Env) -> None:
    webshop_fixture.RUNNING[env._shop.base_url.rstrip("/")].crash_once()  # type: ignore[attr-defined]


def _fixture_gold(_env: Env, task_id: str) -> list[str]:
    return webshop_fixture.gold_actions(int(task_id.rpartition("-")[2]))


CASES = [
    EnvCase("twx/cookingworld", _kill_twx_jvm, "look around", _own_twx_jvm),
    EnvCase("twx/twc", _kill_twx_jvm, "look around", _own_twx_jvm),
    EnvCase("twx/coin", _kill_twx_jvm, "inventory", _own_twx_jvm),
    # One short task: every test starts its own JVMs (~20 s each on 2 cores).
    EnvCase(
        "scienceworld/find-animal", _kill_scienceworld_jvm, "look around", _own_scienceworld_jvms
    ),
    EnvCase("intercode-sql", _kill_mariadb, "SHOW TABLES;"),
    EnvCase("alfworld", _break_alfworld_engine, "look"),
    # FIXTURE: WebShop's product data cannot be had here; a loopback stand-in shop serves
    # WebShop-shaped pages (tests/webshop_fixture.py), so this checks the adapter, not WebShop.
    EnvCase(
        "webshop",
        _crash_fixture_shop,
        "search[mug]",
        locate=_locate_fixture_shop,
        gold=_fixture_gold,
    ),  # fmt: skip
]

INVALID_ACTIONS = ["", "xyzzy", "take the moon", "x" * 20_000, "'; DROP TABLE x; --\n\\ \u2603"]
UNPARSABLE_TURNS = ["I will think about it.", "Thought: no action follows", "Action:"]


@pytest.fixture(params=CASES, ids=str)
def case(request: pytest.FixtureRequest) -> EnvCase:
    return request.param


@pytest.fixture(scope="module")
def fixture_shop_url() -> Iterator[str]:
    with webshop_fixture.serve_fixture_shop(num_goals=WEBSHOP_GOALS) as (url, _):
        yield url


@pytest.fixture
def env(
    case: EnvCase, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Env]:
    case.locate(request, monkeypatch)
    made = make_env(case.env_id)
    yield made
    made.close()


@pytest.fixture
def engine(
    case: EnvCase, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RolloutEngine]:
    """An engine without a policy: `replay` executes given assistant turns."""
    case.locate(request, monkeypatch)
    case.isolate(monkeypatch)
    with RolloutEngine(case.env_id, None, EpisodeSettings(step_timeout_s=2.0)) as made:  # type: ignore[arg-type]
        yield made


def _turn(action: str) -> str:
    return f"Thought: next step.\nAction: {action}"


def test_reset_is_deterministic_per_task_id(env: Env) -> None:
    first_id, other_id = env.task_ids("dev")[:2]
    first = env.reset(first_id)
    env.step("look around")
    env.reset(other_id)
    again = env.reset(first_id)
    assert first == again
    assert (first.task_id, first.split) == (first_id, "dev")
    assert first.instruction and first.initial_observation


def test_splits_are_stable_and_disjoint(env: Env) -> None:
    splits = {split: env.task_ids(split) for split in SPLITS}
    assert all(splits.values())
    assert splits["train"] == env.task_ids("train")
    assert not set(splits["train"]) & (set(splits["dev"]) | set(splits["test"]))
    assert not set(splits["dev"]) & set(splits["test"])
    with pytest.raises(ValueError):
        env.task_ids("no-such-split")


def test_gold_actions_replay_to_full_reward(case: EnvCase, env: Env) -> None:
    for split in SPLITS:
        for task_id in env.task_ids(split)[: case.tasks_per_split]:
            env.reset(task_id)
            gold = case.gold(env, task_id)
            assert gold, f"{task_id}: no gold actions"
            assert len(gold) <= env.max_steps, task_id
            for action in gold:
                result = env.step(action)
                assert 0.0 <= result.reward <= 1.0, (task_id, action, result.reward)
                if result.done:
                    break
            assert result.done and result.reward == 1.0, (task_id, result)


def test_invalid_actions_get_an_observation(env: Env) -> None:
    env.reset(env.task_ids("train")[0])
    for action in INVALID_ACTIONS:
        result = env.step(action)
        assert isinstance(result.observation, str) and result.observation, repr(action[:40])
        assert 0.0 <= result.reward <= 1.0
        assert not result.done


def test_unparsable_turns_get_a_corrective_observation(engine: RolloutEngine) -> None:
    task_id = engine.task_ids("train")[0]
    result, ended = engine.replay(task_id, UNPARSABLE_TURNS)
    assert not ended and result.status == "ok" and result.error is None
    assert [step.observation for step in result.trajectory.steps] == [
        INVALID_TURN_OBSERVATION
    ] * len(UNPARSABLE_TURNS)
    assert result.parse_failures == len(UNPARSABLE_TURNS) and result.env_steps == 0


def test_the_env_ends_the_episode_at_max_steps(case: EnvCase, env: Env) -> None:
    env.reset(env.task_ids("test")[0])
    results = [env.step(case.idle_action) for _ in range(env.max_steps)]
    assert [r.done for r in results] == [False] * (env.max_steps - 1) + [True]
    assert all(0.0 <= r.reward <= 1.0 for r in results)


def test_the_engine_ends_at_max_steps_with_the_outcome(
    case: EnvCase, engine: RolloutEngine
) -> None:
    task_id = engine.task_ids("test")[0]
    result, ended = engine.replay(task_id, [_turn(case.idle_action)] * engine.max_steps)
    assert ended and result.status in ("ok", "max_steps")  # the env's bound or the engine's
    assert result.outcome_reward is not None and 0.0 <= result.outcome_reward <= 1.0
    assert len(result.trajectory.steps) == engine.max_steps


def test_a_crash_is_a_failed_rollout_and_the_env_works_again(
    case: EnvCase, engine: RolloutEngine
) -> None:
    task_id = engine.task_ids("train")[0]
    env = make_env(case.env_id)
    env.reset(task_id)
    gold = [_turn(action) for action in case.gold(env, task_id) or []]
    env.close()

    case.crash(engine._idle_envs[0])
    crashed, ended = engine.replay(task_id, gold)
    assert ended and crashed.status == "env_error"
    assert crashed.outcome_reward is None and crashed.error

    again, ended = engine.replay(task_id, gold)
    assert ended and again.status == "ok" and again.outcome_reward == 1.0


def test_a_crashed_adapter_raises_env_crashed(case: EnvCase, engine: RolloutEngine) -> None:
    env = engine._idle_envs[0]
    env.reset(env.task_ids("train")[0])
    case.crash(env)
    with pytest.raises(EnvCrashed):
        env.step(case.idle_action)


def test_a_hung_step_is_a_failed_rollout_and_the_engine_goes_on(
    case: EnvCase, engine: RolloutEngine
) -> None:
    hung = engine._idle_envs[0]
    real_step = hung.step
    release, returned = threading.Event(), threading.Event()

    def step_that_hangs(action: str) -> StepResult:
        release.wait(timeout=60)
        result = real_step(action)
        returned.set()
        return result

    hung.step = step_that_hangs  # type: ignore[method-assign]
    task_id = engine.task_ids("train")[0]
    failed, ended = engine.replay(task_id, [_turn(case.idle_action)])
    assert not returned.is_set(), "the engine waited for the hung step"
    assert ended and failed.status == "env_error" and failed.outcome_reward is None
    assert "did not finish" in (failed.error or "")

    again, ended = engine.replay(task_id, [_turn(case.idle_action)])
    assert not ended and again.status == "ok" and again.env_steps == 1
    release.set()
    assert returned.wait(timeout=60)
