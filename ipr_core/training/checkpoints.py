"""Content-addressed checkpoint folders: retrying a stage never retrains a finished model.

A checkpoint's id hashes its parent's id, its training data and its settings, so the same
inputs always land in the same folder. Training writes to a temporary folder that is
renamed into place only after the completion marker is written: a folder named by an
id is always complete.

A LoRA checkpoint is also portable: its adapter, result and step log (~20 MB for
SmolLM2-135M, against ~540 MB of merged model) rebuild it on another machine, bit for bit,
by merging the adapter into its parent again (`export_portable`, `import_portable`), so a
store committed with them resumes on a fresh clone without retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ipr_core.digest import digest

CheckpointKind = Literal["base", "sft", "mixture", "reward_model"]
COMPLETE_MARKER = "COMPLETE"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
"""The full (merged) model and tokenizer: what the next stage and the backends load."""
ADAPTER_DIR = "adapter"
"""The LoRA adapter alone, when LoRA was used."""
STEPS_FILE = "training_steps.json"
"""What the trainer logged at each optimizer step (`runtime.run_training`): the store's
`training_steps` rows are read from it, also when a later run reuses the checkpoint."""
TENSORBOARD_DIR = "tensorboard"
"""The same step logs as TensorBoard event files (`tensorboard --logdir <checkpoint>`)."""


@dataclass(frozen=True)
class TrainResult:
    checkpoint_id: str
    parent_id: str | None
    kind: CheckpointKind
    path: Path
    """The loadable model folder (`<checkpoint>/model`)."""
    settings: dict[str, Any]
    metrics: dict[str, float]
    skipped: bool = False
    """True when the checkpoint already existed and nothing was trained."""

    def summary(self) -> str:
        """One line for the logs: reused, or steps, losses, speed and what did not fit."""
        if self.skipped:
            return "reused"
        m = self.metrics
        line = (
            f"trained: {m['steps']} steps, loss {m['first_step_loss']:.3f} -> "
            f"{m['last_step_loss']:.3f}, {m['seconds_per_step']:.1f} s/step"
        )
        examples = m.get("n_examples", m.get("n_pairs"))
        if m.get("n_truncated") or m.get("n_dropped"):
            line += (
                f"; of {examples} examples {m.get('n_truncated', 0)} lost their oldest turns "
                f"and {m.get('n_dropped', 0)} were dropped to fit max_length"
            )
        return line

    def training_steps(self) -> list[dict[str, float]]:
        """The trainer's log of each optimizer step (empty for checkpoints trained before
        the log was kept, and for the base model)."""
        steps = self.path.parent / STEPS_FILE
        return json.loads(steps.read_text()) if steps.exists() else []

    def to_json(self) -> str:
        data = asdict(self)
        data["path"] = str(self.path)
        del data["skipped"]
        return json.dumps(data, sort_keys=True, indent=2)


def checkpoint_id(parent_id: str, data_hash: str, settings: BaseModel) -> str:
    return digest([parent_id, data_hash, settings.model_dump(mode="json")], 16)


def model_id(model_path: Path) -> str:
    """The id of a model folder: the id it was trained as, else a hash of its files' content."""
    result = model_path.parent / RESULT_FILE
    if model_path.name == MODEL_DIR and (model_path.parent / COMPLETE_MARKER).exists():
        return json.loads(result.read_text())["checkpoint_id"]
    files = hashlib.sha256()
    for file in sorted(p for p in model_path.rglob("*") if p.is_file()):
        files.update(file.relative_to(model_path).as_posix().encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                files.update(chunk)
    return files.hexdigest()[:16]


def base_checkpoint(model_path: Path) -> TrainResult:
    """The result-shaped record of a model this project did not train (the base model)."""
    return TrainResult(
        checkpoint_id=model_id(model_path),
        parent_id=None,
        kind="base",
        path=model_path,
        settings={},
        metrics={},
        skipped=True,
    )


def train_once(
    checkpoints_root: Path,
    ckpt_id: str,
    parent_id: str,
    kind: CheckpointKind,
    settings: BaseModel,
    train: Callable[[Path], dict[str, float]],
) -> TrainResult:
    """Run `train(work_dir)` unless checkpoint `ckpt_id` is already complete.

    `train` saves the model under `work_dir / MODEL_DIR` and returns its metrics.
    """
    final = checkpoints_root / ckpt_id
    if (final / COMPLETE_MARKER).exists():
        return load_result(final)
    work = _work_folder(checkpoints_root, ckpt_id)
    work.mkdir()
    metrics = train(work)
    result = TrainResult(
        checkpoint_id=ckpt_id,
        parent_id=parent_id,
        kind=kind,
        path=final / MODEL_DIR,
        settings=settings.model_dump(mode="json"),
        metrics=metrics,
    )
    (work / RESULT_FILE).write_text(result.to_json())
    _publish(work, final)
    return result


def _work_folder(checkpoints_root: Path, ckpt_id: str) -> Path:
    """Where checkpoint `ckpt_id` is written before `_publish` moves it into place (this
    process's own; a folder left by an earlier attempt is removed, not reused)."""
    checkpoints_root.mkdir(parents=True, exist_ok=True)
    work = checkpoints_root / f".{ckpt_id}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    return work


def _publish(work: Path, final: Path) -> None:
    """Mark a written checkpoint complete and rename it into place in one step."""
    (work / COMPLETE_MARKER).touch()
    shutil.rmtree(final, ignore_errors=True)  # an incomplete folder left by other means
    os.replace(work, final)


def export_portable(folder: Path, to: Path) -> bool:
    """Copy what rebuilds checkpoint `folder` into `to/<id>`: its adapter, its model folder
    but the weights (config, tokenizer), result and step log. False for a checkpoint without
    an adapter (full fine-tuning: its weights are the model)."""
    if not (folder / COMPLETE_MARKER).exists() or not (folder / ADAPTER_DIR).is_dir():
        return False
    dest = to / folder.name
    if (dest / RESULT_FILE).exists():
        return True
    work = to / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(folder / ADAPTER_DIR, work / ADAPTER_DIR)
    weights = shutil.ignore_patterns("*.safetensors", "*.bin")
    shutil.copytree(folder / MODEL_DIR, work / MODEL_DIR, ignore=weights)
    for name in (STEPS_FILE, RESULT_FILE):
        if (folder / name).exists():
            shutil.copy2(folder / name, work / name)
    os.replace(work, dest)
    return True


def import_portable(packed: Path, checkpoints_root: Path, parent: Path) -> TrainResult:
    """Rebuild the checkpoint exported to `packed` in `checkpoints_root`, its adapter merged
    into `parent` (the model folder it was trained from) as training merged it."""
    from ipr_core.training.runtime import merge_adapter

    final = checkpoints_root / packed.name
    if (final / COMPLETE_MARKER).exists():
        return load_result(final)
    work = _work_folder(checkpoints_root, packed.name)
    shutil.copytree(packed, work)
    merge_adapter(parent, work / ADAPTER_DIR, work / MODEL_DIR)  # keeps the exported files
    _publish(work, final)
    return load_result(final)


def load_result(folder: Path) -> TrainResult:
    data = json.loads((folder / RESULT_FILE).read_text())
    data["path"] = folder / MODEL_DIR
    return TrainResult(**data, skipped=True)


def checkpoint_row(
    result: TrainResult, run_id: str | None = None, iteration: int | None = None
) -> dict[str, Any]:
    """The checkpoint's `checkpoints` row (the id is the primary key)."""
    return {
        "checkpoint_id": result.checkpoint_id,
        "parent_id": result.parent_id,
        "kind": result.kind,
        "path": str(result.path),
        "run_id": run_id,
        "iteration": iteration,
        "config": json.dumps(result.settings, sort_keys=True),
        "metrics": json.dumps(result.metrics, sort_keys=True),
    }
