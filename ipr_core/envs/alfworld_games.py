"""ALFWorld game files: the standard release's, or ones generated offline from the package.

ALFWorld's text games are `game.tw-pddl` files (the PDDL domain, the text grammar with the
task sentence, the PDDL problem of one ALFRED scene, and the expert walkthrough) next to a
`traj_data.json` (the task type and its targets, which the handcoded expert reads). The
standard release puts them under `$ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}`.
The `alfworld` wheel ships no game files, and nothing may be downloaded here, so without
`ALFWORLD_DATA` this module writes games of the same format from what the wheel does ship:

- the PDDL domain (`alfred.pddl`) and the grammar (`alfred.twl2`) the engine plays;
- per ALFRED floor plan, the object types present (`FloorPlanN-objects.json`) and the
  receptacle instances with the agent pose that reaches each (`FloorPlanN-openable.json`),
  from which the receptacles and their locations are taken;
- ALFRED's constants: which receptacle type may hold which object type, and which objects
  are heatable/coolable/cleanable/toggleable; and the goal library (PDDL goals and task
  sentences of the six ALFWorld task types).

What is NOT real ALFRED data: where objects start. ALFRED's scenes came from AI2-THOR with
physically sampled object poses; here each object is put in a receptacle that ALFRED
allows for its type, chosen by a seeded random generator, and receptacle types a floor plan
contains but has no recorded instance of (stove burners, toasters, coffee machines, ...) get
one instance each. Every game is solved by ALFWorld's handcoded expert in the real engine;
games it does not solve within `max_steps` are dropped, as `alfworld-generate` drops
unsolvable ones.

Splits follow the paper's use of ALFWorld (train; dev = valid_seen; test = valid_unseen):
train and dev games are drawn from the same floor plans (seen scenes, different games), test
games only from ALFRED's four valid_unseen floor plans (10, 219, 308, 424), which no train or
dev game uses. ALFRED's eight test-unseen floor plans are used by no split.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import textworld
from textworld.envs import PddlEnv

from ipr_core.errors import InputError

# Importing alfworld creates the folder $ALFWORLD_DATA names (default ~/.cache/alfworld) and
# exports the variable: keep what the user set, let the import use a folder of ours, and
# leave the environment as it was (child processes must not see a folder they did not set).
USER_ALFWORLD_DATA = os.environ.get("ALFWORLD_DATA")
os.environ["ALFWORLD_DATA"] = str(Path(".ipr", "alfworld", "alfworld_data").resolve())
try:
    import alfworld.gen.constants as alfred
    import alfworld.gen.goal_library as goal_library
    from alfworld.agents.environment.alfred_tw_env import (
        AlfredDemangler,
        AlfredExpert,
        AlfredExpertType,
    )
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH
finally:
    if USER_ALFWORLD_DATA is None:
        del os.environ["ALFWORLD_DATA"]
    else:
        os.environ["ALFWORLD_DATA"] = USER_ALFWORLD_DATA

GENERATOR_VERSION = 2
"""Bump when generated games change, so cached ones are regenerated."""

SPLIT_FOLDERS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen"}
GAMES_PER_SPLIT = {"train": 6, "dev": 3, "test": 3}
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
VALID_UNSEEN_SCENES = (10, 219, 308, 424)
"""ALFRED's valid_unseen floor plans: the test split's scenes."""
TEST_UNSEEN_SCENES = (9, 29, 215, 226, 315, 325, 404, 425)
"""ALFRED's test-unseen floor plans (no public games in ALFWorld either): used by no split."""
LAYOUTS = Path(alfred.__file__).parent / "layouts"
DISTRACTOR_TYPES = 8
"""Object types placed besides the task's, so the agent has to search."""
MAX_ATTEMPTS_PER_GAME = 30
TYPE_OFFSET = {"train": 0, "dev": 1, "test": 2}
"""Task types take turns in each split from here, so the small splits differ in types."""

