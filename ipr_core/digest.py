"""The one content hash: sha256 of a value as sorted-key JSON, cut to `length` hex digits.

Fingerprints, checkpoint ids, data hashes and manifests all name content with it; their
lengths (16, 32 or 64) are those the stored ids were made with, so stored ids still match.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest(value: Any, length: int = 64) -> str:
    """A hash of `value`'s JSON (`str` for what JSON cannot hold, such as paths)."""
    payload = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
