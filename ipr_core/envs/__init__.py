"""Environment registry: env ids are `family/variant`, e.g. `twx/cookingworld`, or just
`family` for a family with a single environment (its one variant is ""), e.g. `intercode-sql`
or `alfworld`.

Families register a factory taking the variant; adapter modules are imported only when an env
of their family is made, so importing the registry stays cheap (no JVM, no py4j).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ipr_core.envs.base import Env, EnvCrashed, EnvTask, StepResult
from ipr_core.errors import UnknownEnvError

__all__ = ["Env", "EnvCrashed", "EnvTask", "StepResult", "known_env_ids", "make_env"]

# The TWX game names, kept here so listing env ids does not import the adapter.
_TWX_GAMES = (
    "cookingworld",
    "coin",
    "twc",
    "mapreader",
    "arithmetic",
    "sorting",
    "simonsays",
    "peckingorder",
)


def _make_twx(variant: str) -> Env:
    from ipr_core.envs.textworld_express import TextWorldExpressEnv

    return TextWorldExpressEnv(variant)


# The ScienceWorld task names (the package's tasks.json; a test checks them against the engine).
_SCIENCEWORLD_TASKS = (
    "boil",
    "melt",
    "freeze",
    "change-the-state-of-matter-of",
    "use-thermometer",
    "measure-melting-point-known-substance",
    "measure-melting-point-unknown-substance",
    "power-component",
    "power-component-renewable-vs-nonrenewable-energy",
    "test-conductivity",
    "test-conductivity-of-unknown-substances",
    "find-living-thing",
    "find-non-living-thing",
    "find-plant",
    "find-animal",
    "grow-plant",
    "grow-fruit",
    "chemistry-mix",
    "chemistry-mix-paint-secondary-color",
    "chemistry-mix-paint-tertiary-color",
    "lifespan-longest-lived",
    "lifespan-shortest-lived",
    "lifespan-longest-lived-then-shortest-lived",
    "identify-life-stages-1",
    "identify-life-stages-2",
    "inclined-plane-determine-angle",
    "inclined-plane-friction-named-surfaces",
    "inclined-plane-friction-unnamed-surfaces",
    "mendelian-genetics-known-plant",
    "mendelian-genetics-unknown-plant",
)


def _make_scienceworld(variant: str) -> Env:
    from ipr_core.envs.science_world import ScienceWorldEnv

    return ScienceWorldEnv(variant)


def _make_webshop(variant: str) -> Env:
    from ipr_core.envs.webshop import make_webshop_env

    return make_webshop_env()


def _make_intercode_sql(variant: str) -> Env:
    from ipr_core.envs.intercode_sql import InterCodeSqlEnv

    return InterCodeSqlEnv()


def _make_alfworld(variant: str) -> Env:
    from ipr_core.envs.alfworld import AlfWorldEnv
    from ipr_core.envs.alfworld_games import USER_ALFWORLD_DATA

    return AlfWorldEnv(data_dir=Path(USER_ALFWORLD_DATA) if USER_ALFWORLD_DATA else None)


_FAMILIES: dict[str, tuple[Callable[[str], Env], tuple[str, ...]]] = {
    "twx": (_make_twx, _TWX_GAMES),
    "scienceworld": (_make_scienceworld, _SCIENCEWORLD_TASKS),
    "webshop": (_make_webshop, ("",)),
    "intercode-sql": (_make_intercode_sql, ("",)),
    "alfworld": (_make_alfworld, ("",)),
}


def known_env_ids() -> list[str]:
    return [
        f"{family}/{v}" if v else family
        for family, (_, variants) in _FAMILIES.items()
        for v in variants
    ]


def make_env(env_id: str) -> Env:
    """A fresh adapter instance for `env_id`; the caller closes it."""
    family, _, variant = env_id.partition("/")
    if env_id not in known_env_ids():
        raise UnknownEnvError(
            f"unknown env id {env_id!r}; known env ids: {', '.join(known_env_ids())}"
        )
    factory, _ = _FAMILIES[family]
    return factory(variant)
