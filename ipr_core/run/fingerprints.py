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

ADDED_AFTER_STORES: dict[str, dict[str, Any]] = {
    "generation": {
        "prefill_dtype": "float32",
        "decode_dtype": "float32",
        "decode_attention": "sdpa",
    },
    "monte_carlo": {"early_stop": False, "expert_steps": "all"},
}
"""Settings added after stores were written, with the value that means what those stores
did: hashed only when set to something else, so a stored stage stays done after an
upgrade and a run that changes the setting redoes it."""


def fingerprinted(config: BaseModel, fields: set[str]) -> dict[str, Any]:
    """`config`'s named fields, JSON-ready, without the later settings left at their
    old meaning (`ADDED_AFTER_STORES`)."""
    data = config.model_dump(mode="json", include=fields)
    for section, olds in ADDED_AFTER_STORES.items():
        part = data.get(section)
        if isinstance(part, dict):
            for key, old in olds.items():
                if part.get(key) == old:
                    del part[key]
    return data
