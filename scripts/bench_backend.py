"""Tokens per second of a policy backend on IPR-shaped requests.

Two workloads over TextWorldExpress-style conversations (system prompt, task, turns), as
the rollout engine sends them: `greedy`, one completion for each of B distinct
conversations (exploration, evaluation), and `mc`, B/n distinct conversations each sent n
times with its own seed, at temperature 1 (Monte Carlo scoring: a backend with prefix
caching prefills each prompt once). Prompt tokens are counted as computed (prefix-cache
hits are free) and as cached, from the backend's stats.

    python scripts/bench_backend.py --backend transformers --model .ipr/models/smollm2-135m-instruct
    python scripts/bench_backend.py --backend vllm --model PATH [--gpu-memory-utilization 0.3]
    python scripts/bench_backend.py --backend openai --model PATH --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ipr_core.agent.prompts import OBSERVATION_PREFIX, STOP_STRINGS, system_message
from ipr_core.config import OpenAISettings, VLLMSettings
from ipr_core.engine.backends import SamplingParams, make_backend
from ipr_core.types import Message

HINT = "Actions: look, inventory, go <direction>, take <item>, put <item> in <container>."


def conversation(index: int, turns: int) -> list[Message]:
    """A distinct episode per index: the prompts differ after the shared system message."""
    messages = [
        system_message(HINT),
        {
            "role": "user",
            "content": f"Your task is to put the key {index} in the box.\n\n"
            f"{OBSERVATION_PREFIX}You are in the hallway {index}. There is a door to the north.",
        },
    ]
    for turn in range(turns):
        messages.append(
            {"role": "assistant", "content": f"Thought: explore room {turn}.\nAction: go north"}
        )
        messages.append(
            {
                "role": "user",
                "content": f"{OBSERVATION_PREFIX}You are in room {turn} of "
                f"house {index}. You see a table, a chair and a shelf with {turn + 2} books.",
            }
        )
    return messages


def measure(
    backend, conversations: list[list[Message]], params: SamplingParams, seeds: list[int] | None
) -> dict:
    before = dict(backend.stats)
    started = time.perf_counter()
    backend.generate(conversations, params, seeds)
    seconds = time.perf_counter() - started
    delta = {key: backend.stats[key] - before.get(key, 0) for key in backend.stats}
    computed, generated = delta["prefill_tokens"], delta["generated_tokens"]
    return {
        "seconds": round(seconds, 2),
        "completions": len(conversations),
        "prompt_tokens_computed": computed,
        "prompt_tokens_cached": delta["cached_tokens"],
        "generated_tokens": generated,
        "generated_per_s": round(generated / seconds, 1),
        "computed_and_generated_per_s": round((computed + generated) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("transformers", "vllm", "openai"), required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16, help="completions per call")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt in the mc workload")
    parser.add_argument("--turns", type=int, default=6, help="assistant turns in each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per workload")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()

    options: dict = {}
    if args.backend == "vllm":
        settings = VLLMSettings(
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_engines=1,
            max_model_len=args.max_model_len,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
        options = {"settings": settings}
    elif args.backend == "openai":
        options = {"settings": OpenAISettings(base_url=args.base_url)}
    else:
        options = {"max_batch_size": args.batch}
    started = time.perf_counter()
    backend = make_backend(args.model, kind=args.backend, **options)
    report: dict = {
        "backend": args.backend,
        "load_seconds": round(time.perf_counter() - started, 1),
    }

    greedy = SamplingParams(max_new_tokens=args.max_new_tokens, stop=STOP_STRINGS)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, stop=STOP_STRINGS)
    backend.generate([conversation(i, args.turns) for i in range(2)], greedy)  # warm-up
    for repeat in range(args.repeats):
        # Fresh episodes per repeat so no repeat is served from an earlier one's cache.
        offset = (repeat + 1) * 1000
        batch = [conversation(offset + i, args.turns) for i in range(args.batch)]
        report[f"greedy_{repeat}"] = measure(backend, batch, greedy, None)
        mc = [
            conversation(offset + 500 + i, args.turns)
            for i in range(args.batch // args.n)
            for _ in range(args.n)
        ]
        report[f"mc_{repeat}"] = measure(backend, mc, sampled, list(range(len(mc))))
    report["stats"] = dict(backend.stats)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    main()
