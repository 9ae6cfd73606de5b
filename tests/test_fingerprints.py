"""One hash and one list of fingerprinted fields, and the stores made before them still
keep their ids: a committed experiment's evaluations have the fingerprints recorded."""

import hashlib
import json
import shutil
from pathlib import Path

from ipr_core.digest import digest
from ipr_core.run import fingerprints, loop, shards
from ipr_core.run.context import RunContext
from ipr_core.run.experiment import load_experiment_config
from ipr_core.store.store import Store

ROOT = Path(__file__).resolve().parents[1]


def test_digest_is_sha256_of_sorted_key_json_cut_to_length():
    value = ["sft", {"b": 1, "a": [Path("/x"), None]}]
    text = '["sft", {"a": ["/x", null], "b": 1}]'
    assert json.dumps(value, sort_keys=True, default=str) == text
    assert digest(value) == hashlib.sha256(text.encode()).hexdigest()
    assert digest(value, 16) == digest(value)[:16]


def test_the_loop_and_the_shards_fingerprint_the_same_fields():
    assert loop.SCORING_FIELDS is shards.SCORING_FIELDS is fingerprints.SCORING_FIELDS
    assert loop.ROLLOUT_FIELDS is fingerprints.ROLLOUT_FIELDS
    assert set(fingerprints.SCORING_FIELDS) - set(fingerprints.ROLLOUT_FIELDS) == {"monte_carlo"}


def test_a_setting_added_after_stores_is_hashed_only_when_it_changes_what_they_did():
    """A run at the old meaning hashes as before the setting existed (stored stages stay
    done); a run that sets it to something else gets another fingerprint."""
    base = load_experiment_config(ROOT / "configs" / "repro-full-sft.yaml").run_config("ipr", 0)
    fields = {*fingerprints.SCORING_FIELDS, "cut_explorations"}
    old = base.model_dump(mode="json", include=fields)
    for section, olds in fingerprints.ADDED_AFTER_STORES.items():
        if not isinstance(olds, dict):
            del old[section]
            continue
        for key in olds:
            del old[section][key]
    assert fingerprints.fingerprinted(base, fields) == old
    stopped = base.model_copy(
        update={"monte_carlo": base.monte_carlo.model_copy(update={"early_stop": True})}
    )
    assert fingerprints.fingerprinted(stopped, fields)["monte_carlo"]["early_stop"] is True


def test_a_committed_experiment_s_evaluation_fingerprints_are_unchanged(tmp_path, monkeypatch):
    """The dev evaluations of `repro-full-sft` (committed store, committed config) have the
    fingerprints their completion records hold: the one digest made the ids it always made.
    (Their rows no longer count as done: dev is now its first 24 distinct games, and
    dev-10015 and dev-10019 repeat earlier ones, so a resume evaluates dev again.) The store
    names each evaluated model by its id, and the model folders are not committed, so a
    model's path here is its id."""
    path = Path(shutil.copy(ROOT / "docs/results/repro-full-sft.duckdb", tmp_path / "s.duckdb"))
    config = load_experiment_config(ROOT / "configs" / "repro-full-sft.yaml", store=path)
    store = Store(path)
    monkeypatch.setattr(loop, "model_id", lambda model: model.name)
    for method, seed in (("ipr", 1), ("eto", 2)):
        run = config.run_config(method, seed)
        ctx = RunContext(run, store, print)
        for number in (0, 1):
            record = store.stage_record(run.run_id, number, "evaluate-dev")
            assert record is not None
            policy = Path(record.result["policy_id"])
            it = loop.Iteration(number, policy, policy)
            assert loop.EVALUATE.fingerprint(ctx, it) == record.fingerprint
