"""Every operator setting: its environment variable, type, default, choices and meaning. The one place they live.

Dagster resources (`defs/resources.py`) and `DownloadOptions` (`download/options.py`) take their defaults and
choices from here, and `laion_vq_tests/test_settings.py` holds the README's settings table to it, so the three
cannot drift apart. Resources take a value the operator set as an `EnvVar` where Dagster can, so the UI shows
where it came from. Partition count and run batching are read at import, because Dagster needs them when it
loads the definitions.

An instance can carry its settings in `$DAGSTER_HOME/laion_vq.env` (`KEY=value` lines; the demo writes
one). Every process that loads the code location for that instance (webserver, daemon, run workers,
`dg dev`, `dagster asset materialize`) reads it, so all of them see the same settings; a variable set
in the process's own environment wins over the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, get_args

from laion_vq.shards.numbering import DEFAULT_NUM_SHARDS, DEFAULT_SAMPLES_PER_SHARD
from laion_vq.shards.sources import DEFAULT_PRESET, INPUT_FORMATS, PRESETS

T = TypeVar("T")

#: The choices of the settings that have them, as types: the resources' fields use them, so the launchpad
#: offers the choices (Dagster shows a `Literal` field as an enum).
EncodeMode = Literal["exact", "fast"]
IndexRule = Literal["argmax", "sample"]
DecodeDevice = Literal["auto", "cpu"]
ResizeMode = Literal["border", "center_crop", "keep_ratio", "keep_ratio_largest", "no"]
#: The presets of `laion_vq/shards/sources.py`, whatever it holds (built at run time: it is their one home).
if TYPE_CHECKING:
    MetadataFormat = str  # a type checker cannot read a Literal built at run time
else:
    MetadataFormat = Literal[tuple(PRESETS)]

_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: `type` is how its text is read (str, int, float or bool), `choices` the values
    it may take (None: any). `default` is the typed value when the variable is unset or empty (None: no value)."""

    env: str
    default: T
    help: str
    type: type = str
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # A declaration that contradicts itself fails at import, not when someone leaves the variable unset.
        if self.type not in (str, int, float, bool):
            raise TypeError(f"{self.env}: a setting is a str, int, float or bool, not {self.type!r}")
        if self.default is not None and type(self.default) is not self.type:
            raise TypeError(f"{self.env}: default {self.default!r} is not a {self.type.__name__}")
        if self.choices is not None and self.default is not None and self.default not in self.choices:
            raise ValueError(f"{self.env}: default {self.default!r} is not one of {self.choices}")

    def raw(self) -> str | None:
        """The variable's text; None when unset or empty (an empty variable means the default)."""
        value = os.environ.get(self.env)
        return value if value not in (None, "") else None

    def parse(self, text: str) -> Any:
        """`text` read as this setting's type and checked against its choices; an error names the variable."""
        value: Any = text
        if self.type is bool:
            value = _parse_bool(self.env, text)
        elif self.type is int:
            try:
                value = int(text)
            except ValueError as err:
                raise ValueError(f"{self.env} must be an integer, got {text!r}") from err
        elif self.type is float:
            try:
                value = float(text)
            except ValueError as err:
                raise ValueError(f"{self.env} must be a number, got {text!r}") from err
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.env} must be one of {', '.join(self.choices)}, got {text!r}")
        return value

    def get(self) -> T:
        """The typed value: the variable's, read and checked, else the default."""
        text = self.raw()
        return self.default if text is None else self.parse(text)

    def get_str(self) -> str | None:
        """The value as text (checked like `get`): what was set, else the default's text, else None."""
        text = self.raw()
        if text is not None:
            self.parse(text)
            return text
        return None if self.default is None else str(self.default)

    def get_int(self) -> int:
        """The value of an int (or bool: 0/1) setting."""
        return int(self._number())

    def get_float(self) -> float:
        """The value of a float or int setting."""
        return float(self._number())

    def _number(self) -> int | float:
        value = self.get()
        if not isinstance(value, int | float):
            raise TypeError(f"{self.env} is a {self.type.__name__} setting with no default, not a number")
        return value


