"""Game parameters in env ids: parsing, canonical spelling, errors, `ipr envs`, configs, and
parametrised TWX and ScienceWorld games against their engines (starts JVMs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.commands import main
from ipr_core.config import load_config
from ipr_core.envs import canonical_env_id, known_env_ids, make_env, parse_env_id, variant_info
from ipr_core.envs import science_world as sw
from ipr_core.envs import textworld_express as twx
from ipr_core.errors import EnvParamError, InputError, UnknownEnvError
from ipr_core.run.pipeline import ingest_gold
from ipr_core.store.store import Store

EASY_TWC = ["twx/twc?locations=1&items=1", "twx/twc?locations=1&items=2"]


def test_every_spelling_of_one_setting_is_one_canonical_id() -> None:
    full = "twx/twc?locations=1&items=3&doors=0&inventory_limit=0"
    assert canonical_env_id("twx/twc?items=3&locations=1") == full
    assert canonical_env_id("twx/twc?locations=1&items=3&inventory_limit=0") == full
    # Every parameter is spelt, defaults included: the id names its game if a default moves.
    short = "twx/twc?locations=1&items=2&doors=0&inventory_limit=0"
    assert canonical_env_id("twx/twc?locations=1") == short
    assert canonical_env_id("twx/twc?locations=1&items=2") == short
    default = "twx/twc?locations=2&items=2&doors=0&inventory_limit=0"
    assert canonical_env_id("twx/twc") == canonical_env_id("twx/twc?items=02") == default
    assert canonical_env_id("twx/twc?items=1") != canonical_env_id("twx/twc?locations=1")
    spec = parse_env_id("twx/twc?items=1&doors=1")
    assert (spec.family, spec.variant) == ("twx", "twc")
    assert spec.params == {"locations": 2, "items": 1, "doors": 1, "inventory_limit": 0}
    assert spec.engine_params() == {
        "numLocations": 2,
        "numItemsToPutAway": 1,
        "includeDoors": 1,
        "limitInventorySize": 0,
    }
    for env_id in known_env_ids():  # an env without parameters keeps its bare id
        spelt = "?" + "&".join(f"{p.name}={p.default}" for p in variant_info(env_id).params)
        assert canonical_env_id(env_id) == env_id + (spelt if spelt != "?" else "")


def test_parsing_imports_no_engine() -> None:
    """Configs and the CLI parse env ids before any env is made; that must stay cheap."""
    code = (
        "import sys; from ipr_core.envs import parse_env_id; "
        "spec = parse_env_id('twx/cookingworld?ingredients=1'); "
        "print(spec.max_steps, 'py4j' in sys.modules, 'textworld_express' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["25", "False", "False"]


def test_an_unknown_parameter_is_named_with_the_envs_parameters() -> None:
    with pytest.raises(EnvParamError) as err:
        parse_env_id("twx/twc?rooms=1")
    message = str(err.value)
    assert "'rooms'" in message and "locations, items, doors, inventory_limit" in message
    assert isinstance(err.value, UnknownEnvError)
    with pytest.raises(EnvParamError, match="its parameters: none"):
        parse_env_id("alfworld?tasks=1")
    with pytest.raises(EnvParamError, match="name=value, each once"):
        parse_env_id("twx/twc?items=1&items=2")
    with pytest.raises(UnknownEnvError, match="'twx/nosuchgame'"):
        parse_env_id("twx/nosuchgame?items=1")


@pytest.mark.parametrize(
    ("env_id", "expected"),
    [
        ("twx/twc?locations=4", "locations=4 is out of range; .* from 1 to 3, default 2"),
        ("twx/twc?items=0", "items=0 is out of range; .* from 1 to 4, default 2"),
        ("twx/twc?doors=2", "doors=2 is out of range; .* from 0 to 1"),
        ("twx/coin?locations=12", "locations=12 is out of range; .* from 1 to 11"),
        ("twx/twc?items=two", "items=two is not an integer"),
        ("twx/twc?items=--1", "items=--1 is not an integer"),
        ("twx/twc?items=", "items= is not an integer"),
        ("twx/twc?locations=1&items=4", "items=4 needs locations>1"),
    ],
)
def test_a_bad_value_names_the_parameter_and_its_range(env_id: str, expected: str) -> None:
    with pytest.raises(EnvParamError, match=expected):
        parse_env_id(env_id)


def test_the_cli_reports_a_bad_parameter_in_one_line_with_exit_code_2(tmp_path, capsys) -> None:
    store = tmp_path / "s.duckdb"
    assert main(["ingest", "--env", "twx/twc?items=9", "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 'twx/twc?items=9': items=9")
    assert not store.exists()


def test_ipr_envs_lists_ids_parameters_defaults_ranges_splits_and_step_bounds(capsys) -> None:
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:1] != " "}
    assert set(known_env_ids()) <= set(rows)
    assert rows["twx/twc"] == ["20", "(10-50)", "1000/1000/1000"]
    assert rows["scienceworld/boil"] == ["260", "14/7/9"]
    assert rows["alfworld"] == ["20", "from", "the", "data"]
    assert "    items=1..4 (default 2; numItemsToPutAway): items to put away" in out
    assert "    locations=1..11 (default 3; numLocations): rooms" in out
    assert "    items=4 needs locations>1" in out


def test_a_config_with_a_parametrised_env_id_loads_it_canonically(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text('env: "twx/twc?items=1&locations=1"\n', encoding="utf-8")
    assert load_config(path).env == "twx/twc?locations=1&items=1&doors=0&inventory_limit=0"
    path.write_text("env: twx/twc?items=7\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert err.value.field == "env" and "items=7 is out of range" in str(err.value)


# -- against the engine -----------------------------------------------------------------------
def test_declared_ranges_are_what_the_engine_accepts() -> None:
    """Every end of a numeric range loads; one past it the engine itself refuses."""
    gateway = twx._JVM.acquire()
    try:
        server = gateway.jvm.textworldexpress.runtime.PythonInterface()
        for game in twx.VARIANTS:
            for p in variant_info(f"twx/{game}").params:
                for value in (p.low, p.high):
                    assert not server.load(game, f"{p.engine_name}={value}"), (game, p, value)
                if p.high > 1:  # the engine accepts any value for its 0/1 flags
                    assert server.load(game, f"{p.engine_name}={p.high + 1}"), (game, p)
    finally:
        twx._JVM.release(gateway)


@pytest.mark.parametrize("env_id", EASY_TWC)
def test_a_parametrised_twc_games_gold_path_reaches_reward_1(env_id: str) -> None:
    env = make_env(env_id)
    try:
        assert env.env_id == canonical_env_id(env_id) and env.max_steps == 10
        sizes = tuple(len(env.task_ids(split)) for split in ("train", "dev", "test"))
        seeds = variant_info("twx/twc").split_sizes  # the seeds make fewer distinct games
        assert seeds is not None and all(0 < n < s for n, s in zip(sizes, seeds, strict=True))
        for split in ("train", "dev", "test"):
            for task_id in env.task_ids(split)[:5]:
                task = env.reset(task_id)
                assert task.env_id == env.env_id
                gold = env.gold_actions()
                assert gold and len(gold) <= env.max_steps
                for action in gold:
                    result = env.step(action)
                assert result.done and result.reward == 1.0, task_id
    finally:
        env.close()


def test_a_long_simonsays_games_gold_path_reaches_reward_1() -> None:
    env = make_env("twx/simonsays?memorization=1&length=30")
    try:
        spelt = "twx/simonsays?length=30&distractors=3&memorization=1&verbose=0"
        assert env.env_id == spelt and env.max_steps == 40
        env.reset(env.task_ids("test")[0])
        gold = env.gold_actions() or []
        assert len(gold) == 30
        for action in gold:
            result = env.step(action)
        assert result.done and result.reward == 1.0
    finally:
        env.close()


def test_a_parameter_changes_the_game_and_its_rows_never_mix(tmp_path: Path) -> None:
    default, easy = make_env("twx/twc"), make_env("twx/twc?items=1&locations=1")
    try:
        task_id = default.task_ids("train")[0]
        assert default.reset(task_id).initial_observation != easy.reset(task_id).initial_observation
    finally:
        default.close()
        easy.close()
    store = Store(tmp_path / "s.duckdb")
    assert ingest_gold(store, "twx/twc?locations=1", "train", 2).written == 2
    args = ["ingest", "--env", "twx/twc?items=1&locations=1", "--limit", "2"]
    assert main([*args, "--store", str(tmp_path / "s.duckdb")]) == 0
    stored = store.query("SELECT env_id, count(*) AS n FROM expert_trajectories GROUP BY 1")
    assert dict(zip(stored["env_id"], stored["n"], strict=True)) == {  # defaults spelt too
        "twx/twc?locations=1&items=2&doors=0&inventory_limit=0": 2,
        "twx/twc?locations=1&items=1&doors=0&inventory_limit=0": 2,
    }
    easy_id = "twx/twc?locations=1&items=1&doors=0&inventory_limit=0"
    [easy_expert, _] = store.expert_trajectories(easy_id, "train")
    assert easy_expert.outcome_reward == 1.0 and len(easy_expert.steps) <= 4


def test_scienceworld_simplifications_are_flags_and_electrical_tasks_keep_their_actions() -> None:
    assert canonical_env_id("scienceworld/boil?open_doors=1&teleport=0") == (
        "scienceworld/boil?teleport=0&open_doors=1&open_containers=0&self_watering=1"
        "&no_electrical=1"
    )
    assert parse_env_id("scienceworld/boil").engine_params()["noElectricalAction"] == 1
    with pytest.raises(EnvParamError, match="'no_electrical' of scienceworld/power-component"):
        parse_env_id("scienceworld/power-component?no_electrical=1")


def test_a_scienceworld_setting_runs_in_its_own_jvm_and_its_gold_path_reaches_reward_1() -> None:
    easy = make_env("scienceworld/find-animal")
    hard = make_env("scienceworld/find-animal?teleport=0&open_doors=0")
    try:
        assert hard.env_id == (
            "scienceworld/find-animal?teleport=0&open_doors=0&open_containers=0"
            "&self_watering=1&no_electrical=1"
        )
        assert "teleport" in easy.action_hint and "teleport" not in hard.action_hint
        assert hard._gateway.java_process.pid != easy._gateway.java_process.pid
        assert sw.simplification_str(parse_env_id(hard.env_id)) == (
            "selfWateringFlowerPots,noElectricalAction"
        )
        for task_id in hard.task_ids("dev")[:2]:
            assert hard.reset(task_id).env_id == hard.env_id
            for action in hard.gold_actions() or []:
                result = hard.step(action)
                if result.done:
                    break
            assert result.done and result.reward == 1.0, task_id
    finally:
        easy.close()
        hard.close()
