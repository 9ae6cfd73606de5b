"""The GPU check behind scripts/gpu_check.sh: figures of one GPU, as JSON under OUT.

Needs only torch, transformers and PEFT (and this repository): the GPU machines have no
vLLM, maybe no TRL, DuckDB or Prefect, and no package registry, so nothing here imports
them; which of them import is reported, with what that skipped. Covers:
  hardware  -- the bare model's prefill and decode tokens/s over batch sizes and dtypes
               (`ipr_core.engine.backends.throughput`, the bench's sweep);
  rollouts  -- the transformers backend (dtypes `auto`: bfloat16 on a GPU) running
               multi-turn sampled conversations, and its `fraction_of_hardware`: the time
               the sweep's best rates need for its prefilled and generated tokens, over its
               wall time (the bench's figure, without an environment);
  training  -- SFT and mixture optimizer steps with LoRA in bfloat16: the SFT loss, and the
               mixture's passes (policy on chosen and rejected, the reference with the
               adapter off, DPO + SFT loss), written out in torch so TRL is not needed.
The model is --model PATH, else a random model with SmolLM2-135M's layer shapes and the
test tokenizer (figures of shapes, not of a trained model). `--mode cpu-tiny` runs the same
code on the tiny test Llama on the CPU in seconds (CI checks the arguments and the JSON).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipr_core.engine.backends.base import SamplingParams  # noqa: E402
from ipr_core.engine.backends.throughput import (  # noqa: E402
    DTYPES,
    decode_rate,
    in_dtype,
    prefill_rate,
)
from ipr_core.engine.backends.transformers_backend import TransformersBackend  # noqa: E402
from ipr_core.engine.models import build_tiny_llama  # noqa: E402

OPTIONAL = {
    "trl": "the project's SFT and mixture trainers (the steps below are written out in torch)",
    "duckdb": "the store, so no `ipr run` here",
    "prefect": "the flows, so no `ipr` deployment here",
    "vllm": "the vllm backend",
    "textworld_express": "real environments, so rollouts run without one",
}
SHAPES = {
    # mode: sweep rows, context, conversations, turns, new tokens, train batch, train length
    "gpu": {"rows": (8, 32, 128), "context": 512, "conversations": 64, "turns": 3,
            "new_tokens": 32, "batch": 8, "length": 512, "steps": 3},
    "cpu-tiny": {"rows": (2, 4), "context": 32, "conversations": 4, "turns": 2,
                 "new_tokens": 6, "batch": 2, "length": 32, "steps": 1},
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--mode", choices=sorted(SHAPES), default="gpu")
    parser.add_argument("--model", type=Path, help="a local model folder (default: random)")
    args = parser.parse_args(argv)
    device = "cuda" if args.mode == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --mode gpu: torch sees no CUDA device (try --mode cpu-tiny)", file=sys.stderr)
        return 2
    if args.model is not None and not (args.model / "config.json").is_file():
        print(f"error: --model {args.model}: no config.json there", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shape = SHAPES[args.mode]
    report: dict[str, Any] = {"mode": args.mode, "environment": environment(device)}
    report["skipped"] = [
        f"{name}: {why}" for name, why in OPTIONAL.items() if not report["environment"][name]
    ]
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model or model_folder(args.mode, Path(scratch))
        report["model"] = str(
            args.model or f"random ({'SmolLM2-135M shapes' if device == 'cuda' else 'tiny'})"
        )
        print(f"gpu_check: {args.mode} on {report['environment']['device']}", flush=True)
        report["hardware"] = hardware(model_path, device, shape)
        report["rollouts"] = rollouts(model_path, device, shape, report["hardware"])
        report["training"] = training(model_path, device, shape)
    report["wall_s"] = time.perf_counter() - started
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(summary(report))
    print(f"wrote {path}")
    return 0


def environment(device: str) -> dict[str, Any]:
    versions = {
        name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft")
    }
    found = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {"device": name, "python": platform.python_version(), **versions, **found}


def model_folder(mode: str, scratch: Path) -> Path:
    """The tiny test Llama, or on a GPU a random model of SmolLM2-135M's layer shapes with
    the tiny tokenizer (vocabulary sized to it, so the LM head is smaller than SmolLM2's)."""
    tiny = build_tiny_llama(scratch / "tiny")
    if mode != "gpu":
        return tiny
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    folder = scratch / "smollm2-shaped"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hardware(model_path: Path, device: str, shape: dict[str, Any]) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    rates = []
    for dtype in DTYPES:
        candidate = in_dtype(model.eval(), dtype)
        rates += [prefill_rate(candidate, rows, shape["context"]) for rows in (1, 8)]
        rates += [decode_rate(candidate, rows, shape["context"]) for rows in shape["rows"]]
    rows = [vars(rate) for rate in rates]
    return {
        "sweep": rows,
        "best_prefill": max((r for r in rows if r["phase"] == "prefill"), key=_rate),
        "best_decode": max((r for r in rows if r["phase"] == "decode"), key=_rate),
    }


def rollouts(
    model_path: Path, device: str, shape: dict[str, Any], limit: dict[str, Any]
) -> dict[str, Any]:
    """Sampled multi-turn conversations through the backend: each turn appends the reply
    and an observation, so the prefix cache, batched prefill and decode all run."""
    backend = TransformersBackend(
        model_path, max_batch_size=shape["conversations"], device=device,
        prefill_dtype="auto", decode_dtype="auto",
    )  # fmt: skip
    system = {"role": "system", "content": "You are an agent in a text game. Think, then act."}
    conversations = [
        [system, {"role": "user", "content": f"Task {k}: put the apple {k} in the fridge."}]
        for k in range(shape["conversations"])
    ]
    params = SamplingParams(temperature=1.0, max_new_tokens=shape["new_tokens"])
    started = time.perf_counter()
    for turn in range(shape["turns"]):
        seeds = [turn * 1000 + k for k in range(len(conversations))]
        replies = backend.generate(conversations, params, seeds)
        for conversation, (reply,) in zip(conversations, replies, strict=True):
            conversation += [
                {"role": "assistant", "content": reply.text or "Action: look"},
                {"role": "user", "content": f"Observation: you see a table ({turn})."},
            ]
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    prefilled, generated = backend.stats["prefill_tokens"], backend.stats["generated_tokens"]
    hardware_s = prefilled / _rate(limit["best_prefill"]) + generated / _rate(limit["best_decode"])
    return {
        "conversations": len(conversations),
        "turns": shape["turns"],
        "prefill_dtype": backend.prefill_dtype,
        "decode_dtype": backend.decode_dtype,
        "prefill_tokens": prefilled,
        "cached_tokens": backend.stats["cached_tokens"],
        "generated_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": (prefilled + generated) / wall,
        "fraction_of_hardware": hardware_s / wall,
    }


def training(model_path: Path, device: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Seconds per optimizer step and tokens/s of SFT and of a mixture step, LoRA, bf16."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).to(device)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, length = shape["batch"], shape["length"]
    vocab = model.config.vocab_size

    def sft_step() -> int:
        ids = torch.randint(vocab, (batch, length), device=device)
        model(input_ids=ids, labels=ids).loss.backward()
        return batch * length

    def mixture_step() -> int:
        """Policy on chosen and rejected, the reference (adapter off) on both, DPO + SFT."""
        ids = torch.randint(vocab, (2 * batch, length), device=device)
        policy = _sequence_logps(model(input_ids=ids).logits, ids)
        with torch.no_grad(), model.disable_adapter():
            reference = _sequence_logps(model(input_ids=ids).logits, ids)
        margin = (policy - reference)[:batch] - (policy - reference)[batch:]
        loss = -F.logsigmoid(0.1 * margin).mean() - policy[:batch].mean() / length
        loss.backward()
        return 2 * batch * length

    return {name: _timed(step, optimizer, device, shape["steps"]) for name, step in
            (("sft", sft_step), ("mixture", mixture_step))}  # fmt: skip


def _sequence_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logps.gather(-1, ids[:, 1:, None])[..., 0].sum(-1)


def _timed(step, optimizer: torch.optim.Optimizer, device: str, steps: int) -> dict[str, float]:
    step()  # warm-up
    optimizer.step()
    optimizer.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
    tokens, started = 0, time.perf_counter()
    for _ in range(steps):
        tokens += step()
        optimizer.step()
        optimizer.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"seconds_per_step": wall / steps, "tokens_per_s": tokens / wall, "peak_mb": peak}


def _rate(rate: dict[str, Any]) -> float:
    return rate["tokens_per_s"]


def summary(report: dict[str, Any]) -> str:
    hw, ro, tr = report["hardware"], report["rollouts"], report["training"]
    return "\n".join(
        [
            f"hardware: prefill {_rate(hw['best_prefill']):.0f} tok/s "
            f"({hw['best_prefill']['dtype']}, {hw['best_prefill']['rows']} rows), decode "
            f"{_rate(hw['best_decode']):.0f} tok/s ({hw['best_decode']['dtype']}, "
            f"{hw['best_decode']['rows']} rows)",
            f"rollouts: {ro['tokens_per_s']:.0f} tok/s, fraction_of_hardware "
            f"{ro['fraction_of_hardware']:.2f} (prefill {ro['prefill_dtype']}, decode "
            f"{ro['decode_dtype']})",
            f"training: sft {tr['sft']['seconds_per_step']:.2f} s/step, mixture "
            f"{tr['mixture']['seconds_per_step']:.2f} s/step",
            *(f"skipped {line}" for line in report["skipped"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
