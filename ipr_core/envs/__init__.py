"""Environment registry: env ids are `family/variant`, e.g. `twx/cookingworld`, or just
`family` for a family with a single environment (its one variant is ""), e.g. `intercode-sql`
or `alfworld`, optionally followed by game parameters: `twx/twc?locations=1&items=2`.

Parameter syntax is a URL query string (`?name=value&name=value`) because it reads as "this
env, with these settings", `?`, `&` and `=` occur in no family or variant name, and values
are small integers, so nothing needs escaping (a shell needs the id quoted). Each parameter
has a short name mapped to the engine's own (`items` is TWX's `numItemsToPutAway`), a
default and an inclusive range. `parse_env_id` is the one place ids are read: its `EnvSpec`
prints the canonical id: every parameter, defaults included, in declared order, so
`twx/twc?items=2&locations=1` and `twx/twc?locations=1` are both
`twx/twc?locations=1&items=2&doors=0&inventory_limit=0`, every spelling of one setting is one
store key, and a stored id names its game even after a default changes. Stores written when
ids left defaults out are rewritten on opening (`ipr_core.store`).

Parameters so far: TWX's cookingworld, coin, twc and simonsays (the engine's settings),
ScienceWorld's simplifications as 0/1 flags. ALFWorld has none: its generated games are
6/3/3 per split over six task types, so a task-type filter would leave splits empty.

Families register a factory taking the spec; adapter modules are imported only when an env
of their family is made, so importing the registry stays cheap (no JVM, no py4j).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from itertools import product
from pathlib import Path

from ipr_core.envs.base import Env, EnvCrashed, EnvTask, StepResult
from ipr_core.errors import EnvParamError, UnknownEnvError

__all__ = [
    "Env",
    "EnvCrashed",
    "EnvSpec",
    "EnvTask",
    "Param",
    "Rule",
    "StepResult",
    "VariantInfo",
    "canonical_env_id",
    "describe_games",
    "env_spec",
    "known_env_ids",
    "make_env",
    "parse_env_id",
    "scienceworld_is_electrical",
    "variant_info",
]


@dataclass(frozen=True)
class Param:
    """One game parameter of an env id: `name` is what users write, `engine_name` the engine's."""

    name: str
    engine_name: str
    default: int
    low: int
    high: int
    help: str


@dataclass(frozen=True)
class Rule:
    """A constraint across parameters that their ranges cannot say."""

    holds: Callable[[Mapping[str, int]], bool]
    text: str


@dataclass(frozen=True)
class VariantInfo:
    """What the registry knows about one env without starting its engine."""

    max_steps: Callable[[Mapping[str, int]], int]
    """The episode step bound of a setting (every parameter by name)."""
    params: tuple[Param, ...] = ()
    split_sizes: tuple[int, int, int] | None = None
    """Seeds (TWX) or variations (ScienceWorld) in train / dev / test where the engine fixes
    them; None: they depend on data. A TWX split's tasks are its distinct games, fewer
    (`ipr envs ID` counts them)."""
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class EnvSpec:
    """A parsed env id: family, variant and the value of every parameter, defaults included."""

    family: str
    variant: str
    values: tuple[tuple[str, int], ...] = ()
    """(name, value) per declared parameter, in declared order."""

    @property
    def base_id(self) -> str:
        return f"{self.family}/{self.variant}" if self.variant else self.family

    @property
    def env_id(self) -> str:
        """The canonical id: every parameter, defaults included, in declared order."""
        query = "&".join(f"{k}={v}" for k, v in self.values)
        return f"{self.base_id}?{query}" if query else self.base_id

    @property
    def at_defaults(self) -> bool:
        """Whether every parameter has its default value."""
        defaults = {p.name: p.default for p in variant_info(self.base_id).params}
        return all(value == defaults[name] for name, value in self.values)

    @property
    def params(self) -> dict[str, int]:
        return dict(self.values)

    def engine_params(self) -> dict[str, int]:
        """Every parameter under the engine's name, as the adapter passes them on."""
        names = {p.name: p.engine_name for p in variant_info(self.base_id).params}
        return {names[k]: v for k, v in self.values}

    @property
    def max_steps(self) -> int:
        return variant_info(self.base_id).max_steps(self.params)


