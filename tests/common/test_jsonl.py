import pytest

from balcony_edge.common.errors import DataError
from balcony_edge.common.jsonl import read_jsonl


def read(path):
    return read_jsonl(path, "--data", "a JSON record", "give a JSONL file", DataError)


def test_every_non_blank_line_with_its_number(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2]\n"three"\n', encoding="utf-8")
    assert read(path) == [(1, {"a": 1}), (4, [2]), (5, "three")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"a": 1}\n{oops\n', r"--data .*a.jsonl:2 is not a JSON record \(.*\); give a JSONL file$"),
        (b"\xff\xfe not text", r"--data .*a.jsonl is not UTF-8 text; give a JSONL file$"),
    ],
)
def test_a_bad_file_is_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "a.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(
        DataError, match=r"cannot read --data .*absent.jsonl \(No such file or directory\); give a JSONL file$"
    ):
        read(tmp_path / "absent.jsonl")
