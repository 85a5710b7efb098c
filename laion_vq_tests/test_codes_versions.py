"""Re-encoding with another checkpoint, precision or index rule never overwrites codes silently: the stage
refuses and keeps the stored parquet byte for byte; a new codes folder holds the new version side by side;
replacing takes an explicit setting. Real tars, the tiny real-architecture encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from laion_vq.shards.codes import read_codes_provenance
from laion_vq.shards.storage import StorageLayout
from laion_vq.stages import CodesVersionError, encode_code_shard

from .conftest import TINY_MODEL, _jpeg, _write_shard

V1 = {"checkpoint": "/models/a.ckpt", "checkpoint_sha256": "a" * 64, "dtype": "fp32", "index_rule": "argmax"}


def _encode(layout: StorageLayout, tiny_encoder, provenance: dict, **kwargs) -> str:
    config, model = tiny_encoder
    return encode_code_shard(
        layout, 5, model_name=TINY_MODEL, encode=lambda b, _keys: model.encode_uint8(b, batch_size=4), grid=32,
        n_embed=config.n_embed, batch_size=4, provenance=provenance, **kwargs,
    ).path  # fmt: skip


CHANGES = [{"checkpoint_sha256": "b" * 64}, {"dtype": "bf16"}, {"index_rule": "sample"}]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: next(iter(c)))
def test_another_version_goes_side_by_side_never_over(tmp_path: Path, tiny_encoder, change: dict) -> None:
    layout = StorageLayout(str(tmp_path))
    _write_shard(layout, 5, {f"00005{i:04d}": _jpeg(i) for i in range(3)}, failed=["000050003"])
    first = _encode(layout, tiny_encoder, V1)
    stored = Path(first).read_bytes()
    assert _encode(layout, tiny_encoder, V1) == first  # the same version re-runs freely

    v2 = {**V1, **change}
    with pytest.raises(CodesVersionError, match=rf"{next(iter(change))}: stored .* ≠ this run .*LAION_VQ_CODES_NAME"):
        _encode(layout, tiny_encoder, v2)
    assert Path(first).read_bytes() == stored  # nothing overwritten

    side = _encode(layout, tiny_encoder, v2, codes_name=f"{TINY_MODEL}-v2")
    assert side == layout.code_shard(f"{TINY_MODEL}-v2", 5) != first
    assert read_codes_provenance(side)[next(iter(change))] == next(iter(change.values()))
    assert Path(first).read_bytes() == stored

    _encode(layout, tiny_encoder, v2, replace_other_versions=True)  # the explicit override
    assert read_codes_provenance(first)[next(iter(change))] == next(iter(change.values()))
