"""The dataset card over real code parquets: its header loads exactly the included shards, its prose names the rest."""

from __future__ import annotations

import os
import re

import numpy as np
import polars as pl
import pyarrow.dataset as ds
import pytest
import yaml

from laion_vq.report import card as card_module
from laion_vq.report.card import dataset_card, included_code_files
from laion_vq.report.shards import CHECKS_SCHEMA, CODES_SCHEMA_REPORT, IMAGES_SCHEMA, build_report
from laion_vq.shards.codes import build_codes_table, write_codes_parquet
from laion_vq.shards.schema import CODES_SCHEMA
from laion_vq.shards.storage import StorageLayout

MODEL = "vqgan_gumbel_f8"
GRID, N_EMBED = 32, 8192
ROWS = {0: 3, 1: 2, 2: 4, 3: 1}  # 00002 excluded, 00003 corrupted (its file stays on storage)
PROVENANCE = {
    "checkpoint": "/models/vqgan_gumbel_f8/last.ckpt",
    "checkpoint_sha256": "ab" * 32,
    "dtype": "bf16",
    "index_rule": "argmax",
}


def _write_codes(layout: StorageLayout) -> str:
    rng = np.random.default_rng(0)
    for shard, n in ROWS.items():
        keys = [f"{shard:05d}{i:04d}" for i in range(n)]
        meta = {
            k: {"caption": f"caption {k}", "url": f"https://example.com/{k}.jpg", "LICENSE": "?", "NSFW": "UNLIKELY"}
            for k in keys
        }
        table = build_codes_table(keys, rng.integers(0, N_EMBED, (n, GRID, GRID)), meta)
        write_codes_parquet(table, layout.code_shard(MODEL, shard), {"model": MODEL, "grid": GRID})
    folder = layout.codes_dir(MODEL)
    open(os.path.join(folder, "00004.parquet.tmp-0123"), "wb").close()  # a crashed write's leftover
    return folder


def _report(other_checkpoint_for: str | None = None):
    checks = [
        dict(shard=f"{s:05d}", check="code_parquets_contract", passed=True, severity="ERROR", checked_at=1.0)
        for s in (0, 1, 2)
    ]
    checks.append(
        dict(
            shard="00003",
            check="code_parquets_contract",
            passed=False,
            severity="ERROR",
            reason="code out of range",
            detail="codes span [0, 9000], outside [0, 8192)",
            checked_at=1.0,
        )
    )
    codes = [
        dict(
            shard=f"{s:05d}",
            encoded=n,
            undecodable=0,
            checkpoint_sha256="cd" * 32 if f"{s:05d}" == other_checkpoint_for else PROVENANCE["checkpoint_sha256"],
        )
        for s, n in ROWS.items()
    ]
    images = [dict(shard=f"{s:05d}", rows=n + 1, successes=n) for s, n in ROWS.items()]
    return build_report(
        checks=pl.DataFrame(checks, schema=CHECKS_SCHEMA),
        metadata=None,
        images=pl.DataFrame(images, schema=IMAGES_SCHEMA),
        codes=pl.DataFrame(codes, schema=CODES_SCHEMA_REPORT),
        exclusions={"00002": "duplicate of 00001 (metadata bug)"},
        num_shards=10,
        n_embed=N_EMBED,
    )


def _card(folder: str, report, provenance: dict) -> tuple[str, dict, list[str]]:
    files = included_code_files(report, os.listdir(folder))
    text = dataset_card(
        model=MODEL,
        provenance=provenance,
        report=report,
        included_files=files,
        grid=GRID,
        n_embed=N_EMBED,
        code_columns=CODES_SCHEMA.names,
    )
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(text)
    header = re.match(r"---\n(.*?\n)---\n", text, re.DOTALL)
    assert header, "the card must open with YAML front matter"
    return text, yaml.safe_load(header.group(1)), files


@pytest.fixture
def folder(tmp_path) -> str:
    return _write_codes(StorageLayout(str(tmp_path)))