# Receptacles a desk lamp stands on in ALFRED scenes (no ALFRED receptacle list names lamps).
LAMP_HOLDERS = ("Desk", "SideTable", "Dresser", "Shelf")
# The appliance a task type uses, which is not also its place-in target.
TASK_APPLIANCE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
TASK_ABILITY = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
ABILITY_PREDICATES = {
    "Heatable": "heatable",
    "Coolable": "coolable",
    "Cleanable": "cleanable",
    "Toggleable": "toggleable",
}


@dataclass(frozen=True)
class GameRef:
    """One game: its task id (the game folder relative to the split root) and its file."""

    task_id: str
    game_file: Path


# -- finding games ---------------------------------------------------------------------------
def standard_games(data_dir: Path) -> dict[str, list[GameRef]]:
    """Games of the standard release under `data_dir/json_2.1.1`, as ALFWorld's TW env picks them.

    Like `AlfredTWEnv.collect_game_files`: the six task types, no movable-receptacle or sliced
    tasks, and only games marked solvable.
    """
    root = data_dir / "json_2.1.1"
    if not root.is_dir():
        raise FileNotFoundError(
            f"ALFWORLD_DATA={data_dir} has no json_2.1.1 folder (the standard ALFWorld game "
            "files); unset ALFWORLD_DATA to use the games generated under .ipr/alfworld"
        )
    found = {split: _games_under(root, folder) for split, folder in SPLIT_FOLDERS.items()}
    if not any(found.values()):
        raise FileNotFoundError(
            f"{root} holds no playable game (folders {', '.join(SPLIT_FOLDERS.values())})"
        )
    return found


@cache
def _games_under(root: Path, folder: str) -> list[GameRef]:
    games = []
    for traj_file in sorted((root / folder).glob("*/*/traj_data.json")):
        game_dir = traj_file.parent
        game_file = game_dir / "game.tw-pddl"
        if "movable" in game_dir.parent.name or "Sliced" in game_dir.parent.name:
            continue
        if not game_file.is_file():
            continue
        if _json_field(traj_file, "task_type") not in TASK_TYPES:
            continue
        if not _json_field(game_file, "solvable", required=False):
            continue
        games.append(GameRef(game_dir.relative_to(root).as_posix(), game_file))
    return games


def _json_field(path: Path, field: str, required: bool = True) -> Any:
    """One field of a JSON object file; a malformed file is an error naming it and the field."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(str(path), f"not a readable JSON file: {e}") from e
    if not isinstance(data, dict) or (required and field not in data):
        raise InputError(str(path), "missing", field=field)
    return data.get(field)


def generated_games(cache_dir: Path, max_steps: int) -> dict[str, list[GameRef]]:
    """The generated games under `cache_dir`, generated first if they are not there."""
    root = cache_dir / f"generated-v{GENERATOR_VERSION}-max{max_steps}"
    if not (root / "manifest.json").is_file():
        _generate_into(root, max_steps)
    manifest = json.loads((root / "manifest.json").read_text())
    return {
        split: [GameRef(tid, root / tid / "game.tw-pddl") for tid in manifest[split]]
        for split in SPLIT_FOLDERS
    }


def _generate_into(root: Path, max_steps: int) -> None:
    """Generate into a private folder, then move it into place (another process may race)."""
    print(f"alfworld: generating games into {root} (once)", file=sys.stderr)
    root.parent.mkdir(parents=True, exist_ok=True)
    work = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    manifest = {
        split: generate_split(work, split, GAMES_PER_SPLIT[split], max_steps)
        for split in SPLIT_FOLDERS
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if root.is_dir() and not (root / "manifest.json").is_file():
        shutil.rmtree(root)  # an incomplete folder: games without their manifest
    try:
        work.rename(root)
    except OSError:  # another process finished first: keep its games
        shutil.rmtree(work, ignore_errors=True)
        if not (root / "manifest.json").is_file():
            raise


# -- generating games ------------------------------------------------------------------------
def split_scenes(split: str) -> list[int]:
    """Floor plans a split draws from: seen scenes for train/dev, valid_unseen ones for test."""
    if split == "test":
        return list(VALID_UNSEEN_SCENES)
    excluded = set(VALID_UNSEEN_SCENES) | set(TEST_UNSEEN_SCENES)
    return [n for n in sorted(_scene_numbers()) if n not in excluded]


@cache
def _scene_numbers() -> list[int]:
    return [
        int(p.name[len("FloorPlan") : -len("-objects.json")])
        for p in LAYOUTS.glob("*-objects.json")
    ]


def generate_split(root: Path, split: str, count: int, max_steps: int) -> list[str]:
    """Generate `count` expert-solved games of `split` under `root`; their task ids, in order.

    Deterministic: attempt k of a split is seeded by (split, k), and the task types take turns.
    """
    hosts = {t: [n for n in split_scenes(split) if task_targets(n, t)] for t in TASK_TYPES}
    task_types = [t for t in TASK_TYPES if hosts[t]]
    task_ids: list[str] = []
    attempt = 0
    solver = ExpertSolver(max_steps)
    splits = _SplitGames(root, split, task_types, hosts, solver)
    try:
        while len(task_ids) < count:
            attempt = _next_game(splits, attempt, task_ids)
    finally:
        solver.close()
    return task_ids


@dataclass(frozen=True)
class _SplitGames:
    """What every attempt of a split's generation shares."""

    root: Path
    split: str
    task_types: list[str]
    hosts: dict[str, list[int]]
    solver: ExpertSolver


