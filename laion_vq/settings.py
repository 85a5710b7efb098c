"""Every operator setting: its environment variable, default and meaning. The one place they live.

Dagster resources (`resources.py`) take their values from here, as `EnvVar`s when the variable is
set, so the UI shows where a value came from. Partition count and run batching are read at import,
because Dagster needs them when it loads the definitions.

An instance can carry its settings in `$DAGSTER_HOME/laion_vq.env` (`KEY=value` lines; the demo writes
one). Every process that loads the code location for that instance (webserver, daemon, run workers,
`dg dev`, `dagster asset materialize`) reads it, so all of them see the same settings; a variable set
in the process's own environment wins over the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from laion_vq.shards.numbering import DEFAULT_NUM_SHARDS, DEFAULT_SAMPLES_PER_SHARD


@dataclass(frozen=True)
class Setting:
    env: str
    default: str | int | None
    help: str

    def raw(self) -> str | None:
        value = os.environ.get(self.env)
        return value if value not in (None, "") else None

    def get_str(self) -> str | None:
        value = self.raw()
        return value if value is not None else (None if self.default is None else str(self.default))

    def get_float(self) -> float:
        value = self.raw()
        if value is None:
            return float(self.default)  # type: ignore[arg-type]
        try:
            return float(value)
        except ValueError as err:
            raise ValueError(f"{self.env} must be a number, got {value!r}") from err

    def get_int(self) -> int:
        value = self.raw()
        if value is None:
            return int(self.default)  # type: ignore[arg-type]
        try:
            return int(value)
        except ValueError as err:
            raise ValueError(f"{self.env} must be an integer, got {value!r}") from err


STORAGE = Setting("LAION_VQ_STORAGE", "./data", "storage root: a local path or an s3:// URI")
METADATA = Setting(
    "LAION_VQ_METADATA", "./data/laion-metadata", "LAION metadata: a parquet file, a folder of parts or a glob"
)
METADATA_FORMAT = Setting(
    "LAION_VQ_METADATA_FORMAT",
    "laion400m",
    "the metadata's layout: laion400m, relaion5b, laion5b, datacomp, coyo700m or cc12m (laion_vq/shards/sources.py)",
)
URL_COLUMN = Setting("LAION_VQ_URL_COLUMN", None, "the column holding image URLs (default: the format's)")
CAPTION_COLUMN = Setting("LAION_VQ_CAPTION_COLUMN", None, "the column holding captions (default: the format's)")
INPUT_FORMAT = Setting(
    "LAION_VQ_INPUT_FORMAT",
    None,
    "file format of the metadata, as img2dataset spells it: parquet, csv, csv.gz, tsv, tsv.gz, jsonl, jsonl.gz "
    "(default: the format's)",
)
FILTER = Setting(
    "LAION_VQ_FILTER",
    None,
    "a SQL predicate over the metadata columns (polars SQL, e.g. `punsafe < 0.1 and similarity >= 0.28`): rows "
    "it rejects are never downloaded, recorded as `filtered`; part of the dataset's version",
)
IMAGE_SIZE = Setting(
    "LAION_VQ_IMAGE_SIZE", 256, "side of the images downloaded and encoded, in pixels; part of the dataset's version"
)
RESIZE_MODE = Setting(
    "LAION_VQ_RESIZE_MODE",
    "border",
    "img2dataset resize mode: border (white padding), center_crop, keep_ratio, keep_ratio_largest or no; "
    "part of the dataset's version",
)
SAMPLES_PER_SHARD = Setting("LAION_VQ_SAMPLES_PER_SHARD", DEFAULT_SAMPLES_PER_SHARD, "samples per shard")
NUM_SHARDS = Setting("LAION_VQ_NUM_SHARDS", DEFAULT_NUM_SHARDS, "partition count: shards 00000 … N-1")
MODEL = Setting("LAION_VQ_MODEL", "vqgan_gumbel_f8", "VQGAN config name from laion_vq.vqgan.registry")
CHECKPOINT = Setting("LAION_VQ_CHECKPOINT", None, "path or URI of the model's checkpoint (last.ckpt)")
CODES_NAME = Setting(
    "LAION_VQ_CODES_NAME", None, "folder of the code parquets, codes/<name>/ (default: the model name)"
)
REPLACE_CODES = Setting(
    "LAION_VQ_REPLACE_CODES", 0, "1: overwrite code parquets made by another checkpoint, precision or index rule"
)
DEVICE = Setting("LAION_VQ_DEVICE", "auto", "encoder device: auto (cuda if available), cpu, cuda, cuda:1 …")
ENCODE_BATCH_SIZE = Setting(
    "LAION_VQ_ENCODE_BATCH_SIZE",
    0,
    "images per encoder forward pass; 0: from free GPU memory on CUDA (halved on out-of-memory), 8 on CPU",
)
ENCODE_MODE = Setting(
    "LAION_VQ_ENCODE_MODE",
    "exact",
    "exact (fp32, TF32 off: the reference codes) or fast (bf16 body + torch.compile, fp32 head; README: Encode modes)",
)
COMPILE_CACHE = Setting(
    "LAION_VQ_COMPILE_CACHE",
    None,
    "folder of torch.compile's kernel cache for `fast` (default: $DAGSTER_HOME/inductor-cache, else "
    "~/.cache/laion_vq/inductor)",
)
DECODE_DEVICE = Setting(
    "LAION_VQ_DECODE_DEVICE",
    "auto",
    "JPEG decoding: auto (nvJPEG when the encoder is on CUDA, else PIL on every core) or cpu",
)
DECODE_WORKERS = Setting("LAION_VQ_DECODE_WORKERS", 0, "CPU JPEG-decoding threads (0: one per core)")
INDEX_RULE = Setting(
    "LAION_VQ_INDEX_RULE",
    "argmax",
    "how logits become codes: argmax (the mode, deterministic) or sample (a draw seeded by the sample key; "
    "Gumbel models only)",
)
PREVIEW_SAMPLES = Setting(
    "LAION_VQ_PREVIEW_SAMPLES", 4, "images shown beside their reconstructions per encoder run (0: none)"
)
DOWNLOAD_THREADS = Setting("LAION_VQ_DOWNLOAD_THREADS", 128, "img2dataset download threads per shard")
DOWNLOAD_TIMEOUT = Setting("LAION_VQ_DOWNLOAD_TIMEOUT", 10, "seconds per image request")
DOWNLOAD_RETRIES = Setting("LAION_VQ_DOWNLOAD_RETRIES", 0, "retries per failed image request")
DOWNLOAD_DEADLINE = Setting(
    "LAION_VQ_DOWNLOAD_DEADLINE", 30, "seconds per image in all (connect, redirects, body), on top of the timeout"
)
DOWNLOAD_MAX_BYTES = Setting(
    "LAION_VQ_DOWNLOAD_MAX_BYTES", 20_000_000, "largest image body accepted, in bytes (larger: `too large`)"
)
DOWNLOAD_BUFFER_BYTES = Setting(
    "LAION_VQ_DOWNLOAD_BUFFER_BYTES", 512_000_000, "image bodies one shard holds in memory at once, in bytes"
)
DOWNLOAD_MAX_REDIRECTS = Setting("LAION_VQ_DOWNLOAD_MAX_REDIRECTS", 3, "redirect hops followed per image")
DOWNLOAD_ALLOW_NETWORKS = Setting(
    "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS",
    "",
    "CIDRs downloads may reach although they are loopback/private/link-local (comma-separated; empty: none)",
)
DOWNLOAD_MIN_RATE_RATIO = Setting(
    "LAION_VQ_DOWNLOAD_MIN_RATE_RATIO",
    "0.5",
    "a re-download whose success rate is below this fraction of the stored shard's is refused",
)
DOWNLOAD_REPLACE_WORSE = Setting(
    "LAION_VQ_DOWNLOAD_REPLACE_WORSE", 0, "1: publish a re-download even when it is worse than the stored shard"
)
DOWNLOAD_SHARDS_PER_RUN = Setting(
    "LAION_VQ_DOWNLOAD_SHARDS_PER_RUN", 8, "backfill: shards per metadata+download run (README: run granularity)"
)
SCHEDULE_SHARDS_PER_TICK = Setting(
    "LAION_VQ_SCHEDULE_SHARDS_PER_TICK", 64, "download_missing_shards schedule: shards requested per tick"
)
SCHEDULE_MAX_FAILURES = Setting(
    "LAION_VQ_SCHEDULE_MAX_FAILURES", 3, "the schedule skips a shard whose download failed this many times"
)
ENCODE_SHARDS_PER_RUN = Setting(
    "LAION_VQ_ENCODE_SHARDS_PER_RUN",
    256,
    "backfill: shards per encoder run (one model load each; fixed costs ≤ 2% at 3,000 images/s, README)",
)
ENCODE_FEED = Setting(
    "LAION_VQ_ENCODE_FEED",
    1,
    "1: a backfill's encoder run keeps its model loaded and takes the backfill's shards as their tars land "
    "(README: run granularity); 0: it encodes its own shards only",
)
ENCODE_FEED_IDLE_SECONDS = Setting(
    "LAION_VQ_ENCODE_FEED_IDLE_SECONDS",
    900,
    "a fed encoder run ends when no tar of its backfill landed for this long (it holds the GPU pool meanwhile)",
)
ENCODE_FEED_POLL_SECONDS = Setting(
    "LAION_VQ_ENCODE_FEED_POLL_SECONDS", 2, "how often a fed encoder run looks for newly landed tars"
)

CELERY_BROKER = Setting(
    "LAION_VQ_CELERY_BROKER",
    None,
    "the Celery code location's broker (`amqp://USER:PASSWORD@HOST:5672//`; results come back over it, rpc://)",
)
CELERY_QUEUE_PREFIX = Setting(
    "LAION_VQ_CELERY_QUEUE_PREFIX", "", "prefix of the Celery queue names (`<prefix>gpu`, `<prefix>download`)"
)

ALL_SETTINGS = (
    STORAGE,
    METADATA,
    METADATA_FORMAT,
    URL_COLUMN,
    CAPTION_COLUMN,
    INPUT_FORMAT,
    FILTER,
    IMAGE_SIZE,
    RESIZE_MODE,
    SAMPLES_PER_SHARD,
    NUM_SHARDS,
    MODEL,
    CHECKPOINT,
    CODES_NAME,
    REPLACE_CODES,
    DEVICE,
    ENCODE_BATCH_SIZE,
    ENCODE_MODE,
    COMPILE_CACHE,
    DECODE_DEVICE,
    DECODE_WORKERS,
    INDEX_RULE,
    PREVIEW_SAMPLES,
    DOWNLOAD_THREADS,
    DOWNLOAD_TIMEOUT,
    DOWNLOAD_RETRIES,
    DOWNLOAD_DEADLINE,
    DOWNLOAD_MAX_BYTES,
    DOWNLOAD_MAX_REDIRECTS,
    DOWNLOAD_BUFFER_BYTES,
    DOWNLOAD_ALLOW_NETWORKS,
    DOWNLOAD_MIN_RATE_RATIO,
    DOWNLOAD_REPLACE_WORSE,
    DOWNLOAD_SHARDS_PER_RUN,
    ENCODE_SHARDS_PER_RUN,
    ENCODE_FEED,
    ENCODE_FEED_IDLE_SECONDS,
    ENCODE_FEED_POLL_SECONDS,
    SCHEDULE_SHARDS_PER_TICK,
    SCHEDULE_MAX_FAILURES,
    CELERY_BROKER,
    CELERY_QUEUE_PREFIX,
)

#: Variables that no longer do anything, and what replaced them: set, they are an error rather than ignored.
RETIRED = {
    "LAION_VQ_ENCODE_DTYPE": f"{ENCODE_MODE.env} (exact = fp32, fast = bf16 + torch.compile)",
}


def refuse_retired() -> None:
    """Raise naming the replacement when the operator still sets a retired variable."""
    for env, replacement in RETIRED.items():
        if os.environ.get(env):
            raise ValueError(f"{env} was replaced by {replacement}; unset {env}")


#: The instance's settings file, beside its `dagster.yaml`.
INSTANCE_SETTINGS_FILE = "laion_vq.env"


class SettingsFileError(ValueError):
    """The instance's settings file names a variable that is not a setting, or cannot be parsed."""


