"""ScienceWorld adapter: the `scienceworld/<task>` environments (the 30 tasks of the package),
optionally with simplification flags (`scienceworld/boil?teleport=0`; see `ipr_core.envs`).

ScienceWorld (Wang et al. 2022; the `scienceworld` package, as used by ETO) simulates
elementary-science experiments in a Scala JVM reached through py4j. Like TextWorldExpress,
every instance gets its own `PythonInterface` in one JVM per process (`ipr_core.envs.jvm`),
with two differences forced by the engine:

- The simplification settings live in a JVM-global singleton (`SimplifierProcessor`) that
  every `load` clears and refills. By default this adapter uses ETO's "easy" setting
  (teleport action, open doors, self-watering flower pots, no electrical actions), which the
  engine expands without `noElectricalAction` for the four electrical tasks; a non-electrical
  world in a JVM where an electrical task was loaded afterwards offers the electrical actions
  too (checked: its valid action combinations went from 115 to 439). So every effective
  setting (easy for electrical tasks, easy for the others, and each one an env id's
  parameters choose, e.g. `scienceworld/boil?teleport=0`) gets its own shared JVM, and every
  call into a JVM holds that JVM's lock (a concurrent `load` would empty the setting under
  another instance's step; the gold agent's path cache is not thread-safe). The gold agent
  does not rely on the setting: its paths do not teleport and open doors themselves
  (checked: boil, find-animal and chemistry-mix, variations 0 and 3, reach full score with
  no simplifications).
- Generating a gold path makes the engine run its gold agent (up to ~17 s for mendelian
  genetics), so `reset` loads without it and `gold_actions()` builds it on a second
  interface once per (task, variation) and process. The gold agent is not seeded: a task's
  gold path may differ between processes (e.g. which flower pot it waters), never its world.

Task ids are `<split>-<variation>` over ScienceWorld's own train/dev/test variation sets,
each game once (`ipr_core.envs.games`): variations can make the same game (find-animal: 300
variations, 270 distinct). A game's key is its task description and first observation (the
gold agent is not seeded, so its path is left out; two variations that differ only outside
the first room count as one game, the conservative side). Every variation still resets.
The instruction is the task description; the initial observation is a free 'look around'.

Scoring: the engine reports progress in [0, 1] (the package's API shows it as 0-100); it is
rounded to whole points as the package does and reported as points / 100. A negative score
means the task failed (e.g. focusing on the wrong object): the episode ends with reward 0.
An unknown action gets "No known action matches that input." and costs a step here (the
engine does not count it as a move). An ambiguous one gets a numbered list of readings, and
the next action may be the number.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from py4j.java_gateway import JavaGateway
from py4j.protocol import Py4JError
from scienceworld.constants import BASEPATH, JAR_PATH

from ipr_core.envs import EnvSpec, env_spec, scienceworld_is_electrical
from ipr_core.envs.base import EnvCrashed, EnvTask, StepResult
from ipr_core.envs.games import content_key, distinct_numbers
from ipr_core.envs.jvm import SharedJvm

SPLITS = ("train", "dev", "test")
DEFAULT_SIMPLIFICATIONS = "easy"
"""ETO's setting, the registry's defaults; the engine drops `noElectricalAction` from it for
the electrical tasks. The engine silently ignores names it does not know."""
MAX_ACTION_CHARS = 300
"""Longer actions are cut: no ScienceWorld command is near this long."""
JAVA_OPTS = ("-Xmx2g", "-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2")
"""-Xmx2g: a world takes ~11 MB of heap, so 2 GB holds a pool of 32 instances and the gold
agent with room to spare; without a cap the JVM grew to 1.9 GB RSS after a few loads.
hashCode=2 (every identity hash code the same): the engine lists objects in hash-set order, so
with the JVM's random identity hashes the same world was described with its objects in a
different order on 4 of 8 resets (boil dev-14). With a constant hash the order is the order
of creation, and resets and replays gave identical text; steps took ~1.5x as long (contended
measurements, ~20-140 ms either way)."""

# Steps the adapter allows per task: 1.5x the longest gold path to completion, and at least
# the longest whole gold path (some go on after the task is done), rounded up to a multiple
# of 5, over 6 evenly spaced variations of each split (all of them where a split has fewer)
# measured by `scripts/sciworld_gold_lengths.py`. A run config's `max_steps` can lower them:
# inclined-plane-friction-named-surfaces has gold paths of ~740 steps (most are 50-110).
# Comments: median / longest steps to completion / longest whole gold path, and how many
# sampled gold paths did not reach full score (ingest rejects such variations).
MAX_STEPS: dict[str, int] = {
    "boil": 260,  # 76 / 173 / 188
    "change-the-state-of-matter-of": 170,  # 47 / 113 / 118
    "chemistry-mix": 90,  # 21 / 57 / 58
    "chemistry-mix-paint-secondary-color": 55,  # 12 / 34 / 35
    "chemistry-mix-paint-tertiary-color": 50,  # 23 / 32 / 33
    "find-animal": 25,  # 12 / 16 / 16
    "find-living-thing": 25,  # 12 / 16 / 16
    "find-non-living-thing": 20,  # 7 / 11 / 11
    "find-plant": 20,  # 12 / 12 / 12
    "freeze": 220,  # 65 / 144 / 149 (1 of 18 failed)
    "grow-fruit": 125,  # 73 / 82 / 89 (1 of 18 failed)
    "grow-plant": 75,  # 33 / 41 / 75
    "identify-life-stages-1": 60,  # 38 / 40 / 42
    "identify-life-stages-2": 25,  # 14 / 15 / 17
    "inclined-plane-determine-angle": 285,  # 75 / 188 / 189
    "inclined-plane-friction-named-surfaces": 1135,  # 77 / 755 / 756
    "inclined-plane-friction-unnamed-surfaces": 340,  # 108 / 226 / 227
    "lifespan-longest-lived": 15,  # 5 / 7 / 8
    "lifespan-longest-lived-then-shortest-lived": 15,  # 6 / 8 / 9
    "lifespan-shortest-lived": 15,  # 5 / 7 / 8
    "measure-melting-point-known-substance": 110,  # 31 / 73 / 74
    "measure-melting-point-unknown-substance": 145,  # 47 / 95 / 96 (1 of 18 failed)
    "melt": 210,  # 59 / 140 / 142
    "mendelian-genetics-known-plant": 200,  # 129 / 132 / 133
    "mendelian-genetics-unknown-plant": 205,  # 131 / 134 / 135
    "power-component": 20,  # 10 / 12 / 15
    "power-component-renewable-vs-nonrenewable-energy": 45,  # 24 / 28 / 30
    "test-conductivity": 70,  # 27 / 45 / 46
    "test-conductivity-of-unknown-substances": 55,  # 22 / 36 / 37
    "use-thermometer": 35,  # 19 / 23 / 24
}

# How each of the package's action templates (`getPossibleActionsWithIDs`) is shown to the
# agent, in ETO's phrasing; 'reset task' (it undoes the agent's progress) is left out.
ACTION_PHRASES: dict[str, str] = {
    "look around": "look around: describe the current room",
    "look at OBJ": "look at OBJ: describe an object in detail",
    "look in OBJ": "look in OBJ: describe a container's contents",
    "read OBJ": "read OBJ: read a note or book",
    "inventory": "inventory: list what you carry",
    "task": "task: repeat the task description",
    "teleport OBJ": "teleport to LOC: go to any room in one step",
    "go OBJ": "go to LOC: go through an open door to a neighbouring room",
    "open OBJ": "open OBJ: open a door or container",
    "close OBJ": "close OBJ: close a door or container",
    "pick up OBJ": "pick up OBJ: move an object to your inventory",
    "put down OBJ": "put down OBJ: drop an object from your inventory",
    "move OBJ to OBJ": "move OBJ to OBJ: move an object into a container or onto a surface",
    "pour OBJ in OBJ": "pour OBJ into OBJ: pour a liquid into a container",
    "dunk OBJ in OBJ": "dunk OBJ in OBJ: dunk a container in a liquid",
    "mix OBJ": "mix OBJ: chemically mix the contents of a container",
    "activate OBJ": "activate OBJ: switch a device on",
    "deactivate OBJ": "deactivate OBJ: switch a device off",
    "use OBJ on OBJ": "use OBJ on OBJ: use a device or tool on something",
    "connect OBJ to OBJ": "connect OBJ to OBJ: connect electrical components",
    "disconnect OBJ": "disconnect OBJ: disconnect an electrical component",
    "eat OBJ": "eat OBJ: eat food",
    "flush OBJ": "flush OBJ: flush a toilet",
    "focus on OBJ": "focus on OBJ: signal that an object is the one the task is about",
    "wait": "wait: do nothing for 10 steps",
    "wait1": "wait1: do nothing for 1 step",
}
OMITTED_TEMPLATES = frozenset({"reset task"})

_HINT_INTRO = (
    "Actions use the names of objects (OBJ) and rooms (LOC) exactly as the observations "
    "write them. The available actions are: "
)
_HINT_OUTRO = (
    ". Focus only on the object the task asks for: focusing on a wrong one fails the task. "
    "If an action is ambiguous you get a numbered list; answer with the number you meant."
)


def _one_line(action: str) -> str:
    return " ".join(action.split())[:MAX_ACTION_CHARS]


@dataclass
class _JvmGroup:
    """A shared JVM whose instances all load with the same effective simplifications."""

    jvm: SharedJvm
    lock: threading.Lock = field(default_factory=threading.Lock)


def _new_group(name: str) -> _JvmGroup:
    return _JvmGroup(SharedJvm(name, classpath=JAR_PATH, cwd=BASEPATH, java_opts=JAVA_OPTS))


_GROUPS: dict[tuple[bool, str], _JvmGroup] = {}
"""One shared JVM per (electrical task, simplification string), started on first use."""
_CACHE_LOCK = threading.Lock()
_SPLIT_VARIATIONS: dict[str, dict[str, tuple[int, ...]]] = {}
_GOLD_PATHS: dict[tuple[str, str, int], tuple[str, ...]] = {}
"""Per process: one gold path per (task, simplifications, variation), so repeated calls agree."""


def _group(task: str, simplifications: str) -> _JvmGroup:
    key = (scienceworld_is_electrical(task), simplifications)
    with _CACHE_LOCK:
        if key not in _GROUPS:
            kind = " (electrical tasks)" if key[0] else ""
            _GROUPS[key] = _new_group(f"ScienceWorld{kind} {simplifications or 'unsimplified'}")
        return _GROUPS[key]


def simplification_str(env: EnvSpec) -> str:
    """The engine's `simplificationStr` for an env id's parameters ("easy" at the defaults)."""
    if env.at_defaults:
        return DEFAULT_SIMPLIFICATIONS
    return ",".join(name for name, on in env.engine_params().items() if on)


class ScienceWorldEnv:
    """One ScienceWorld task (`task` is the package's task name, e.g. 'boil') as an `Env`;
    `params` (the env id's simplification flags, e.g. {"teleport": 0}) override "easy"."""

    def __init__(self, task: str, params: Mapping[str, int] | None = None):
        if task not in MAX_STEPS:
            raise ValueError(f"unknown ScienceWorld task {task!r}; known: {sorted(MAX_STEPS)}")
        env = env_spec(f"scienceworld/{task}", params)
        self.task = task
        self.env_id = env.env_id
        self.max_steps = MAX_STEPS[task]
        self._simplifications = simplification_str(env)
        self._group = _group(task, self._simplifications)
        self._gateway: JavaGateway | None = None
        self._server: Any = None
        self._gold_server: Any = None
        self._current: EnvTask | None = None
        self._variation = -1
        self._last: StepResult | None = None
        self._steps = 0
        try:
            self._connect()
            self._load(0)
            templates = json.loads(self._call("getPossibleActionsWithIDs"))
            self.action_hint = action_hint([t["action_example"] for t in templates])
            with _CACHE_LOCK:
                if task not in _SPLIT_VARIATIONS:
                    _SPLIT_VARIATIONS[task] = {
                        split: tuple(int(v) for v in self._call(f"getVariations{split.title()}"))
                        for split in SPLITS
                    }
        except (EnvCrashed, ValueError):
            self.close()
            raise

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        setting = ["scienceworld", self.task, self._simplifications, version("scienceworld")]
        scratch: list[Any] = []

        def key(split: str, variation: int) -> str:
            if not scratch:  # a second interface: this instance's episode stays as it is
                scratch.append(self._new_interface())
            server = scratch[0]
            self._call("load", self.task, variation, self._simplifications, False, server=server)
            observation = self._call("freeActionLook", server=server).strip()
            return content_key(self._call("getTaskDescription", server=server).strip(), observation)

        games = distinct_numbers(setting, _SPLIT_VARIATIONS[self.task], key)
        return [f"{split}-{v}" for v in games[split]]

    def reset(self, task_id: str) -> EnvTask:
        split, _, variation = task_id.partition("-")
        if (
            split not in SPLITS
            or not variation.isdigit()
            or int(variation) not in _SPLIT_VARIATIONS[self.task][split]
        ):
            raise ValueError(f"{self.env_id}: unknown task id {task_id!r}")
        self._load(int(variation))
        observation = self._call("freeActionLook").strip()
        self._current = EnvTask(
            env_id=self.env_id,
            task_id=task_id,
            split=split,
            instruction=self._call("getTaskDescription").strip(),
            initial_observation=observation,
            action_hint=self.action_hint,
        )
        self._variation = int(variation)
        self._steps = 0
        self._last = StepResult(observation, done=False, reward=0.0)
        return self._current

    def step(self, action: str) -> StepResult:
        if self._last is None:
            raise RuntimeError(f"{self.env_id}: step() before reset()")
        if self._last.done:
            return self._last
        observation = self._call("step", _one_line(action)).strip()
        points = round(100 * float(self._call("getScore")))
        completed = bool(self._call("getCompleted"))
        self._steps += 1
        failed = points < 0
        done = completed or failed or self._steps >= self.max_steps
        reward = 0.0 if failed else min(points, 100) / 100
        self._last = StepResult(observation or "Nothing happens.", done=done, reward=reward)
        return self._last

    def gold_actions(self) -> list[str] | None:
        if self._current is None:
            return None
        key = (self.task, self._simplifications, self._variation)
        with _CACHE_LOCK:
            cached = _GOLD_PATHS.get(key)
        if cached is None:
            cached = self._generate_gold_path(self._variation)
            with _CACHE_LOCK:
                cached = _GOLD_PATHS.setdefault(key, cached)
        return list(cached)

    def close(self) -> None:
        """Drop this instance's worlds; the shared JVM stops with its last instance."""
        self._disconnect()

    # -- the JVM ----------------------------------------------------------------------------
    def _connect(self) -> None:
        self._gateway = self._group.jvm.acquire()
        self._server = self._new_interface()

    def _new_interface(self) -> Any:
        if self._gateway is None:
            raise EnvCrashed(f"{self.env_id}: used after close()")
        try:
            return self._gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()
        except Py4JError as e:
            raise EnvCrashed(f"{self.env_id}: ScienceWorld JVM failed: {e}") from e

    def _disconnect(self) -> None:
        if self._gateway is not None:
            self._server = self._gold_server = None
            self._group.jvm.release(self._gateway)
            self._gateway = None

    def _load(self, variation: int) -> None:
        error = self._call("load", self.task, variation, self._simplifications, False)
        if error:
            raise EnvCrashed(f"{self.env_id}: ScienceWorld could not load variation {variation}")

    def _generate_gold_path(self, variation: int) -> tuple[str, ...]:
        if self._gold_server is None:
            self._gold_server = self._new_interface()
        self._call(
            "load", self.task, variation, self._simplifications, True, server=self._gold_server
        )
        return tuple(str(a) for a in self._call("getGoldActionSequence", server=self._gold_server))

    def _call(self, method: str, *args: Any, server: Any = None) -> Any:
        """Call the JVM under its lock; any failure there is the environment's, not the agent's."""
        server = server if server is not None else self._server
        if server is None:
            raise EnvCrashed(f"{self.env_id}: used after close()")
        try:
            with self._group.lock:
                return getattr(server, method)(*args)
        except Py4JError as e:
            raise EnvCrashed(f"{self.env_id}: ScienceWorld JVM failed in {method}: {e}") from e


def action_hint(templates: list[str]) -> str:
    """The hint for a task offering `templates`, in ACTION_PHRASES order."""
    offered = set(templates) - OMITTED_TEMPLATES
    unknown = offered - set(ACTION_PHRASES)
    if unknown:
        raise ValueError(f"ScienceWorld offers action templates with no phrase: {sorted(unknown)}")
    phrases = [phrase for template, phrase in ACTION_PHRASES.items() if template in offered]
    return _HINT_INTRO + "; ".join(phrases) + _HINT_OUTRO
