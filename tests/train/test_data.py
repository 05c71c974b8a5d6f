"""Training text: text, JSONL and parquet files and folders, packing, the held-out split, and bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from balcony_edge.common.errors import DataError
from balcony_edge.data import HELD_OUT_EVERY, data_stem, default_corpus_files, load_corpus, pack, read_documents


def test_reads_text_jsonl_and_parquet_from_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"], "id": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert read_documents([tmp_path]) == ["plain text", "json one", "json two", "parquet one", "parquet two", "café"]
    assert read_documents([tmp_path / "b.jsonl"]) == ["json one", "json two"]


def test_xz_and_gzip_compressed_text_and_jsonl_read_as_their_plain_selves(tmp_path):
    import gzip
    import lzma

    lines = json.dumps({"text": "xz one"}) + "\n" + json.dumps({"text": "xz two"}) + "\n"
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(lines.encode()))
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"gzipped text"))
    (tmp_path / "c.parquet.gz").write_bytes(b"not read: parquet compresses itself")
    assert read_documents([tmp_path]) == ["xz one", "xz two", "gzipped text"]
    assert load_corpus([tmp_path / "a.jsonl.xz"]).train == ["xz one"]
    (tmp_path / "broken.jsonl.xz").write_bytes(lzma.compress(lines.encode())[:-20])
    with pytest.raises(DataError, match="cannot read data file .*broken.jsonl.xz"):
        read_documents([tmp_path / "broken.jsonl.xz"])
    damaged = bytearray(gzip.compress(b"some text that deflate packs " * 40))
    damaged[20:30] = bytes(10)  # a broken deflate stream: zlib's own error, not an OSError
    (tmp_path / "damaged.txt.gz").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="cannot read data file .*damaged.txt.gz"):
        read_documents([tmp_path / "damaged.txt.gz"])
    assert [data_stem(tmp_path / n) for n in ("a.jsonl.xz", "notes.v2.txt", "c.parquet.gz")] == [
        "a",
        "notes.v2",
        "c.parquet",
    ]
    with pytest.raises(DataError, match=r"is not .txt, .md, .jsonl, .json \(any of them .xz or .gz\) or .parquet"):
        read_documents([tmp_path / "c.parquet.gz"])


def test_pack_joins_documents_with_eos_into_fixed_blocks(tiny_base):
    tokenizer = tiny_base.tokenizer
    docs = ["the river runs", "a small city"]
    blocks = pack(docs, tokenizer, seq_len=3)
    flat = [t for doc in docs for t in tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]]
    assert blocks.shape == (len(flat) // 3, 3)
    assert blocks.flatten().tolist() == flat[: blocks.numel()]


def test_every_twentieth_document_is_held_out(tmp_path):
    for i in range(45):
        (tmp_path / f"{i:02d}.txt").write_text(f"document {i}")
    corpus = load_corpus([tmp_path])
    assert corpus.held_out == [f"document {i}" for i in (19, 39)]
    assert len(corpus.train) == 43 and not set(corpus.train) & set(corpus.held_out)
    assert HELD_OUT_EVERY == 20


def test_the_default_corpus_ships_in_a_package():
    files = default_corpus_files()
    assert len(files) == 2225
    assert {f.parent.name for f in files} == {"business", "entertainment", "politics", "sports", "tech"}


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no .txt"),
        (lambda p: (p / "x.csv").write_text("a,b") and p / "x.csv", "is not .txt"),
        (lambda p: (p / "x.jsonl").write_text("{bad json\n") and p / "x.jsonl", "not valid JSON"),
        (lambda p: (p / "x.jsonl").write_text('{"body": "no text field"}\n') and p / "x.jsonl", 'no "text"'),
        (lambda p: (p / "blank.txt").write_text("   \n") and p / "blank.txt", "holds no text"),
    ],
)
def test_bad_data_paths_name_the_problem(tmp_path, setup, words):
    with pytest.raises(DataError, match=words):
        read_documents([setup(tmp_path)])


def test_parquet_without_a_text_column_is_refused(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match='no "text" column'):
        read_documents([tmp_path / "x.parquet"])


def test_text_shorter_than_one_sequence_is_refused(tiny_base):
    with pytest.raises(DataError, match="shorter than one sequence of 512"):
        pack(["only a few words"], tiny_base.tokenizer, seq_len=512)


def test_binary_data_named_txt_is_refused_but_latin_1_text_is_read(tmp_path):
    import random

    noise = tmp_path / "noise.txt"
    noise.write_bytes(random.Random(0).randbytes(3000))
    with pytest.raises(DataError, match="holds binary data, not text"):
        read_documents([noise])
    text = tmp_path / "old.txt"
    text.write_bytes("Caf\xe9 cr\xe8me, na\xefve\tr\xe9sum\xe9\n".encode("latin-1") * 50)
    assert read_documents([text])[0].startswith("Café crème")