def _adapter_bound(module: str, task: str | None = None) -> Callable[[Mapping[str, int]], int]:
    """The bound an adapter keeps as its `MAX_STEPS` (a dict per task, or one int; the same for
    every setting), read on demand so the registry does not import the adapter."""

    def bound(params: Mapping[str, int]) -> int:
        steps = import_module(f"ipr_core.envs.{module}").MAX_STEPS
        return steps if task is None else steps[task]

    return bound


def _ceil5(steps: float) -> int:
    return 5 * math.ceil(steps / 5)


def _flag(name: str, engine_name: str, default: int, help: str) -> Param:
    return Param(name, engine_name, default, 0, 1, help)


_DOORS = _flag("doors", "includeDoors", 0, "1 puts doors to open between rooms")
_INVENTORY = _flag("inventory_limit", "limitInventorySize", 0, "1 limits what the agent can carry")
_TWX_SPLITS = (1000, 1000, 1000)
"""TWX's seed sets, the same for every game and setting."""

# Defaults are this project's settings (short episodes for a small model: few rooms, no doors,
# no inventory limit); ranges are what the engine's `load` accepts (checked by a test). Step
# bounds equal the bound tuned at the default and grow with the game (TWX's gold agents walk
# at random, hence the room terms); every gold path of all 3000 seeds fits within them at the
# ends of the ranges (`scripts/twx_gold_lengths.py`; longest path / bound): twc 1 room 1 item
# 4/10, 3 rooms 4 items doors and inventory limit 37/50; coin 11 rooms 10 distractors doors
# and inventory limit 36/71; cookingworld 1 room 1 ingredient 13/20, 11 rooms 5 ingredients
# 10 distractors doors and inventory limit 163/180.
_TWX: dict[str, VariantInfo] = {
    # Gold path length 10-24, median 17 at the default.
    "cookingworld": VariantInfo(
        params=(
            Param("locations", "numLocations", 3, 1, 11, "rooms"),
            Param("ingredients", "numIngredients", 2, 1, 5, "ingredients in the recipe"),
            Param("distractors", "numDistractorItems", 3, 0, 10, "ingredients not in it"),
            _DOORS,
            _INVENTORY,
        ),
        max_steps=lambda p: max(20, _ceil5(12 + 3 * p["locations"] * p["ingredients"])),
        split_sizes=_TWX_SPLITS,
    ),
    # Gold path length 2-27, median 5 at the default: the TWX gold agent walks at random until
    # it sees the coin, and is not seeded (TWX bug), so the same task gets a different gold
    # path each reset. With 3 rooms a random walk over valid actions succeeded 87% of the time.
    "coin": VariantInfo(
        params=(
            Param("locations", "numLocations", 5, 1, 11, "rooms"),
            Param("distractors", "numDistractorItems", 3, 0, 10, "items that are not the coin"),
            _DOORS,
            _INVENTORY,
        ),
        max_steps=lambda p: 5 + 6 * p["locations"],
        split_sizes=_TWX_SPLITS,
    ),
    # Gold path length 6-10 at the default; 3-4 with 1 room and 1 item, 5-7 with 1 room and 2.
    "twc": VariantInfo(
        params=(
            Param("locations", "numLocations", 2, 1, 3, "rooms"),
            Param("items", "numItemsToPutAway", 2, 1, 4, "items to put away"),
            _DOORS,
            _INVENTORY,
        ),
        max_steps=lambda p: max(10, 5 * p["items"] + {1: 0, 2: 10, 3: 30}[p["locations"]]),
        split_sizes=_TWX_SPLITS,
        # With 1 room and 4 items the engine fails to generate 137 of the 3000 seeds.
        rules=(Rule(lambda p: p["items"] < 4 or p["locations"] > 1, "items=4 needs locations>1"),),
    ),
    # No parameters yet: the engine accepts 1-50 rooms and distances 1-8 but fails to generate
    # many games (every seed with 1, 49 or 50 rooms; 54 of 60 with 2 rooms at distance 8).
    # Gold path length 7-9.
    "mapreader": VariantInfo(max_steps=lambda p: 20, split_sizes=_TWX_SPLITS),
    # Gold path length 5.
    "arithmetic": VariantInfo(max_steps=lambda p: 15, split_sizes=_TWX_SPLITS),
    # Gold path length 6-10.
    "sorting": VariantInfo(max_steps=lambda p: 20, split_sizes=_TWX_SPLITS),
    # Gold path length = length (checked at 1, 20, 100 and 1000, with and without memorization).
    "simonsays": VariantInfo(
        params=(
            Param("length", "gameLength", 5, 1, 1000, "commands to repeat in order"),
            Param("distractors", "numDistractors", 3, 0, 5, "commands Simon does not say"),
            _flag("memorization", "memorization", 0, "1 shows every command at the start only"),
            _flag("verbose", "verbose", 0, "1 confirms each right command (with memorization)"),
        ),
        max_steps=lambda p: p["length"] + 10,
        split_sizes=_TWX_SPLITS,
    ),
    # Gold path length 9.
    "peckingorder": VariantInfo(max_steps=lambda p: 20, split_sizes=_TWX_SPLITS),
}


