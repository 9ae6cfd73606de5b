"""The malformed-input corpus (tests/data/malformed/): each file, handed to the real CLI,
ends in exit code 2 and one line naming the file, the record and the field, and the
store's rows stay as they were."""

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from ipr_core.store import formats

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "malformed"
ENV = "twx/cookingworld"
GOOD = {
    "id": "cook-1",
    "conversations": [
        {"from": "human", "value": "Cook a meal. You are in the kitchen."},
        {"from": "gpt", "value": "Thought: I need the recipe.\nAction: read cookbook"},
        {"from": "human", "value": "Observation: The recipe says: eat apple."},
        {"from": "gpt", "value": "Thought: done.\nAction: eat apple"},
    ],
}

# file -> what its one-line error must contain besides the file name
SFT_CASES = {
    "sft-not-utf8.json": ["not UTF-8", "line 36"],
    "sft-deep-nesting.json": ["nested too deeply"],
    "sft-huge-number.json": ["not valid JSON", "too long"],
    "sft-truncated.json": ["not valid JSON", "line 22"],
    "sft-bad-line.jsonl": ["not valid JSON", "line 3"],
    "sft-empty.json": ["no records"],
    "sft-record-not-object.json": ["record '#1'", "expected an object"],
    "sft-id-object.json": ["record '#1'", "field 'id'", "got an object"],
    "sft-id-bool.jsonl": ["record 'line 2'", "field 'id'", "got a boolean"],
    "sft-id-missing.json": ["record '#1'", "field 'id'", "missing"],
    "sft-id-too-long.json": ["record '#0'", "field 'id'", "256"],
    "sft-duplicate-id.json": ["record 'cook-1'", "field 'id'", "duplicate"],
    "sft-reward-true.json": ["record 'cook-2'", "field 'reward'", "got a boolean"],
    "sft-reward-string.json": ["record 'cook-2'", "field 'reward'", "got a string"],
    "sft-reward-nan.json": ["record 'cook-2'", "field 'reward'", "nan"],
    "sft-reward-out-of-range.json": ["record 'cook-2'", "field 'reward'", "[0, 1]"],
    "sft-conversations-object.json": ["record 'cook-2'", "field 'conversations'", "an object"],
    "sft-conversations-empty.json": ["record 'cook-2'", "field 'conversations'", "empty"],
    "sft-turn-not-object.json": ["record 'cook-2'", "field 'conversations[2]'"],
    "sft-role-unknown.json": ["record 'cook-2'", "field 'conversations[1].from'", "'robot'"],
    "sft-role-not-string.json": ["record 'cook-2'", "field 'conversations[1].from'"],
    "sft-first-turn-gpt.json": ["record 'cook-2'", "field 'conversations[0].from'"],
    "sft-value-number.json": ["record 'cook-2'", "field 'conversations[3].value'", "integer"],
    "sft-no-action.json": ["record 'cook-2'", "field 'conversations[3].value'", "Action"],
    "sft-lone-surrogate.json": ["record 'cook-2'", "field 'conversations[2].value'"],
}
PAIR_CASES = {
    "pairs-not-utf8.json": ["not UTF-8", "line 1"],
    "pairs-id-object.json": ["record '#1'", "field 'id'", "got an object"],
    "pairs-duplicate-id.json": ["record 'p-1'", "field 'id'", "duplicate"],
    "pairs-chosen-null.json": ["record 'p-2'", "field 'chosen'", "got null"],
    "pairs-prompt-number.json": ["record 'p-2'", "field 'prompt'", "got an integer"],
    "pairs-rejected-role.json": ["record 'p-2'", "field 'rejected[0].from'", "'assistant'"],
    "pairs-level-unknown.json": ["record 'p-2'", "field 'level'", "got 'turn'"],
    "pairs-chosen-from-human.json": ["record 'p-2'", "field 'chosen'", "'gpt' turn"],
    "pairs-env-unknown.json": ["record 'p-2'", "field 'env_id'", "unknown env id 'twx/nowhere'"],
    "pairs-env-bad-param.json": ["record 'p-2'", "field 'env_id'", "items=9 is out of range"],
    "pairs-sides-identical.json": ["record 'p-2'", "field 'rejected'", "must differ"],
    "pairs-reward-above-1.json": ["record 'p-2'", "field 'chosen_reward'", "[0, 1], got 1.5"],
    "pairs-chosen-worse.json": ["record 'p-2'", "field 'chosen_outcome'", "chosen_may_be_worse"],
}
CONFIG_CASES = {
    "config-not-utf8.yaml": ["not UTF-8", "line 2"],
    "config-list.yaml": ["expected a mapping", "got a list"],
    "config-bad-yaml.yaml": ["not valid YAML", "line 3"],
    "config-deep-nesting.yaml": ["nested too deeply"],
    "config-unknown-field.yaml": ["field 'itterations'"],
    "config-wrong-type.yaml": ["field 'monte_carlo.n_samples'", "integer"],
    "config-bool-for-number.yaml": ["field 'monte_carlo.n_samples'", "got a boolean"],
    "config-unknown-env.yaml": ["field 'env'", "unknown env id"],
    "config-duplicate-key.yaml": ["field 'n_samples'", "duplicate key", "line 4"],
    "config-negative-margin.yaml": ["field 'mining.step_margin'", "greater than or equal to 0"],
}


