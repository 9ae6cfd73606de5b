"""What stage fingerprints read of a run's config, defined once: the loop's stages and the
scale-out shards (whose files carry the fingerprint of the job that wrote them) read the
same fields, so a shard is reused exactly when the stage it serves would be."""

from __future__ import annotations

ROLLOUT_FIELDS = ("env", "backend", "max_steps", "step_timeout_s", "generation", "prompt")
"""What every rollout reads; `prompt` (the history window) shapes each prompt it generates."""
SCORING_FIELDS = (*ROLLOUT_FIELDS, "monte_carlo")
"""What Monte Carlo step scoring reads: its rollouts and how many, how hot."""
FINGERPRINT_CHARS = 32
"""A fingerprint's length in hex digits (`ipr_core.digest`), as stored records have it."""
