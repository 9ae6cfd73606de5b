"""Environment registry: env ids are `family/variant`, e.g. `twx/cookingworld`, or just
`family` for a family with a single environment (its one variant is ""), e.g. `intercode-sql`.

Families register a factory taking the variant; adapter modules are imported only when an env
of their family is made, so importing the registry stays cheap (no JVM, no py4j).
"""

from __future__ import annotations

from collections.abc import Callable

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


def _make_intercode_sql(variant: str) -> Env:
    from ipr_core.envs.intercode_sql import InterCodeSqlEnv

    return InterCodeSqlEnv()


_FAMILIES: dict[str, tuple[Callable[[str], Env], tuple[str, ...]]] = {
    "twx": (_make_twx, _TWX_GAMES),
    "intercode-sql": (_make_intercode_sql, ("",)),
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
