"""IPR core: the method as a plain library (no Prefect imports here)."""

import os

# OpenMP threads that wait at a barrier sleep instead of spinning. When other processes
# share the cores (tests, a second run, a Prefect server), a spinning thread holds the
# core its descheduled partner needs: a SmolLM2 decode step of 32 rows took 5.7 s with 2
# spinning threads beside another job and 0.51 s with passive waiting (docs/benchmarks.md,
# "Measured on this machine").
# The price on a machine a run has to itself: `configs/bench.yaml`'s engine took 67-68 s
# with PASSIVE against 52 s with spinning (2026-12-07, same code, back to back), and two
# runs side by side took 97-98 s each with PASSIVE against 406-409 s spinning. So PASSIVE
# stays the default, and a run that owns its cores sets OMP_WAIT_POLICY=ACTIVE itself.
# Read when torch loads its OpenMP runtime, so it is set before anything imports torch;
# an explicit OMP_WAIT_POLICY in the environment wins.
OMP_WAIT_FROM_ENVIRONMENT = "OMP_WAIT_POLICY" in os.environ
"""Whether the environment chose the wait policy (else it is this default)."""
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
