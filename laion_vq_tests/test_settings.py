"""Settings have one home, `laion_vq/settings.py`: the README's table, the Dagster resources and `DownloadOptions`
are held to it here, so a default changed in one place and not the others fails a test instead of drifting."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._config.field_utils import IntEnvVar

from laion_vq import settings
from laion_vq.defs.resources import DownloaderResource, LaionMetadataResource, VQGANEncoderResource, _from_env
from laion_vq.download import DownloadOptions
from laion_vq.download.guard import parse_networks
from laion_vq.settings import ALL_SETTINGS, Setting
from laion_vq.shards.sources import INPUT_FORMATS, PRESETS

README = Path(__file__).resolve().parents[1] / "README.md"
BY_ENV = {setting.env: setting for setting in ALL_SETTINGS}


def _settings_table() -> dict[str, tuple[str, str]]:
    """README *Configuration*'s `| variable | default | meaning |` rows: variable -> (default cell, meaning)."""
    section = README.read_text(encoding="utf-8").split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = lines.index("| variable | default | meaning |") + 2  # past the header and its `| --- |` line
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        variable, default, meaning = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        name = variable.strip("`")
        assert name not in rows, f"README lists {name} twice"
        rows[name] = (default, meaning.strip())
    return rows


def _readme_spelling(default: Any) -> str:
    """How the README writes a declared default: `value`, `—` for None, `empty` for ""; 1/0 for a flag."""
    if default is None:
        return "—"
    if default == "":
        return "empty"
    if isinstance(default, bool):
        return f"`{int(default)}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


def test_the_readme_table_is_the_settings():
    rows = _settings_table()
    assert sorted(set(BY_ENV) - set(rows)) == [], "settings with no README row (README: Configuration)"
    assert sorted(set(rows) - set(BY_ENV)) == [], "README rows naming no setting (laion_vq/settings.py)"
    for env, (written, _) in rows.items():
        default = BY_ENV[env].default
        if default is None and not written.startswith("`") and written not in ("—", "empty"):
            continue  # the default described in words ("the format's", "the model name"): computed elsewhere
        assert written == _readme_spelling(default), f"README says {env} defaults to {written}, settings.py {default!r}"


def test_the_readme_names_every_choice():
    rows = _settings_table()
    for setting in ALL_SETTINGS:
        for choice in setting.choices or ():
            assert f"`{choice}`" in rows[setting.env][1], f"README's {setting.env} row does not name {choice}"


def test_choices_come_from_their_homes():
    assert settings.METADATA_FORMAT.choices == tuple(PRESETS)
    assert settings.INPUT_FORMAT.choices == INPUT_FORMATS
    from laion_vq.encode.engine import ENCODE_MODES
    from laion_vq.vqgan.sampling import INDEX_RULES

    assert settings.ENCODE_MODE.choices == ENCODE_MODES
    assert settings.INDEX_RULE.choices == INDEX_RULES


