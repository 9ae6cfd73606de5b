"""TextWorldExpress (TWX) adapter: the `twx/<game>` environments.

TWX simulates its text games in a Scala JVM reached through py4j. Every instance gets its own
`PythonInterface` object in one JVM per process (`ipr_core.envs.jvm`); each holds its own game
and the interface has no shared state. The JVM stops when the last instance is closed.

Scoring: TWX reports `score` as progress normalised by the game's maximum score, 1.0 exactly
when the task succeeds. cookingworld, coin, twc and mapreader only add credit (e.g. TWC gives
1 point per target item in the inventory and 2 once it is put away), and a task failure
(e.g. an ingredient cut the wrong way) ends the episode keeping the partial score;
arithmetic, sorting, simonsays and peckingorder report -1 on failure. The reward here is
that score clamped to [0, 1], and 1.0 on success.

Gold paths (generated on every reset) reach reward 1.0 for all 3000 train/dev/test seeds of
every variant at its default setting (and for every seed sampled at the ends of the parameter
ranges, see `ipr_core.envs`), but may hold actions after the task is done (twc appends a
move); replaying them past `done` is harmless.

Invalid actions are answered by TWX itself with "Unknown action: I'm not sure what you
mean." and cost a step; they never raise.

Distinct games (`ipr_core.envs.games`): TWX seeds can make the same game (twc with 1 room
and 2 items: 50 test seeds held 47 games), so a split's task ids are its distinct games. A
game is what the engine generates for a seed: its task description, first observation and
gold path (coin's gold path is an unseeded random walk, so there it is left out). Every
seed stays valid for `reset`, so stored task ids of duplicate seeds still read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from py4j.java_gateway import JavaGateway
from py4j.protocol import Py4JError
from textworld_express.constants import BASEPATH, JAR_PATH

from ipr_core.envs import env_spec
from ipr_core.envs.base import EnvCrashed, EnvTask, StepResult
from ipr_core.envs.games import content_key, distinct_numbers
from ipr_core.envs.jvm import SharedJvm

SPLITS = ("train", "dev", "test")
MAX_ACTION_CHARS = 300
"""Longer actions are cut: no TWX command is near this long, and the text goes over a socket."""

_COMMON_HINT = (
    "Actions are short imperative commands using the exact object names from the "
    "observation, e.g. 'look around', 'inventory', 'move north' (or south/east/west)"
)


@dataclass(frozen=True)
class TwxVariant:
    """How one TWX game is set up for this project, beyond its env id's parameters."""

    game: str
    action_hint: str
    fixed_params: dict[str, int] = field(default_factory=dict)
    """Engine settings the env id does not expose."""
    seeded_gold: bool = True
    """Whether the gold path is the same on every reset of a seed (part of a game's key)."""


