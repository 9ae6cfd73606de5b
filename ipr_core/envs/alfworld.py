"""ALFWorld adapter: the `alfworld` environment on ALFWorld's real text engine.

The engine is what `AlfredTWEnv` plays: TextWorld's `PddlEnv` (PDDL states and actions
through fast-downward, text from the ALFWorld grammar) behind ALFWorld's `AlfredDemangler`,
which names entities as the agent sees them ("cabinet 1"). Games are the standard release's
when `ALFWORLD_DATA` holds it (train / dev = valid_seen / test = valid_unseen, as in the
IPR paper), otherwise games generated offline from the package's data (`alfworld_games`).

Reward is ALFWorld's: 1.0 once the goal holds (`won`), else 0.0. An action the engine does
not know is answered "Nothing happens." by the engine itself and costs a step.

The action vocabulary changed between ALFWorld releases: 0.3 placed objects with
"put X in/on Y", 0.4 with "move X to Y". The action hint is built from the command
templates of the grammar inside the game files in use, so it always names the commands
the engine in use accepts.

Speed (measured on 2 busy cores, ALFRED kitchen with ~30 receptacles): TextWorld rebuilds
its parsers' output on every call (it re-parses each grammar rule and fact query with TatSu,
~0.25 s per step) and translates the PDDL problem to fast-downward's SAS twice on every
load and every reset (~1-4 s). `install_engine_caches` memoises both: parses in memory (a
parse is a pure function of its text; the engine gets a fresh copy each call), SAS
translations in memory and on disk under `.ipr/alfworld/sas/`. Steps then take ~60 ms and
a reset ~0.2 s; the observations are byte-identical (tested against the unpatched engine).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import sys
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import fast_downward
import textworld
import textworld.envs.pddl.logic as pddl_logic
import textworld.envs.pddl.textgen as textgen
import textworld.logic
from textworld.envs import PddlEnv

# alfworld itself is imported through alfworld_games, which keeps its import from creating
# ~/.cache/alfworld.
from ipr_core.envs.alfworld_games import (
    AlfredDemangler,
    ExpertSolver,
    GameRef,
    generated_games,
    standard_games,
)
from ipr_core.envs.base import EnvCrashed, EnvTask, StepResult

SPLITS = ("train", "dev", "test")
MAX_STEPS = 20
"""The IPR paper's step budget for ALFWorld."""
DEFAULT_CACHE_DIR = Path(".ipr") / "alfworld"
MAX_ACTION_CHARS = 300
NOTHING_HAPPENS = "Nothing happens."

# Placeholders of the grammar's command templates, as the hint names them.
_PLACEHOLDER_WORDS = {"r": "receptacle", "o": "object", "co": "object", "ko": "object"}