def test_get_is_typed(monkeypatch):
    for setting in ALL_SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
        assert setting.get() == setting.default
        assert setting.default is None or type(setting.default) is setting.type
    monkeypatch.setenv("LAION_VQ_DOWNLOAD_THREADS", "7")
    monkeypatch.setenv("LAION_VQ_DOWNLOAD_MIN_RATE_RATIO", "0.25")
    monkeypatch.setenv("LAION_VQ_ENCODE_FEED", "0")
    monkeypatch.setenv("LAION_VQ_REPLACE_CODES", "true")
    monkeypatch.setenv("LAION_VQ_ENCODE_MODE", "fast")
    monkeypatch.setenv("LAION_VQ_CHECKPOINT", "")  # empty: the default
    assert settings.DOWNLOAD_THREADS.get() == 7 and settings.DOWNLOAD_MIN_RATE_RATIO.get() == 0.25
    assert settings.ENCODE_FEED.get() is False and settings.REPLACE_CODES.get() is True
    assert settings.ENCODE_MODE.get() == "fast" and settings.CHECKPOINT.get() is None
    # the older accessors keep working
    assert settings.DOWNLOAD_THREADS.get_int() == 7 and settings.ENCODE_FEED.get_int() == 0
    assert settings.ENCODE_FEED_POLL_SECONDS.get_float() == 2.0 and settings.ENCODE_MODE.get_str() == "fast"


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("LAION_VQ_ENCODE_MODE", "turbo", "LAION_VQ_ENCODE_MODE must be one of exact, fast, got 'turbo'"),
        ("LAION_VQ_INDEX_RULE", "mode", "LAION_VQ_INDEX_RULE must be one of argmax, sample"),
        ("LAION_VQ_DECODE_DEVICE", "gpu", "LAION_VQ_DECODE_DEVICE must be one of auto, cpu"),
        ("LAION_VQ_RESIZE_MODE", "stretch", "LAION_VQ_RESIZE_MODE must be one of border, center_crop"),
        ("LAION_VQ_METADATA_FORMAT", "laion9b", "LAION_VQ_METADATA_FORMAT must be one of laion400m"),
        ("LAION_VQ_INPUT_FORMAT", "xlsx", "LAION_VQ_INPUT_FORMAT must be one of parquet, csv"),
        ("LAION_VQ_DOWNLOAD_THREADS", "many", "LAION_VQ_DOWNLOAD_THREADS must be an integer"),
        ("LAION_VQ_DOWNLOAD_MIN_RATE_RATIO", "half", "LAION_VQ_DOWNLOAD_MIN_RATE_RATIO must be a number"),
        ("LAION_VQ_ENCODE_FEED", "maybe", "LAION_VQ_ENCODE_FEED must be 1 or 0"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        BY_ENV[env].get()
    with pytest.raises(ValueError, match=re.escape(message)):
        _from_env(BY_ENV[env])  # so loading the code location fails naming it


def test_a_declaration_that_contradicts_itself_fails():
    with pytest.raises(TypeError, match="LAION_VQ_X: default '8' is not a int"):
        Setting("LAION_VQ_X", "8", "", int)
    with pytest.raises(ValueError, match="LAION_VQ_X: default 'c' is not one of"):
        Setting("LAION_VQ_X", "c", "", choices=("a", "b"))


def test_download_options_default_to_the_settings_defaults(monkeypatch):
    monkeypatch.delenv("LAION_VQ_DOWNLOAD_ALLOW_NETWORKS", raising=False)
    fields = {f.name for f in dataclasses.fields(DownloadOptions)}
    options = DownloadOptions()
    expected = {
        "image_size": settings.IMAGE_SIZE,
        "resize_mode": settings.RESIZE_MODE,
        "timeout": settings.DOWNLOAD_TIMEOUT,
        "deadline": settings.DOWNLOAD_DEADLINE,
        "max_bytes": settings.DOWNLOAD_MAX_BYTES,
        "max_redirects": settings.DOWNLOAD_MAX_REDIRECTS,
        "buffer_bytes": settings.DOWNLOAD_BUFFER_BYTES,
        "retries": settings.DOWNLOAD_RETRIES,
        "thread_count": settings.DOWNLOAD_THREADS,
    }
    assert set(expected) <= fields
    assert {name: getattr(options, name) for name in expected} == {n: s.default for n, s in expected.items()}
    assert options.encode_quality == settings.ENCODE_QUALITY
    assert options.allow_networks == tuple(str(n) for n in parse_networks(settings.DOWNLOAD_ALLOW_NETWORKS.default))
    # and the resource's defaults are the same, so a downloader resource and bare options agree
    resource = DownloaderResource().options()
    assert {name: getattr(resource, name) for name in expected} == {n: s.default for n, s in expected.items()}


def test_resource_defaults_are_the_settings_defaults():
    fields = {
        VQGANEncoderResource: {
            "model": settings.MODEL,
            "checkpoint": settings.CHECKPOINT,
            "device": settings.DEVICE,
            "batch_size": settings.ENCODE_BATCH_SIZE,
            "mode": settings.ENCODE_MODE,
            "compile_cache": settings.COMPILE_CACHE,
            "decode_device": settings.DECODE_DEVICE,
            "decode_workers": settings.DECODE_WORKERS,
            "index_rule": settings.INDEX_RULE,
            "preview_samples": settings.PREVIEW_SAMPLES,
            "codes_name": settings.CODES_NAME,
            "replace_codes": settings.REPLACE_CODES,
            "image_size": settings.IMAGE_SIZE,
        },
        DownloaderResource: {
            "min_rate_ratio": settings.DOWNLOAD_MIN_RATE_RATIO,
            "replace_worse": settings.DOWNLOAD_REPLACE_WORSE,
            "resize_mode": settings.RESIZE_MODE,
        },
        LaionMetadataResource: {
            "samples_per_shard": settings.SAMPLES_PER_SHARD,
            "format": settings.METADATA_FORMAT,
            "url_column": settings.URL_COLUMN,
            "caption_column": settings.CAPTION_COLUMN,
            "input_format": settings.INPUT_FORMAT,
            "row_filter": settings.FILTER,
        },
    }
    for resource, by_field in fields.items():
        declared = resource.model_fields
        for name, setting in by_field.items():
            assert declared[name].default == setting.default, (resource.__name__, name)
            assert setting.env in (declared[name].description or ""), (resource.__name__, name)


def test_the_launchpad_offers_the_choices():
    """Settings with choices are enums in the resources' config schema; a value in code outside them fails
    naming the variable, as one from the environment does."""
    schema = VQGANEncoderResource.to_config_schema().as_field().config_type.fields
    for name, setting in (
        ("mode", settings.ENCODE_MODE),
        ("index_rule", settings.INDEX_RULE),
        ("decode_device", settings.DECODE_DEVICE),
    ):
        assert [v.config_value for v in schema[name].config_type.enum_values] == list(setting.choices or ())
    metadata = LaionMetadataResource.to_config_schema().as_field().config_type.fields
    assert [v.config_value for v in metadata["format"].config_type.enum_values] == list(PRESETS)
    downloader = DownloaderResource.to_config_schema().as_field().config_type.fields
    assert [v.config_value for v in downloader["resize_mode"].config_type.enum_values] == list(
        settings.RESIZE_MODE.choices or ()
    )
    with pytest.raises(dg.Failure, match="LAION_VQ_RESIZE_MODE .* got 'stretch'"):
        DownloaderResource(resize_mode="stretch")
    with pytest.raises(dg.Failure, match="LAION_VQ_INPUT_FORMAT .* got 'xlsx'"):
        LaionMetadataResource(source="meta", input_format="xlsx")


def test_a_set_variable_reaches_the_resource_as_an_env_var_where_dagster_can_take_one(monkeypatch):
    monkeypatch.setenv("LAION_VQ_DEVICE", "cpu")
    monkeypatch.setenv("LAION_VQ_DOWNLOAD_THREADS", "8")
    monkeypatch.setenv("LAION_VQ_ENCODE_MODE", "fast")
    monkeypatch.delenv("LAION_VQ_MODEL", raising=False)
    assert _from_env(settings.DEVICE) == dg.EnvVar("LAION_VQ_DEVICE")
    assert isinstance(_from_env(settings.DOWNLOAD_THREADS), IntEnvVar)
    assert _from_env(settings.ENCODE_MODE) == "fast"  # an enum field takes no EnvVar: the checked value
    assert _from_env(settings.MODEL) == settings.MODEL.default
