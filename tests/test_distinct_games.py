"""Splits hold distinct games: a game is what the engine makes for a seed, not the seed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli import main as cli_main
from flows.commands import main
from ipr_core.envs import Env, make_env
from ipr_core.envs.textworld_express import game_key

ENV_ID = "twx/twc?locations=1&items=2"
"""One room, two items: the setting of the committed reproduction, where test seeds 20010
and 20019 make the same game (identical first observation and gold path)."""


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    made = make_env(ENV_ID)
    yield made
    made.close()


def test_two_seeds_that_make_the_same_game_yield_one_task(env: Env) -> None:
    first, repeat = env.reset("test-20010"), env.reset("test-20019")  # old ids still reset
    assert first.initial_observation == repeat.initial_observation
    test = env.task_ids("test")
    assert "test-20010" in test and "test-20019" not in test
    assert len(test) < 1000  # the engine's 1000 test seeds make fewer games


def test_no_game_is_twice_in_a_split_or_in_two_splits(env: Env) -> None:
    server = env._scratch_server()  # a game server of the setting, apart from the env's own
    keys = [
        game_key(server, int(task_id.partition("-")[2]), split, seeded_gold=True)
        for split in ("train", "dev", "test")
        for task_id in env.task_ids(split)
    ]
    assert None not in keys
    assert len(set(keys)) == len(keys)


def test_scienceworld_variations_that_make_the_same_game_yield_one_task() -> None:
    env = make_env("scienceworld/find-animal")
    try:
        first, repeat = env.reset("train-11"), env.reset("test-251")
        assert (first.instruction, first.initial_observation) == (
            repeat.instruction,
            repeat.initial_observation,
        )
        assert "train-11" in env.task_ids("train")
        assert "test-251" not in env.task_ids("test")  # a train game is not a test game
    finally:
        env.close()


def test_ipr_envs_prints_distinct_games_per_split(capsys) -> None:
    assert main(["envs", ENV_ID]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "twx/twc?locations=1&items=2&doors=0&inventory_limit=0: 663 / 500 / 473"
    )


def test_asking_for_more_games_than_a_split_has_is_a_named_error(tmp_path: Path, capsys) -> None:
    config = tmp_path / "x.yaml"
    store = tmp_path / "x.duckdb"
    settings = {"experiment_id": "x", "methods": ["sft"], "seeds": [0], "test_limit": 474}
    settings["run"] = {"env": ENV_ID, "model": "tiny-llama", "store": str(store)}
    config.write_text(json.dumps(settings))  # JSON is YAML
    assert cli_main(["experiment", "--config", str(config), "--no-prefect"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {ENV_ID}&doors=0&inventory_limit=0: split 'test' has 473 distinct games; "
        "test_limit asks for 474"
    ]
    assert not store.exists()  # nothing half-written