def _next_game(games: _SplitGames, attempt: int, task_ids: list[str]) -> int:
    """Try attempts from `attempt` until one game is solved; append it; the next attempt."""
    while True:
        if attempt >= MAX_ATTEMPTS_PER_GAME * (len(task_ids) + 1):
            raise RuntimeError(f"alfworld: could only generate {len(task_ids)} {games.split} games")
        rng = random.Random(f"alfworld-{games.split}-{attempt}")
        task_type = games.task_types[
            (TYPE_OFFSET[games.split] + len(task_ids)) % len(games.task_types)
        ]
        game = build_game(rng.choice(games.hosts[task_type]), task_type, rng)
        game_dir = (
            games.root / SPLIT_FOLDERS[games.split] / game.folder_name / f"trial_g{attempt:05d}"
        )
        game.write(game_dir)
        walkthrough = games.solver.solve(game_dir / "game.tw-pddl", seed=attempt)
        attempt += 1
        if walkthrough is None:  # unsolved, or not within max_steps
            shutil.rmtree(game_dir)
            with contextlib.suppress(OSError):  # other trials of the same task may be there
                game_dir.parent.rmdir()
            continue
        game.game["walkthrough"], game.game["solvable"] = walkthrough, True
        game.write(game_dir)
        task_ids.append(game_dir.relative_to(games.root).as_posix())
        return attempt


@dataclass
class BuiltGame:
    """A generated game before it is written: the game file's and traj_data.json's content."""

    game: dict[str, Any]
    traj_data: dict[str, Any]

    @property
    def folder_name(self) -> str:
        """ALFRED's task folder naming: type-object-movable_recep-parent-scene."""
        p = self.traj_data["pddl_params"]
        parent = p["parent_target"] or p["toggle_target"]
        scene = self.traj_data["scene"]["scene_num"]
        return f"{self.traj_data['task_type']}-{p['object_target']}-None-{parent}-{scene}"

    def write(self, game_dir: Path) -> None:
        game_dir.mkdir(parents=True, exist_ok=True)
        (game_dir / "game.tw-pddl").write_text(json.dumps(self.game))
        (game_dir / "traj_data.json").write_text(json.dumps(self.traj_data, indent=1))


def _pddl_name(alfred_id: str) -> str:
    """ALFRED's escaping of object ids into PDDL names (the demangler reverses it)."""
    for char, word in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_")):
        alfred_id = alfred_id.replace(char, word)
    return alfred_id


