"""What stage fingerprints read of a run's config, defined once: the loop's stages and the
scale-out shards (whose files carry the fingerprint of the job that wrote them) read the
same fields, so a shard is reused exactly when the stage it serves would be."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

ROLLOUT_FIELDS = ("env", "backend", "max_steps", "step_timeout_s", "generation", "prompt")
"""What every rollout reads; `prompt` (the history window) shapes each prompt it generates."""
SCORING_FIELDS = (*ROLLOUT_FIELDS, "monte_carlo")
"""What Monte Carlo step scoring reads: its rollouts and how many, how hot."""
FINGERPRINT_CHARS = 32
"""A fingerprint's length in hex digits (`ipr_core.digest`), as stored records have it."""

ADDED_AFTER_STORES: dict[str, Any] = {
    "generation": {
        "prefill_dtype": "float32",
        "decode_dtype": "float32",
        "decode_attention": "sdpa",
    },
    "monte_carlo": {"early_stop": False, "expert_steps": "all"},
    "cut_explorations": False,
}
"""Run settings added after stores were written (by section), with the value that means
what those stores did: hashed only when set to something else, so a stored stage stays
done after an upgrade and a run that changes the setting redoes it; a recorded experiment
missing one ran with that value (`ipr_core.run.experiment.register`)."""


def fingerprinted(config: BaseModel, fields: set[str]) -> dict[str, Any]:
    """`config`'s named fields, JSON-ready, without the later settings left at their
    old meaning (`ADDED_AFTER_STORES`)."""
    data = config.model_dump(mode="json", include=fields)
    _drop_old(data, ADDED_AFTER_STORES)
    return data


def _drop_old(data: dict[str, Any], olds: dict[str, Any]) -> None:
    for key, old in olds.items():
        if isinstance(old, dict) and isinstance(data.get(key), dict):
            _drop_old(data[key], old)
        elif not isinstance(old, dict) and key in data and data[key] == old:
            del data[key]
