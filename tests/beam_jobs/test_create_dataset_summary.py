"""create_dataset's summary and exit code: an unbalanced accounting fails the job and says why."""

from __future__ import annotations

from beam_jobs import create_dataset
from schemas.dataset_info import Accounting
from tests.schemas.test_artifact_contracts import dataset_info


def test_unbalanced_accounting_exits_1_and_names_the_numbers(tmp_path, capsys):
    # 7 rows read but only 4 written and 1 rejected: two rows vanished.
    dataset_info(read=7, written=4, rejected=1).write(str(tmp_path))
    info = create_dataset.read_dataset_info(str(tmp_path))
    assert info.accounting == Accounting(7, 4, 1)
    assert create_dataset.report_summary(info) == 1
    out, err = capsys.readouterr()
    assert "NOT BALANCED" in out
    assert "accounting does not balance: read 7 != written 4 + rejected 1 (= 5): 2 row(s) unaccounted for" in err


def test_balanced_accounting_exits_0_with_the_summary(tmp_path, capsys):
    dataset_info(read=5, written=4, rejected=1).write(str(tmp_path))
    assert create_dataset.report_summary(create_dataset.read_dataset_info(str(tmp_path))) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines()[0] == "read 5  written 4  rejected 1  (balanced)"
    # Splits in --split_names order (not the file's sorted key order).
    assert [line.split()[0] for line in out.splitlines()[1:4]] == ["train", "valid", "test"]
    assert "  rejected not_an_image: 1" in out