def instance_settings_path(dagster_home: str | None = None) -> str | None:
    """`$DAGSTER_HOME/laion_vq.env` (whether or not it exists); None without a DAGSTER_HOME."""
    home = dagster_home or os.environ.get("DAGSTER_HOME")
    return os.path.join(home, INSTANCE_SETTINGS_FILE) if home else None


def read_settings_file(path: str) -> dict[str, str]:
    """The file's `KEY=value` pairs; a key that is no setting (a typo would be silently ignored) is an error
    naming the file and line."""
    from dotenv import dotenv_values

    known = {setting.env for setting in ALL_SETTINGS}
    values = {key: value for key, value in dotenv_values(path).items() if value is not None}
    with open(path, encoding="utf-8") as lines:
        numbers = {line.split("=", 1)[0].strip().removeprefix("export "): n for n, line in enumerate(lines, 1)}
    for key in values:
        if key in RETIRED:
            raise SettingsFileError(f"{path}:{numbers.get(key, '?')}: {key} was replaced by {RETIRED[key]}")
        if key not in known:
            line = numbers.get(key, "?")
            raise SettingsFileError(f"{path}:{line}: {key} is not a laion_vq setting (README: Configuration)")
    return values


def load_instance_settings() -> dict[str, str]:
    """Put the instance's settings file into this process's environment, under what is already set there;
    returns the variables it supplied. Called before the definitions read any setting."""
    path = instance_settings_path()
    if path is None or not os.path.exists(path):
        return {}
    supplied = {key: value for key, value in read_settings_file(path).items() if os.environ.get(key) in (None, "")}
    os.environ.update(supplied)
    return supplied


def write_instance_settings(dagster_home: str, values: dict[str, str]) -> str:
    """Write `values` as the instance's settings file (atomically: temp name, then rename); returns its path."""
    path = instance_settings_path(dagster_home)
    assert path is not None
    lines = ["# laion_vq settings of this Dagster instance: every process with DAGSTER_HOME here reads them;",
             "# a variable set in the environment wins (README: Configuration)."]  # fmt: skip
    lines += [f"{key}={_quoted(value)}" for key, value in values.items()]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    read_settings_file(path)  # what we write must read back
    return path


def _quoted(value: str) -> str:
    if "'" in value or "\n" in value:
        raise SettingsFileError(f"a setting's value cannot hold a quote or a newline: {value!r}")
    return value if value and all(c.isalnum() or c in "/._-:,+@" for c in value) else f"'{value}'"


def compile_cache_dir() -> str:
    """Where `fast` mode keeps compiled kernels, so the next run (same machine, same model) skips compiling."""
    configured = COMPILE_CACHE.get_str()
    if configured:
        return configured
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return os.path.join(home, "inductor-cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "laion_vq", "inductor")


#: JPEG quality of the stored images: LAION-400M's tars used 95.
ENCODE_QUALITY = 95
