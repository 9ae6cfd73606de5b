"""ALFWorld on its real engine: generated games, the adapter, the standard-release layout.

The games are generated once into `.ipr/alfworld` (the adapter's default cache) and reused
by later sessions; the generic behaviour (crashes, hangs, max steps) is in the conformance
suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fast_downward
import pytest

from ipr_core.envs import alfworld_games as games
from ipr_core.envs import make_env
from ipr_core.envs.alfworld import NOTHING_HAPPENS, AlfWorldEnv, action_hint
from ipr_core.errors import InputError, UnknownEnvError
from ipr_core.method.expert import build_expert_trajectory

SPLITS = ("train", "dev", "test")


@pytest.fixture(scope="module")
def env() -> Iterator[AlfWorldEnv]:
    made = make_env("alfworld")
    assert isinstance(made, AlfWorldEnv)
    yield made
    made.close()


def _game_dir(env: AlfWorldEnv, task_id: str) -> Path:
    return env._by_id[task_id][1].game_file.parent  # type: ignore[attr-defined]


def test_the_registry_knows_the_bare_family_id() -> None:
    from ipr_core.envs import known_env_ids

    assert "alfworld" in known_env_ids()
    for bad in ["alfworld/", "alfworld/valid_seen", "alfworlds"]:
        with pytest.raises(UnknownEnvError, match=re.escape(repr(bad))):
            make_env(bad)


def test_generated_splits_follow_seen_and_unseen_scenes(env: AlfWorldEnv) -> None:
    scenes = {}
    for split in SPLITS:
        task_ids = env.task_ids(split)
        assert len(task_ids) == games.GAMES_PER_SPLIT[split]
        assert all(t.startswith(games.SPLIT_FOLDERS[split] + "/") for t in task_ids)
        traj = [json.loads((_game_dir(env, t) / "traj_data.json").read_text()) for t in task_ids]
        scenes[split] = {t["scene"]["scene_num"] for t in traj}
        if split == "train":  # the six ALFWorld task types take turns
            assert [t["task_type"] for t in traj] == list(games.TASK_TYPES)
    assert scenes["test"] <= set(games.VALID_UNSEEN_SCENES)
    seen = scenes["train"] | scenes["dev"]
    assert not seen & (set(games.VALID_UNSEEN_SCENES) | set(games.TEST_UNSEEN_SCENES))


def test_reset_is_deterministic_and_splits_task_and_room(env: AlfWorldEnv) -> None:
    task_id = env.task_ids("train")[0]
    first = env.reset(task_id)
    env.step("go to drawer 1")
    env.reset(env.task_ids("test")[0])
    assert env.reset(task_id) == first
    assert first.initial_observation.startswith("You are in the middle of a room.")
    assert "Your task is to" not in first.initial_observation
    traj = json.loads((_game_dir(env, task_id) / "traj_data.json").read_text())
    assert traj["pddl_params"]["object_target"].lower() in first.instruction.lower()


def test_every_generated_game_replays_its_walkthrough_to_success(env: AlfWorldEnv) -> None:
    for split in SPLITS:
        for task_id in env.task_ids(split):
            env.reset(task_id)
            gold = env.gold_actions()
            assert gold and len(gold) <= env.max_steps
            results = [env.step(action) for action in gold]
            assert [r.done for r in results] == [False] * (len(gold) - 1) + [True], task_id
            assert [r.reward for r in results] == [0.0] * (len(gold) - 1) + [1.0], task_id


def test_ingest_builds_expert_trajectories_with_alfworld_thoughts(env: AlfWorldEnv) -> None:
    trajectory = build_expert_trajectory(env, env.task_ids("train")[0])
    assert trajectory.outcome_reward == 1.0  # type: ignore[union-attr]
    moves = [s for s in trajectory.steps if s.action.startswith("move ")]  # type: ignore[union-attr]
    assert moves and "will go" not in moves[0].text  # a placement, not a walk


def test_actions_are_normalised_and_unknown_ones_change_nothing(env: AlfWorldEnv) -> None:
    task_id = env.task_ids("train")[0]
    env.reset(task_id)
    gold = env.gold_actions()
    assert gold and gold[1].startswith("go to ")
    expected = env.step(gold[1])
    env.reset(task_id)
    assert env.step(f"  {gold[1].upper()}.  ") == expected
    env.reset(task_id)
    for action in ["put it somewhere", "go to the moon", "take", ""]:
        result = env.step(action)
        assert result.observation == NOTHING_HAPPENS
        assert (result.done, result.reward) == (False, 0.0)


def test_the_episode_ends_at_max_steps_with_reward_zero(env: AlfWorldEnv) -> None:
    env.reset(env.task_ids("dev")[0])
    results = [env.step("look") for _ in range(env.max_steps)]
    assert [r.done for r in results] == [False] * (env.max_steps - 1) + [True]
    assert {r.reward for r in results} == {0.0}
    assert env.step("look") == results[-1]


def test_the_action_hint_names_the_commands_of_the_engine_in_use(env: AlfWorldEnv) -> None:
    assert "'move (object) to (receptacle)'" in env.action_hint
    assert "'put " not in env.action_hint
    # every command the expert plays fits one of the hint's templates
    patterns = [
        re.compile(
            "^" + re.escape(c).replace(r"\(receptacle\)", ".+").replace(r"\(object\)", ".+") + "$"
        )
        for c in re.findall(r"'([^']+)'", env.action_hint)
    ]
    for task_id in env.task_ids("train"):
        env.reset(task_id)
        for action in env.gold_actions() or []:
            assert any(p.match(action) for p in patterns), action
    # an ALFWorld 0.3 grammar places with "put X in/on Y": the hint follows the game files
    game = json.loads(env._by_id[env.task_ids("train")[0]][1].game_file.read_text())
    old_grammar = game["grammar"].replace('"move {o} to {r}"', '"put {o} in/on {r}"')
    old_hint = action_hint(old_grammar, game["pddl_domain"])
    assert "'put (object) in/on (receptacle)'" in old_hint and "move" not in old_hint


def test_engine_caches_leave_the_game_text_unchanged(env: AlfWorldEnv) -> None:
    """The memoised engine (this process) and the stock engine (a fresh process) agree."""
    task_id = env.task_ids("test")[0]
    task = env.reset(task_id)
    gold = env.gold_actions() or []
    actions = ["xyzzy", *gold[: env.max_steps - 1]]  # an unknown command costs a step too
    ours = [task.initial_observation] + [env.step(a).observation for a in actions]
    script = (
        "import json, sys, textworld\n"
        "from textworld.envs import PddlEnv\n"
        "from alfworld.agents.environment.alfred_tw_env import AlfredDemangler\n"
        "game, actions = sys.argv[1], json.loads(sys.argv[2])  # the engine overwrites argv\n"
        "env = AlfredDemangler(PddlEnv(textworld.EnvInfos(won=True)), shuffle=False)\n"
        "env.load(game)\n"
        "out = [env.reset().feedback]\n"
        "out += [env.step(a)[0].feedback for a in actions]\n"
        "print(json.dumps(out))\n"
    )
    game_file = str(_game_dir(env, task_id) / "game.tw-pddl")
    stock = subprocess.run(
        [sys.executable, "-c", script, game_file, json.dumps(actions)],
        capture_output=True,
        text=True,
        check=True,
        env={
            **os.environ,
            "ALFWORLD_DATA": str(Path(".ipr", "alfworld", "alfworld_data").resolve()),
        },
    )
    theirs = json.loads(stock.stdout.splitlines()[-1])
    assert theirs[0].split("\n\n")[1] == ours[0]
    assert [t.strip() for t in theirs[1:]] == ours[1:]


def test_translations_are_cached_on_disk_and_argv_is_kept(env: AlfWorldEnv) -> None:
    game = json.loads(env._by_id[env.task_ids("dev")[0]][1].game_file.read_text())
    argv = list(sys.argv)
    problem = game["pddl_problem"] + "\n; a variant never translated before\n"
    sas_dir = Path(".ipr", "alfworld", "sas")
    before = set(sas_dir.glob("*.pickle"))
    first = fast_downward.pddl2sas(game["pddl_domain"], problem)
    written = set(sas_dir.glob("*.pickle")) - before
    assert len(written) == 1 and sys.argv == argv
    assert fast_downward.pddl2sas(game["pddl_domain"], problem) is first
    written.pop().unlink()


def test_generation_is_deterministic_and_redone_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(games, "GAMES_PER_SPLIT", {"train": 1, "dev": 1, "test": 1})
    first = games.generated_games(tmp_path / "a", max_steps=20)
    again = games.generated_games(tmp_path / "b", max_steps=20)
    assert first.keys() == again.keys()
    for split in SPLITS:
        [one], [other] = first[split], again[split]
        assert one.task_id == other.task_id
        assert one.game_file.read_bytes() == other.game_file.read_bytes()
    manifest = next((tmp_path / "a").glob("*/manifest.json"))
    manifest.unlink()
    shutil.rmtree(first["train"][0].game_file.parent)
    regenerated = games.generated_games(tmp_path / "a", max_steps=20)
    assert (
        regenerated["train"][0].game_file.read_bytes() == again["train"][0].game_file.read_bytes()
    )


def _standard_release(env: AlfWorldEnv, root: Path) -> None:
    """The standard layout (json_2.1.1/<split folder>/<task>/<trial>) from generated games."""
    for split in SPLITS:
        for task_id in env.task_ids(split):
            shutil.copytree(_game_dir(env, task_id), root / "json_2.1.1" / task_id)


def test_standard_release_games_are_found_filtered_and_solved(
    env: AlfWorldEnv, tmp_path: Path
) -> None:
    _standard_release(env, tmp_path)
    train = tmp_path / "json_2.1.1" / "train"
    source = train / env.task_ids("train")[0].split("/", 1)[1]
    for skipped in ["pick_and_place_with_movable_recep-Apple-Bowl-Fridge-1", "unsolvable-1"]:
        shutil.copytree(source, train / skipped / "trial_x")
    unsolvable = train / "unsolvable-1" / "trial_x" / "game.tw-pddl"
    unsolvable.write_text(json.dumps({**json.loads(unsolvable.read_text()), "solvable": False}))
    # a release game without a stored walkthrough: the handcoded expert solves it
    first = train / env.task_ids("train")[0].split("/", 1)[1] / "game.tw-pddl"
    first.write_text(json.dumps({**json.loads(first.read_text()), "walkthrough": None}))

    standard = AlfWorldEnv(data_dir=tmp_path)
    try:
        for split in SPLITS:
            assert standard.task_ids(split) == sorted(env.task_ids(split))
        task = standard.reset(env.task_ids("train")[0])
        assert task.split == "train"
        gold = standard.gold_actions()
        assert gold and [standard.step(a) for a in gold][-1].reward == 1.0
    finally:
        standard.close()


def test_alfworld_data_without_the_release_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        AlfWorldEnv(data_dir=tmp_path)
    (tmp_path / "json_2.1.1" / "valid_seen").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no playable game"):
        AlfWorldEnv(data_dir=tmp_path)


def test_a_malformed_release_file_is_named(env: AlfWorldEnv, tmp_path: Path) -> None:
    _standard_release(env, tmp_path)
    traj = tmp_path / "json_2.1.1" / env.task_ids("dev")[0] / "traj_data.json"
    traj.write_text(json.dumps({"pddl_params": {}}))
    with pytest.raises(InputError, match=re.escape(f"{traj}, field 'task_type': missing")):
        AlfWorldEnv(data_dir=tmp_path)
    traj.write_text("{not json")
    with pytest.raises(InputError, match=re.escape(f"{traj}: not a readable JSON file")):
        AlfWorldEnv(data_dir=tmp_path)


def test_the_expert_with_fixed_tracking_solves_what_the_stock_expert_cannot(
    env: AlfWorldEnv,
) -> None:
    """alfworld 0.4.2's expert loses track of a placed object ("move", not "put")."""
    [task_id] = [t for t in env.task_ids("train") if "pick_two_obj_and_place" in t]
    game_file = env._by_id[task_id][1].game_file
    stock = games.AlfredExpert(
        games.AlfredDemangler(
            games.PddlEnv(games.textworld.EnvInfos(won=True, admissible_commands=True)),
            shuffle=False,
        ),
        expert_type="handcoded",
    )
    stock.load(str(game_file))
    state, won = stock.reset(), False
    for _ in range(env.max_steps):
        state, _, won = stock.step(state["extra.expert_plan"][0])
        if won:
            break
    assert not won
    solved = games.ExpertSolver(env.max_steps).solve(game_file)
    assert solved and len(solved) <= env.max_steps


def test_envs_in_threads_play_as_they_do_alone(env: AlfWorldEnv) -> None:
    """The rollout engine steps its envs in a thread pool; TextWorld's parsers are shared."""
    task_ids = env.task_ids("dev") + env.task_ids("test")

    def play(task_id: str) -> list[str]:
        own = AlfWorldEnv()
        task = own.reset(task_id)
        gold = own.gold_actions() or []
        return [task.initial_observation] + [own.step(a).observation for a in ["xyzzy", *gold]]

    alone = [play(task_id) for task_id in task_ids]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(play, task_ids))
    assert together == alone