class AlfWorldEnv:
    """ALFWorld's text games as an `Env`: a standard release in `data_dir`, else generated ones."""

    env_id = "alfworld"

    def __init__(
        self,
        data_dir: Path | None = None,
        cache_dir: Path = DEFAULT_CACHE_DIR,
        max_steps: int = MAX_STEPS,
    ):
        self.max_steps = max_steps
        install_engine_caches(cache_dir / "sas")
        if data_dir is not None:
            self._games = standard_games(data_dir)
        else:
            self._games = generated_games(cache_dir, max_steps)
        self._by_id = {g.task_id: (split, g) for split, gs in self._games.items() for g in gs}
        first = next(g for gs in self._games.values() for g in gs)
        self.action_hint = action_hint_from_game(first.game_file)
        self._engine: Any = _new_engine()
        self._loaded: str | None = None
        self._task: EnvTask | None = None
        self._last: StepResult | None = None
        self._steps = 0
        self._gold: dict[str, list[str] | None] = {}

    def task_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return [g.task_id for g in self._games[split]]

    def reset(self, task_id: str) -> EnvTask:
        if task_id not in self._by_id:
            raise ValueError(f"{self.env_id}: unknown task id {task_id!r}")
        split, game = self._by_id[task_id]
        state = self._call(lambda: self._reset_engine(game), f"resetting to {game.game_file}")
        instruction, observation = split_intro(state.feedback)
        self._task = EnvTask(
            self.env_id, task_id, split, instruction, observation, self.action_hint
        )
        self._steps = 0
        self._last = StepResult(observation, done=False, reward=0.0)
        return self._task

    def step(self, action: str) -> StepResult:
        if self._last is None:
            raise RuntimeError(f"{self.env_id}: step() before reset()")
        if self._last.done:
            return self._last
        command = normalise_action(action)
        where = f"step {self._steps + 1} of {self._task and self._task.task_id}"
        state, _, _ = self._call(lambda: self._live_engine().step(command), where)
        self._steps += 1
        won = bool(state["won"])
        self._last = StepResult(
            observation=state.feedback.strip() or NOTHING_HAPPENS,
            done=won or self._steps >= self.max_steps,
            reward=1.0 if won else 0.0,
        )
        return self._last

    def gold_actions(self) -> list[str] | None:
        """The game file's expert walkthrough; games without one are solved by the expert."""
        if self._task is None:
            return None
        task_id = self._task.task_id
        if task_id not in self._gold:
            game_file = self._by_id[task_id][1].game_file
            self._gold[task_id] = walkthrough(game_file, self.max_steps)
        return self._gold[task_id]

    def close(self) -> None:
        """Drop the engine; a later reset builds a new one.

        Each engine loads a private copy of fast-downward's library (TextWorld's way of
        keeping planner states apart); it is not unloaded: after `fast_downward.close_lib`
        (dlclose) a later load in the same process crashed (segfault in dlopen). A loaded
        copy costs ~3.4 MB of resident memory.
        """
        self._engine, self._loaded = None, None

    def _reset_engine(self, game: GameRef) -> Any:
        if self._engine is None:
            self._engine = _new_engine()
        if self._loaded != game.task_id:
            self._loaded = None
            self._engine.load(str(game.game_file))
            self._loaded = game.task_id
        return self._engine.reset()

    def _live_engine(self) -> Any:
        if self._engine is None:
            raise EnvCrashed(f"{self.env_id}: the engine is gone (closed or crashed); reset first")
        return self._engine

    def _call(self, engine_call: Callable[[], Any], where: str) -> Any:
        """Run the engine; any failure there is the environment's, and the engine is rebuilt."""
        try:
            return engine_call()
        except EnvCrashed:
            raise
        except Exception as e:
            self.close()
            raise EnvCrashed(f"{self.env_id}: the ALFWorld engine failed {where}: {e!r}") from e


def _new_engine() -> Any:
    """What AlfredTWEnv plays: TextWorld's PDDL engine behind ALFWorld's entity naming."""
    infos = textworld.EnvInfos(won=True)
    return AlfredDemangler(PddlEnv(infos), shuffle=False)


def normalise_action(action: str) -> str:
    """Commands are lower case with single spaces; a trailing full stop is not part of them."""
    return " ".join(action.lower().split()).rstrip(".")[:MAX_ACTION_CHARS]


def split_intro(feedback: str) -> tuple[str, str]:
    """The intro's task sentence (the instruction) and its room description (the observation)."""
    lines = [line.strip() for line in feedback.strip().splitlines() if line.strip()]
    task = next((line for line in lines if line.startswith("Your task is to:")), None)
    if task is None:
        raise EnvCrashed(f"alfworld: the game's intro has no task sentence: {feedback!r}")
    room = " ".join(line for line in lines if line != task and not line.startswith("-="))
    sentence = task.removeprefix("Your task is to:").strip()
    return sentence[:1].upper() + sentence[1:], room


def walkthrough(game_file: Path, max_steps: int) -> list[str] | None:
    """The walkthrough stored in the game file, else the handcoded expert's (None if it fails)."""
    stored = json.loads(game_file.read_text()).get("walkthrough")
    if stored:
        return [str(a) for a in stored]
    with _SOLVER_LOCK:  # the expert draws from the global `random`, which `solve` seeds
        return _expert_solver(max_steps).solve(game_file)


_SOLVER_LOCK = threading.Lock()


@cache
def _expert_solver(max_steps: int) -> ExpertSolver:
    return ExpertSolver(max_steps)


@cache
def action_hint_from_game(game_file: Path) -> str:
    """The hint names exactly the commands of the game's grammar whose action the domain has."""
    game = json.loads(game_file.read_text())
    return action_hint(game["grammar"], game["pddl_domain"])


