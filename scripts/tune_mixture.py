"""Tune the mixture trainer on dev, on the pairs an experiment already mined.

Exploration and Monte Carlo scoring cost far more than training here, so every variant
trains on the SAME iteration-1 pairs of one finished experiment run and is scored on the
dev split only (never test). Each variant is a run `<experiment>-tune-<name>` in the
experiment's store, so its dev evaluation is queryable like any other:

    python scripts/tune_mixture.py --config configs/tune-twc.yaml \
        --pairs-from tune-a-ipr-s0 --variant lr3e-4='{"lr": 3e-4}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ipr_core.backends import release_engines
from flows.experiment import load_experiment_config, prepare
from ipr_core.run import evaluate_model
from ipr_core.store import Store
from ipr_core.training.checkpoints import record_checkpoint
from ipr_core.training.config import MixtureSettings
from ipr_core.training.data import load_pairs
from ipr_core.training.mixture import train_mixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="experiment config")
    parser.add_argument("--pairs-from", required=True, help="run id whose iteration-1 pairs to use")
    parser.add_argument(
        "--variant", action="append", required=True, help="NAME=JSON mixture overrides"
    )
    args = parser.parse_args()
    config = load_experiment_config(args.config)
    store = Store(config.run.store)
    shared = prepare(store, config, print)
    pairs = load_pairs(store, args.pairs_from, 1)
    for variant in args.variant:
        name, _, overrides = variant.partition("=")
        base = config.run.mixture.model_dump()
        settings = MixtureSettings.model_validate(deep_update(base, json.loads(overrides)))
        run = config.run_config("ipr", 0).model_copy(
            update={"run_id": f"{config.experiment_id}-tune-{name}", "mixture": settings}
        )
        store.write({"runs": [{"run_id": run.run_id, "config": run.model_dump_json()}]})
        release_engines()
        trained = train_mixture(
            shared.sft_path, pairs, settings, run.checkpoints_dir, compute=run.compute
        )
        record_checkpoint(store, trained, run.run_id, 1)
        print(f"[{name}] {trained.summary()}")
        evaluate_model(store, run, trained.path, 1, lambda m, n=name: print(f"[{n}] {m}"))


def deep_update(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        base[key] = deep_update(base[key], value) if isinstance(value, dict) else value
    return base


if __name__ == "__main__":
    main()