def _location(x: float, z: float, rotation: float, horizon: float) -> str:
    """ALFRED's location id: grid position (0.25 m steps), rotation quarter, camera horizon."""
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{int(rotation) // 90 % 4}|{int(horizon)}"


def _instance_id(kind: str, rng: random.Random) -> str:
    """An ALFRED-style instance id (type|x|y|z) at a random position."""
    x, y, z = rng.uniform(-3, 3), rng.uniform(0, 2), rng.uniform(-3, 3)
    return f"{kind}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"


def _scene_receptacles(scene: int, rng: random.Random) -> dict[str, tuple[str, str]]:
    """Receptacle id -> (type, location): the recorded instances, plus one per missing type."""
    receptacles = {
        rid: (kind, _location(*pose)) for rid, (kind, pose) in _recorded_receptacles(scene).items()
    }
    points = np.load(LAYOUTS / f"FloorPlan{scene}-layout.npy")
    recorded = {kind for kind, _ in receptacles.values()}
    for kind in sorted(_receptacle_types(scene) - recorded):
        x, z = points[rng.randrange(len(points))]
        fixture = kind.removesuffix("Basin")  # ALFRED names a basin Sink|x|y|z|SinkBasin
        rid = _instance_id(fixture, rng) + (f"|{kind}" if fixture != kind else "")
        receptacles[rid] = (kind, _location(x, z, 90 * rng.randrange(4), 30))
    return receptacles


def _recorded_receptacles(scene: int) -> dict[str, tuple[str, list[float]]]:
    """Receptacle instances of the floor plan with the agent pose that reaches each."""
    poses = json.loads((LAYOUTS / f"FloorPlan{scene}-openable.json").read_text())
    receptacles = {}
    for rid, pose in sorted(poses.items()):
        kind = rid.split("|")[0]
        if kind in ("Sink", "Bathtub"):  # ALFRED's receptacle is the basin inside the fixture
            rid, kind = f"{rid}|{kind}Basin", f"{kind}Basin"
        if kind in alfred.RECEPTACLES:
            receptacles[rid] = (kind, pose)
    return receptacles


@cache
def _receptacle_types(scene: int) -> frozenset[str]:
    """Receptacle types of the floor plan: recorded instances' and the object list's."""
    listed = {
        {"Sink": "SinkBasin", "Bathtub": "BathtubBasin"}.get(t, t) for t in _scene_types(scene)
    }
    static = {t for t in listed if t in alfred.RECEPTACLES - alfred.MOVABLE_RECEPTACLES_SET}
    return frozenset(static | {kind for kind, _ in _recorded_receptacles(scene).values()})


@cache
def _scene_types(scene: int) -> frozenset[str]:
    return frozenset(json.loads((LAYOUTS / f"FloorPlan{scene}-objects.json").read_text()))


def _holders(kind: str, receptacle_types: frozenset[str]) -> list[str]:
    """Receptacle types of the scene that ALFRED allows `kind` in."""
    if kind == "DeskLamp":
        return [t for t in LAMP_HOLDERS if t in receptacle_types]
    return sorted(t for t in receptacle_types if kind in alfred.VAL_RECEPTACLE_OBJECTS.get(t, ()))


def _placeable(scene: int) -> list[str]:
    """Object types of the floor plan that some receptacle of it may hold (lamps aside)."""
    static = alfred.RECEPTACLES - alfred.MOVABLE_RECEPTACLES_SET
    rtypes = _receptacle_types(scene)
    return sorted(
        t
        for t in _scene_types(scene)
        if t != "DeskLamp" and t not in static and _holders(t, rtypes)
    )


def task_targets(scene: int, task_type: str) -> list[str]:
    """Object types a `task_type` task can be about in `scene`; empty if it cannot host one."""
    rtypes = _receptacle_types(scene)
    appliance = TASK_APPLIANCE.get(task_type)
    if appliance and appliance not in rtypes:
        return []
    if task_type == "look_at_obj_in_light":
        lamp = "DeskLamp" in _scene_types(scene) and _holders("DeskLamp", rtypes)
        return _placeable(scene) if lamp else []
    ability = TASK_ABILITY.get(task_type)
    return [
        t
        for t in _placeable(scene)
        if (ability is None or t in alfred.VAL_ACTION_OBJECTS[ability])
        # the target starts in one receptacle type and goes to another
        and len([h for h in _holders(t, rtypes) if h != appliance]) >= 2
    ]


def build_game(scene: int, task_type: str, rng: random.Random) -> BuiltGame:
    """A game of `task_type` in floor plan `scene` (one that `task_targets` says can host it)."""
    targets = task_targets(scene, task_type)
    if not targets:
        raise ValueError(f"FloorPlan{scene} cannot host a {task_type} task")
    receptacles = _scene_receptacles(scene, rng)
    rtypes = _receptacle_types(scene)
    appliance = TASK_APPLIANCE.get(task_type)
    target = rng.choice(targets)
    parent = ""
    if task_type != "look_at_obj_in_light":
        parent = rng.choice([t for t in _holders(target, rtypes) if t != appliance])

    objects: dict[str, tuple[str, str]] = {}  # object id -> (type, receptacle id)

    def place(kind: str, allowed_types: list[str]) -> None:
        rid = rng.choice(sorted(r for r, (t, _) in receptacles.items() if t in allowed_types))
        objects[_instance_id(kind, rng)] = (kind, rid)

    start_types = [t for t in _holders(target, rtypes) if t != parent]
    for _ in range(
        rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    ):
        place(target, start_types)
    if task_type == "look_at_obj_in_light":
        place("DeskLamp", _holders("DeskLamp", rtypes))
    others = [t for t in _placeable(scene) if t != target]
    for kind in rng.sample(others, min(DISTRACTOR_TYPES, len(others))):
        for _ in range(rng.randint(1, 2)):
            place(kind, _holders(kind, rtypes))

    start = _start_location(scene, {loc for _, loc in receptacles.values()}, rng)
    toggle = "DeskLamp" if task_type == "look_at_obj_in_light" else ""
    goal = goal_library.gdict[task_type]
    sentence = rng.choice(goal["templates"]).format(
        obj=target.lower(), recep=parent.lower(), toggle=toggle.lower()
    )
    traj_data = {
        "task_type": task_type,
        "pddl_params": {
            "object_target": target,
            "parent_target": parent,
            "toggle_target": toggle,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "scene": {"floor_plan": f"FloorPlan{scene}", "scene_num": scene},
        "ipr_generated": {"generator_version": GENERATOR_VERSION},
    }
    problem = _pddl_problem(receptacles, objects, start) + goal["pddl"].format(
        obj=target, recep=parent, toggle=toggle
    ).replace("#", "-")
    game = {
        "pddl_domain": Path(ALFRED_PDDL_PATH).read_text(),
        "grammar": Path(ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", sentence),
        "pddl_problem": problem,
        "solvable": None,
        "walkthrough": None,
    }
    return BuiltGame(game, traj_data)


def _start_location(scene: int, taken: set[str], rng: random.Random) -> str:
    """A reachable point facing no receptacle: the intro then lists the room's receptacles,
    which the expert (and an agent) needs to know where it may go."""
    points = np.load(LAYOUTS / f"FloorPlan{scene}-layout.npy")
    while True:
        x, z = points[rng.randrange(len(points))]
        start = _location(x, z, 90 * rng.randrange(4), 30)
        if start not in taken:
            return start


def _pddl_problem(
    receptacles: dict[str, tuple[str, str]], objects: dict[str, tuple[str, str]], start: str
) -> str:
    """The problem's objects and initial facts (the goal is appended), in ALFRED's vocabulary."""
    object_types = sorted({kind for kind, _ in objects.values()})
    receptacle_types = sorted({kind for kind, _ in receptacles.values()})
    locations = sorted({loc for _, loc in receptacles.values()} | {start})
    declared = (
        ["agent1 - agent"]
        + [f"{_pddl_name(o)} - object" for o in sorted(objects)]
        + [f"{_pddl_name(r)} - receptacle" for r in sorted(receptacles)]
        + [f"{_pddl_name(loc)} - location" for loc in locations]
        + [f"{t}Type - otype" for t in object_types]
        + [f"{t}Type - rtype" for t in receptacle_types]
    )
    facts = [f"(atLocation agent1 {_pddl_name(start)})"]
    for rid, (kind, loc) in sorted(receptacles.items()):
        facts += [f"(receptacleType {_pddl_name(rid)} {kind}Type)"]
        facts += [f"(receptacleAtLocation {_pddl_name(rid)} {_pddl_name(loc)})"]
        if kind in alfred.OPENABLE_CLASS_SET:
            facts.append(f"(openable {_pddl_name(rid)})")
    for oid, (kind, rid) in sorted(objects.items()):
        name = _pddl_name(oid)
        facts += [
            f"(objectType {name} {kind}Type)",
            f"(inReceptacle {name} {_pddl_name(rid)})",
            f"(objectAtLocation {name} {_pddl_name(receptacles[rid][1])})",
        ]
        if kind != "DeskLamp":
            facts.append(f"(pickupable {name})")
        facts += [
            f"({predicate} {name})"
            for ability, predicate in ABILITY_PREDICATES.items()
            if kind in alfred.VAL_ACTION_OBJECTS[ability]
        ]
    for rtype in receptacle_types:
        facts += [
            f"(canContain {rtype}Type {otype}Type)"
            for otype in object_types
            if otype in alfred.VAL_RECEPTACLE_OBJECTS.get(rtype, ())
        ]
    indent = "\n        "
    return (
        "(define (problem ipr_generated)\n    (:domain alfred)\n    (:objects"
        + indent
        + indent.join(declared)
        + "\n    )\n    (:init"
        + indent
        + indent.join(facts)
        + "\n    )\n"
    )


# -- the handcoded expert --------------------------------------------------------------------
class ExpertSolver:
    """ALFWorld's handcoded expert playing games in the real engine, as `alfworld-generate` does."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        infos = textworld.EnvInfos(admissible_commands=True, won=True, extras=["gamefile"])
        self._pddl = PddlEnv(infos)
        self._env = _MoveTrackingExpert(
            AlfredDemangler(self._pddl, shuffle=False), expert_type=AlfredExpertType.HANDCODED
        )

    def solve(self, game_file: Path, seed: int = 0) -> list[str] | None:
        """The expert's actions until the game is won, or None if it fails within max_steps.

        The expert breaks ties with the global `random` module: seed it for this game and
        restore it afterwards.
        """
        saved = random.getstate()
        random.seed(seed)
        try:
            return list(self._play(game_file))
        except _NotSolved:
            return None
        finally:
            random.setstate(saved)

    def _play(self, game_file: Path) -> Iterator[str]:
        self._env.load(str(game_file))
        state = self._env.reset()
        for _ in range(self.max_steps):
            try:
                action = state["extra.expert_plan"][0]
                state, _, done = self._env.step(action)
            except Exception as e:  # the expert gives up (timeout, no plan, no subgoal left)
                raise _NotSolved from e
            yield action
            if state["won"]:
                return
        raise _NotSolved

    def close(self) -> None:
        """Drop the engine. Its copy of fast-downward's library stays loaded (see alfworld.py)."""
        self._env = self._pddl = None


class _NotSolved(Exception):
    pass


class _MoveTrackingExpert(AlfredExpert):
    """The handcoded expert with its inventory tracking fixed for the 0.4 grammar.

    alfworld 0.4.2's expert places objects with "move X to Y" (the 0.4 command) but its state
    tracker only notices a placement in a command containing "put" (the 0.3 command), so after
    placing an object it still believes it holds it: pick-two tasks, and any task where it
    first picks up the wrong object, then fail. The tracker is shown the 0.3 name of a
    placement; the engine still receives the 0.4 command.
    """

    def step(self, command: str) -> Any:
        self.state, reward, done = textworld.core.Wrapper.step(self, command)
        self.prev_command = _PLACE_COMMAND.sub(r"put \1 in/on \2", str(command))
        self._gather_infos()
        return self.state, reward, done


_PLACE_COMMAND = re.compile(r"^move (.+) to (.+)$")
