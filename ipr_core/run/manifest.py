"""A run's manifest: what shaped its numbers besides the config, recorded where it starts.

A run resumed weeks later with another torch, another model folder under the same name,
an env package whose splits moved, or a prompt builder that changed would mix results of
two setups under one run id. The manifest records each of these; `check_resume` compares
a resumed run's manifest with the stored one. Fields that change results (`RESULT_FIELDS`)
refuse the resume unless allowed; the others (the machine, the project's git commit) are
reported and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from ipr_core.agent.prompts import PromptFormat, build_conversation
from ipr_core.envs import parse_env_id
from ipr_core.envs.base import EnvTask
from ipr_core.errors import IprError
from ipr_core.types import Step

Manifest = dict[str, Any]

CORE_PACKAGES = ("torch", "transformers", "trl", "peft", "duckdb")
ENV_PACKAGES = {
    "twx": ("textworld-express",),
    "alfworld": ("alfworld", "textworld"),
    "scienceworld": ("scienceworld",),
    "intercode-sql": ("pymysql",),
}
"""The distributions behind each env family: their games, splits and rewards."""
BACKEND_PACKAGES = {"vllm": ("vllm",), "openai": ("openai",)}

RESULT_FIELDS = ("packages", "model_id", "splits", "prompt_hash")
"""Manifest fields whose change changes a run's numbers: a resume is refused unless allowed.
The others (`machine`, `git_commit`) are reported when they change and the run resumes:
the same inputs on other hardware, or code whose effect on results these fields cover."""

PROBE_TASK = EnvTask(
    env_id="probe",
    task_id="probe-0",
    split="train",
    instruction="Put a clean apple in the fridge.",
    initial_observation="You are in a kitchen. There is a sink, a fridge and an apple.",
)
PROBE_STEPS = tuple(
    Step(text=f"Thought: step {i}.\nAction: {action}", action=action, observation=seen)
    for i, (action, seen) in enumerate(
        [
            ("take apple", "You take the apple."),
            ("clean apple with sink", "You clean the apple."),
            ("open fridge", "The fridge is open."),
            ("put apple in fridge", "You put the apple in the fridge."),
        ]
    )
)
"""A fixed conversation: the prompt builder's output for it stands for the builder."""


class ManifestChanged(IprError):
    """A resumed run whose packages, model, splits or prompt differ from its manifest."""


def run_manifest(
    env_id: str,
    backend: str,
    model_id: str,
    split_ids: dict[str, Sequence[str]],
    prompt: PromptFormat,
) -> Manifest:
    """The manifest of a run on `env_id` with the base model `model_id`, the task ids of
    each split it uses and its prompt format."""
    family = parse_env_id(env_id).family
    names = CORE_PACKAGES + ENV_PACKAGES.get(family, ()) + BACKEND_PACKAGES.get(backend, ())
    return {
        "packages": package_versions(names),
        "model_id": model_id,
        "splits": {
            split: {"count": len(ids), "hash": _digest(list(ids))}
            for split, ids in sorted(split_ids.items())
        },
        "prompt_hash": _digest(build_conversation(PROBE_TASK, PROBE_STEPS, prompt)),
        "machine": machine(),
        "git_commit": git_commit(),
    }


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed version of each distribution; one not installed is left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine() -> dict[str, Any]:
    """CPU model, hardware threads, GPUs (names; empty without CUDA) and Python."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": _cpu_model(),
        "threads": os.cpu_count(),
        "gpus": gpus,
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The project's commit (with '+dirty' when files differ from it); None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def changes(before: Manifest, now: Manifest) -> dict[str, tuple[Any, Any]]:
    """Every leaf field that differs, as 'packages.torch' -> (before, now)."""
    old, new = _flat(before), _flat(now)
    keys = sorted(old | new)
    return {key: (old.get(key), new.get(key)) for key in keys if old.get(key) != new.get(key)}


def _flat(manifest: Manifest) -> dict[str, Any]:
    return pd.json_normalize(manifest, sep=".").to_dict("records")[0]


def check_resume(
    run_id: str, before: Manifest, now: Manifest, allow: bool, log: Callable[[str], None]
) -> None:
    """Say what changed since the run's stored manifest; refuse (one line naming the
    fields) a change of a result field unless `allow`."""
    changed = changes(before, now)
    if not changed:
        return
    results = {key: v for key, v in changed.items() if key.split(".")[0] in RESULT_FIELDS}
    if results and not allow:
        raise ManifestChanged(
            f"run {run_id!r} was started with a setup that gives other results "
            f"({_shown(results)}); use a new run id, or pass --allow-manifest-change"
        )
    log(f"run {run_id!r}: manifest changed since it started ({_shown(changed)}); resuming")


def _shown(changed: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in changed.items())


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
