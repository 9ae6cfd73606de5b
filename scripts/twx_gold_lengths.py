"""Gold path lengths (actions to success) and distinct games of TWX settings:
`python scripts/twx_gold_lengths.py 'twx/twc?locations=1&items=1' ...`.

Per setting: distinct games per split (`distinct_seeds`: the split's task ids), then over
those games the gold path's range, median and mean against the registry's step bound, and
how many gold paths fail or overrun it. Seeds the engine fails to generate are counted as
crashed (twc with 1 room and 4 items)."""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

from py4j.protocol import Py4JError

from ipr_core.envs import parse_env_id
from ipr_core.envs.textworld_express import (
    _JVM,
    SPLITS,
    VARIANTS,
    _ints,
    _params_str,
    distinct_seeds,
)


def measure(server: Any, env_id: str) -> str:
    spec = parse_env_id(env_id)
    variant = VARIANTS[spec.variant]
    engine_params = {**variant.fixed_params, **spec.engine_params()}
    server.load(variant.game, _params_str(engine_params))
    seeds = {split: _ints(getattr(server, f"getSeeds{split.title()}")()) for split in SPLITS}
    games = distinct_seeds(lambda: server, variant, engine_params, seeds)
    lengths, failed, crashed = [], 0, 0
    for split in SPLITS:
        for seed in games[split]:
            try:
                server.generateNewGameJSON(seed, split, True)
            except Py4JError:
                crashed += 1
                continue
            steps, success = 0, False
            for action in server.getGoldActionSequence():
                steps += 1
                if json.loads(server.stepJSON(action))["tasksuccess"]:
                    success = True
                    break
            lengths.append(steps)
            failed += not success
    lengths.sort()
    over = sum(n > spec.max_steps for n in lengths)
    distinct = "/".join(str(len(games[split])) for split in SPLITS)
    return (
        f"{spec.env_id}: distinct games {distinct} (train/dev/test); gold {lengths[0]}-"
        f"{lengths[-1]} (median {lengths[len(lengths) // 2]}, mean "
        f"{statistics.fmean(lengths):.1f}), bound {spec.max_steps}, over the bound {over}, "
        f"failed {failed}, crashed {crashed}"
    )


def main(env_ids: list[str]) -> None:
    gateway = _JVM.acquire()
    try:
        server = gateway.jvm.textworldexpress.runtime.PythonInterface()
        for env_id in env_ids:
            print(measure(server, env_id), flush=True)
    finally:
        _JVM.release(gateway)


if __name__ == "__main__":
    main(sys.argv[1:])
