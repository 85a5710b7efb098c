"""The dataset card (`codes/<model>/README.md`): what a Hugging Face user reads, and what `datasets` loads.

The YAML header's `configs` lists the exact code parquets of the dataset, relative to the card's folder, so
`load_dataset` and the card's pyarrow snippet read the same files and nothing else. Which files those are is
one rule (`included_code_files`): **a shard is included when it has a code parquet, is not excluded and is
not corrupted** (warned shards, e.g. a low download rate, stay in). The prose follows the seed dataset's
card (VQGAN f8 8192 embeddings for LAION-100M) but states what this copy holds exactly: the checkpoint
and its sha256, the precision and index rule, which shards are in, which are out and why.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import cast

import polars as pl
import yaml

from laion_vq.report.shards import ShardReport
from laion_vq.shards.numbering import SHARD_DIGITS, is_shard_key
from laion_vq.shards.schema import success_rate
from laion_vq.shards.sources import DEFAULT_PRESET, PRESETS, SourceFormat, title
from laion_vq.shards.storage import TMP_MARKER

INLINE_FILES_MAX = 32  # up to this many files the snippet lists them; beyond, it reads them from the header
_SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)


def _shard_of(file_name: str) -> str | None:
    """`00042.parquet` → `00042`; anything else (the card, temp files, other names) → None."""
    stem, dot, ext = file_name.partition(".")
    if dot and ext == "parquet" and is_shard_key(stem) and TMP_MARKER not in file_name:
        return stem
    return None


def included_code_files(report: ShardReport, model_dir_listing: Iterable[str]) -> list[str]:
    """The code parquets of `codes/<model>/` that go into the dataset, as names relative to that folder, sorted.

    `model_dir_listing`: the folder's file names or paths. Included: a shard's `NNNNN.parquet` whose shard
    is neither excluded nor corrupted in the report (a file the report has not seen yet is included: no
    check has found it wanting)."""
    left_out = set(report.table.filter(pl.col("excluded") | pl.col("corrupted")).get_column("shard").to_list())
    names = {posixpath.basename(str(entry).rstrip("/")) for entry in model_dir_listing}
    return sorted(name for name in names if (shard := _shard_of(name)) is not None and shard not in left_out)


def _size_category(n: int) -> str:
    return next((label for limit, label in _SIZE_CATEGORIES if n < limit), "n>1T")


def _shard_ranges(shards: list[str]) -> str:
    """`00000, 00001, 00002, 00005` → `00000–00002, 00005`: 10,000 shard names in one readable line."""
    if not shards:
        return "none"
    numbers = sorted(int(s) for s in shards)
    ranges: list[tuple[int, int]] = []
    for n in numbers:
        if ranges and n == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], n)
        else:
            ranges.append((n, n))
    width = SHARD_DIGITS
    return ", ".join(f"`{a:0{width}d}`" if a == b else f"`{a:0{width}d}`–`{b:0{width}d}`" for a, b in ranges)


def _cell(value: object) -> str:
    text = "—" if value is None else " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= 200 else text[:199] + "…"


def _success_spread(rows: pl.DataFrame) -> str:
    """Per-shard download success, lowest / median / highest: one bad shard hides in an overall rate."""
    rates = rows.get_column("success_rate").drop_nulls()
    if rates.is_empty():
        return ""
    # floats (a Float64 column), though polars types a Series' min/median/max as any scalar
    lowest, median, highest = cast(tuple[float, float, float], (rates.min(), rates.median(), rates.max()))
    return f"Download success per shard: lowest {lowest:.1%}, median {median:.1%}, highest {highest:.1%}.\n"


def _front_matter(model: str, included_files: list[str], images: int, source: SourceFormat) -> str:
    name = title(source.name)
    header = {
        "pretty_name": f"VQGAN codes ({model}) of {name} images",
        "license": "other",
        "license_name": f"{source.name}-metadata-licence-images-keep-their-own-licences",
        "task_categories": ["text-to-image", "image-to-text"],
        "size_categories": [_size_category(images)],
        "tags": ["vqgan", "image-tokens", *(["laion"] if "laion" in source.name else []), source.name, model],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": list(included_files)}]}],
    }
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # the C dumper: 10,000 file names in ~0.1 s
    return "---\n" + yaml.dump(header, Dumper=dumper, sort_keys=False, allow_unicode=True) + "---\n"


def _loading_snippet(included_files: list[str], grid: int) -> str:
    if len(included_files) <= INLINE_FILES_MAX:
        files = "files = [" + ", ".join(repr(f) for f in included_files) + "]  # exactly the header's data_files"
    else:
        files = (
            "import yaml\n\n"
            "# the header's data_files, exactly (too many to list here)\n"
            'header = (folder / "README.md").read_text().split("---\\n")[1]\n'
            'files = yaml.safe_load(header)["configs"][0]["data_files"][0]["path"]'
        )
    return (
        "```python\n"
        "import pathlib\n\n"
        "import numpy as np\n"
        "import pyarrow.dataset as ds\n\n"
        'folder = pathlib.Path(".")  # the folder holding this README.md and the parquets\n'
        f"{files}\n"
        'dataset = ds.dataset([str(folder / f) for f in files], format="parquet")\n'
        "table = dataset.to_table()\n"
        "row = table.slice(0, 1).to_pylist()[0]  # the first image\n"
        f'codes = np.frombuffer(row["code"], np.int16).reshape({grid}, {grid})\n'
        "```\n"
    )


def _removals_section(removals: list[dict], removed: int) -> str:
    """What this copy was cleaned against: each removal list (name, sha256, items, newest date) and how many
    items it took out of shards already made (`removals`: dicts with those keys, from the lists and the ledger);
    `removed`: the rows marked removed in the shards on record (the report's `images_removed`), which also
    counts rows a list named before their download and that were never downloaded."""
    head = "## Cleaned against removal lists\n\n"
    if not removals and not removed:
        return head + "No removal list was applied to this copy (lists go under `removals/` at the storage root).\n"
    after = sum(int(r["removed"]) for r in removals)
    total = max(removed, after)
    lines = [
        head + f"{total:,} item(s) were removed from the shards (tar, status and every code version): {after:,} "
        f"taken out of shards already made, {total - after:,} never downloaded because a list named them first. "
        "The lists name items by URL, domain, sample id, key or image hash:\n",
        "| list | sha256 | items | newest date | removed here |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{_cell(r['name'])}` | `{r['sha256']}` | {int(r['items']):,} | {r['date']} | {int(r['removed']):,} |"
        for r in removals
    ]
    if not removals:
        lines.append("| (lists no longer on storage) | — | — | — | 0 |")
    return "\n".join(lines) + "\n"


def dataset_card(
    *,
    model: str,
    provenance: dict,
    report: ShardReport,
    included_files: list[str],
    grid: int,
    n_embed: int,
    code_columns: list[str],
    removals: list[dict] | None = None,
) -> str:
    """The README.md of `codes/<model>/`: YAML header (configs listing `included_files` exactly, licence,
    task and size categories, tags) then the prose. `provenance`: `checkpoint`, `checkpoint_sha256`,
    `dtype`, `index_rule`, and `random_weights` (true for a stand-in checkpoint: the card then says loudly
    that the codes are noise); `source_format`, `image_size`, `resize_mode` and `filter` say which source
    and which images (LAION-400M's 256 px `border` when absent: codes made before sources had formats)."""
    source = PRESETS.get(str(provenance.get("source_format") or DEFAULT_PRESET), PRESETS[DEFAULT_PRESET])
    name = title(source.name)
    image_size = int(provenance.get("image_size") or 256)
    resize_mode = str(provenance.get("resize_mode") or "border")
    row_filter = provenance.get("filter")
    table = report.table
    included = [shard for name in included_files if (shard := _shard_of(posixpath.basename(name)))]
    rows = table.filter(pl.col("shard").is_in(included))
    encoded = int(rows.get_column("encoded").sum() or 0)
    attempted = int(rows.get_column("image_rows").sum() or 0)
    downloaded = int(rows.get_column("successes").sum() or 0)
    left_out = int(rows.get_column("removed").sum() or 0) + int(rows.get_column("filtered").sum() or 0)
    rate = success_rate(downloaded, attempted, left_out)
    unknown_counts = len(included) - int(rows.get_column("encoded").is_not_null().sum())
    excluded = table.filter("excluded")
    corrupted = table.filter("corrupted")
    warned = rows.filter("warned").height
    num_shards = int(report.summary.get("num_shards") or 0)

    # a card is published: the checkpoint by file name (with its sha256), never a local path or private bucket
    checkpoint = (provenance.get("checkpoint") or "unknown").rstrip("/").rsplit("/", 1)[-1]
    sha256 = provenance.get("checkpoint_sha256") or "unknown"
    dtype = provenance.get("dtype") or "unknown"
    index_rule = provenance.get("index_rule") or "unknown"
    other_checkpoints = sorted(set(rows.get_column("checkpoint_sha256").drop_nulls().to_list()) - {sha256})
    licence_columns = [c for c in source.license_columns if c in code_columns or f"source_{c}" in code_columns]

    out = [
        _front_matter(model, included_files, encoded, source),
        f"# VQGAN codes ({model}, {n_embed} entries) of {name}\n",
    ]
    if provenance.get("random_weights"):
        out.append(
            "> [!CAUTION]\n"
            "> **THESE CODES ARE NOISE.** They were made by a checkpoint with **random weights** (a stand-in for\n"
            "> tests and demos), not a trained VQGAN. Do not train on them or compare them with the seed dataset.\n"
        )
    if other_checkpoints:
        out.append(
            "> [!WARNING]\n"
            f"> Some included shards were encoded by other checkpoints (sha256 {', '.join(other_checkpoints)}),\n"
            f"> not only by `{sha256}`: the dataset mixes code versions.\n"
        )
    out.append(
        f"This dataset holds the VQGAN codes of **{encoded:,} images** from **{len(included):,} shards** of\n"
        f"[{name}]({source.citation.split(' ; ')[0]}), in the format of the *VQGAN (f8, 8192)\n"
        "embeddings for LAION-100M* dataset. VQGAN was introduced in\n"
        '["Taming Transformers for High-Resolution Image Synthesis"](https://github.com/CompVis/taming-transformers).\n'
        "It does not contain the images.\n\n"
        "**Warning**: this large-scale dataset is non-curated. It was built for research purposes and **is not\n"
        "meant for any real-world production or application.**\n"
    )
    index_note = (
        "\nThe index rule `argmax` takes each code as the argmax of the quantizer's logits (deterministic);\n"
        "taming's own `encode` adds Gumbel noise, so the seed dataset's codes are samples of the same\n"
        "distribution, not bit-identical.\n"
        if index_rule == "argmax"
        else "\nThe index rule `sample` draws each code from softmax(logits) (Gumbel-max), the distribution taming's\n"
        "`GumbelQuantize` samples from, with noise seeded by the sample's key and the position: a key's codes do\n"
        "not depend on batch, order, shard grouping or device, and re-running reproduces them.\n"
        if index_rule == "sample"
        else ""
    )
    used = int((report.code_usage > 0).sum())
    codebook = f"{n_embed} entries; {used} used over the shards on record" if used else f"{n_embed} entries"
    out.append(
        "## Model\n\n"
        "| | |\n| --- | --- |\n"
        f"| model | `{model}` |\n"
        f"| checkpoint file | `{checkpoint}` |\n"
        f"| checkpoint sha256 | `{sha256}` |\n"
        f"| precision (dtype) | `{dtype}` |\n"
        f"| index rule | `{_cell(index_rule)}` |\n"
        f"| codebook | {codebook} |\n"
        f"| codes per image | {grid}×{grid} = {grid * grid} ({image_size}×{image_size} images) |\n"
        f"| random weights | {'**yes**' if provenance.get('random_weights') else 'no'} |\n" + index_note
    )
    out.append(
        "## Data\n\n"
        f"One parquet per {name} shard, `NNNNN.parquet`, one row per downloaded and decodable image, sorted by\n"
        f"`key`. Columns: {', '.join(f'`{c}`' for c in code_columns)}.\n\n"
        f"- `code`: {grid * grid} little-endian int16, row-major {grid}×{grid}, every value in `[0, {n_embed})`:\n"
        f'  `np.frombuffer(row["code"], np.int16).reshape({grid}, {grid})`.\n'
        f"- `caption`, `url` and the other columns are {name}'s `{source.caption_column}`, `{source.url_column}` and\n"
        "  every other column of its metadata, with their types (a name img2dataset uses itself, such as `width`\n"
        "  or `sha256`, is kept as `source_<name>`).\n"
        + (
            f"- Licence and safety columns: {', '.join(f'`{c}`' for c in licence_columns)}, as the source recorded "
            "them.\n"
            if licence_columns
            else f"- No licence or safety columns ({', '.join(f'`{c}`' for c in source.license_columns) or 'none'}"
            " in the source) in these parquets.\n"
        )
        + "\nLoad exactly the files of the header (paths relative to this card):\n\n"
        + _loading_snippet(included_files, grid)
    )
    out.append(
        "## Shards\n\n"
        f"Included: {len(included):,} of {num_shards:,} shards ({_shard_ranges(included)}).\n"
        + (
            f"Their images: {attempted:,} in the metadata, {downloaded:,} downloaded ("
            + ("—" if rate is None else f"{rate:.2%}")
            + (f" of the {attempted - left_out:,} not removed or filtered" if left_out else "")
            + f"), {encoded:,} encoded.\n{_success_spread(rows)}"
            if attempted
            else f"Their images: {encoded:,} encoded.\n"
        )
        + (f"Row counts are not on record for {unknown_counts} included shard(s).\n" if unknown_counts else "")
        + (f"{warned} included shard(s) had a warning (e.g. a low download rate) and stay in.\n" if warned else "")
    )
    if excluded.height:
        share = f" ({excluded.height / num_shards:.2%} of the shards)" if num_shards else ""
        out.append(f"### Excluded shards{share}\n\nTaken out by the operators:\n\n| shard | reason |\n| --- | --- |")
        out.extend(f"| {_cell(r['shard'])} | {_cell(r['excluded_reason'])} |" for r in excluded.iter_rows(named=True))
        out.append("")
    if corrupted.height:
        out.append(
            "### Corrupted shards, left out\n\nA check found them corrupted; their files (where present) are not in "
            "`data_files`:\n\n| shard | check | reason |\n| --- | --- | --- |"
        )
        out.extend(
            f"| {_cell(r['shard'])} | {_cell(r['corrupted_by'])} | {_cell(r['reason'])} |"
            for r in corrupted.iter_rows(named=True)
        )
        out.append("")
    out.append(_removals_section(removals or [], int(report.summary.get("images_removed") or 0)))
    # the full shards' size, from the report (an int column: polars types its max as any scalar)
    rows_per_shard = cast(int, table.get_column("metadata_rows").max()) or 10_000
    out.append(
        "## How it was made\n\n"
        f"1. {name} metadata parts, cut into shards of {rows_per_shard:,} rows (`metadata/NNNNN.parquet`)"
        + (
            f"; rows failing the filter `{_cell(row_filter)}` were never downloaded (status `filtered`).\n"
            if row_filter
            else ".\n"
        )
        + f"2. [img2dataset](https://github.com/rom1504/img2dataset) downloads each shard's images ({image_size} px,\n"
        f"   resize mode `{resize_mode}`; JPEG quality 95), counting failures by reason.\n"
        f"3. The `{model}` encoder turns each image into {grid}×{grid} codes; images that do not decode are\n"
        "   counted by reason and listed in each parquet's `laion_vq` key-value metadata, with the provenance.\n"
        "4. Checks, one result per shard: `raw_metadata_shards_valid` (rows, columns, URLs), `image_tars_complete`\n"
        "   (every image present and hashing as downloaded) and `code_parquets_contract` (shape, code range, keys;\n"
        "   rows = downloaded − undecodable), and `no_removed_items` on tars and codes (no item of a removal list\n"
        "   left).\n\n"
        "Made with the `laion_vq` Dagster pipeline, one partition per shard.\n"
    )
    out.append(
        "## Licence\n\n"
        f"The {name} metadata (captions, URLs, the other columns): {source.licence}.\n"
        "The images are not included: each image, and what is derived from it, stays under its own licence and\n"
        "its authors' rights"
        + ("\n(the `LICENSE` column holds what LAION found)" if "LICENSE" in licence_columns else "")
        + ".\nThe VQGAN models are distributed under the "
        "[MIT license](https://github.com/CompVis/taming-transformers/blob/master/License.txt).\n"
    )
    return "\n".join(out)
