"""Gold path lengths (actions to success) over all 3000 seeds of TWX settings, against the
registry's step bound: `python scripts/twx_gold_lengths.py 'twx/twc?locations=1&items=1' ...`.

Seeds the engine fails to generate are counted as crashed (twc with 1 room and 4 items)."""

from __future__ import annotations

import json
import sys
from typing import Any

from py4j.protocol import Py4JError

from ipr_core.envs import parse_env_id
from ipr_core.envs.textworld_express import _JVM, SPLITS, _params_str


def measure(server: Any, env_id: str) -> str:
    spec = parse_env_id(env_id)
    server.load(spec.variant, _params_str(spec.engine_params()))
    lengths, failed, crashed = [], 0, 0
    for split in SPLITS:
        for seed in getattr(server, f"getSeeds{split.title()}")():
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
    return (
        f"{spec.env_id}: gold {lengths[0]}-{lengths[-1]} (median {lengths[len(lengths) // 2]}), "
        f"bound {spec.max_steps}, over the bound {over}, failed {failed}, crashed {crashed}"
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