def _record(record_id: str, **fields: object) -> dict:
    return {**json.loads(json.dumps(GOOD)), "id": record_id, **fields}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A store holding two imported expert trajectories, built once and copied per test."""
    folder = tmp_path_factory.mktemp("seed")
    source = _write(folder / "experts.json", [GOOD, _record("cook-2")])
    store = folder / "seed.duckdb"
    assert main(["ingest", "--env", ENV, "--source", str(source), "--store", str(store)]) == 0
    return store


@pytest.fixture
def store(seeded, tmp_path) -> Path:
    return Path(shutil.copy(seeded, tmp_path / "store.duckdb"))


def row_counts(store: Path) -> dict[str, int]:
    with duckdb.connect(str(store), read_only=True) as con:
        found = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
        tables = [table for (table,) in found]
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


def assert_one_named_line(err: str, name: str, fragments: list[str]) -> None:
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert name in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def ingest(store: Path, source: Path, *flags: str) -> int:
    return main(["ingest", "--env", ENV, "--source", str(source), "--store", str(store), *flags])


def test_every_corpus_file_has_its_expected_error():
    assert {p.name for p in CORPUS.iterdir()} == {*SFT_CASES, *PAIR_CASES, *CONFIG_CASES}


@pytest.mark.parametrize("name", sorted(SFT_CASES))
def test_malformed_sft_file_is_one_named_line_and_writes_nothing(name, store, capsys):
    before = row_counts(store)
    assert ingest(store, CORPUS / name) == 2
    captured = capsys.readouterr()
    assert_one_named_line(captured.err, name, SFT_CASES[name])
    assert "imported" not in captured.out
    assert row_counts(store) == before


def _turn_over_the_cap(path: Path) -> list[str]:
    value = "Observation: " + "x" * formats.MAX_TURN_CHARS
    turns = [*GOOD["conversations"][:2], {"from": "human", "value": value}]
    _write(path, [GOOD, _record("cook-3", conversations=turns)])
    return ["record 'cook-3'", "field 'conversations[2].value'", "no training context"]


def _turns_over_the_cap(path: Path) -> list[str]:
    step = GOOD["conversations"][1:3]
    turns = [GOOD["conversations"][0], *step * (formats.MAX_TURNS // 2 + 1)]
    _write(path, [_record("cook-3", conversations=turns)])
    return ["record 'cook-3'", "field 'conversations'", f"cap of {formats.MAX_TURNS}"]


def _file_over_the_cap(path: Path) -> list[str]:
    with path.open("wb") as f:
        f.truncate(formats.MAX_FILE_BYTES + 1)  # sparse: nothing is written, nothing is read
    return [f"{formats.MAX_FILE_BYTES}-byte cap"]


@pytest.mark.parametrize("build", [_turn_over_the_cap, _turns_over_the_cap, _file_over_the_cap])
def test_records_over_the_size_caps_are_refused(
    build: Callable[[Path], list[str]], store, tmp_path, capsys
):
    path = tmp_path / "big.json"
    fragments = build(path)
    before = row_counts(store)
    assert ingest(store, path) == 2
    assert_one_named_line(capsys.readouterr().err, "big.json", fragments)
    assert row_counts(store) == before


@pytest.mark.parametrize("name", sorted(PAIR_CASES))
def test_malformed_pair_file_is_one_named_line_and_writes_nothing(name, store, capsys):
    before = row_counts(store)
    args = ["import-pairs", str(CORPUS / name), "--run-id", "r", "--iteration", "1"]
    assert main([*args, "--env", ENV, "--store", str(store)]) == 2
    assert_one_named_line(capsys.readouterr().err, name, PAIR_CASES[name])
    assert row_counts(store) == before


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_malformed_config_is_one_named_line_and_writes_nothing(name, store, capsys):
    before = row_counts(store)
    assert main(["run", "--config", str(CORPUS / name), "--store", str(store)]) == 2
    assert_one_named_line(capsys.readouterr().err, name, CONFIG_CASES[name])
    assert row_counts(store) == before


def test_the_installed_entry_prints_one_line_without_a_traceback(store):
    before = row_counts(store)
    args = ["ingest", "--env", ENV, "--source", str(CORPUS / "sft-not-utf8.json")]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--store", str(store)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert_one_named_line(done.stderr, "sft-not-utf8.json", ["not UTF-8"])
    assert row_counts(store) == before


@pytest.mark.parametrize(
    "name",
    [
        "config-negative-margin.yaml",
        "pairs-env-unknown.json",
        "pairs-sides-identical.json",
        "pairs-reward-above-1.json",
    ],
)
def test_input_that_once_got_through_is_refused_by_the_installed_entry(name, store):
    """Issue 31's cases, through the real command line: a negative mining margin, a pair of
    an unknown env, a pair whose sides are the same, a reward of 1.5."""
    before = row_counts(store)
    path = str(CORPUS / name)
    if name.startswith("config"):
        args = ["run", "--no-prefect", "--config", path]
    else:
        args = ["import-pairs", path, "--run-id", "r", "--iteration", "1", "--env", ENV]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--store", str(store)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    fragments = CONFIG_CASES.get(name) or PAIR_CASES[name]
    assert_one_named_line(done.stderr, name, fragments)
    assert row_counts(store) == before


def _stored(store: Path, task_id: str) -> tuple[str, int]:
    with duckdb.connect(str(store), read_only=True) as con:
        query = "SELECT source, n_steps FROM expert_trajectories WHERE task_id = ?"
        return con.execute(query, [task_id]).fetchone()


def test_reimport_of_stored_ids_is_refused_naming_the_ids_and_the_flag(store, tmp_path, capsys):
    kept = _stored(store, "cook-1")
    shorter = _record("cook-1", conversations=GOOD["conversations"][:2])
    source = _write(tmp_path / "again.json", [shorter, _record("cook-9")])
    before = row_counts(store)
    assert ingest(store, source) == 2
    err = capsys.readouterr().err
    assert_one_named_line(err, "again.json", ["'cook-1'", "--replace", "field 'id'"])
    assert "cook-9" not in err
    assert row_counts(store) == before
    assert _stored(store, "cook-1") == kept


def test_replace_flag_replaces_and_reports_how_many(store, tmp_path, capsys):
    shorter = _record("cook-1", conversations=GOOD["conversations"][:2])
    source = _write(tmp_path / "again.json", [shorter, _record("cook-9")])
    before = row_counts(store)
    assert ingest(store, source, "--replace") == 0
    out = capsys.readouterr().out
    assert "imported 2 expert trajectories" in out and "(replaced 1)" in out
    assert row_counts(store)["expert_trajectories"] == before["expert_trajectories"] + 1
    assert _stored(store, "cook-1") == (str(source), 1)


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ("nope/x", ["unknown env id 'nope/x'", "known env ids"]),
        ("twx/twc?items=abc", ["items=abc is not an integer"]),
        ("twx/twc?items=9", ["items=9", "from 1 to 4"]),
        ("twx/twc?bogus=1", ["unknown parameter 'bogus'", "its parameters"]),
    ],
)
def test_bad_env_ids_and_parameters_are_one_line_through_the_cli(
    env, fragments, store, tmp_path, capsys
):
    before = row_counts(store)
    out = tmp_path / "export.json"
    for argv in (
        ["ingest", "--env", env, "--store", str(store)],
        ["ingest", "--env", env, "--source", str(CORPUS / "sft-empty.json"), "--store", str(store)],
        ["export", "sft", "--env", env, "--out", str(out), "--store", str(store)],
    ):
        assert main(argv) == 2
        assert_one_named_line(capsys.readouterr().err, env, fragments)
    assert row_counts(store) == before and not out.exists()


def test_gold_ingest_of_stored_ids_is_refused_unless_replace(tmp_path, capsys):
    path = tmp_path / "gold.duckdb"
    args = ["ingest", "--env", "twx/twc", "--limit", "1", "--store", str(path)]
    assert main(args) == 0
    with duckdb.connect(str(path)) as con:
        [(task_id,)] = con.execute("SELECT task_id FROM expert_trajectories").fetchall()
        con.execute("UPDATE expert_trajectories SET source = 'edited'")
    capsys.readouterr()
    before = row_counts(path)
    assert main(args) == 2
    err = capsys.readouterr().err
    name = "gold trajectories of twx/twc?locations=2&items=2&doors=0&inventory_limit=0 train"
    assert_one_named_line(err, name, [repr(task_id), "--replace"])
    assert row_counts(path) == before
    assert _stored(path, task_id)[0] == "edited"
    assert main([*args, "--replace"]) == 0
    assert _stored(path, task_id)[0] == "gold"


def test_a_pair_file_stores_the_full_env_id_and_takes_a_stated_worse_chosen(store, tmp_path):
    side = [{"from": "human", "value": "Task"}]
    record = {
        "prompt": side,
        "chosen": "Thought: a\nAction: b",
        "rejected": "Thought: c\nAction: d",
    }
    pairs = [
        {**record, "id": "p-1", "env_id": "twx/twc?locations=1"},
        {**record, "id": "p-2", "chosen_reward": 0.2, "rejected_reward": 0.6},
    ]
    source = _write(tmp_path / "pairs.json", pairs)
    args = ["import-pairs", str(source), "--run-id", "r", "--iteration", "1", "--env", ENV]
    assert main([*args, "--store", str(store)]) == 2  # p-2's chosen side is the worse one
    pairs[1]["chosen_may_be_worse"] = True
    _write(source, pairs)
    assert main([*args, "--store", str(store)]) == 0
    with duckdb.connect(str(store), read_only=True) as con:
        stored = con.execute("SELECT task_id, env_id FROM pairs ORDER BY 1").fetchall()
    assert stored == [
        ("p-1", "twx/twc?locations=1&items=2&doors=0&inventory_limit=0"),
        (
            "p-2",
            "twx/cookingworld?locations=3&ingredients=2&distractors=3&doors=0&inventory_limit=0",
        ),
    ]
