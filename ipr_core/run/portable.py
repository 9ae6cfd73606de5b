"""A store's LoRA checkpoints as small files to commit beside it, and back.

A run resumes from its store, but its trained models live in the machine's cache
(`<cache_dir>/checkpoints`), ~540 MB each for SmolLM2-135M: on a fresh clone every stage
whose model is missing would train again. Exported, a LoRA checkpoint is its adapter and
records (~20 MB); imported, it is merged into its parent again, bit for bit, parents first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ipr_core.config import checkpoints_dir
from ipr_core.engine.models import MODEL_SPECS, is_complete_model, resolve_model
from ipr_core.errors import InputError
from ipr_core.run.experiment import ensure_known
from ipr_core.store.store import Store
from ipr_core.training.checkpoints import (
    COMPLETE_MARKER,
    MODEL_DIR,
    RESULT_FILE,
    export_portable,
    import_portable,
    model_id,
)


def export_checkpoints(
    store: Store, to: Path, experiment_id: str | None = None
) -> tuple[list[str], list[str]]:
    """Export every trained checkpoint the store names that this machine holds, or with
    `experiment_id` only those a resume of the experiment needs (`resume_checkpoints`;
    earlier exports of others are removed from `to`); returns (exported, skipped: missing
    here or without an adapter)."""
    if experiment_id is not None:
        ensure_known(store, experiment_id)  # a misspelt id must not empty `to`
        refuse_incomplete(store, experiment_id, to)  # nor a directory the paths miss
    wanted = None if experiment_id is None else resume_checkpoints(store, experiment_id)
    if wanted is not None and to.is_dir():
        for folder in to.iterdir():
            if (folder / RESULT_FILE).is_file() and folder.name not in wanted:
                shutil.rmtree(folder)
    exported, skipped = [], []
    for record in store.checkpoint_records().itertuples():
        if record.kind == "base" or (wanted is not None and record.checkpoint_id not in wanted):
            continue
        folder = Path(record.path).parent
        done = folder.name == record.checkpoint_id and export_portable(folder, to)
        (exported if done else skipped).append(record.checkpoint_id)
    return exported, skipped


def snapshot(
    store: Store, target: Path, experiment_id: str | None = None
) -> tuple[Path, list[str], list[str]]:
    """What to commit of a store while its experiment runs, so that a fresh clone resumes it:
    a consistent copy at `target` and, in `checkpoints_beside(target)`, the checkpoints
    `export_checkpoints` picks, read from the copy so that the two agree. Returns the
    checkpoints' folder, exported and skipped."""
    folder = checkpoints_beside(target)
    if experiment_id is not None:  # before anything is written
        ensure_known(store, experiment_id)
        refuse_incomplete(store, experiment_id, folder)
    copy = Store(store.copy_to(target), read_only=True)
    return folder, *export_checkpoints(copy, folder, experiment_id)


def checkpoints_beside(store_copy: Path) -> Path:
    """Where a snapshot keeps its checkpoints: `<store name>-checkpoints/` beside the copy
    (docs/results/decisive.duckdb -> docs/results/decisive-checkpoints)."""
    return store_copy.with_name(f"{store_copy.stem}-checkpoints")


def resume_checkpoints(store: Store, experiment_id: str) -> set[str]:
    """What resuming an experiment needs of its trained checkpoints: those its unfinished
    work starts from (`Store.resume_checkpoint_roots`) and their parents, each of which an
    import rebuilds first."""
    records = store.checkpoint_records()
    parents = dict(zip(records["checkpoint_id"], records["parent_id"], strict=True))
    kinds = dict(zip(records["checkpoint_id"], records["kind"], strict=True))
    needed: set[str] = set()
    for root in store.resume_checkpoint_roots(experiment_id):
        checkpoint = root
        while checkpoint in parents and kinds[checkpoint] != "base" and checkpoint not in needed:
            needed.add(checkpoint)
            checkpoint = parents[checkpoint]
    return needed


def refuse_incomplete(store: Store, experiment_id: str, to: Path) -> None:
    """Refuse an export that could not resume the experiment: a checkpoint its resume needs
    that this machine lacks (a store's checkpoint folders are recorded relative to the
    directory the run ran in, so a command run elsewhere finds none) and that `to` does not
    hold from an earlier export."""
    folders = {
        r.checkpoint_id: Path(r.path).parent for r in store.checkpoint_records().itertuples()
    }
    lost = sorted(
        checkpoint
        for checkpoint in resume_checkpoints(store, experiment_id)
        if not (folders[checkpoint] / COMPLETE_MARKER).exists()
        and not (to / checkpoint / RESULT_FILE).is_file()
    )
    if lost:
        raise InputError(
            str(store.path),
            f"{len(lost)} checkpoint(s) a resume of experiment {experiment_id!r} needs are "
            f"neither on this machine nor exported in {to}: {' '.join(lost)} (recorded at "
            f"{folders[lost[0]]}, relative to the directory the run ran in); nothing written",
            field="checkpoints",
        )


def import_checkpoints(store: Store, packed_root: Path, cache_dir: Path) -> list[str]:
    """Rebuild every exported checkpoint under `packed_root` that the cache's checkpoints
    lack, each merged into its parent: a checkpoint here or imported first, or the store's
    base model (built from its spec if this machine has not yet). Returns the ids rebuilt."""
    checkpoints_root = checkpoints_dir(cache_dir)
    bases = {
        r.checkpoint_id: Path(r.path)
        for r in store.checkpoint_records().itertuples()
        if r.kind == "base"
    }
    packed = {p.name: p for p in sorted(packed_root.iterdir()) if (p / RESULT_FILE).is_file()}
    rebuilt: list[str] = []

    def model_of(checkpoint: str, needed_by: Path) -> Path:
        local = checkpoints_root / checkpoint
        if (local / COMPLETE_MARKER).exists():
            return local / MODEL_DIR
        if checkpoint in packed:
            return rebuild(checkpoint)
        if checkpoint in bases:
            return base_model(checkpoint, bases[checkpoint], cache_dir)
        raise InputError(
            str(needed_by / RESULT_FILE),
            f"{checkpoint!r} is neither a checkpoint here, nor exported, nor a base model "
            "of the store",
            field="parent_id",
        )

    def rebuild(checkpoint: str) -> Path:
        folder = packed[checkpoint]
        parent = json.loads((folder / RESULT_FILE).read_text())["parent_id"]
        result = import_portable(folder, checkpoints_root, model_of(parent, folder))
        rebuilt.append(checkpoint)
        return result.path

    for checkpoint in packed:
        if not (checkpoints_root / checkpoint / COMPLETE_MARKER).exists():
            rebuild(checkpoint)
    return rebuilt


def base_model(checkpoint: str, recorded: Path, cache_dir: Path) -> Path:
    """The base model the store recorded as `checkpoint`, where it was; else built from its
    spec (the recorded folder's name) into this machine's cache. Its weights must hash to
    the recorded id: merging an adapter into other weights would not rebuild the model."""
    path = recorded
    if not is_complete_model(path):
        if recorded.name not in MODEL_SPECS:
            missing = f"base model {checkpoint} is not at {recorded}"
            raise InputError("store", missing, "checkpoints")
        path = resolve_model(recorded.name, cache_dir)
    if model_id(path) != checkpoint:
        raise InputError(
            "store", f"the model at {path} is not {checkpoint}, the store's base", "checkpoints"
        )
    return path
