"""The one place this project reaches past TRL's public API, and why each reach is needed.

Everything else uses TRL's public names only (`tests/test_trl_adapter.py` walks the code
for private ones). What is here fits the TRL releases of `TRL_VERSIONS`, the range
pyproject.toml requires; the same test checks that the installed TRL still has each
private name with the signature used here, so an upgrade that moves one fails a test
instead of training differently.

1. `PretokenizedDPOTrainer` skips `DPOTrainer._prepare_dataset`. TRL tokenises a
   (prompt, chosen, rejected) example itself and scores every completion token; a pair
   here is a multi-turn conversation whose completion holds observations, which must not
   be scored, so `training.data` tokenises it with assistant masks and TRL must take the
   rows as they are (DPOConfig has no switch for that; SFTConfig's is public).
2. `project_only_scored_positions` sets `trl.trainer.utils._use_triton`, the switch of
   TRL's fused LM head between projecting only the scored positions and all of them.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer
from trl.trainer import utils as trl_utils

TRL_VERSIONS = ">=1.16,<2"
"""The TRL releases this adapter fits: pyproject.toml's requirement (tested to be equal)."""

PRIVATE_USES = {
    "trl.DPOTrainer._prepare_dataset": (
        "self",
        "dataset",
        "processing_class",
        "args",
        "dataset_name",
    ),
    "trl.trainer.utils._use_triton": ("device",),
}
"""Each private name used here and the parameters it is used with (tested against TRL)."""


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on rows already tokenised by `training.data` (see 1. above)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def project_only_scored_positions() -> None:
    """Make TRL's fused LM head project only the positions the loss scores, on every device.

    TRL does so on Triton devices; elsewhere it projects every position, so that compilers
    such as Neuron's see fixed shapes. On CPU that is all the work of the head (49k x 576
    here) for tokens the loss masks out: 76% of an SFT conversation's tokens and 86% of a
    pair's are prompt and observations. Measured in full SFT on 2 cores: 152 -> 215
    tokens/s (docs/benchmarks.md). TRL's kernels read their own copy of the name, so they
    still pick Triton only where it runs."""
    trl_utils._use_triton = _project_compact


def _project_compact(device: torch.device) -> bool:
    return True
