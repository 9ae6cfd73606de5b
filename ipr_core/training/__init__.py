"""Training on TRL and PEFT: SFT on expert trajectories, then the IPR mixture on pairs.

Heavy imports (torch, TRL) load only when a trainer is used.
"""

from ipr_core.training.config import (
    LoraConfig,
    MixtureConfig,
    MixtureWeights,
    SFTConfig,
)

__all__ = ["LoraConfig", "MixtureConfig", "MixtureWeights", "SFTConfig"]
