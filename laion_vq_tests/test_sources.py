"""Metadata source presets (`laion_vq/shards/sources.py`) and the parts fabricated in their layouts
(`laion_vq/testing/source_parts.py`): every preset is well formed, and every layout and file format reads
back with the columns, types and values that were written."""

from __future__ import annotations

import dataclasses
import hashlib

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from laion_vq.shards.schema import CAPTION_COLUMN, LAION_SCHEMA, URL_COLUMN
from laion_vq.shards.sources import (
    DEFAULT_PRESET,
    INPUT_FORMATS,
    PARQUET,
    PRESETS,
    SourceFormat,
    arrow_type,
    preset,
    type_spec,
)
from laion_vq.testing.source_parts import EXTRA_COLUMNS, extra_columns, write_source_part

PRESET_ORDER = ["laion400m", "relaion5b", "laion5b", "datacomp", "coyo700m", "cc12m"]
URLS = [f"http://127.0.0.1:8000/img/{i}.jpg?size=256,256" for i in range(7)]


def test_presets_in_order_and_default():
    assert list(PRESETS) == PRESET_ORDER
    assert DEFAULT_PRESET == "laion400m"
    assert preset(DEFAULT_PRESET) is PRESETS[DEFAULT_PRESET]


@pytest.mark.parametrize("name", PRESET_ORDER)
def test_each_preset_is_complete(name):
    fmt = preset(name)
    assert isinstance(fmt, SourceFormat)
    assert fmt.name == name
    assert fmt.input_format in INPUT_FORMATS
    names = fmt.column_names
    assert len(set(names)) == len(names), "a column is listed twice"
    assert fmt.url_column in names and fmt.caption_column in names
    assert set(fmt.license_columns) <= set(names)
    assert (fmt.hash_column is None) == (fmt.hash_type is None)
    if fmt.hash_column:
        assert fmt.hash_column in names and fmt.hash_type in ("md5", "sha256", "sha512")
    assert fmt.licence and fmt.citation.startswith("https://") and fmt.description
    assert fmt.schema.names == list(names)


def test_preset_facts():
    """The facts other code relies on: DataComp verifies sha256, CC12M is a headerless TSV, the rest parquet."""
    assert (preset("datacomp").hash_column, preset("datacomp").hash_type) == ("sha256", "sha256")
    cc12m = preset("cc12m")
    assert (cc12m.input_format, cc12m.header, cc12m.column_names) == ("tsv", False, ("url", "caption"))
    assert all(preset(n).input_format == PARQUET and preset(n).header for n in PRESET_ORDER if n != "cc12m")
    assert [(preset(n).url_column, preset(n).caption_column) for n in PRESET_ORDER] == [
        ("URL", "TEXT"),
        ("url", "caption"),
        ("URL", "TEXT"),
        ("url", "text"),
        ("url", "text"),
        ("url", "caption"),
    ]


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="unknown metadata format 'nope'") as err:
        preset("nope")
    for name in PRESET_ORDER:
        assert repr(name) in str(err.value)


def test_with_overrides():
    coyo = preset("coyo700m")
    assert coyo.with_overrides() is coyo
    assert coyo.with_overrides(url_column=None, caption_column="", input_format=None) is coyo
    changed = coyo.with_overrides(url_column="image_url", input_format="jsonl.gz")
    assert (changed.url_column, changed.caption_column, changed.input_format) == ("image_url", "text", "jsonl.gz")
    assert dataclasses.replace(changed, url_column="url", input_format=PARQUET) == coyo
    assert preset("coyo700m") is coyo, "an override must not change the preset"
    with pytest.raises(ValueError, match="input format"):
        coyo.with_overrides(input_format="xlsx")
    with pytest.raises(ValueError, match="must differ"):
        coyo.with_overrides(caption_column="url")


def test_laion400m_is_laion_schema():
    fmt = preset("laion400m")
    assert fmt.schema == LAION_SCHEMA
    assert fmt.column_names == tuple(LAION_SCHEMA.names)
    assert (fmt.url_column, fmt.caption_column) == (URL_COLUMN, CAPTION_COLUMN)


def test_arrow_type_parses_every_type_used():
    specs = {spec for fmt in PRESETS.values() for _, spec in fmt.columns}
    specs |= {type_spec(t) for t in EXTRA_COLUMNS.values()}
    assert specs >= {"string", "int32", "int64", "float32", "float64", "bool", "list<list<float64>>", "list<int64>"}
    for spec in specs:
        assert type_spec(arrow_type(spec)) == spec
    assert arrow_type("list<list<float64>>") == pa.list_(pa.list_(pa.float64()))
    assert arrow_type(" list< int32 > ") == pa.list_(pa.int32())
    for data_type in (pa.float64(), pa.float32(), pa.list_(pa.int64()), pa.list_(pa.list_(pa.float64()))):
        assert arrow_type(str(data_type)) == data_type, "pyarrow's own spelling parses back"
    for bad in ("int128", "list<int64", "map<string, int64>", ""):
        with pytest.raises(ValueError, match="unknown Arrow type"):
            arrow_type(bad)
    with pytest.raises(ValueError, match="no `columns` spelling"):
        type_spec(pa.timestamp("s"))


