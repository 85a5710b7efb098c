"""Metadata sources: which columns hold the URL and caption, in which file format, and what else the source
knows about each image (a hash to verify, licence columns). One place for every preset.

A preset names a published dataset's layout, with the column names as its publishers spell them (each cites
where). img2dataset reads the same sources with `url_col`, `caption_col`, `input_format`, `verify_hash`; the
operator picks a preset with `LAION_VQ_METADATA_FORMAT` and may override the URL/caption columns and the file
format one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from laion_vq.shards.schema import LAION_SCHEMA

#: File formats, spelled as img2dataset's `input_format` spells them.
PARQUET = "parquet"
TEXT_FORMATS = ("csv", "csv.gz", "tsv", "tsv.gz", "jsonl", "jsonl.gz")
INPUT_FORMATS = (PARQUET, *TEXT_FORMATS)


@dataclass(frozen=True)
class SourceFormat:
    """How to read one metadata source.

    `columns` lists the published columns and their Arrow types (`"string"`, `"int64"`, `"float64"`,
    `"bool"`, `"list<list<float64>>"` …) in published order: what the source holds, used for the docs,
    the dataset card and test fixtures; reading never needs it except for a text file without a header
    (`header=False`), whose column names it gives.
    """

    name: str
    url_column: str
    caption_column: str
    input_format: str = PARQUET
    #: a text file whose first line is data, not column names (CC12M's TSV): names come from `columns`
    header: bool = True
    #: the column holding a hash of the image's original bytes (DataComp's `sha256`), and the hash's type
    hash_column: str | None = None
    hash_type: str | None = None
    #: columns a user must look at to honour licences and safety labels (named on the dataset card)
    license_columns: tuple[str, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()
    #: the dataset's licence as published (for the card)
    licence: str = ""
    #: where the column names above are published
    citation: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input format {self.input_format!r} is not one of {INPUT_FORMATS}")
        if self.url_column == self.caption_column:
            raise ValueError(f"the URL and caption columns must differ, both are {self.url_column!r}")
        if not self.header and not self.columns:
            raise ValueError(f"source {self.name!r}: a file without a header needs its column names in `columns`")
        for column, spec in self.columns:
            try:
                arrow_type(spec)
            except ValueError as err:
                raise ValueError(f"source {self.name!r}: column {column!r}: {err}") from err

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def schema(self) -> pa.Schema:
        """The published columns as an Arrow schema (empty when the preset publishes none)."""
        return pa.schema([pa.field(name, arrow_type(spec)) for name, spec in self.columns])

    def with_overrides(
        self, url_column: str | None = None, caption_column: str | None = None, input_format: str | None = None
    ) -> SourceFormat:
        """This preset with the operator's explicit URL/caption columns or file format."""
        changes: dict[str, Any] = {
            key: value
            for key, value in (
                ("url_column", url_column),
                ("caption_column", caption_column),
                ("input_format", input_format),
            )
            if value
        }
        return replace(self, **changes) if changes else self


#: The scalar Arrow types a preset's `columns` may name, by the spelling used there. pyarrow's own names for the
#: floats (`double`, `float`) are accepted too, so `str(pa_type)` parses back.
_SCALAR_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}
_ALIASES = {"double": "float64", "float": "float32", "utf8": "string", "large_string": "string"}


def arrow_type(spec: str) -> pa.DataType:
    """The Arrow type a `columns` entry names: a scalar (`string`, `int32`, `int64`, `float32`, `float64`,
    `bool`) or `list<…>` of one, nested as deep as needed (`list<list<float64>>`).

    A spelling, not a Python object, so presets stay plain data that docs and cards can print.
    """
    text = spec.strip()
    if text.startswith("list<") and text.endswith(">"):
        inner = text[len("list<") : -1].strip()
        if inner.startswith("item:"):  # pyarrow's own str(): list<item: int64>
            inner = inner[len("item:") :]
        return pa.list_(arrow_type(inner))
    name = _ALIASES.get(text, text)
    if name in _SCALAR_TYPES:
        return _SCALAR_TYPES[name]
    raise ValueError(f"unknown Arrow type {spec!r}; known: {sorted(_SCALAR_TYPES)} and list<…> of them")


def type_spec(data_type: pa.DataType) -> str:
    """The `columns` spelling of `data_type`, the inverse of `arrow_type` (so LAION_SCHEMA can be a preset)."""
    if pa.types.is_list(data_type):
        return f"list<{type_spec(data_type.value_type)}>"
    for name, known in _SCALAR_TYPES.items():
        if data_type == known:
            return name
    raise ValueError(f"Arrow type {data_type} has no `columns` spelling; known: {sorted(_SCALAR_TYPES)}")


