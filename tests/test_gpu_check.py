"""scripts/gpu_check.sh on the CPU (tiny model): its arguments and its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"


def check(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OUT"} | {"PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, check=False, env=environ | env
    )


def test_without_an_out_folder_it_prints_its_usage_and_exits_2():
    done = check()
    assert done.returncode == 2 and done.stderr.startswith("usage: scripts/gpu_check.sh OUT")


def test_a_model_folder_that_is_not_one_is_refused(tmp_path):
    done = check(str(tmp_path / "out"), "--mode", "cpu-tiny", "--model", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: --model {tmp_path}: no config.json there"
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_cpu_tiny_mode_writes_every_figure_under_out_from_the_environment(tmp_path):
    done = check("--mode", "cpu-tiny", OUT=str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-tiny"
    env = report["environment"]
    assert {"torch", "transformers", "peft", "trl", "duckdb", "prefect", "vllm"} <= env.keys()
    assert [line.split(":")[0] for line in report["skipped"]] == [
        name for name in ("trl", "duckdb", "prefect", "vllm", "textworld_express") if not env[name]
    ]
    hardware = report["hardware"]
    assert {r["dtype"] for r in hardware["sweep"]} == {"float32", "bfloat16"}
    assert hardware["best_decode"]["phase"] == "decode"
    rollouts = report["rollouts"]
    assert rollouts["generated_tokens"] > 0 and rollouts["cached_tokens"] > 0
    assert rollouts["fraction_of_hardware"] > 0
    assert {rollouts["prefill_dtype"], rollouts["decode_dtype"]} <= {"float32", "bfloat16"}
    for step in ("sft", "mixture"):
        assert report["training"][step]["seconds_per_step"] > 0
    assert "fraction_of_hardware" in done.stdout
