"""`passn evaluate`'s record of finished problems: a torn last line is dropped (re-evaluated), a bad
line elsewhere is an error naming file and line, rewrites replace the file at once, and test
problems that share a unique_id are refused before anything runs."""

import json

import fsspec
import pytest

from jobs.evaluate import PROBLEMS_FILE, _check_unique, _read_rows, _write_rows
from passn.tasks import DataError, Problem


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_named(tmp_path, capsys):
    rows = [{"uid": "a", "samples": 4}, {"uid": "b", "samples": 4}]
    fs, root = fsspec.core.url_to_fs(str(tmp_path))
    _write_rows(fs, root, rows)
    assert _read_rows(str(tmp_path)) == rows and [p.name for p in tmp_path.iterdir()] == [PROBLEMS_FILE]
    path = tmp_path / PROBLEMS_FILE
    path.write_text(path.read_text() + '{"uid": "c", "sam')  # killed mid-line
    assert _read_rows(str(tmp_path)) == rows
    assert f"{PROBLEMS_FILE}:3: a torn last line, dropped" in capsys.readouterr().out
    path.write_text(json.dumps(rows[0]) + "\nnot json\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=rf"{PROBLEMS_FILE}:2: not a problem record"):
        _read_rows(str(tmp_path))


def test_problems_sharing_a_unique_id_are_refused():
    _check_unique([Problem("x", "1+1", "2"), Problem("y", "2+2", "4")])
    with pytest.raises(DataError, match="test problems 0 and 2 share the unique_id 'x'"):
        _check_unique([Problem("x", "1+1", "2"), Problem("y", "2+2", "4"), Problem("x", "3+3", "6")])