def _make_twx(spec: EnvSpec) -> Env:
    from ipr_core.envs.textworld_express import TextWorldExpressEnv

    return TextWorldExpressEnv(spec.variant, spec.params)


# The ScienceWorld tasks (the package's tasks.json; a test checks them against the engine) and
# their variations in train / dev / test.
_SCIENCEWORLD_SPLITS: dict[str, tuple[int, int, int]] = {
    "boil": (14, 7, 9),
    "melt": (14, 7, 9),
    "freeze": (14, 7, 9),
    "change-the-state-of-matter-of": (14, 7, 9),
    "use-thermometer": (270, 135, 135),
    "measure-melting-point-known-substance": (218, 109, 109),
    "measure-melting-point-unknown-substance": (150, 75, 75),
    "power-component": (10, 5, 5),
    "power-component-renewable-vs-nonrenewable-energy": (10, 5, 5),
    "test-conductivity": (450, 225, 225),
    "test-conductivity-of-unknown-substances": (300, 150, 150),
    "find-living-thing": (150, 75, 75),
    "find-non-living-thing": (150, 75, 75),
    "find-plant": (150, 75, 75),
    "find-animal": (150, 75, 75),
    "grow-plant": (62, 31, 33),
    "grow-fruit": (62, 31, 33),
    "chemistry-mix": (16, 8, 8),
    "chemistry-mix-paint-secondary-color": (18, 9, 9),
    "chemistry-mix-paint-tertiary-color": (18, 9, 9),
    "lifespan-longest-lived": (62, 31, 32),
    "lifespan-shortest-lived": (62, 31, 32),
    "lifespan-longest-lived-then-shortest-lived": (62, 31, 32),
    "identify-life-stages-1": (6, 3, 5),
    "identify-life-stages-2": (4, 2, 4),
    "inclined-plane-determine-angle": (84, 42, 42),
    "inclined-plane-friction-named-surfaces": (692, 346, 348),
    "inclined-plane-friction-unnamed-surfaces": (80, 40, 42),
    "mendelian-genetics-known-plant": (60, 30, 30),
    "mendelian-genetics-unknown-plant": (240, 120, 120),
}


def scienceworld_is_electrical(task: str) -> bool:
    """The package's own rule for the tasks whose 'easy' setting keeps electrical actions."""
    return "power-component" in task or "conductivity" in task