def test_header_lists_exactly_the_included_shards_and_they_load(folder):
    text, header, files = _card(folder, _report(), PROVENANCE)
    assert files == ["00000.parquet", "00001.parquet"]
    assert header["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}]
    assert header["license"] == "other" and header["size_categories"] == ["n<1K"]
    assert {"task_categories", "tags"} <= set(header)
    table = ds.dataset([os.path.join(folder, f) for f in files], format="parquet").to_table()
    assert table.num_rows == ROWS[0] + ROWS[1]
    code = np.frombuffer(table.column("code")[0].as_py(), np.int16).reshape(GRID, GRID)
    assert code.shape == (32, 32) and code.dtype == np.int16
    assert "00002.parquet" not in text and "00003.parquet" not in text


def test_prose_names_what_is_left_out_and_the_provenance(folder):
    text, _, _ = _card(folder, _report(), PROVENANCE)
    assert "| 00002 | duplicate of 00001 (metadata bug) |" in text
    assert "| 00003 | code_parquets_contract | code out of range |" in text
    for fact in ("| checkpoint file | `last.ckpt` |", PROVENANCE["checkpoint_sha256"], "`bf16`", "`argmax`", MODEL):
        assert fact in text
    assert PROVENANCE["checkpoint"] not in text  # a published card names no local path or private bucket
    assert 'np.frombuffer(row["code"], np.int16).reshape(32, 32)' in text
    assert "Licence and safety columns: `LICENSE`, `NSFW`" in text and "CC-BY 4.0" in text
    assert "Included: 2 of 10 shards (`00000`–`00001`)" in text
    assert "7 in the metadata, 5 downloaded (71.43%), 5 encoded" in text  # shards 00000 (3 of 4), 00001 (2 of 3)
    assert "lowest 66.7%, median 70.8%, highest 75.0%" in text
    assert "NOISE" not in text and "CAUTION" not in text and "mixes code versions" not in text


def test_random_weights_warning_only_when_flagged(folder):
    text, _, _ = _card(folder, _report(), {**PROVENANCE, "random_weights": True})
    assert "**THESE CODES ARE NOISE.**" in text and "**random weights**" in text


def test_mixed_checkpoints_are_called_out(folder):
    text, _, _ = _card(folder, _report(other_checkpoint_for="00001"), PROVENANCE)
    assert "cd" * 32 in text and "the dataset mixes code versions" in text


@pytest.mark.parametrize("inline_max", [32, 1])  # the snippet lists the files, or reads them from the header
def test_the_cards_snippet_loads_the_header_files(folder, monkeypatch, inline_max):
    monkeypatch.setattr(card_module, "INLINE_FILES_MAX", inline_max)
    text, _, files = _card(folder, _report(), PROVENANCE)
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    assert ("files = ['00000.parquet', '00001.parquet']" in snippet) == (inline_max == 32)
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(snippet, namespace)  # the card's own snippet, run as a reader would
    assert namespace["files"] == files
    assert namespace["table"].num_rows == ROWS[0] + ROWS[1]
    assert namespace["codes"].shape == (GRID, GRID)


def test_card_follows_the_source_its_images_and_its_filter(folder):
    """A DataComp copy at 512 px with a filter: the card names DataComp, its licence and safety columns as the
    parquets hold them, the image size, the resize mode and the filter rows had to pass."""
    provenance = {
        **PROVENANCE,
        "source_format": "datacomp",
        "image_size": 512,
        "resize_mode": "center_crop",
        "filter": "clip_l14_similarity_score >= 0.3",
    }
    files = included_code_files(_report(), os.listdir(folder))
    columns = ["key", "code", "caption", "url", "uid", "face_bboxes", "source_sha256", "image_sha256"]
    text = dataset_card(
        model=MODEL,
        provenance=provenance,
        report=_report(),
        included_files=files,
        grid=32,
        n_embed=N_EMBED,
        code_columns=columns,
    )
    header = yaml.safe_load(re.match(r"---\n(.*?\n)---\n", text, re.DOTALL).group(1))
    assert header["pretty_name"] == f"VQGAN codes ({MODEL}) of DataComp images" and "datacomp" in header["tags"]
    assert "of DataComp\n" in text and "LAION-400M" not in text
    assert "Licence and safety columns: `face_bboxes`" in text
    assert "(512×512 images)" in text and "resize mode `center_crop`" in text
    assert "rows failing the filter `clip_l14_similarity_score >= 0.3` were never downloaded" in text
    assert "CC-BY 4.0" in text  # DataComp's published licence
