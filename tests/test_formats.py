import json
from pathlib import Path

import pytest

from flows.commands import main
from ipr_core.errors import InputError
from ipr_core.store.formats import load_pair_file, load_sft_file

GOOD = {
    "id": "cook-1",
    "conversations": [
        {"from": "human", "value": "Cook a meal. You are in the kitchen."},
        {"from": "gpt", "value": "Thought: I need the recipe.\nAction: read cookbook"},
        {"from": "human", "value": "Observation: The recipe says: eat apple."},
        {"from": "gpt", "value": "Thought: done.\nAction: eat apple"},
    ],
}


def write(tmp_path, records, name="experts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_loads_sft_records(tmp_path):
    [trajectory] = load_sft_file(write(tmp_path, [GOOD]), "twx/cookingworld", "train")
    assert trajectory.task.task_id == "cook-1"
    assert [s.action for s in trajectory.steps] == ["read cookbook", "eat apple"]
    assert trajectory.steps[0].observation == "The recipe says: eat apple."
    assert trajectory.outcome_reward == 1.0


def test_jsonl_is_accepted(tmp_path):
    path = tmp_path / "experts.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    assert len(load_sft_file(path, "twx/cookingworld", "train")) == 1


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop("conversations"), "conversations"),
        (lambda r: r["conversations"][1].update({"from": "bot"}), "conversations[1].from"),
        (lambda r: r["conversations"][3].update({"value": 7}), "conversations[3].value"),
        (lambda r: r["conversations"][3].update({"value": "no action"}), "conversations[3].value"),
        (lambda r: r.update({"reward": 3}), "reward"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, mutate, field):
    bad = json.loads(json.dumps(GOOD))
    bad["id"] = "cook-2"
    mutate(bad)
    path = write(tmp_path, [GOOD, bad])
    with pytest.raises(InputError) as info:
        load_sft_file(path, "twx/cookingworld", "train")
    message = str(info.value)
    assert str(path) in message and "'cook-2'" in message and repr(field) in message


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1,')
    with pytest.raises(InputError, match="broken.json.*not valid JSON"):
        load_sft_file(path, "twx/coin", "train")


def test_pair_file_sides_accept_strings_and_turns(tmp_path):
    record = {
        "id": 0,
        "prompt": [{"from": "human", "value": "Task"}],
        "chosen": "Thought: a\nAction: b",
        "rejected": [{"from": "gpt", "value": "Thought: c\nAction: d"}],
    }
    [pair] = load_pair_file(write(tmp_path, [record]))
    assert pair["chosen"] == [{"role": "assistant", "content": "Thought: a\nAction: b"}]
    assert pair["prompt"] == [{"role": "user", "content": "Task"}]
    with pytest.raises(InputError, match="'rejected'"):
        load_pair_file(write(tmp_path, [{**record, "rejected": None}], "bad.json"))


def test_cli_import_of_a_bad_file_exits_nonzero_and_writes_nothing(tmp_path, capsys):
    bad = json.loads(json.dumps(GOOD))
    bad["id"] = "cook-2"
    bad["conversations"][1]["from"] = "robot"
    source = write(tmp_path, [GOOD, bad])
    store = tmp_path / "s.duckdb"
    args = ["ingest", "--env", "twx/cookingworld", "--source", str(source), "--store", str(store)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "conversations[1].from" in err and "cook-2" in err
    assert not store.exists()


def test_shipped_expert_file_loads():
    path = Path(__file__).resolve().parents[1] / "data" / "twx-cookingworld-train.sft.json"
    trajectories = load_sft_file(path, "twx/cookingworld", "train")
    assert len(trajectories) == 20
    assert all(t.steps and all(s.action for s in t.steps) for t in trajectories)


def test_eto_extras_integer_ids_and_a_bom_are_accepted(tmp_path):
    record = json.loads(json.dumps(GOOD))
    record["id"] = 7
    record["game_file"] = "cook/7.z8"  # fields the format does not define are ignored
    for turn in record["conversations"]:
        turn["loss"] = turn["from"] == "gpt"  # as in ETO's SFT files
    path = tmp_path / "eto.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    [trajectory] = load_sft_file(path, "twx/cookingworld", "train")
    assert trajectory.task.task_id == "7"


def test_jsonl_records_without_a_usable_id_are_named_by_line(tmp_path):
    path = tmp_path / "experts.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": None}) + "\n")
    with pytest.raises(InputError, match="record 'line 3', field 'id': .* got null"):
        load_sft_file(path, "twx/cookingworld", "train")


def test_integer_and_string_spellings_of_one_id_are_duplicates(tmp_path):
    path = write(tmp_path, [{**GOOD, "id": 5}, {**GOOD, "id": "5"}])
    with pytest.raises(InputError, match="record '5', field 'id': duplicate id"):
        load_sft_file(path, "twx/cookingworld", "train")
