"""`ipr bench rollouts` end to end on the tiny model: the three measurements and the ratios."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from flows.bench_training import load_training_bench_config
from ipr_core.engine.backends.attention import GQA_PREFILL, GROUPED_DECODE
from ipr_core.errors import InputError


def test_bench_rollouts_writes_the_three_measurements(tmp_path, tiny_model_path):
    config = tmp_path / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "env": "twx/cookingworld",
                "model": str(tiny_model_path),
                "tasks": 2,
                "queries_per_task": 1,
                "reference_tasks": 1,
                "n_samples": 2,
                "max_steps": 3,
                "max_new_tokens": 6,
                "prefill_dtype": "bfloat16",
                "sweep_rows": [2, 4],
                "sweep_context": 16,
                "repeats": 2,
            }
        )
    )
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "flows.commands", "bench", "rollouts", "--config", config,
         "--out", out],
        capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    engine, reference, limit = report["engine"], report["reference"], report["limit"]
    assert report["queries"] == 2
    assert report["omp_wait_policy"] == "ACTIVE"  # a benchmark owns its cores, recorded
    assert engine["rollouts"] == 4  # 2 tasks x 1 query x N=2
    assert reference["rollouts"] == 2  # the first task's query only (reference_tasks)
    # the reference re-encodes every turn: it prefills more per rollout than the engine
    per_rollout = {
        k: m["prefill_tokens"] / m["rollouts"] for k, m in (("a", engine), ("b", reference))
    }
    assert per_rollout["b"] > per_rollout["a"] > 0
    assert report["prefill_tokens_ratio"] == per_rollout["b"] / per_rollout["a"]
    assert report["wall_speedup"] == pytest.approx(
        (reference["wall_s"] / 2) / (engine["wall_s"] / 4)
    )
    # the limit replays exactly the engine's prefill passes
    assert limit["prefill_tokens"] == engine["prefill_tokens"]
    assert report["fraction_of_limit"] == limit["wall_s"] / engine["wall_s"]
    # the hardware limits: the sweep's best rates applied to the engine's tokens, at the
    # engine's own context lengths and at the fixed sweep_context
    contexts = report["work_contexts"]
    assert contexts["prefill_tail"] > 0 and contexts["prefill_cached"] > 0  # later turns
    assert contexts["decode"] > contexts["prefill_tail"]
    for key, fraction, prefill_context, decode_context in (
        ("hardware", "fraction_of_hardware",
         contexts["prefill_tail"] + contexts["prefill_cached"], contexts["decode"]),
        ("hardware_at_fixed_context", "fraction_of_hardware_at_fixed_context", 16, 16),
    ):  # fmt: skip
        hardware = report[key]
        sweep = [(r["phase"], r["dtype"], r["attention"], r["rows"], r["tokens"]) for r in
                 hardware["sweep"]]  # fmt: skip
        assert sorted(sweep) == sorted(
            (phase, dtype, attention, rows, tokens)
            for dtype in ("float32", "bfloat16")
            for phase, attentions, rows, tokens in (
                *(("prefill", ["sdpa", GQA_PREFILL], rows, prefill_context) for rows in (1, 8, 32)),
                *(("decode", ["sdpa", GROUPED_DECODE], rows, decode_context) for rows in (2, 4)),
            )
            for attention in attentions
        )
        prefill, decode = hardware["best_prefill"], hardware["best_decode"]
        assert prefill["tokens_per_s"] == max(
            r["tokens_per_s"] for r in hardware["sweep"] if r["phase"] == "prefill"
        )
        assert hardware["wall_s"] == pytest.approx(
            engine["prefill_tokens"] / prefill["tokens_per_s"]
            + engine["generated_tokens"] / decode["tokens_per_s"]
        )
        assert report[fraction] == hardware["wall_s"] / engine["wall_s"]
    # a and d ran twice, each a on a fresh backend: the same work both times; the report
    # keeps the pair with the lower of the two fractions
    repeats = report["repeats"]
    assert len(repeats) == 2
    assert {r["engine_tokens"] for r in repeats} == {
        engine["prefill_tokens"] + engine["generated_tokens"]
    }
    assert report["fraction_of_hardware"] == min(r["fraction_of_hardware"] for r in repeats)
    kept = min(repeats, key=lambda r: r["fraction_of_hardware"])
    assert kept["engine_wall_s"] == engine["wall_s"]
    assert "per repeat" in done.stdout
    assert 0.0 <= report["greedy_outcome_agreement"] <= 1.0
    assert report["greedy_rollouts"] == 1  # the reference's queries
    assert "fraction_of_hardware" in done.stdout  # the printed table


def test_bench_training_counts_the_tokens_each_trainer_trains(tmp_path, tiny_model_path):
    config = tmp_path / "bench-training.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "env": "twx/twc",
                "model": str(tiny_model_path),
                "examples": 2,
                "pairs": 2,
                "batch_size": 2,
                "max_length": 4096,  # the tiny model's tokenizer spends more tokens
                "modes": ["lora"],
                # both conversations (pairs) in one forward pass
                "micro_batch_size": {"lora": {"sft": 2, "mixture": 2}},
                "limit_batch_shapes": [1, 2],
            }
        )
    )
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "flows.commands", "bench", "training", "--config", config,
         "--out", out],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    sft, mixture = report["results"]
    assert (sft["trainer"], mixture["trainer"]) == ("sft", "mixture")
    for row in (sft, mixture):
        assert row["optimizer_steps"] == 1  # 2 examples (pairs), batches of 2, one epoch
        assert 0 < row["scored_tokens"] < row["tokens"]
        assert row["fraction_of_limit"] == row["tokens_per_s"] / row["limit_tokens_per_s"]
    assert sft["micro_batch_size"] == mixture["micro_batch_size"] == 2
    # the mode's micro-batch reached the trainer: the shorter conversation is padded
    assert 0 < sft["padding_tokens"] < sft["tokens"]
    assert 0 < mixture["padding_tokens"] < mixture["tokens"]
    # a pair trains both sides: at least the two SFT conversations' worth of tokens
    assert mixture["tokens"] > sft["tokens"]
    assert "fraction_of_limit" in done.stdout


@pytest.mark.parametrize(
    ("micro", "field"),
    [
        ({"qlora": {"sft": 2}}, "micro_batch_size.qlora"),
        ({"full": {"sft": 0}}, "micro_batch_size.full.sft"),
        ({"full": {"ppo": 2}}, "micro_batch_size.full.ppo"),
    ],
)
def test_bench_training_refuses_a_bad_micro_batch_size(tmp_path, micro, field):
    config = tmp_path / "bench-training.yaml"
    config.write_text(yaml.safe_dump({"micro_batch_size": micro}))
    with pytest.raises(InputError) as caught:
        load_training_bench_config(config)
    assert caught.value.field == field


def test_bench_compare_refuses_an_engine_it_cannot_run(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "flows.commands", "bench", "rollouts", "--compare", "llama.cpp",
         "--out", out],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.strip().splitlines() == [
        "error: --compare: unknown engine 'llama.cpp'; expected one of ('ctranslate2',)"
    ]


def test_ctranslate2_replays_the_engine_calls_int8(tmp_path, tiny_model_path):
    """The comparison engine gets every row's prompt and exactly as many tokens as the
    engine generated for the longest row of its batch."""
    from flows.bench import BenchConfig, ctranslate2_replay
    from ipr_core.engine.backends.transformers_backend import WorkLog

    work = WorkLog(calls=[[([1, 5, 9, 12], 3), ([1, 5, 7], 5)], [([1, 2, 3, 4, 5, 6], 2)]])
    config = BenchConfig(model=str(tiny_model_path), cache_dir=tmp_path, max_batch_size=2)
    report = ctranslate2_replay(tiny_model_path, config, work)
    assert report["engine"].startswith("ctranslate2") and report["engine"].endswith("int8")
    assert report["prompt_tokens"] == 13
    assert report["generated_tokens"] == 2 * 5 + 2
    assert (tmp_path / "ctranslate2" / f"{tiny_model_path.name}-int8" / "model.bin").exists()