# The parameters an env id can set, their defaults (this project's), ranges and step bounds are
# in the registry (`ipr_core.envs`), which needs them without importing this module.
VARIANTS: dict[str, TwxVariant] = {
    "cookingworld": TwxVariant(
        game="cookingworld",
        action_hint=_COMMON_HINT
        + ", 'examine X', 'open X', 'close X', 'take X', 'put X in Y', 'read cookbook', "
        "'slice X', 'dice X', 'chop X' (with the knife in your inventory), "
        "'cook X in stove' (fried) or 'cook X in oven' (roasted), 'prepare meal', 'eat meal'.",
    ),
    "coin": TwxVariant(
        game="coin",
        seeded_gold=False,
        action_hint=_COMMON_HINT + ", 'take X'. Take the coin once you see it.",
    ),
    "twc": TwxVariant(
        game="twc",
        action_hint=_COMMON_HINT + ", 'examine X', 'open X', 'close X', 'take X', 'put X in Y' "
        "(Y a container or surface, e.g. 'put clean blue socks in chest of drawers').",
    ),
    "mapreader": TwxVariant(
        game="mapreader",
        fixed_params={
            "numLocations": 6,
            "maxDistanceApart": 2,
            "maxDistractorItemsPerLocation": 0,
            "includeDoors": 0,
            "limitInventorySize": 0,
        },
        action_hint=_COMMON_HINT
        + ", 'task' (repeats the task), 'read map', 'take X', 'put X in Y'.",
    ),
    "arithmetic": TwxVariant(
        game="arithmetic",
        action_hint=_COMMON_HINT
        + ", 'take X', 'read math problem', 'put X in box', where X is named with its "
        "quantity, e.g. 'take 2 bananas'.",
    ),
    "sorting": TwxVariant(
        game="sorting",
        action_hint=_COMMON_HINT
        + ", 'take X', 'put X in box', where X is named with its quantity, "
        "e.g. 'take 25g of oak'.",
    ),
    "simonsays": TwxVariant(
        game="simonsays",
        action_hint=(
            "Each turn, type exactly the command Simon says, e.g. 'smell pineapple', "
            "'examine apple', 'touch peach', 'jump up and down', 'sit down'."
        ),
    ),
    "peckingorder": TwxVariant(
        game="peckingorder",
        action_hint=_COMMON_HINT + ", 'read instructions book', 'take X', 'put X in Y'. "
        "Read the instructions book again after each step it asks for.",
    ),
}


_JVM = SharedJvm("TextWorldExpress", classpath=JAR_PATH, cwd=BASEPATH)