def _parse_bool(env: str, text: str) -> bool:
    """`1`/`0` as before (any integer: nonzero is true), or true/false, yes/no, on/off."""
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    try:
        return int(word) != 0
    except ValueError:
        raise ValueError(f"{env} must be 1 or 0 (true or false), got {text!r}") from None


STORAGE: Setting[str] = Setting("LAION_VQ_STORAGE", "./data", "storage root: a local path or an s3:// URI")
#: How every S3 client of the platform (s3fs, and polars' object store for the removal scan) rides out faults:
#: botocore's retry policy, set in one place (`laion_vq.shards.object_store.s3_client_config`).
S3RetryMode = Literal["standard", "adaptive"]
S3_RETRY_MODE: Setting[S3RetryMode | None] = Setting(
    "LAION_VQ_S3_RETRY_MODE",
    None,
    "botocore retry mode of every S3 request: standard (exponential backoff with full jitter on 500/503/"
    "throttling/connection errors and timeouts) or adaptive (standard, plus client-side rate limiting once S3 "
    "throttles); unset: AWS_RETRY_MODE when that is set, else standard",
    choices=get_args(S3RetryMode),
)
S3_MAX_ATTEMPTS: Setting[int | None] = Setting(
    "LAION_VQ_S3_MAX_ATTEMPTS",
    None,
    "attempts per S3 request, the first included (botocore's total_max_attempts); unset: AWS_MAX_ATTEMPTS when "
    "that is set, else 10",
    int,
)
S3_CONNECT_TIMEOUT: Setting[float] = Setting(
    "LAION_VQ_S3_CONNECT_TIMEOUT", 5.0, "seconds to open a connection to S3 (per attempt)", float
)
S3_READ_TIMEOUT: Setting[float] = Setting(
    "LAION_VQ_S3_READ_TIMEOUT",
    30.0,
    "seconds an S3 request may wait for the next bytes of its answer before the attempt counts as failed (per attempt)",
    float,
)
METADATA: Setting[str] = Setting(
    "LAION_VQ_METADATA", "./data/laion-metadata", "the metadata: a file, a folder of parts (*.<format>) or a glob"
)
METADATA_FORMAT: Setting[MetadataFormat] = Setting(
    "LAION_VQ_METADATA_FORMAT",
    DEFAULT_PRESET,
    "the metadata's layout: a preset of laion_vq/shards/sources.py",
    choices=get_args(MetadataFormat),
)
URL_COLUMN: Setting[str | None] = Setting(
    "LAION_VQ_URL_COLUMN", None, "the column holding image URLs (default: the format's)"
)
CAPTION_COLUMN: Setting[str | None] = Setting(
    "LAION_VQ_CAPTION_COLUMN", None, "the column holding captions (default: the format's)"
)
INPUT_FORMAT: Setting[str | None] = Setting(
    "LAION_VQ_INPUT_FORMAT",
    None,
    "file format of the metadata, as img2dataset spells it (default: the format's)",
    choices=INPUT_FORMATS,
)
FILTER: Setting[str | None] = Setting(
    "LAION_VQ_FILTER",
    None,
    "a SQL predicate over the metadata columns (polars SQL, e.g. `punsafe < 0.1 and similarity >= 0.28`): rows "
    "it rejects are never downloaded, recorded as `filtered`; part of the dataset's version",
)
IMAGE_SIZE: Setting[int] = Setting(
    "LAION_VQ_IMAGE_SIZE",
    256,
    "side of the images downloaded and encoded, in pixels; part of the dataset's version",
    int,
)
RESIZE_MODE: Setting[ResizeMode] = Setting(
    "LAION_VQ_RESIZE_MODE",
    "border",
    "img2dataset resize mode (border: white padding); part of the dataset's version",
    choices=get_args(ResizeMode),
)
SAMPLES_PER_SHARD: Setting[int] = Setting(
    "LAION_VQ_SAMPLES_PER_SHARD", DEFAULT_SAMPLES_PER_SHARD, "samples per shard", int
)
NUM_SHARDS: Setting[int] = Setting(
    "LAION_VQ_NUM_SHARDS", DEFAULT_NUM_SHARDS, "partition count: shards 00000 … N-1", int
)
MODEL: Setting[str] = Setting("LAION_VQ_MODEL", "vqgan_gumbel_f8", "VQGAN config name from laion_vq.vqgan.registry")
CHECKPOINT: Setting[str | None] = Setting(
    "LAION_VQ_CHECKPOINT", None, "path or URI of the model's checkpoint (last.ckpt)"
)
CODES_NAME: Setting[str | None] = Setting(
    "LAION_VQ_CODES_NAME", None, "folder of the code parquets, codes/<name>/ (default: the model name)"
)
REPLACE_CODES: Setting[bool] = Setting(
    "LAION_VQ_REPLACE_CODES",
    False,
    "1: overwrite code parquets made by another checkpoint, precision or index rule",
    bool,
)
DEVICE: Setting[str] = Setting(
    "LAION_VQ_DEVICE", "auto", "encoder device: auto (cuda if available), cpu, cuda, cuda:1 …"
)
ENCODE_BATCH_SIZE: Setting[int] = Setting(
    "LAION_VQ_ENCODE_BATCH_SIZE",
    0,
    "images per encoder forward pass; 0: from free GPU memory on CUDA (halved on out-of-memory), 8 on CPU",
    int,
)
ENCODE_MODE: Setting[EncodeMode] = Setting(
    "LAION_VQ_ENCODE_MODE",
    "exact",
    "exact (fp32, TF32 off: the reference codes) or fast (bf16 body + torch.compile, fp32 head; README: Encode modes)",
    choices=get_args(EncodeMode),
)
COMPILE_CACHE: Setting[str | None] = Setting(
    "LAION_VQ_COMPILE_CACHE",
    None,
    "folder of torch.compile's kernel cache for `fast` (default: $DAGSTER_HOME/inductor-cache, else "
    "~/.cache/laion_vq/inductor)",
)
DECODE_DEVICE: Setting[DecodeDevice] = Setting(
    "LAION_VQ_DECODE_DEVICE",
    "auto",
    "JPEG decoding: auto (nvJPEG when the encoder is on CUDA, else PIL on every core) or cpu",
    choices=get_args(DecodeDevice),
)
DECODE_WORKERS: Setting[int] = Setting("LAION_VQ_DECODE_WORKERS", 0, "CPU JPEG-decoding threads (0: one per core)", int)
INDEX_RULE: Setting[IndexRule] = Setting(
    "LAION_VQ_INDEX_RULE",
    "argmax",
    "how logits become codes: argmax (the mode, deterministic) or sample (a draw seeded by the sample key; "
    "Gumbel models only)",
    choices=get_args(IndexRule),
)
PREVIEW_SAMPLES: Setting[int] = Setting(
    "LAION_VQ_PREVIEW_SAMPLES", 4, "images shown beside their reconstructions per encoder run (0: none)", int
)
DOWNLOAD_THREADS: Setting[int] = Setting(
    "LAION_VQ_DOWNLOAD_THREADS", 128, "img2dataset download threads per shard", int
)
DOWNLOAD_TIMEOUT: Setting[int] = Setting("LAION_VQ_DOWNLOAD_TIMEOUT", 10, "seconds per image request", int)
DOWNLOAD_RETRIES: Setting[int] = Setting("LAION_VQ_DOWNLOAD_RETRIES", 0, "retries per failed image request", int)
DOWNLOAD_DEADLINE: Setting[int] = Setting(
    "LAION_VQ_DOWNLOAD_DEADLINE",
    30,
    "seconds per image in all (connect, redirects, body), on top of the timeout",
    int,
)
DOWNLOAD_MAX_BYTES: Setting[int] = Setting(
    "LAION_VQ_DOWNLOAD_MAX_BYTES", 20_000_000, "largest image body accepted, in bytes (larger: `too large`)", int
)
DOWNLOAD_BUFFER_BYTES: Setting[int] = Setting(
    "LAION_VQ_DOWNLOAD_BUFFER_BYTES", 512_000_000, "image bodies one shard holds in memory at once, in bytes", int
)
DOWNLOAD_MAX_REDIRECTS: Setting[int] = Setting(
    "LAION_VQ_DOWNLOAD_MAX_REDIRECTS", 3, "redirect hops followed per image", int
)
DOWNLOAD_ALLOW_NETWORKS: Setting[str] = Setting(
    "LAION_VQ_DOWNLOAD_ALLOW_NETWORKS",
    "",
    "CIDRs downloads may reach although they are loopback/private/link-local (comma-separated; empty: none)",
)
DOWNLOAD_MIN_RATE_RATIO: Setting[float] = Setting(
    "LAION_VQ_DOWNLOAD_MIN_RATE_RATIO",
    0.5,
    "a re-download whose success rate is below this fraction of the stored shard's is refused",
    float,
)
DOWNLOAD_REPLACE_WORSE: Setting[bool] = Setting(
    "LAION_VQ_DOWNLOAD_REPLACE_WORSE",
    False,
    "1: publish a re-download even when it is worse than the stored shard",
    bool,
)
DOWNLOAD_SHARDS_PER_RUN: Setting[int] = Setting(
    "LAION_VQ_DOWNLOAD_SHARDS_PER_RUN", 8, "backfill: shards per metadata+download run (README: run granularity)", int
)
SCHEDULE_SHARDS_PER_TICK: Setting[int] = Setting(
    "LAION_VQ_SCHEDULE_SHARDS_PER_TICK", 64, "download_missing_shards schedule: shards requested per tick", int
)
SCHEDULE_MAX_FAILURES: Setting[int] = Setting(
    "LAION_VQ_SCHEDULE_MAX_FAILURES", 3, "the schedule skips a shard whose download failed this many times", int
)
ENCODE_SHARDS_PER_RUN: Setting[int] = Setting(
    "LAION_VQ_ENCODE_SHARDS_PER_RUN",
    256,
    "backfill: shards per encoder run (one model load each; fixed costs ≤ 2% at 3,000 images/s, README)",
    int,
)
ENCODE_FEED: Setting[bool] = Setting(
    "LAION_VQ_ENCODE_FEED",
    True,
    "1: a backfill's encoder run keeps its model loaded and takes the backfill's shards as their tars land "
    "(README: run granularity); 0: it encodes its own shards only",
    bool,
)
ENCODE_FEED_IDLE_SECONDS: Setting[float] = Setting(
    "LAION_VQ_ENCODE_FEED_IDLE_SECONDS",
    900.0,
    "a fed encoder run ends when no tar of its backfill landed for this long (it holds the GPU pool meanwhile)",
    float,
)
ENCODE_FEED_POLL_SECONDS: Setting[float] = Setting(
    "LAION_VQ_ENCODE_FEED_POLL_SECONDS", 2.0, "how often a fed encoder run looks for newly landed tars", float
)
ENCODE_FEED_HANDOVER: Setting[float] = Setting(
    "LAION_VQ_ENCODE_FEED_HANDOVER",
    0.75,
    "a fed encoder run takes no new shard once it has run this share of its maximum runtime (run monitoring's "
    "`max_runtime_seconds` or its `dagster/max_runtime` tag) and ends, handing the rest to a fresh run of its "
    "backfill, rather than being failed by run monitoring",
    float,
)

CELERY_BROKER: Setting[str | None] = Setting(
    "LAION_VQ_CELERY_BROKER",
    None,
    "the Celery code location's broker (`amqp://USER:PASSWORD@HOST:5672//`; results come back over it, rpc://)",
)
CELERY_QUEUE_PREFIX: Setting[str] = Setting(
    "LAION_VQ_CELERY_QUEUE_PREFIX", "", "prefix of the Celery queue names (`<prefix>gpu`, `<prefix>download`)"
)

ALL_SETTINGS = (
    STORAGE,
    S3_RETRY_MODE,
    S3_MAX_ATTEMPTS,
    S3_CONNECT_TIMEOUT,
    S3_READ_TIMEOUT,
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
    ENCODE_FEED_HANDOVER,
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