#: The default and today's layout.
DEFAULT_PRESET = "laion400m"

# Where each preset's facts come from. The img2dataset examples were read from the rom1504/img2dataset git
# mirror (HEAD 95523bc, 2025-08-16), `dataset_examples/*.md`; the other sources are named above each preset.
PRESETS: dict[str, SourceFormat] = {
    # LAION_SCHEMA in laion_vq/shards/schema.py is the one home of this layout (what the pipeline has always read).
    # URL/TEXT/parquet and the LICENSE/NSFW/similarity columns: img2dataset dataset_examples/laion400m.md
    # (`--url_col "URL" --caption_col "TEXT"`, `--save_additional_columns '["NSFW","similarity","LICENSE"]'`).
    # laion.ai/blog/laion-400-open-dataset is the publisher's page (not re-read here); the CC-BY 4.0 licence is
    # the one the project's dataset card (laion_vq/report/card.py) already states.
    "laion400m": SourceFormat(
        name="laion400m",
        url_column="URL",
        caption_column="TEXT",
        input_format=PARQUET,
        license_columns=("LICENSE", "NSFW"),
        columns=tuple((field.name, type_spec(field.type)) for field in LAION_SCHEMA),
        licence="CC-BY 4.0 (the metadata; each image keeps its own licence)",
        citation=(
            "https://laion.ai/blog/laion-400-open-dataset/ ; "
            "https://github.com/rom1504/img2dataset/blob/main/dataset_examples/laion400m.md"
        ),
        description=(
            "LAION-400M metadata parquets (the-eye.eu laion400m-meta), 400 M English image-text pairs. The column "
            "types are LAION_SCHEMA's, which the pipeline has read since its first shard; no parquet was re-read "
            "for this preset. LICENSE is what LAION found on the page (often '?'), NSFW its UNLIKELY/UNSURE/NSFW tag."
        ),
    ),
    # Re-LAION-5B (Aug 2024), e.g. laion/relaion2B-en-research-safe on Hugging Face: gated, and the repo has no
    # dataset card ("No dataset card yet"), so no published schema could be read. `url`/`caption` are the names
    # third-party code uses on the real parts: github.com/anyscale/examples image_processing/process_images.py
    # (ray.data.read_parquet(..., columns=["url"])) and rmnigm/retrieve evaluation/eval_datasets/etl/laion.py
    # (COLUMNS = key, hash, url, caption, similarity, pwatermark, punsafe, original_width, original_height); `width`,
    # `height`, `exif` and `status` appear in other third-party scripts that read the parts. Licence: LAION's
    # release post as quoted by rmnigm/retrieve docs ("We release both Re-LAION-5B-research and
    # Re-LAION-5B-research-safe under Apache 2.0 License"); huggingface.co/datasets/laion/relaion2B-en-research
    # shows "License: cc-by-4.0".
    "relaion5b": SourceFormat(
        name="relaion5b",
        url_column="url",
        caption_column="caption",
        input_format=PARQUET,
        license_columns=("punsafe", "pwatermark"),
        columns=(
            ("key", "string"),
            ("hash", "int64"),
            ("url", "string"),
            ("caption", "string"),
            ("similarity", "float64"),
            ("pwatermark", "float64"),
            ("punsafe", "float64"),
            ("original_width", "int64"),
            ("original_height", "int64"),
            ("width", "int64"),
            ("height", "int64"),
            ("exif", "string"),
            ("status", "string"),
        ),
        licence=(
            "Apache-2.0 per LAION's Re-LAION-5B post (quoted, not read here); the Hugging Face page of "
            "laion/relaion2B-en-research lists cc-by-4.0; research use only, gated"
        ),
        citation=(
            "https://laion.ai/blog/relaion-5b/ ; https://huggingface.co/datasets/laion/relaion2B-en-research-safe ; "
            "https://github.com/anyscale/examples/blob/main/image_processing/process_images.py"
        ),
        description=(
            "Re-LAION-5B (relaion2B-en/-multi, relaion1B-nolang; -research and -research-safe), LAION-5B re-released "
            "in Aug 2024 without the links to known CSAM; gated on Hugging Face. UNVERIFIED: LAION publishes no "
            "schema (no dataset card) and the gated parts could not be read here. The URL/caption names (`url`, "
            "`caption`) are those third-party code uses on the real parts; the other columns are names such code "
            "reads too (about 15 columns in all, one script says), but their order and Arrow types here are "
            "assumptions, and the list is incomplete. `hash` is LAION's int64 join key, not a hash of the image."
        ),
    ),
    # LAION-5B as first published (laion2B-en, laion2B-multi, laion1B-nolang), in its "joined" layout, the one with
    # punsafe/pwatermark: img2dataset dataset_examples/laion5B.md ("the joined collection that include the pwatermark
    # and punsafe fields", url_col="URL", caption_col="TEXT", input_format="parquet"). The column list and types are
    # those of a published subset of laion2B-en-joined, huggingface.co/datasets/Rexhaif/laion-2b-en-very-unsafe
    # README.md dataset_info (URL string, TEXT string, WIDTH int32, HEIGHT int32, similarity float64, hash int64,
    # punsafe float32, pwatermark float32); laion/laion2B-en-joined itself is disabled ("Access to this dataset has
    # been disabled") and its README is empty. Licence: huggingface.co/datasets/laion/laion2B-en-joined
    # ("License: cc-by-4.0").
    "laion5b": SourceFormat(
        name="laion5b",
        url_column="URL",
        caption_column="TEXT",
        input_format=PARQUET,
        license_columns=("punsafe", "pwatermark"),
        columns=(
            ("URL", "string"),
            ("TEXT", "string"),
            ("WIDTH", "int32"),
            ("HEIGHT", "int32"),
            ("similarity", "float64"),
            ("hash", "int64"),
            ("punsafe", "float32"),
            ("pwatermark", "float32"),
        ),
        licence="CC-BY 4.0 (the metadata; each image keeps its own licence)",
        citation=(
            "https://github.com/rom1504/img2dataset/blob/main/dataset_examples/laion5B.md ; "
            "https://huggingface.co/datasets/laion/laion2B-en-joined ; "
            "https://huggingface.co/datasets/Rexhaif/laion-2b-en-very-unsafe"
        ),
        description=(
            "LAION-5B's laion2B-en-joined parts (URL, TEXT, size, CLIP similarity, LAION's int64 `hash` of the "
            "sample, and the punsafe/pwatermark detector scores); laion2B-multi-joined adds a LANGUAGE column "
            "(ride-along). LAION withdrew LAION-5B in Dec 2023; use relaion5b for the cleaned re-release. The "
            "column types come from a published subset of laion2B-en-joined, not from LAION's own card (empty). "
            "The plain laion2B-en parts (without -joined) have, as far as published subsets show, LAION-400M's "
            "columns (SAMPLE_ID … LICENSE, NSFW, similarity; -multi adds LANGUAGE): read them with laion400m. "
            "`hash` is not a hash of the image bytes (the separate laion2B-*-md5 collections carry an md5)."
        ),
    ),
    # DataComp (CommonPool small…xlarge and DataComp-1B): url/text/parquet, face_bboxes as the bbox column and uid
    # carried along: github.com/mlfoundations/datacomp download_upstream.py (HEAD 4a8df19): img2dataset.download(...,
    # input_format="parquet", url_col="url", caption_col="text", bbox_col="face_bboxes", save_additional_columns=
    # ["uid"]). Columns, order and types: the Hugging Face viewer of mlfoundations/datacomp_small (uid string, url
    # string, text string, original_width int64, original_height int64, clip_b32_similarity_score float32,
    # clip_l14_similarity_score float32, face_bboxes sequence, sha256 string) and, for face_bboxes' nesting, a
    # published subset's card (huggingface.co/datasets/nielsr/datacomp_small_basic_filtering: sequence of sequence
    # of float64). Licence: huggingface.co/datasets/mlfoundations/datacomp_1b ("License: cc-by-4.0").
    "datacomp": SourceFormat(
        name="datacomp",
        url_column="url",
        caption_column="text",
        input_format=PARQUET,
        hash_column="sha256",
        hash_type="sha256",
        license_columns=("face_bboxes",),
        columns=(
            ("uid", "string"),
            ("url", "string"),
            ("text", "string"),
            ("original_width", "int64"),
            ("original_height", "int64"),
            ("clip_b32_similarity_score", "float32"),
            ("clip_l14_similarity_score", "float32"),
            ("face_bboxes", "list<list<float64>>"),
            ("sha256", "string"),
        ),
        licence="CC-BY 4.0 (the metadata; each image keeps its own licence)",
        citation=(
            "https://github.com/mlfoundations/datacomp/blob/main/download_upstream.py ; "
            "https://huggingface.co/datasets/mlfoundations/datacomp_small ; "
            "https://github.com/rom1504/img2dataset/blob/main/dataset_examples/datacomp.md"
        ),
        description=(
            "DataComp CommonPool (small 12.8M … xlarge 12.8B) and DataComp-1B metadata parquets. `uid` is a 128-bit "
            "hex id, `sha256` the hash of the image bytes DataComp downloaded (verify with img2dataset's verify_hash), "
            "`face_bboxes` the detected faces as relative [x0, y0, x1, y1] boxes, which DataComp's own download "
            "blurs (img2dataset bbox_col): the privacy column to look at. No NSFW column is published."
        ),
    ),
    # COYO-700M: url/text/parquet and the ride-along columns: img2dataset dataset_examples/coyo-700m.md
    # (--url_col "url" --caption_col "text", --save_additional_columns '["clip_similarity_vitb32", …]'). Columns,
    # order and types: github.com/kakaobrain/coyo-dataset README.md (HEAD 3dc6afb), "Dataset Preview" and the
    # name/type table: id long, url string, text string, width/height integer, image_phash string, text_length,
    # word_count, num_tokens_bert, num_tokens_gpt, num_faces integer, the six scores float (Spark's long = int64,
    # integer = int32, float = float32; a published subset's card, huggingface.co/datasets/dwb2023/
    # filtered-coyo-700M-beta, shows the same int64/int32/float32). Licence: the same README, "## License".
    "coyo700m": SourceFormat(
        name="coyo700m",
        url_column="url",
        caption_column="text",
        input_format=PARQUET,
        license_columns=("nsfw_score_opennsfw2", "nsfw_score_gantman", "watermark_score"),
        columns=(
            ("id", "int64"),
            ("url", "string"),
            ("text", "string"),
            ("width", "int32"),
            ("height", "int32"),
            ("image_phash", "string"),
            ("text_length", "int32"),
            ("word_count", "int32"),
            ("num_tokens_bert", "int32"),
            ("num_tokens_gpt", "int32"),
            ("num_faces", "int32"),
            ("clip_similarity_vitb32", "float32"),
            ("clip_similarity_vitl14", "float32"),
            ("nsfw_score_opennsfw2", "float32"),
            ("nsfw_score_gantman", "float32"),
            ("watermark_score", "float32"),
            ("aesthetic_score_laion_v2", "float32"),
        ),
        licence="CC-BY 4.0 (the metadata; the images and texts keep the licence of their content)",
        citation=(
            "https://github.com/kakaobrain/coyo-dataset#dataset-preview ; "
            "https://huggingface.co/datasets/kakaobrain/coyo-700m ; "
            "https://github.com/rom1504/img2dataset/blob/main/dataset_examples/coyo-700m.md"
        ),
        description=(
            "COYO-700M (Kakao Brain), 747 M alt-text pairs with image and text attributes. `image_phash` is a "
            "perceptual hash, not a hash of the bytes, so it cannot verify a download. Safety columns: the two NSFW "
            "scores (OpenNSFW2, GantMan) and the watermark score. The Arrow widths (int32/float32) are read from "
            "Spark's type names in the README and a published subset, not from a coyo-700m parquet footer."
        ),
    ),
    # CC12M: one `cc12m.tsv`, url TAB caption, no header line: github.com/google-research-datasets/conceptual-12m
    # README.md (HEAD 387452e), "Format (.tsv)": [image_url_N]\t[caption_N]. The names url/caption are the ones
    # img2dataset's dataset_examples/cc12m.md gives them (`sed -i '1s/^/url\tcaption\n/' cc12m.tsv`, --url_col "url"
    # --caption_col "caption"); here they come from `columns` instead of a rewritten file. Licence: the repo's LICENSE.
    "cc12m": SourceFormat(
        name="cc12m",
        url_column="url",
        caption_column="caption",
        input_format="tsv",
        header=False,
        columns=(("url", "string"), ("caption", "string")),
        licence=(
            "Google's terms: may be freely used for any purpose, acknowledgement of Google LLC appreciated; "
            "provided as is (the images are not Google's)"
        ),
        citation=(
            "https://github.com/google-research-datasets/conceptual-12m ; "
            "https://github.com/rom1504/img2dataset/blob/main/dataset_examples/cc12m.md"
        ),
        description=(
            "Conceptual 12M (Google), ~12 M pairs in one TSV without a header line; the column names are "
            "img2dataset's. No licence or safety columns. Google publishes SHA256 and MD5 hashes of the images in "
            "a separate TSV (url, SHA256, MD5), not in cc12m.tsv, so this preset has no hash column."
        ),
    ),
}


#: How cards and logs name each preset's dataset.
TITLES = {
    "laion400m": "LAION-400M",
    "relaion5b": "Re-LAION-5B",
    "laion5b": "LAION-5B",
    "datacomp": "DataComp",
    "coyo700m": "COYO-700M",
    "cc12m": "Conceptual 12M (CC12M)",
}


def title(name: str) -> str:
    """`datacomp` → `DataComp`; a name that is no preset stays as it is."""
    return TITLES.get(name, name)


def preset(name: str) -> SourceFormat:
    """The preset called `name`; an unknown name is an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown metadata format {name!r}; known: {sorted(PRESETS)}") from None
