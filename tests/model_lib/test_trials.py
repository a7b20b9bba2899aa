"""Trial spec parsing: grids, lists, overrides, stable ids, malformed specs."""

from __future__ import annotations

import json

import pytest

from model_lib import trials


def test_grid_is_a_cartesian_product_over_base():
    spec = """
base: {epochs: 3, arch: small_cnn}
grid:
  learning_rate: [0.001, 0.01]
  dropout: [0.1, 0.2, 0.3]
"""
    parsed = trials.parse_trials(spec)
    assert len(parsed) == 6
    assert [dict(t.hparams) for t in parsed][:2] == [
        {"epochs": 3, "arch": "small_cnn", "learning_rate": 0.001, "dropout": 0.1},
        {"epochs": 3, "arch": "small_cnn", "learning_rate": 0.001, "dropout": 0.2},
    ]
    assert {(t.hparams["learning_rate"], t.hparams["dropout"]) for t in parsed} == {
        (lr, d) for lr in (0.001, 0.01) for d in (0.1, 0.2, 0.3)
    }
    assert [t.trial_id[:4] for t in parsed] == [f"{i:03d}-" for i in range(6)]


def test_json_list_with_ids_and_command_line_overrides():
    spec = json.dumps({"base": {"epochs": 5}, "trials": [{"id": "cnn", "dropout": 0.2}, {"arch": "mobilenet_v2"}]})
    parsed = trials.parse_trials(spec, overrides={"epochs": 2, "batch_size": 16})
    assert parsed[0] == trials.TrialSpec("cnn", {"epochs": 2, "batch_size": 16, "dropout": 0.2})
    assert parsed[1].hparams == {"epochs": 2, "batch_size": 16, "arch": "mobilenet_v2"}
    assert parsed[1].trial_id.startswith("001-")
    assert parsed[0].input_ref == "trial:cnn"


def test_ids_are_stable_and_depend_on_hyperparameters():
    first = trials.parse_trials("grid: {learning_rate: [0.1, 0.2]}")
    again = trials.parse_trials("grid: {learning_rate: [0.1, 0.2]}")
    other = trials.parse_trials("grid: {learning_rate: [0.1, 0.3]}")
    assert [t.trial_id for t in first] == [t.trial_id for t in again]
    assert first[1].trial_id != other[1].trial_id


def test_no_spec_is_a_single_trial_of_the_overrides():
    parsed = trials.load_trials(None, {"arch": "small_cnn", "epochs": 1})
    assert len(parsed) == 1
    assert parsed[0].hparams == {"arch": "small_cnn", "epochs": 1}


def test_load_trials_reads_a_file(tmp_path):
    path = tmp_path / "trials.yaml"
    path.write_text("trials:\n  - {id: a, epochs: 1}\n  - {id: b, epochs: 2}\n")
    assert [t.trial_id for t in trials.load_trials(str(path))] == ["a", "b"]


def test_bad_values_are_not_rejected_at_parse_time():
    # A bad value fails only its own trial (dead letter), not the whole job.
    parsed = trials.parse_trials("trials: [{id: bad, arch: no_such_model}, {id: good}]")
    assert [t.trial_id for t in parsed] == ["bad", "good"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "must be a mapping"),
        ("grids: {a: [1]}", "unknown trial spec keys"),
        ("grid: {learning_rate: []}", "no values"),
        ("trials: {a: 1}", "must be a list"),
        ("trials: [{id: x}, {id: x}]", "repeated: \\['x'\\]"),
        ("trials: [{id: '../escape'}]", "id='../escape'"),
        ("base: 3", "base must be a mapping"),
        ("grid: {a: [1}", "neither valid YAML nor JSON"),
    ],
)
def test_malformed_specs_fail_before_the_job(text, message):
    with pytest.raises(trials.TrialSpecError, match=message):
        trials.parse_trials(text)