def _scienceworld_params(task: str) -> tuple[Param, ...]:
    """The engine's simplifications as 0/1 flags, defaults giving ETO's "easy" (which leaves
    the electrical actions to the tasks that need them: no `no_electrical` flag there)."""
    flags = (
        _flag("teleport", "teleportAction", 1, "1 adds 'teleport to LOC'"),
        _flag("open_doors", "openDoors", 1, "1 opens every door from the start"),
        _flag("open_containers", "openContainers", 0, "1 opens every container from the start"),
        _flag("self_watering", "selfWateringFlowerPots", 1, "1 keeps flower pots watered"),
    )
    if scienceworld_is_electrical(task):
        return flags
    return (*flags, _flag("no_electrical", "noElectricalAction", 1, "1 drops 'connect X to Y'"))


def _make_scienceworld(spec: EnvSpec) -> Env:
    from ipr_core.envs.science_world import ScienceWorldEnv

    return ScienceWorldEnv(spec.variant, spec.params)


def _make_webshop(spec: EnvSpec) -> Env:
    from ipr_core.envs.webshop import make_webshop_env

    return make_webshop_env()


def _make_intercode_sql(spec: EnvSpec) -> Env:
    from ipr_core.envs.intercode_sql import InterCodeSqlEnv

    return InterCodeSqlEnv()


def _make_alfworld(spec: EnvSpec) -> Env:
    from ipr_core.envs.alfworld import AlfWorldEnv
    from ipr_core.envs.alfworld_games import USER_ALFWORLD_DATA

    return AlfWorldEnv(data_dir=Path(USER_ALFWORLD_DATA) if USER_ALFWORLD_DATA else None)


_FAMILIES: dict[str, tuple[Callable[[EnvSpec], Env], dict[str, VariantInfo]]] = {
    "twx": (_make_twx, _TWX),
    "scienceworld": (
        _make_scienceworld,
        {
            task: VariantInfo(
                max_steps=_adapter_bound("science_world", task),
                params=_scienceworld_params(task),
                split_sizes=sizes,
            )
            for task, sizes in _SCIENCEWORLD_SPLITS.items()
        },
    ),
    "webshop": (_make_webshop, {"": VariantInfo(max_steps=_adapter_bound("webshop"))}),
    "intercode-sql": (
        _make_intercode_sql,
        {"": VariantInfo(max_steps=_adapter_bound("intercode_sql"))},
    ),
    "alfworld": (_make_alfworld, {"": VariantInfo(max_steps=_adapter_bound("alfworld"))}),
}


def known_env_ids() -> list[str]:
    """Every env id without parameters, in registry order."""
    return [
        f"{family}/{v}" if v else family
        for family, (_, variants) in _FAMILIES.items()
        for v in variants
    ]


def variant_info(base_id: str) -> VariantInfo:
    """The registry entry of an env id without parameters."""
    family, _, variant = base_id.partition("/")
    if base_id not in known_env_ids():
        raise UnknownEnvError(
            f"unknown env id {base_id!r}; known env ids: {', '.join(known_env_ids())}"
        )
    return _FAMILIES[family][1][variant]


def parse_env_id(env_id: str) -> EnvSpec:
    """Read an env id; an unknown id, parameter or value raises UnknownEnvError (or its
    subclass EnvParamError) naming it and what is allowed."""
    base_id, has_query, query = env_id.partition("?")
    info = variant_info(base_id)
    given: dict[str, str] = {}
    for item in query.split("&") if has_query else []:
        name, has_value, value = item.partition("=")
        if not has_value or name in given:
            raise EnvParamError(
                f"{env_id!r}: expected parameters as name=value, each once, joined by '&'"
            )
        given[name] = value
    return _spec(env_id, base_id, info, given)


