"""Run manifests: recorded where a run starts, compared when it resumes; a change of what
shapes results refuses the resume (naming the fields) unless allowed."""

import json
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml

from flows.cli import main
from ipr_core.agent.prompts import PromptFormat
from ipr_core.run import manifest
from ipr_core.store.store import Store, manifest_row
from ipr_core.training.checkpoints import model_id

TABLES = ("runs", "rollouts", "step_rewards", "pairs", "evaluations", "checkpoints", "stage_runs")


@pytest.fixture
def resumable(smoke_run, tmp_path) -> tuple[Path, Store]:
    """A copy of the finished smoke run's store, and a config file that resumes it."""
    config, store, _ = smoke_run
    copy = Store(shutil.copy(store.path, tmp_path / "run.duckdb"))
    path = tmp_path / "smoke.yaml"
    path.write_text(
        yaml.safe_dump(config.model_copy(update={"store": copy.path}).model_dump(mode="json"))
    )
    return path, copy


def edit_manifest(store: Store, run_id: str, edit) -> dict:
    [stored] = store.run_manifests(run_id)
    edit(stored)
    with duckdb.connect(str(store.path)) as con:
        con.execute("DELETE FROM run_manifests WHERE run_id = ?", [run_id])
    store.write({"run_manifests": [manifest_row(run_id, stored)]})
    return stored


def counts(store: Store) -> dict[str, int]:
    return {table: store.count(table) for table in TABLES}


def test_a_run_records_what_shaped_its_numbers(smoke_run, tiny_model_path):
    config, store, _ = smoke_run
    [recorded] = store.run_manifests(config.run_id)
    assert recorded["model_id"] == model_id(tiny_model_path)
    assert {"torch", "transformers", "trl", "peft", "duckdb", "textworld-express"} <= set(
        recorded["packages"]
    )
    assert set(recorded["splits"]) == {config.train_split, config.dev_split}
    assert all(
        split["count"] > 0 and len(split["hash"]) == 16 for split in recorded["splits"].values()
    )
    assert recorded["machine"]["threads"] > 0 and recorded["machine"]["cpu"]
    assert "git_commit" in recorded and len(recorded["prompt_hash"]) == 16


def test_a_changed_package_version_refuses_the_resume_naming_it(resumable, capsys):
    path, store = resumable
    stored = edit_manifest(store, "smoke", lambda m: m["packages"].update(torch="1.0.0"))
    before = counts(store)
    assert main(["run", "--config", str(path), "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "packages.torch: 1.0.0 -> " in err and "--allow-manifest-change" in err
    assert counts(store) == before and store.run_manifests("smoke") == [stored]


def test_allowed_change_resumes_and_keeps_both_manifests(resumable, capsys):
    path, store = resumable
    edit_manifest(store, "smoke", lambda m: m.update(model_id="another-model"))
    before = counts(store)
    assert main(["run", "--config", str(path), "--no-prefect", "--allow-manifest-change"]) == 0
    out = capsys.readouterr().out
    assert "manifest changed since it started (model_id: another-model -> " in out
    assert counts(store) == before  # every stage was done: nothing recomputed
    old, new = store.run_manifests("smoke")
    assert old["model_id"] == "another-model" and new["model_id"] != "another-model"


def test_a_changed_machine_or_commit_only_warns(resumable, capsys):
    path, store = resumable

    def other_machine(m: dict) -> None:
        m["machine"]["threads"] = 512
        m["git_commit"] = "0" * 40

    edit_manifest(store, "smoke", other_machine)
    assert main(["run", "--config", str(path), "--no-prefect"]) == 0
    out = capsys.readouterr().out
    assert "machine.threads: 512 -> " in out and "git_commit: 0000" in out


def test_result_fields_and_info_fields_are_told_apart():
    now = manifest.run_manifest(
        "twx/twc", "transformers", "m1", {"train": ["a", "b"]}, PromptFormat("hint")
    )
    for change in (
        lambda m: m["splits"]["train"].update(count=3),
        lambda m: m.update(prompt_hash="x"),
        lambda m: m["packages"].pop("trl"),
    ):
        before = json.loads(json.dumps(now))
        change(before)
        with pytest.raises(manifest.ManifestChanged):
            manifest.check_resume("r", before, now, allow=False, log=print)
    windowed = manifest.run_manifest(
        "twx/twc", "transformers", "m1", {"train": ["a", "b"]}, PromptFormat("hint", 1)
    )
    assert windowed["prompt_hash"] != now["prompt_hash"]
    before = json.loads(json.dumps(now))
    before["machine"]["gpus"] = ["H100"]
    said: list[str] = []
    manifest.check_resume("r", before, now, allow=False, log=said.append)
    assert len(said) == 1 and "machine.gpus" in said[0]
