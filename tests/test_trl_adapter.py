"""TRL's private names: used only in `training/trl_adapter.py`, and there only while the
installed TRL still has them as the adapter uses them."""

from __future__ import annotations

import ast
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import trl
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from transformers import AutoModelForCausalLM
from trl.trainer import utils as trl_utils
from trl.trainer.utils import add_fused_lm_head

from ipr_core.training import trl_adapter
from ipr_core.training.trl_adapter import (
    PRIVATE_USES,
    TRL_VERSIONS,
    PretokenizedDPOTrainer,
    project_only_scored_positions,
)

ROOT = Path(__file__).parents[1]
ADAPTER = Path(trl_adapter.__file__).resolve()


def test_the_adapter_names_the_trl_releases_pyproject_requires_and_the_installed_one_fits():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [trl_requirement] = [
        Requirement(r) for r in project["dependencies"] if Requirement(r).name == "trl"
    ]
    assert trl_requirement.specifier == SpecifierSet(TRL_VERSIONS)
    assert version("trl") in SpecifierSet(TRL_VERSIONS)


@pytest.mark.parametrize("name", sorted(PRIVATE_USES))
def test_each_private_name_the_adapter_uses_is_in_trl_with_its_parameters(name: str):
    obj = trl
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)  # AttributeError: this TRL moved the name
    assert tuple(inspect.signature(obj).parameters) == PRIVATE_USES[name]


def test_the_pretokenized_trainer_overrides_only_what_the_adapter_lists():
    overridden = {
        name
        for name, member in vars(PretokenizedDPOTrainer).items()
        if callable(member) and not name.startswith("__")
    }
    listed = {name.rsplit(".", 1)[1] for name in PRIVATE_USES if "DPOTrainer." in name}
    assert overridden == listed


def test_the_fused_lm_head_projects_only_the_scored_positions(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `_use_triton` switches in this TRL: with the adapter's setting the head's
    kernel sees only the scored positions, and their log-probs are the plain forward's."""
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # undone after
    project_only_scored_positions()
    projected = []
    kernel = trl_utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return kernel.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    add_fused_lm_head(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :8] = labels[1, :5] = -100  # prompts: 7 and 4 of the 11 shifted targets masked
    with torch.no_grad():
        fused = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        logits = model(input_ids=ids).logits[:, :-1]
    scored = labels[:, 1:] != -100
    assert projected == [int(scored.sum())] == [11]
    expected = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(fused[scored], expected[scored], atol=1e-5, rtol=1e-5)
    assert (fused[~scored] == 0).all()


# -- no private TRL name elsewhere ---------------------------------------------------------
def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_trl_uses(source: str) -> list[str]:
    """Private TRL names a module uses: imported from `trl...`, read as an attribute of a
    name bound to TRL, or reached in a subclass of a TRL class (a `_method` it defines, or
    a `self._name` that the subclass does not set itself)."""
    tree = ast.parse(source)
    trl_names: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trl":
            for alias in node.names:
                trl_names.add(alias.asname or alias.name)
                if _private(alias.name):
                    found.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "trl":
                    trl_names.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in trl_names
            and _private(node.attr)
        ):
            found.append(f"{node.value.id}.{node.attr}")
    subclasses = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id in trl_names for b in node.bases)
    ]
    for cls in subclasses:
        own = {
            t.attr
            for n in ast.walk(cls)
            if isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign)
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute)
        }
        for n in ast.walk(cls):
            if isinstance(n, ast.FunctionDef) and _private(n.name) and n in cls.body:
                found.append(f"{cls.name}.{n.name}")
            if (
                isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id == "self"
                and _private(n.attr)
                and n.attr not in own
            ):
                found.append(f"{cls.name}: self.{n.attr}")
    return found


def test_the_walk_finds_each_kind_of_private_use():
    source = """
from trl import DPOTrainer
from trl.trainer.utils import _use_triton
from trl.trainer import utils as u
u._use_triton = None
class T(DPOTrainer):
    def _prepare_dataset(self): ...
    def compute_loss(self):
        self._own = 1
        return self._metrics, self._own
"""
    assert private_trl_uses(source) == [
        "from trl.trainer.utils import _use_triton",
        "u._use_triton",
        "T._prepare_dataset",
        "T: self._metrics",
    ]


def test_no_module_but_the_adapter_uses_a_private_trl_name():
    files = [
        path
        for folder in ("ipr_core", "flows", "tasks", "tests", "scripts")
        for path in (ROOT / folder).rglob("*.py")
        if path.resolve() not in {ADAPTER, Path(__file__).resolve()}
    ]
    assert len(files) > 50
    found = {
        str(path.relative_to(ROOT)): uses
        for path in files
        if (uses := private_trl_uses(path.read_text()))
    }
    assert found == {}
    assert private_trl_uses(ADAPTER.read_text())  # the walk sees the adapter's own uses
