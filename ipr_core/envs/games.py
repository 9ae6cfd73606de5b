"""Distinct games: a split holds each game once and no game is in two splits.

Engines number their games by seed (TextWorldExpress) or variation (ScienceWorld), and two
numbers can make the same game (twc with one room and two items: 1000 test seeds, 473 games;
ScienceWorld's find-animal: 300 variations, 270 distinct first rooms). A split's task ids are
therefore its distinct games: the first number of each game, in the engine's order, and no
game of an earlier split (train, dev, test) in a later one. What a game is, the adapter says
with a content key (what the engine generates for the number, never the number itself).

Keys cost a generation per number (~10 s per TWX setting, up to minutes for a large
ScienceWorld task), so the distinct numbers are cached on disk under `IPR_GAMES_CACHE`
(default ~/.cache/ipr/games), keyed by the adapter's description of the setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

SPLIT_ORDER = ("train", "dev", "test")
"""A game of an earlier split is left out of the later ones."""
KEY_VERSION = 1
"""Bump when an adapter's key changes: the cache is keyed by it."""

_DISTINCT: dict[str, dict[str, list[int]]] = {}
"""This process's distinct numbers by setting (the disk cache read once)."""


def games_cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ipr" / "games"
    return Path(os.environ.get("IPR_GAMES_CACHE", default))


def content_key(*parts: Any) -> str:
    """The hash that names a game's content."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def distinct_numbers(
    setting: Sequence[Any],
    numbers: Mapping[str, Sequence[int]],
    key: Callable[[str, int], str | None],
) -> dict[str, list[int]]:
    """Per split, the first number of each game (`key(split, number)`; None: the engine
    cannot generate it, left out) not made by an earlier number or split. `setting`
    (JSON-able) names what the engine was set up with; `key` runs only on a cache miss."""
    name = content_key(*setting, KEY_VERSION)[:32]
    cached = _DISTINCT.get(name)
    path = games_cache_dir() / f"{name}.json"
    if cached is None and path.exists():
        cached = json.loads(path.read_text(encoding="utf-8"))["numbers"]
    if cached is None:
        seen: set[str] = set()
        cached = {}
        for split in SPLIT_ORDER:
            cached[split] = []
            for number in numbers[split]:
                game = key(split, number)
                if game is not None and game not in seen:
                    seen.add(game)
                    cached[split].append(number)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        record = {"setting": list(setting), "numbers": cached}
        scratch.write_text(json.dumps(record), encoding="utf-8")
        scratch.replace(path)  # atomic: a concurrent reader sees the whole file or none
    _DISTINCT[name] = cached
    return cached