def _params_str(params: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def normalise_action(action: str) -> str:
    """One line, single spaces, no trailing full stop, bounded length."""
    return " ".join(action.split()).rstrip(".")[:MAX_ACTION_CHARS]


def _ints(java_list: Any) -> list[int]:
    """A JVM list of ints in one py4j call: iterating it costs a round trip per element
    (3,000 seeds made every env instance take ~0.25 s, and the rollout engine opens dozens)."""
    return [int(x) for x in json.loads(java_list.toString())]


def game_key(server: Any, seed: int, split: str, seeded_gold: bool) -> str | None:
    """The content of the game `seed` makes (None: the engine cannot generate it)."""
    try:
        info = json.loads(server.generateNewGameJSON(seed, split, True))
        # the JVM list's text in one py4j call (iterating it costs a round trip per action)
        gold = str(server.getGoldActionSequence().toString()) if seeded_gold else ""
        return content_key(str(server.getTaskDescription()), info["observation"], gold)
    except Py4JError:
        return None


def distinct_seeds(
    make_server: Callable[[], Any],
    variant: TwxVariant,
    engine_params: Mapping[str, int],
    seeds: Mapping[str, list[int]],
) -> dict[str, list[int]]:
    """Per split, the first seed of each game (`ipr_core.envs.games`); `make_server()` gives
    a game server loaded with this setting, called once and only when the seeds are not
    cached."""
    setting = ["twx", variant.game, sorted(engine_params.items()), Path(JAR_PATH).name]
    made: list[Any] = []

    def key(split: str, seed: int) -> str | None:
        if not made:
            made.append(make_server())
        return game_key(made[0], seed, split, variant.seeded_gold)

    return distinct_numbers(setting, seeds, key)


def _by_lower_case(valid_actions: list[str]) -> dict[str, str]:
    return {a.lower(): a for a in valid_actions}


class TextWorldExpressEnv:
    """One TWX game (`variant` is the game name) as an `Env`; `params` (the env id's short
    names, e.g. {"items": 1}) override the registry's defaults."""

    def __init__(self, variant: str, params: Mapping[str, int] | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown TextWorldExpress game {variant!r}; known: {list(VARIANTS)}")
        spec = VARIANTS[variant]
        env = env_spec(f"twx/{variant}", params)
        self.env_id = env.env_id
        self.max_steps = env.max_steps
        self.action_hint = spec.action_hint
        self._gateway: JavaGateway | None = _JVM.acquire()
        self._server: Any = None
        self._task: EnvTask | None = None
        self._last: StepResult | None = None
        self._steps = 0
        self._valid_actions: dict[str, str] = {}
        try:
            self._server = self._gateway.jvm.textworldexpress.runtime.PythonInterface()
            engine_params = {**spec.fixed_params, **env.engine_params()}
            error = self._server.load(spec.game, _params_str(engine_params))
            if error:
                self.close()
                raise ValueError(f"{self.env_id}: bad game parameters: {error}")
            self._seeds = {
                "train": _ints(self._server.getSeedsTrain()),
                "dev": _ints(self._server.getSeedsDev()),
                "test": _ints(self._server.getSeedsTest()),
            }
            self._variant, self._engine_params = spec, engine_params
        except Py4JError as e:
            self.close()
            raise EnvCrashed(f"{self.env_id}: TWX JVM failed while loading: {e}") from e

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        games = distinct_seeds(
            self._scratch_server, self._variant, self._engine_params, self._seeds
        )
        return [f"{split}-{seed}" for seed in games[split]]

    def _scratch_server(self) -> Any:
        """A second game server of this setting, so that generating every game of the
        splits leaves this instance's episode alone."""
        if self._gateway is None:
            raise EnvCrashed(f"{self.env_id}: used after close()")
        server = self._gateway.jvm.textworldexpress.runtime.PythonInterface()
        server.load(self._variant.game, _params_str(self._engine_params))
        return server

    def reset(self, task_id: str) -> EnvTask:
        split, _, seed = task_id.partition("-")
        if split not in SPLITS or not seed.isdigit() or int(seed) not in self._seeds[split]:
            raise ValueError(f"{self.env_id}: unknown task id {task_id!r}")
        info = json.loads(self._call("generateNewGameJSON", int(seed), split, True))
        self._task = EnvTask(
            env_id=self.env_id,
            task_id=task_id,
            split=split,
            instruction=self._call("getTaskDescription"),
            initial_observation=info["observation"],
            action_hint=self.action_hint,
        )
        self._steps = 0
        self._valid_actions = _by_lower_case(info["validActions"])
        self._last = StepResult(info["observation"], done=False, reward=0.0)
        return self._task

    def step(self, action: str) -> StepResult:
        if self._last is None:
            raise RuntimeError(f"{self.env_id}: step() before reset()")
        if self._last.done:
            return self._last
        action = normalise_action(action)
        # The TWX parser is case-sensitive ("Look around" is unknown) but object names are not
        # all lower case ("clean blue T-shirt"): take the spelling of the matching valid action.
        action = self._valid_actions.get(action.lower(), action)
        info = json.loads(self._call("stepJSON", action))
        self._steps += 1
        self._valid_actions = _by_lower_case(info["validActions"])
        success = bool(info["tasksuccess"])
        reward = 1.0 if success else min(max(float(info["score"]), 0.0), 1.0)
        done = success or bool(info["taskfailure"]) or self._steps >= self.max_steps
        self._last = StepResult(info["observation"], done=done, reward=reward)
        return self._last

    def gold_actions(self) -> list[str] | None:
        if self._task is None:
            return None
        return [str(a) for a in self._call("getGoldActionSequence")]

    def close(self) -> None:
        """Drop this instance's game; the shared JVM stops with the last instance."""
        if self._gateway is not None:
            self._server = None
            _JVM.release(self._gateway)
            self._gateway = None

    def _call(self, method: str, *args: Any) -> Any:
        """Call the JVM; any failure there is the environment's, not the agent's."""
        if self._server is None:
            raise EnvCrashed(f"{self.env_id}: used after close()")
        try:
            return getattr(self._server, method)(*args)
        except Py4JError as e:
            raise EnvCrashed(f"{self.env_id}: TWX JVM failed in {method}: {e}") from e
