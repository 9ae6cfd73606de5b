"""The methods a run trains with, defined once: each method's loss and what its iterations
need. Config validation, the loop's stage list, `ipr estimate`, the experiment and the report
all derive from this registry; no other module spells a method's name.

- `sft`: stage 1 only (the SFT model of the run's seed).
- mixture methods (`eto`, `ipr` and its ablations, `custom`): per iteration, explore, mine
  pairs and train L = w_o L_o-DPO + w_s L_s-DPO + w_sft L_SFT from the previous policy with
  the SFT model as reference. Monte Carlo step rewards are computed only where a term reads
  step pairs (s-DPO, or the SFT term on their chosen sides); ETO's trajectory pairs compare
  outcomes of episodes explored from the start.
- `rft` (rejection-sampling fine-tuning): per iteration, explore from the start of each task
  and train the SFT objective, from the previous policy, on the expert trajectories plus the
  iteration's successful explorations: no Monte Carlo, no pairs. It sees as many rollouts as
  ETO, so "it saw more rollouts" cannot explain a gain of IPR over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ipr_core.training.config import MixtureConfig, MixtureWeights

Training = Literal["none", "mixture", "rft"]


@dataclass(frozen=True)
class Needs:
    """The stages an iteration of a method runs beyond training and evaluation."""

    exploration: bool
    monte_carlo: bool
    """Expert and agent step rewards (and step-level exploration from every prefix)."""
    pairs: bool
    successful_explorations: bool


@dataclass(frozen=True)
class Method:
    name: str
    training: Training
    weights: MixtureWeights | None = None
    """The mixture's weights; None for a mixture method: the config's own (`custom`)."""
    ablates: str | None = None
    """The term of IPR's loss this ablation removes, as the report names it."""
    in_experiments: bool = True
    """Whether an experiment may list it (`custom` has no fixed loss to compare)."""

    @property
    def reads_config_weights(self) -> bool:
        """Whether its loss is the config's `mixture.weights` (`custom`): every other method
        fixes its own, or trains no mixture."""
        return self.training == "mixture" and self.weights is None

    @property
    def trains(self) -> bool:
        """Whether iterations follow SFT (and so the best iteration is picked on dev)."""
        return self.training != "none"

    def needs(self, weights: MixtureWeights | None) -> Needs:
        """What an iteration needs, given the mixture's effective weights."""
        if self.training == "none":
            return Needs(False, False, False, False)
        if self.training == "rft":
            return Needs(True, False, False, True)
        if weights is None:
            raise ValueError(f"method {self.name!r} trains a mixture: its weights are needed")
        return Needs(True, weights.uses_step_pairs, True, False)


SFT = Method("sft", "none")
ETO = Method("eto", "mixture", MixtureWeights(step_dpo=0.0, sft=0.0))
IPR = Method("ipr", "mixture", MixtureWeights())
IPR_NO_ODPO = Method("ipr-no-odpo", "mixture", MixtureWeights(trajectory_dpo=0.0), "o-DPO")
IPR_NO_SDPO = Method("ipr-no-sdpo", "mixture", MixtureWeights(step_dpo=0.0), "s-DPO")
IPR_NO_SFT = Method("ipr-no-sft", "mixture", MixtureWeights(sft=0.0), "the SFT term")
RFT = Method("rft", "rft")
CUSTOM = Method("custom", "mixture", in_experiments=False)

REGISTRY: dict[str, Method] = {
    m.name: m for m in (SFT, ETO, IPR, IPR_NO_ODPO, IPR_NO_SDPO, IPR_NO_SFT, RFT, CUSTOM)
}
"""Every method, in the report's order: the paper's rows (SFT, ETO, IPR), its ablations,
then the baselines it lacks."""

EXPERIMENT_METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.in_experiments)

COMPARISONS: tuple[tuple[Method, Method], ...] = (
    (IPR, SFT),
    (IPR, ETO),
    (IPR, IPR_NO_SDPO),
    (IPR, RFT),
    (ETO, SFT),
    (IPR, IPR_NO_ODPO),
    (IPR, IPR_NO_SFT),
)
"""Paired comparisons (A, B) reported as A - B: IPR against every baseline (IPR minus
ipr-no-sdpo isolates the step term: same SFT term), then ETO against SFT and the other
ablations."""


def method(name: str) -> Method:
    """The registry's method `name`; an unknown name names the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def mixture_preset(name: str, **overrides: object) -> MixtureConfig | None:
    """Mixture config with method `name`'s weights (None for a method that trains no
    mixture); `overrides` set the other fields."""
    found = method(name)
    if found.training != "mixture" or found.weights is None:
        return None
    return MixtureConfig(weights=found.weights, **overrides)
