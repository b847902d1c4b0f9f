"""Result files: atomic, JSON without NaN, readable permissions; console tables."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from common.outputs import atomic_write, table, write_json


def test_json_has_no_nan_and_plain_types(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": float("nan"), "b": np.float32(0.5), "c": (1, np.int64(2)),
                                            "d": np.array([1.0, np.inf])})
    assert json.loads(path.read_text()) == {"a": None, "b": 0.5, "c": [1, 2], "d": [1.0, None]}


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "r.json", {"old": 1})

    def broken(f):
        f.write(b"{half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_table_aligns_text_left_and_numbers_right():
    lines = table(["name", "value"], [["a", 1.23456], ["longer", None]]).splitlines()
    assert lines == ["name    value", "------  -----", "a        1.23", "longer      -"]