def action_hint(grammar: str, domain: str) -> str:
    domain_actions = {
        name.lower()
        for line in domain.splitlines()
        if not line.lstrip().startswith(";")
        for name in re.findall(r"\(:action\s+([\w-]+)", line)
    }
    commands: list[str] = []
    for name, template in re.findall(r'action\s+(\w+)\s*\{\s*template\s*::\s*"([^"]*)"', grammar):
        if name.lower() not in domain_actions:
            continue
        command = re.sub(
            r"\[\{(\w+)\.name\s*\|[^]]*\}\]", r"{\1}", template
        )  # "go to [{r.name | ...}]"
        command = re.sub(r"\{(\w+)\}", lambda m: f"({_PLACEHOLDER_WORDS.get(m[1], m[1])})", command)
        if command not in commands:
            commands.append(command)
    return (
        "Actions are exact commands with the numbered names from the observations "
        "(e.g. 'cabinet 1'): " + ", ".join(f"'{c}'" for c in commands) + "."
    )


# -- engine caches ---------------------------------------------------------------------------
_CACHE_LOCK = threading.Lock()
_PARSE_LOCK = threading.RLock()
_installed: dict[str, Any] = {}


def install_engine_caches(sas_dir: Path) -> None:
    """Memoise TextWorld's TatSu parses and fast-downward's PDDL->SAS translation (per process).

    Both are pure functions of their text arguments. TextWorld mutates what the text
    grammar's parse returns (it sets each symbol's context), so each call gets a deep copy;
    the fact queries and SAS tasks are only read. `pddl2sas` also overwrites `sys.argv`
    (its translator reads options from there): the wrapper puts it back.

    TextWorld's TatSu parsers are module-level singletons that break when two threads parse
    at once (the rollout engine steps envs in a thread pool): every parse takes one lock.
    """
    with _CACHE_LOCK:
        if "sas_dir" in _installed:
            _installed["sas_dir"] = sas_dir
            return
        _installed["sas_dir"] = sas_dir
        textworld.logic._parse_and_convert = _one_at_a_time(textworld.logic._parse_and_convert)
        pddl_logic._parse_and_convert = _one_at_a_time(pddl_logic._parse_and_convert)
        parse_symbols = _one_at_a_time(textgen._parse_and_convert)
        parsed: dict[tuple[str, str], Any] = {}

        def cached_parse(text: str, rule_name: str, trace: bool = False) -> Any:
            key = (text, rule_name)
            if key not in parsed:
                parsed[key] = parse_symbols(text, rule_name=rule_name)
            return copy.deepcopy(parsed[key])

        parse_query = textworld.logic.Rule.parse_conjunctive_query.__func__
        queries: dict[str, Any] = {}

        def cached_query(cls: type, expr: str) -> Any:
            if expr not in queries:
                queries[expr] = parse_query(cls, expr)
            return queries[expr]

        textgen._parse_and_convert = cached_parse
        textworld.logic.Rule.parse_conjunctive_query = classmethod(cached_query)
        fast_downward.pddl2sas = _cached_pddl2sas(fast_downward.pddl2sas)


def _one_at_a_time(parse: Callable[..., Any]) -> Callable[..., Any]:
    def locked_parse(*args: Any, **kwargs: Any) -> Any:
        with _PARSE_LOCK:
            return parse(*args, **kwargs)

    return locked_parse


def _cached_pddl2sas(translate: Callable[..., Any]) -> Callable[..., Any]:
    memo: dict[str, Any] = {}
    version = getattr(fast_downward, "__version__", "20.6.4")

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        text = f"{version}\0{optimize}\0{domain}\0{problem}"
        key = hashlib.sha256(text.encode()).hexdigest()
        with _CACHE_LOCK:
            if key in memo:
                return memo[key]
            path = Path(_installed["sas_dir"]) / f"{key}.pickle"
            result = _read_pickle(path)
            if result is None:
                argv = sys.argv[:]
                try:
                    result = translate(domain, problem, verbose=verbose, optimize=optimize)
                finally:
                    sys.argv = argv
                _write_pickle(path, result)
            memo[key] = result
            return result

    return pddl2sas


def _read_pickle(path: Path) -> Any:
    """A cached translation, or None if it is missing or unreadable (it is then redone)."""
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        return None


def _write_pickle(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
    with tmp.open("wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