def test_source_format_rejects_bad_columns():
    with pytest.raises(ValueError, match="column 'x'.*int128"):
        SourceFormat("mine", "u", "c", columns=(("x", "int128"),))
    with pytest.raises(ValueError, match="without a header needs its column names"):
        SourceFormat("mine", "u", "c", input_format="tsv", header=False)


def test_extra_columns_by_format():
    every = list(EXTRA_COLUMNS)
    scalars = [name for name in every if name != "extra_list"]
    laion = preset("laion400m")
    assert extra_columns(laion) == every
    assert extra_columns(laion.with_overrides(input_format="jsonl.gz")) == every
    for text in ("csv", "csv.gz", "tsv", "tsv.gz"):
        assert extra_columns(laion.with_overrides(input_format=text)) == scalars
    assert extra_columns(preset("cc12m")) == [], "a headerless file can name no extra column"


def _read_back(fmt: SourceFormat, path: str) -> pa.Table:
    """Read a part as a pipeline would: pyarrow's own readers, names from the preset for a headerless file."""
    if fmt.input_format == PARQUET:
        return pq.read_table(path)
    if fmt.input_format.startswith("jsonl"):
        return pajson.read_json(path)
    names = None if fmt.header else [*fmt.column_names, *extra_columns(fmt)]
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names),
        parse_options=pacsv.ParseOptions(delimiter="\t" if fmt.input_format.startswith("tsv") else ","),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
    )


ROUND_TRIPS = [pytest.param(preset(name), id=name) for name in PRESET_ORDER] + [
    pytest.param(preset(name).with_overrides(input_format=input_format), id=f"{name}-{input_format}")
    for name in ("laion400m", "datacomp", "cc12m")
    for input_format in INPUT_FORMATS
    if input_format != preset(name).input_format
]


@pytest.mark.parametrize("fmt", ROUND_TRIPS)
def test_source_part_round_trips(tmp_path, fmt):
    path = str(tmp_path / f"part-00000.{fmt.input_format}")
    written = write_source_part(fmt, URLS, path, seed=3)
    assert written.column_names == [*fmt.column_names, *extra_columns(fmt)]
    assert written.column(fmt.url_column).to_pylist() == URLS
    if fmt.input_format == PARQUET:
        assert written.schema == pa.schema([*fmt.schema, *(pa.field(n, EXTRA_COLUMNS[n]) for n in extra_columns(fmt))])
    read = _read_back(fmt, path)
    assert read.schema == written.schema
    assert read.to_pylist() == written.to_pylist()


def test_text_parts_widen_types_and_exercise_quoting(tmp_path):
    fmt = preset("coyo700m").with_overrides(input_format="csv.gz")
    written = write_source_part(fmt, URLS, str(tmp_path / "part.csv.gz"))
    assert written.schema.field("width").type == pa.int64(), "int32 is read back from text as int64"
    assert written.schema.field("watermark_score").type == pa.float64()
    captions = written.column("text").to_pylist()
    assert any("," in c for c in captions) and any('"' in c for c in captions)
    assert any(not c.isascii() for c in captions)
    datacomp_tsv = preset("datacomp").with_overrides(input_format="tsv")
    list_in_tsv = write_source_part(datacomp_tsv, URLS, str(tmp_path / "part.tsv"))
    assert list_in_tsv.schema.field("face_bboxes").type == pa.string(), "CSV/TSV hold a list as JSON text"


def test_hash_column_takes_the_given_hashes(tmp_path):
    # real sha256 hex digests (an all-digit string would be read back from CSV as a number), and one missing
    hashes = [hashlib.sha256(url.encode()).hexdigest() for url in URLS[:-1]] + [None]
    for input_format in (PARQUET, "csv", "jsonl"):
        fmt = preset("datacomp").with_overrides(input_format=input_format)
        path = str(tmp_path / f"part.{input_format}")
        written = write_source_part(fmt, URLS, path, hashes=hashes)
        assert written.column("sha256").to_pylist() == hashes
        assert _read_back(fmt, path).column("sha256").to_pylist() == hashes
    with pytest.raises(ValueError, match="hashes for"):
        write_source_part(preset("datacomp"), URLS, str(tmp_path / "bad.parquet"), hashes=hashes[:2])


def test_parts_are_deterministic_by_seed(tmp_path):
    fmt = preset("relaion5b")
    first = write_source_part(fmt, URLS, str(tmp_path / "a.parquet"), seed=1)
    again = write_source_part(fmt, URLS, str(tmp_path / "b.parquet"), seed=1)
    other = write_source_part(fmt, URLS, str(tmp_path / "c.parquet"), seed=2)
    assert first.equals(again)
    assert not first.equals(other)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
