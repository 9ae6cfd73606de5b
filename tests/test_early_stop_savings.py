"""scripts/early_stop_savings.py: the waves an early-stopped stage would draw, replayed on
stored samples."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from ipr_core.config import MiningConfig
from ipr_core.method.mining import PairContext

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "early_stop_savings.py"
spec = importlib.util.spec_from_file_location("early_stop_savings", SCRIPT)
savings = importlib.util.module_from_spec(spec)
spec.loader.exec_module(savings)

MINING = MiningConfig(step_margin=0.1)
LOSING_AGENT = PairContext(expert_reward=1.0, expert_outcome=1.0, agent_outcome=0.0)


def test_a_step_stops_at_the_first_wave_after_which_no_sample_can_change_its_pair():
    # after one 0, three more samples bring the mean to 0.75 at most: expert wins by > 0.1
    assert savings.drawn(LOSING_AGENT, MINING, ["ok"] * 4, [0.0, 1.0, 1.0, 1.0]) == 1
    # 1s keep a mean of 1.0 possible (no pair) until the last sample is drawn
    assert savings.drawn(LOSING_AGENT, MINING, ["ok"] * 4, [1.0, 1.0, 1.0, 1.0]) == 4
    # a failed sample brings no outcome: the first wave decides nothing
    failed_first = ["env_error", "ok", "ok", "ok"]
    assert savings.drawn(LOSING_AGENT, MINING, failed_first, [None, 0.0, 0.0, 0.0]) == 2


def test_on_the_committed_reproduction_it_counts_every_agent_step_sampled():
    store = ROOT / "docs" / "results" / "repro-full-sft.duckdb"
    done = subprocess.run(
        [sys.executable, SCRIPT, store], capture_output=True, text=True, check=True
    )
    # its 3 IPR seeds x 3 iterations and the tuning runs: 375 agent steps of N = 4 samples
    assert "all: 1500 rollouts in full" in done.stdout
    assert "| repro-full-sft-ipr-s0 | 1 | 18 | 72 |" in done.stdout
