"""Text metadata parts (csv/tsv/jsonl, plain and .gz) indexed once, then read one shard at a time.

The oracle is pyarrow reading the whole file (what img2dataset's Reader does) and slicing: every shard we read must
equal that slice, row for row and value for value.
"""

from __future__ import annotations

import gzip
import json
import os

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.json as pajson
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
from img2dataset.reader import Reader  # the oracle for shard numbering

import laion_vq.shards.text_index as text_index
from laion_vq.shards.metadata import ShardOutOfRange
from laion_vq.shards.schema import SchemaError
from laion_vq.shards.text_index import (
    StaleIndexError,
    TextFormatError,
    TextPartIndex,
    index_text_part,
    load_index,
    load_or_build_index,
    read_text_rows,
)

LAION_HEADER = ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity"]
#: buffer sizes for the scan: tiny ones put chunk boundaries inside rows, quoted fields and CRLF pairs
CHUNKS = [7, 64, text_index.CHUNK_BYTES]


def laion_tsv_lines(rows: int) -> list[str]:
    lines = []
    for i in range(rows):
        caption = f"photo {i} of a cat" if i % 7 else f'a {i}" tall vase, "blue"'  # literal quotes mid-field
        lines.append(
            "\t".join(
                [str(i), f"https://example.com/{i}.jpg", caption, str(100 + i), str(200 + i), "?", "UNLIKELY", "0.25"]
            )
        )
    return lines


def write(path, data: bytes, gz: bool = False) -> str:
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def whole_file(data: bytes, input_format: str, **read_options) -> pa.Table:
    """pyarrow reading the whole (decompressed) file, as img2dataset does (quoted line breaks allowed)."""
    if input_format.startswith("jsonl"):
        return pajson.read_json(pa.BufferReader(data))
    delimiter = "\t" if input_format.startswith("tsv") else ","
    return pacsv.read_csv(
        pa.BufferReader(data),
        read_options=pacsv.ReadOptions(**read_options),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
    )


