"""Behaviour of the env registry and the TextWorldExpress adapter (starts one JVM)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

from ipr_core.envs import Env, EnvCrashed, canonical_env_id, known_env_ids, make_env
from ipr_core.envs import textworld_express as twx
from ipr_core.envs.jvm import SharedJvm
from ipr_core.envs.textworld_express import VARIANTS
from ipr_core.errors import UnknownEnvError

MAIN_ENV_IDS = ["twx/cookingworld", "twx/coin", "twx/twc"]


@pytest.fixture(scope="module")
def envs() -> Iterator[dict[str, Env]]:
    made = {env_id: make_env(env_id) for env_id in MAIN_ENV_IDS}
    yield made
    for env in made.values():
        env.close()


def test_unknown_env_id_names_it_and_lists_known_ids() -> None:
    for bad in ["twx/nosuchgame", "nosuchfamily/coin", "cookingworld"]:
        with pytest.raises(UnknownEnvError) as err:
            make_env(bad)
        assert repr(bad) in str(err.value)
        assert "twx/cookingworld" in str(err.value)


def test_registry_lists_every_twx_game() -> None:
    assert {e for e in known_env_ids() if e.startswith("twx/")} == {f"twx/{g}" for g in VARIANTS}


@pytest.mark.parametrize("env_id", MAIN_ENV_IDS)
def test_task_ids_per_split_are_non_empty_stable_and_disjoint(
    envs: dict[str, Env], env_id: str
) -> None:
    env = envs[env_id]
    splits = {split: env.task_ids(split) for split in ("train", "dev", "test")}
    assert all(splits.values())
    assert splits["train"] == env.task_ids("train")
    assert all(tid.startswith(f"{split}-") for split, tids in splits.items() for tid in tids)
    assert not set(splits["train"]) & set(splits["dev"])
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["dev"]) & set(splits["test"])
    with pytest.raises(ValueError, match="validation"):
        env.task_ids("validation")


@pytest.mark.parametrize("env_id", MAIN_ENV_IDS)
def test_reset_is_deterministic(envs: dict[str, Env], env_id: str) -> None:
    env = envs[env_id]
    tid = env.task_ids("dev")[3]
    first = env.reset(tid)
    env.step("look around")
    env.reset(env.task_ids("train")[0])
    again = env.reset(tid)
    assert first == again
    assert (first.env_id, first.task_id, first.split) == (canonical_env_id(env_id), tid, "dev")
    assert first.instruction and first.initial_observation.startswith("You are in")


@pytest.mark.parametrize("env_id", MAIN_ENV_IDS)
def test_gold_actions_replay_to_full_reward(envs: dict[str, Env], env_id: str) -> None:
    env = envs[env_id]
    for split in ("train", "dev", "test"):
        for tid in env.task_ids(split)[:4]:
            env.reset(tid)
            gold = env.gold_actions()
            assert gold and len(gold) < env.max_steps
            for action in gold:
                result = env.step(action)
                assert 0.0 <= result.reward <= 1.0
            assert result.done and result.reward == 1.0, tid


@pytest.mark.parametrize("env_id", MAIN_ENV_IDS)
def test_invalid_actions_get_an_observation(envs: dict[str, Env], env_id: str) -> None:
    env = envs[env_id]
    env.reset(env.task_ids("train")[1])
    for action in ["", "xyzzy", "take the moon", "x" * 100_000, "take 'it'\n\\ \u2603"]:
        result = env.step(action)
        assert result.observation
        assert not result.done and result.reward == 0.0


def test_action_case_and_whitespace_are_normalised(envs: dict[str, Env]) -> None:
    env = envs["twx/cookingworld"]
    task = env.reset("train-0")
    assert env.step("  Look   Around.\n").observation == task.initial_observation


@pytest.mark.parametrize("env_id", MAIN_ENV_IDS)
def test_episode_ends_at_max_steps(envs: dict[str, Env], env_id: str) -> None:
    env = envs[env_id]
    env.reset(env.task_ids("test")[0])
    results = [env.step("look around") for _ in range(env.max_steps)]
    assert [r.done for r in results] == [False] * (env.max_steps - 1) + [True]
    assert all(0.0 <= r.reward <= 1.0 for r in results)
    after = env.step("look around")
    assert after.done and after.reward == results[-1].reward


def test_instances_share_one_jvm(envs: dict[str, Env]) -> None:
    processes = {env._gateway.java_process.pid for env in envs.values()}  # type: ignore[attr-defined]
    assert len(processes) == 1


def test_jvm_stops_when_its_last_user_releases_it() -> None:
    jvm = SharedJvm("TextWorldExpress", classpath=twx.JAR_PATH, cwd=twx.BASEPATH)
    gateway = jvm.acquire()
    assert jvm.acquire() is gateway
    jvm.release(gateway)
    assert gateway.java_process.poll() is None
    jvm.release(gateway)
    assert gateway.java_process.wait(timeout=10) is not None
    assert jvm.gateway is None


def test_a_dead_jvm_raises_env_crashed_and_a_new_instance_gets_a_new_jvm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(twx, "_JVM", SharedJvm("twx", classpath=twx.JAR_PATH, cwd=twx.BASEPATH))
    env = make_env("twx/coin")
    env.reset("train-0")
    process = twx._JVM.gateway.java_process
    process.kill()
    process.wait(timeout=10)
    with pytest.raises(EnvCrashed):
        env.step("look around")
    fresh = make_env("twx/coin")
    assert fresh.reset("train-0").initial_observation
    env.close()
    fresh.close()
    assert twx._JVM.gateway is None


def test_objects_of_a_dead_jvm_are_collected_without_reaching_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    jvm = SharedJvm("TextWorldExpress", classpath=twx.JAR_PATH, cwd=twx.BASEPATH)
    gateway = jvm.acquire()
    held = [gateway.jvm.java.util.ArrayList() for _ in range(3)]  # objects living in the JVM
    gateway.java_process.kill()
    gateway.java_process.wait(timeout=10)
    replacement = jvm.acquire()  # the dead JVM is replaced ...
    assert replacement is not gateway
    with caplog.at_level(logging.DEBUG, logger="py4j"):
        del held
        gc.collect()  # ... and its objects' finalizers no longer try to connect to it
        jvm.release(gateway)
        jvm.release(replacement)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not any("connect" in r.getMessage() for r in caplog.records)
    assert replacement.java_process.wait(timeout=10) is not None
