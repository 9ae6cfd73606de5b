"""A policy backend on plain transformers `generate`: runs anywhere, including CPU-only machines."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipr_core.backends.base import Completion, FinishReason, Message, SamplingParams
from ipr_core.backends.chat import context_overflow, encode_prompt, fits_context

DEFAULT_MAX_CONTEXT = 4096
"""Cap on the default context: KV caches for longer prompts do not pay off on CPU."""


class TransformersBackend:
    """Left-padded, micro-batched generation with stop strings, seeds and token accounting."""

    def __init__(
        self,
        model_path: Path,
        policy_id: str | None = None,
        max_batch_size: int = 16,
        max_context: int | None = None,
        device: str = "cpu",
    ):
        model_path = Path(model_path)
        self.policy_id = policy_id or model_path.name
        self.max_batch_size = max_batch_size
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # float32 on CPU: bf16 matmuls there are slower, not faster.
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, local_files_only=True
        ).to(device)
        self.model.eval()
        self.max_context = max_context or min(
            self.model.config.max_position_embeddings, DEFAULT_MAX_CONTEXT
        )
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        self.eos_token_ids = sorted({*eos, self.tokenizer.eos_token_id})
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "generate_calls": 0}
        """Running totals; generate_calls counts model.generate micro-batches."""

    def encode(self, conversation: list[Message]) -> list[int]:
        return encode_prompt(self.tokenizer, conversation)

    def count_tokens(self, conversation: list[Message]) -> int:
        return len(self.encode(conversation))

    @torch.inference_mode()
    def generate(
        self, conversations: list[list[Message]], params: SamplingParams
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each conversation, in order.

        Each conversation is repeated n times (what num_return_sequences does internally),
        so a micro-batch never exceeds max_batch_size sequences even when n does. Rows are
        sorted by prompt length so that a micro-batch wastes little on padding.
        """
        prompts = [self.encode(conversation) for conversation in conversations]
        results: list[list[Completion]] = [[] for _ in conversations]
        rows = [
            i
            for i, ids in enumerate(prompts)
            if fits_context(len(ids), params.max_new_tokens, self.max_context)
            for _ in range(params.n)
        ]
        rows.sort(key=lambda i: len(prompts[i]))
        for batch_index, start in enumerate(range(0, len(rows), self.max_batch_size)):
            batch = rows[start : start + self.max_batch_size]
            torch.manual_seed(params.seed + batch_index)
            outputs = self._generate_batch([prompts[i] for i in batch], params)
            for i, (text, generated, reason) in zip(batch, outputs, strict=True):
                results[i].append(Completion(text, len(prompts[i]), generated, reason))
                self.stats["prefill_tokens"] += len(prompts[i])
                self.stats["generated_tokens"] += generated
        for completions in results:
            if not completions:  # the prompt did not fit: nothing was prefilled or generated
                completions.extend(context_overflow(params.n))
        return results

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> list[tuple[str, int, FinishReason]]:
        padded = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        inputs = padded.to(self.device)
        sampling = params.temperature > 0
        # top_k=0 and top_p=1.0 override transformers' top-k 50 default: plain temperature
        # sampling, as the parameters say.
        options = {"temperature": params.temperature, "top_k": 0, "top_p": 1.0} if sampling else {}
        output = self.model.generate(
            **inputs,
            do_sample=sampling,
            max_new_tokens=params.max_new_tokens,
            stop_strings=list(params.stop) or None,
            tokenizer=self.tokenizer,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **options,
        )
        self.stats["generate_calls"] += 1
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._finish(tokens, params.stop) for tokens in new_tokens]

    def _finish(self, tokens: list[int], stop: tuple[str, ...]) -> tuple[str, int, FinishReason]:
        """Text cut at EOS or the first stop string, and the tokens generated up to that point."""
        eos_at = next((k for k, t in enumerate(tokens) if t in self.eos_token_ids), None)
        body = tokens if eos_at is None else tokens[:eos_at]
        text = self._decode(body)
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            return text[: min(cuts)], self._tokens_to_stop(body, stop), "stop"
        if eos_at is not None:
            return text, eos_at + 1, "stop"
        return text, len(body), "length"

    def _tokens_to_stop(self, tokens: list[int], stop: tuple[str, ...]) -> int:
        """Fewest leading tokens whose text holds a stop string (monotone, so bisect)."""
        low, high = 1, len(tokens)
        while low < high:
            mid = (low + high) // 2
            text = self._decode(tokens[:mid])
            if any(s in text for s in stop):
                high = mid
            else:
                low = mid + 1
        return high

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