def garbage(n: int) -> bytes:
    """Bytes no parser accepts: an opening quote, invalid UTF-8, line breaks."""
    return (b'"\xff\n' * (n // 3 + 1))[:n]


def assert_shards_match(index: TextPartIndex, expected: pa.Table) -> None:
    """Every shard equals the whole-file read's slice, with the same names; values compared as Python objects."""
    assert index.num_rows == expected.num_rows
    assert index.num_shards == -(-expected.num_rows // index.samples_per_shard)
    for k in range(index.num_shards):
        got = read_text_rows(index, k)
        want = expected.slice(k * index.samples_per_shard, index.samples_per_shard)
        assert got.column_names == want.column_names
        assert got.to_pylist() == want.to_pylist(), f"shard {k}"


def test_tsv_three_shards_partial_last_shard(tmp_path):
    data = ("\t".join(LAION_HEADER) + "\n" + "\n".join(laion_tsv_lines(250)) + "\n").encode()
    url = write(tmp_path / "part-00000.tsv", data)
    index = index_text_part(url, "tsv", 100)
    assert (index.num_rows, index.num_shards, index.columns) == (250, 3, tuple(LAION_HEADER))
    assert index.offsets[0] == data.index(b"\n") + 1 and index.offsets[-1] == len(data)
    assert [str(t) for t in index.schema.types] == [
        "int64",
        "string",
        "string",
        "int64",
        "int64",
        "string",
        "string",
        "double",
    ]
    expected = whole_file(data, "tsv")
    last = read_text_rows(index, 2)
    assert last.num_rows == 50
    assert last.equals(expected.slice(200, 50))
    assert last.column("TEXT")[3].as_py() == 'a 203" tall vase, "blue"'
    assert_shards_match(index, expected)
    with pytest.raises(ShardOutOfRange):
        read_text_rows(index, 3)


@pytest.mark.parametrize("shard", [1, 2])
def test_a_shard_reads_only_its_bytes(tmp_path, shard):
    """Bytes outside the shard's range are overwritten with garbage (same size, mtime restored): still read right."""
    data = ("\t".join(LAION_HEADER) + "\n" + "\n".join(laion_tsv_lines(250)) + "\n").encode()
    path = tmp_path / "part.tsv"
    url = write(path, data)
    index = index_text_part(url, "tsv", 100)
    expected = read_text_rows(index, shard)
    start, stop = index.offsets[shard], index.offsets[shard + 1]
    stat = os.stat(path)
    path.write_bytes(garbage(start) + data[start:stop] + garbage(len(data) - stop))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == len(data)
    assert read_text_rows(index, shard).equals(expected)
    with pytest.raises(SchemaError):
        read_text_rows(index, 0)  # the garbage is not readable: only the range was read above


@pytest.mark.parametrize("chunk", CHUNKS)
def test_csv_quoted_fields_commas_newlines_doubled_quotes_crlf(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(text_index, "CHUNK_BYTES", chunk)
    rows = [
        "id,url,caption\r\n",
        '1,http://a/1.jpg,"red, white and blue"\r\n',
        '2,http://a/2.jpg,"two\r\nlines"\r\n',
        '3,http://a/3.jpg,"she said ""hi"""\r\n',
        '4,http://a/4.jpg,""\r\n',
        "\r\n",  # an empty line: pyarrow skips it
        '5,http://a/5.jpg,"""quoted"" start, and\nLF"\r\n',
        "6,http://a/6.jpg,plain\r\n",
        '7,"http://a/7.jpg","ends without a line end"',
    ]
    data = "".join(rows).encode()
    url = write(tmp_path / "quoted.csv", data)
    index = index_text_part(url, "csv", 3)
    assert index.newlines_in_values
    expected = whole_file(data, "csv")
    assert expected.num_rows == 7
    assert_shards_match(index, expected)
    assert read_text_rows(index, 0).column("caption").to_pylist() == [
        "red, white and blue",
        "two\r\nlines",
        'she said "hi"',
    ]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_tsv_literal_quotes_inside_unquoted_fields(tmp_path, monkeypatch, chunk):
    """pyarrow opens quoting only at a field start: `5" tall` is literal; `"Best" seller` is quoted then continues."""
    monkeypatch.setattr(text_index, "CHUNK_BYTES", chunk)
    lines = [
        "url\tcaption\tn",
        'http://a/1\ta 5" tall vase\t1',
        'http://a/2\tsay "hi\t2',  # an unbalanced literal quote: quote parity alone would swallow the rows after
        "http://a/3\tplain\t3",
        'http://a/4\t"Best" seller\t4',
        'http://a/5\t"tab\tinside"\t5',
        'http://a/6\tit"s "x" and ""\t6',
        "http://a/7\tlast\t7",
    ]
    data = ("\n".join(lines) + "\n").encode()
    url = write(tmp_path / "quotes.tsv", data)
    index = index_text_part(url, "tsv", 2)
    expected = whole_file(data, "tsv")
    assert expected.column("caption").to_pylist() == [
        'a 5" tall vase',
        'say "hi',
        "plain",
        "Best seller",
        "tab\tinside",
        'it"s "x" and ""',
        "last",
    ]
    assert not index.newlines_in_values
    assert_shards_match(index, expected)


def test_tsv_without_header_takes_given_column_names(tmp_path):
    names = ["url", "caption"]
    data = "".join(f"http://a/{i}.jpg\tcaption {i}\n" for i in range(5)).encode()
    url = write(tmp_path / "cc12m.tsv", data)
    index = index_text_part(url, "tsv", 2, column_names=names)
    assert (index.header, index.columns, index.num_rows, index.offsets[0]) == (False, tuple(names), 5, 0)
    expected = whole_file(data, "tsv", column_names=names)
    assert_shards_match(index, expected)
    assert read_text_rows(index, 0).column("url")[0].as_py() == "http://a/0.jpg"


@pytest.mark.parametrize("input_format", ["csv.gz", "tsv.gz"])
def test_gzipped_csv_and_tsv(tmp_path, input_format):
    delimiter = "\t" if input_format.startswith("tsv") else ","
    lines = [delimiter.join(["SAMPLE_ID", "URL", "TEXT"])]
    lines += [delimiter.join([str(i), f"http://a/{i}.jpg", f'"caption{delimiter} {i}"']) for i in range(230)]
    data = ("\n".join(lines) + "\n").encode()
    url = write(tmp_path / f"part.{input_format}", data, gz=True)
    index = index_text_part(url, input_format, 50)
    assert index.offsets[-1] == len(data) and index.size == os.path.getsize(url)
    assert_shards_match(index, whole_file(data, input_format))


@pytest.mark.parametrize("input_format", ["jsonl", "jsonl.gz"])
@pytest.mark.parametrize("chunk", [16, text_index.CHUNK_BYTES])
def test_jsonl_plain_and_gzipped(tmp_path, monkeypatch, input_format, chunk):
    monkeypatch.setattr(text_index, "CHUNK_BYTES", chunk)
    lines = []
    for i in range(23):
        lines.append(json.dumps({"url": f"http://a/{i}.jpg", "caption": f"cap {i} {{}}\n", "n": i}))
        if i % 5 == 0:
            lines.append("  ")  # blank lines: pyarrow skips them
    data = ("\r\n".join(lines)).encode()
    url = write(tmp_path / f"part.{input_format}", data, gz=input_format.endswith(".gz"))
    index = index_text_part(url, input_format, 10)
    assert (index.num_rows, index.num_shards) == (23, 3)
    assert_shards_match(index, whole_file(data, input_format))


def test_jsonl_object_over_several_lines_is_refused(tmp_path):
    url = write(tmp_path / "pretty.jsonl", b'{"url": "http://a/1"}\n{\n "url": "http://a/2"\n}\n')
    with pytest.raises(TextFormatError, match="not one whole JSON object"):
        index_text_part(url, "jsonl", 10)


def test_types_stored_once_stay_stable_across_shards(tmp_path, monkeypatch):
    """Types come from the first block only: a column empty there reads as string in every shard, ints as int64."""
    monkeypatch.setattr(text_index, "INFER_BYTES", 200)  # the first block covers (part of) shard 0 only
    lines = ["SAMPLE_ID,URL,LICENSE,similarity"]
    lines += [f"{i},http://a/{i},{'' if i < 40 else 'cc-by'},{i / 10}" for i in range(100)]
    data = ("\n".join(lines) + "\n").encode()
    url = write(tmp_path / "types.csv", data)
    index = index_text_part(url, "csv", 30)
    assert index.schema == pa.schema(
        [("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("LICENSE", pa.string()), ("similarity", pa.float64())]
    )
    shards = [read_text_rows(index, k) for k in range(index.num_shards)]
    assert all(shard.schema == index.schema for shard in shards)
    assert shards[0].column("LICENSE").to_pylist() == [""] * 30  # as pyarrow reads an empty string field
    assert shards[3].column("LICENSE").to_pylist() == ["cc-by"] * 10
    assert_shards_match(index, whole_file(data, "csv"))  # pyarrow's whole-file read widens the same way


def test_jsonl_types_stable_null_then_strings(tmp_path, monkeypatch):
    monkeypatch.setattr(text_index, "INFER_BYTES", 100)
    lines = [json.dumps({"id": i, "tag": None if i < 20 else f"t{i}"}) for i in range(40)]
    url = write(tmp_path / "types.jsonl", ("\n".join(lines) + "\n").encode())
    index = index_text_part(url, "jsonl", 10)
    assert index.schema == pa.schema([("id", pa.int64()), ("tag", pa.string())])
    assert [read_text_rows(index, k).schema for k in range(4)] == [index.schema] * 4
    assert read_text_rows(index, 3).column("tag")[0].as_py() == "t30"


def test_value_breaking_the_stored_type_names_file_shard_and_column(tmp_path, monkeypatch):
    monkeypatch.setattr(text_index, "INFER_BYTES", 100)
    lines = ["URL,HEIGHT"] + [f"http://a/{i},{i}" for i in range(20)] + ["http://a/20,tall"]
    url = write(tmp_path / "bad.csv", ("\n".join(lines) + "\n").encode())
    index = index_text_part(url, "csv", 10)
    assert index.schema.field("HEIGHT").type == pa.int64()
    read_text_rows(index, 0)
    with pytest.raises(SchemaError, match=r"bad\.csv.*local shard 2.*'HEIGHT'.*int64"):
        read_text_rows(index, 2)


@pytest.mark.parametrize(
    ("late_row", "column"), [({"url": "http://a/9", "h": 1.5}, "h"), ({"url": "http://a/9", "extra": 1}, "extra")]
)
def test_jsonl_value_breaking_the_stored_schema_names_the_column(tmp_path, monkeypatch, late_row, column):
    monkeypatch.setattr(text_index, "INFER_BYTES", 50)
    lines = [json.dumps({"url": f"http://a/{i}", "h": i}) for i in range(9)] + [json.dumps(late_row)]
    url = write(tmp_path / "bad.jsonl", ("\n".join(lines) + "\n").encode())
    index = index_text_part(url, "jsonl", 5)
    with pytest.raises(SchemaError, match=rf"bad\.jsonl.*local shard 1.*'{column}'"):
        read_text_rows(index, 1)


def test_stored_index_is_reused_then_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    calls = []
    real = text_index.index_text_part

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(text_index, "index_text_part", counting)
    path = tmp_path / "part.tsv"
    url = write(path, ("\t".join(LAION_HEADER) + "\n" + "\n".join(laion_tsv_lines(25)) + "\n").encode())
    index_dir = str(tmp_path / "metadata" / "text_index")
    first = load_or_build_index(url, "tsv", 10, index_dir)
    (stored,) = os.listdir(index_dir)
    assert stored.endswith("-S10.json") and len(calls) == 1
    assert load_or_build_index(url, "tsv", 10, index_dir) == first and len(calls) == 1
    assert TextPartIndex.from_json(first.to_json()) == first

    path.write_bytes(("\t".join(LAION_HEADER) + "\n" + "\n".join(laion_tsv_lines(31)) + "\n").encode())
    with pytest.raises(StaleIndexError):
        read_text_rows(first, 0)  # the old index is never used on the changed file
    second = load_or_build_index(url, "tsv", 10, index_dir)
    assert len(calls) == 2 and (second.num_rows, second.num_shards) == (31, 4)
    assert read_text_rows(second, 3).column("SAMPLE_ID").to_pylist() == [30]
    assert load_or_build_index(url, "tsv", 10, index_dir) == second and len(calls) == 2
    assert load_index(url, "tsv", 10, index_dir) == second and load_index(url, "tsv", 7, index_dir) is None
    # another shard size is another index file; another way of reading the same file is a rebuild
    load_or_build_index(url, "tsv", 7, index_dir)
    assert len(calls) == 3 and len(os.listdir(index_dir)) == 2
    headless = load_or_build_index(url, "tsv", 10, index_dir, column_names=[f"c{i}" for i in range(8)])
    assert len(calls) == 4 and not headless.header and headless.num_rows == 32
    assert load_index(url, "tsv", 10, index_dir) == headless  # what a reader without the names finds
    assert load_index(url, "csv", 10, index_dir) is None


@pytest.mark.parametrize(
    ("input_format", "data", "columns"),
    [
        ("csv", b"", ()),
        ("csv", b"URL,TEXT\n", ("URL", "TEXT")),
        ("tsv", b"URL\tTEXT", ("URL", "TEXT")),
        ("tsv.gz", b"URL\tTEXT\r\n\r\n", ("URL", "TEXT")),
        ("jsonl", b"", ()),
        ("jsonl", b"\n  \n", ()),
    ],
)
def test_empty_and_header_only_parts_have_no_rows(tmp_path, input_format, data, columns):
    url = write(tmp_path / f"empty.{input_format}", data, gz=input_format.endswith(".gz"))
    index = index_text_part(url, input_format, 10)
    assert (index.num_rows, index.num_shards, index.columns) == (0, 0, columns)
    assert index.offsets == (len(data),)
    assert TextPartIndex.from_json(index.to_json()) == index
    with pytest.raises(ShardOutOfRange):
        read_text_rows(index, 0)


def test_numbering_matches_img2dataset_reader_on_tsv(tmp_path):
    data = ("\t".join(LAION_HEADER) + "\n" + "\n".join(laion_tsv_lines(45)) + "\n").encode()
    url = write(tmp_path / "part.tsv", data)
    os.makedirs(tmp_path / "i2d")
    reader = Reader(
        url_list=url,
        input_format="tsv",
        url_col="URL",
        caption_col="TEXT",
        verify_hash_col=None,
        verify_hash_type=None,
        save_additional_columns=None,
        number_sample_per_shard=20,
        done_shards=set(),
        tmp_path=str(tmp_path / "i2d"),
    )
    expected = {shard_id: feather.read_table(path) for shard_id, path in reader}
    index = index_text_part(url, "tsv", 20)
    assert index.num_shards == len(expected) == 3
    for k, table in expected.items():
        ours = read_text_rows(index, k)
        assert ours.column("URL").to_pylist() == table.column("url").to_pylist()
        assert ours.column("TEXT").to_pylist() == table.column("caption").to_pylist()


@pytest.mark.parametrize("input_format", ["tsv", "tsv.gz"])
def test_part_and_index_on_s3(s3, input_format):
    """The part and its index on S3: ranged reads, the ETag as identity, rebuilt when the object is replaced."""
    data = ("\t".join(LAION_HEADER) + "\n" + "\n".join(laion_tsv_lines(25)) + "\n").encode()
    url = f"{s3}/meta/part-00000.{input_format}"
    with fsspec.open(url, "wb") as f:
        f.write(gzip.compress(data) if input_format.endswith(".gz") else data)
    index = load_or_build_index(url, input_format, 10, f"{s3}/metadata/text_index")
    assert index.etag and index.num_shards == 3
    assert_shards_match(index, whole_file(data, input_format))
    assert load_or_build_index(url, input_format, 10, f"{s3}/metadata/text_index") == index

    changed = data.replace(b"photo 1 of a cat", b"photo 1 of a dog")  # same size, new ETag
    with fsspec.open(url, "wb") as f:
        f.write(gzip.compress(changed) if input_format.endswith(".gz") else changed)
    with pytest.raises(StaleIndexError):
        read_text_rows(index, 0)
    rebuilt = load_or_build_index(url, input_format, 10, f"{s3}/metadata/text_index")
    assert rebuilt.etag != index.etag
    assert read_text_rows(rebuilt, 0).column("TEXT")[1].as_py() == "photo 1 of a dog"