def _spec(env_id: str, base_id: str, info: VariantInfo, given: Mapping[str, str]) -> EnvSpec:
    declared = {p.name: p for p in info.params}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        allowed = ", ".join(declared) if declared else "none"
        raise EnvParamError(
            f"{env_id!r}: unknown parameter {unknown[0]!r} of {base_id}; its parameters: {allowed}"
        )
    values = []
    for p in info.params:
        text = given.get(p.name, str(p.default))
        value = int(text) if re.fullmatch(r"-?[0-9]+", text) else None
        if value is None or not p.low <= value <= p.high:
            problem = "is out of range" if value is not None else "is not an integer"
            raise EnvParamError(
                f"{env_id!r}: {p.name}={text} {problem}; {p.name} ({p.help}) "
                f"is an integer from {p.low} to {p.high}, default {p.default}"
            )
        values.append((p.name, value))
    broken = [rule.text for rule in info.rules if not rule.holds(dict(values))]
    if broken:
        raise EnvParamError(f"{env_id!r}: {broken[0]}")
    family, _, variant = base_id.partition("/")
    return EnvSpec(family, variant, tuple(values))


def env_spec(base_id: str, params: Mapping[str, int] | None = None) -> EnvSpec:
    """The spec of `base_id` with `params` (by short name), validated as `parse_env_id` does."""
    given = {k: str(v) for k, v in (params or {}).items()}
    query = "&".join(f"{k}={v}" for k, v in given.items())
    shown = f"{base_id}?{query}" if query else base_id
    return _spec(shown, base_id, variant_info(base_id), given)


def canonical_env_id(env_id: str) -> str:
    """The one spelling of `env_id` that is stored and compared."""
    return parse_env_id(env_id).env_id


def make_env(env_id: str) -> Env:
    """A fresh adapter instance for `env_id`; the caller closes it."""
    spec = parse_env_id(env_id)
    factory, _ = _FAMILIES[spec.family]
    return factory(spec)


SPLIT_NAMES = ("train", "dev", "test")


def describe_games(env_ids: Sequence[str]) -> str:
    """`ipr envs ID...`: the distinct games of each split of each setting (starts its env)."""
    lines = ["env id: distinct games in train / dev / test"]
    for env_id in env_ids:
        env = make_env(env_id)
        try:
            counts = [len(env.task_ids(split)) for split in SPLIT_NAMES]
        finally:
            env.close()
        lines.append(f"{canonical_env_id(env_id)}: {' / '.join(map(str, counts))}")
    return "\n".join(lines)


def describe_envs() -> str:
    """`ipr envs`: every env id with its step bound and split sizes, then its parameters."""
    width = max(map(len, known_env_ids())) + 2
    lines = [f"{'env id':<{width}}{'max steps':<13}train/dev/test"]
    for base_id in known_env_ids():
        info = variant_info(base_id)
        spec = parse_env_id(base_id)
        settings = [
            dict(zip([p.name for p in info.params], values, strict=True))
            for values in product(*(range(p.low, p.high + 1) for p in info.params))
        ]
        bounds = [
            info.max_steps(setting)
            for setting in settings
            if all(rule.holds(setting) for rule in info.rules)
        ]
        steps = str(spec.max_steps)
        if min(bounds) != max(bounds):
            steps += f" ({min(bounds)}-{max(bounds)})"
        sizes = "/".join(map(str, info.split_sizes)) if info.split_sizes else "from the data"
        lines.append(f"{base_id:<{width}}{steps:<13}{sizes}")
        lines += [
            f"    {p.name}={p.low}..{p.high} (default {p.default}; {p.engine_name}): {p.help}"
            for p in info.params
        ]
        lines += [f"    {rule.text}" for rule in info.rules]
    lines.append(
        "Parameters go after '?', joined by '&', e.g. 'twx/twc?locations=1&items=2'; "
        "max steps is the bound at the defaults (over the parameter ranges in brackets); "
        "train/dev/test counts the engine's seeds: `ipr envs ID...` counts a setting's "
        "distinct games, what its splits hold."
    )
    return "\n".join(lines)
