"""Dagster resources: storage, metadata source, downloader and encoder, configured from `settings`."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator

from laion_vq import settings
from laion_vq.settings import DecodeDevice, EncodeMode, IndexRule, MetadataFormat, ResizeMode, Setting
from laion_vq.shards.metadata import LaionMetadata
from laion_vq.shards.storage import StorageLayout, is_local


def _from_env(setting: Setting[Any]) -> Any:
    """The setting's value, checked now (a bad one fails loading the code location, naming the variable): an
    EnvVar when the operator set it and Dagster can take one (the UI then shows its source), else the value.

    Dagster's EnvVars are str and int only, and a `Literal` field (a setting with choices and a default: the
    launchpad offers the choices) is an enum, which takes none: those get the value itself."""
    value = setting.get()
    literal = setting.choices is not None and setting.default is not None
    if setting.raw() is None or literal or setting.type not in (str, int):
        return value
    return dg.EnvVar.int(setting.env) if setting.type is int else dg.EnvVar(setting.env)


def _field(setting: Setting[Any]) -> Any:
    """A resource field defaulting to the setting's default, described in the launchpad by its help and
    variable."""
    return Field(default=setting.default, description=f"{setting.help} ({setting.env})")


def _choices(resource: str, **fields: Setting[Any]) -> Any:
    """A validator refusing a field value that is none of its setting's choices, naming the variable: a resource
    built in code fails as clearly as one configured from the environment or the launchpad."""

    def check(cls: type, value: Any, info: ValidationInfo) -> Any:
        setting = fields[str(info.field_name)]
        if value is None or isinstance(value, dg.EnvVar) or setting.choices is None or value in setting.choices:
            return value
        raise dg.Failure(
            description=f"{setting.env} (the `{resource}` resource's `{info.field_name}`) must be one of "
            f"{', '.join(setting.choices)}, got {value!r}"
        )

    return field_validator(*fields, mode="before")(check)


def _start_pool_watch(context: dg.InitResourceContext) -> Any:
    """The run's pool watch (`pool_watch.py`), started by the resources of the pooled steps (`downloader` for
    pool `download`, `encoder` for pool `gpu`): a step queued for a slot says who holds it."""
    if context.dagster_run is None or context.instance is None:
        return None
    from laion_vq.defs.pool_watch import PoolWatch

    assert context.log is not None  # a run's resources are initialised with its log manager
    return PoolWatch(context.instance, context.dagster_run.run_id, context.log.warning).start()


def _where_settings_come_from() -> str:
    path = settings.instance_settings_path()
    if path and os.path.exists(path):
        return f" (this instance's settings file: {path})"
    return f" (no settings file for this instance: {path or 'DAGSTER_HOME is not set'}; `make demo` writes one)"


def _absolute(url: str) -> str:
    return os.path.abspath(url) if is_local(url) and "://" not in url else url


class StorageResource(dg.ConfigurableResource):
    """Root of every shard file: a local folder or an `s3://bucket/prefix` URI (via fsspec)."""

    root: str

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(_absolute(self.root))

    def existing_layout(self) -> StorageLayout:
        """The layout of a storage root that exists: a step reading a local root that is not there (a wrong
        `LAION_VQ_STORAGE`) fails once, naming it, before it records anything about any shard."""
        layout = self.layout
        if is_local(layout.root) and not os.path.isdir(layout.root):
            raise dg.Failure(
                description=f"storage root {layout.root!r} does not exist: {settings.STORAGE.env} (the `storage` "
                f"resource's `root`, now {self.root!r}) must name the folder the shards are stored in"
                + _where_settings_come_from()
            )
        return layout


class LaionMetadataResource(dg.ConfigurableResource):
    """The metadata parts, their layout (`format`: a preset of `laion_vq/shards/sources.py`, with the URL and
    caption columns and the file format overridable), how many samples make a shard, and the filter rows must
    pass (`row_filter`, a SQL predicate; empty: none)."""

    source: str = Field(description=f"{settings.METADATA.help} ({settings.METADATA.env})")
    samples_per_shard: int = _field(settings.SAMPLES_PER_SHARD)
    format: MetadataFormat = _field(settings.METADATA_FORMAT)
    url_column: str | None = _field(settings.URL_COLUMN)
    caption_column: str | None = _field(settings.CAPTION_COLUMN)
    #: not a Literal: Dagster has no optional enum (None: the format's)
    input_format: str | None = _field(settings.INPUT_FORMAT)
    row_filter: str | None = _field(settings.FILTER)
    check_choices = _choices("metadata", format=settings.METADATA_FORMAT, input_format=settings.INPUT_FORMAT)

    def source_format(self):
        """The preset with the operator's overrides; an unknown preset or file format fails naming the setting."""
        from laion_vq.shards.sources import preset

        try:
            return preset(self.format).with_overrides(self.url_column, self.caption_column, self.input_format)
        except ValueError as err:
            raise dg.Failure(
                description=f"{err} ({settings.METADATA_FORMAT.env}, {settings.INPUT_FORMAT.env})"
                + _where_settings_come_from()
            ) from err

    def open(self, layout: StorageLayout) -> LaionMetadata:
        """The source with its parts resolved (a text source indexed, once, under the storage's
        `metadata/_index`): a source that is not there fails once, naming the setting, before any shard is
        worked on or audited."""
        laion = LaionMetadata(
            _absolute(self.source), self.samples_per_shard, self.source_format(), layout.metadata_index_dir()
        )
        try:
            laion.parts  # noqa: B018 - resolve the parts now
        except FileNotFoundError as err:
            raise dg.Failure(
                description=f"{err}: {settings.METADATA.env} (the `metadata` resource's `source`) must name the "
                "metadata file, a folder of parts or a glob" + _where_settings_come_from()
            ) from err
        return laion

    def checked_filter(self, laion: LaionMetadata) -> str | None:
        """The filter, tried once on the source's columns: a typo fails the step before any shard is cut."""
        if not self.row_filter:
            return None
        from laion_vq.stages.metadata import FilterError, check_filter

        try:
            check_filter(self.row_filter, laion.read_shard(0).schema)
        except FilterError as err:
            raise dg.Failure(description=f"{settings.FILTER.env}: {err}" + _where_settings_come_from()) from err
        return self.row_filter


class DownloaderResource(dg.ConfigurableResource):
    """img2dataset options and the guards around it. Image size, resize mode and quality are LAION-400M's.

    `allow_networks` (CIDRs) lets downloads reach addresses the guard otherwise refuses (loopback,
    private, link-local); `replace_worse` publishes a re-download even when it is much worse than the
    stored shard (`min_rate_ratio`), for the day the web really lost those images.
    """

    thread_count: int = _field(settings.DOWNLOAD_THREADS)
    timeout: int = _field(settings.DOWNLOAD_TIMEOUT)
    retries: int = _field(settings.DOWNLOAD_RETRIES)
    deadline: int = _field(settings.DOWNLOAD_DEADLINE)
    max_bytes: int = _field(settings.DOWNLOAD_MAX_BYTES)
    max_redirects: int = _field(settings.DOWNLOAD_MAX_REDIRECTS)
    buffer_bytes: int = _field(settings.DOWNLOAD_BUFFER_BYTES)
    #: None: the variable, read where the download runs (`DownloadOptions`)
    allow_networks: str | None = Field(
        default=None,
        description=f"{settings.DOWNLOAD_ALLOW_NETWORKS.help} (unset: {settings.DOWNLOAD_ALLOW_NETWORKS.env})",
    )
    min_rate_ratio: float = _field(settings.DOWNLOAD_MIN_RATE_RATIO)
    replace_worse: bool = _field(settings.DOWNLOAD_REPLACE_WORSE)
    image_size: int = _field(settings.IMAGE_SIZE)
    resize_mode: ResizeMode = _field(settings.RESIZE_MODE)
    encode_quality: int = settings.ENCODE_QUALITY
    check_choices = _choices("downloader", resize_mode=settings.RESIZE_MODE)
    _watch: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._watch = _start_pool_watch(context)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._watch is not None:
            self._watch.stop()

    def options(self):
        from laion_vq.download import DownloadOptions

        allow: dict[str, Any] = (
            {} if self.allow_networks is None else {"allow_networks": tuple(self.allow_networks.split(","))}
        )
        return DownloadOptions(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            encode_quality=self.encode_quality,
            timeout=self.timeout,
            deadline=self.deadline,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            buffer_bytes=self.buffer_bytes,
            retries=self.retries,
            thread_count=self.thread_count,
            **allow,
        )


class VQGANEncoderResource(dg.ConfigurableResource):
    """Which VQGAN, which checkpoint, where it runs, in which mode (`exact` or `fast`, see
    `laion_vq.encode.engine`), and how logits become codes (`index_rule`: `argmax` or `sample`, see
    `laion_vq.vqgan.sampling`). The model loads once per run and serves all its shards; GPU memory is given
    back when the run ends."""

    model: str = _field(settings.MODEL)
    checkpoint: str | None = _field(settings.CHECKPOINT)
    device: str = _field(settings.DEVICE)
    batch_size: int = _field(settings.ENCODE_BATCH_SIZE)
    mode: EncodeMode = _field(settings.ENCODE_MODE)
    compile_cache: str | None = _field(settings.COMPILE_CACHE)
    decode_device: DecodeDevice = _field(settings.DECODE_DEVICE)
    decode_workers: int = _field(settings.DECODE_WORKERS)
    index_rule: IndexRule = _field(settings.INDEX_RULE)
    preview_samples: int = _field(settings.PREVIEW_SAMPLES)
    codes_name: str | None = _field(settings.CODES_NAME)
    replace_codes: bool = _field(settings.REPLACE_CODES)
    #: the side of the downloaded images (`LAION_VQ_IMAGE_SIZE`, the downloader's too): the code grid is it ÷ f
    image_size: int = _field(settings.IMAGE_SIZE)
    check_choices = _choices(
        "encoder", mode=settings.ENCODE_MODE, decode_device=settings.DECODE_DEVICE, index_rule=settings.INDEX_RULE
    )
    _loaded: Any = PrivateAttr(default=None)
    _checkpoint_sha256: str | None = PrivateAttr(default=None)
    _random_weights: bool | None = PrivateAttr(default=None)
    _decoder: Any = PrivateAttr(default=None)
    _engine: Any = PrivateAttr(default=None)
    _config: Any = PrivateAttr(default=None)
    _watch: Any = PrivateAttr(default=None)

    def vqgan_config(self):
        """The architecture: a registry name, a taming/ldm `model.yaml` path, or `auto` (the YAML next to the
        checkpoint); a registry name that disagrees with the YAML beside the checkpoint is refused."""
        if self._config is None:  # resolved once: finding the YAML beside an s3:// checkpoint is I/O
            from laion_vq.vqgan import ModelConfigError, resolve_model_config

            try:
                self._config = resolve_model_config(self.model, _absolute(self.checkpoint) if self.checkpoint else None)
            except (ModelConfigError, KeyError) as err:
                raise dg.Failure(description=f"{settings.MODEL.env}: {err}") from err
        return self._config

    @property
    def codes_folder(self) -> str:
        """`codes/<this>/`: the model's name unless the operator names a side-by-side version."""
        return self.codes_name or self.vqgan_config().name

    def checkpoint_sha256(self) -> str:
        """The checkpoint's identity for provenance (hashed once per process)."""
        if self._checkpoint_sha256 is None:
            from laion_vq.shards.storage import sha256_of

            self._checkpoint_sha256 = sha256_of(_absolute(self.checkpoint or ""))
        return self._checkpoint_sha256

    def random_weights(self) -> bool:
        """Whether the checkpoint is a seeded random one (the demo's): its codes are noise, and say so."""
        if self._random_weights is None:
            from laion_vq.vqgan import has_random_weights

            self._random_weights = has_random_weights(_absolute(self.checkpoint or ""))
        return self._random_weights

    def checked_index_rule(self) -> str:
        """The index rule, refused (naming the model) when unknown or when the model cannot `sample`."""
        from laion_vq.vqgan.sampling import check_index_rule

        try:
            check_index_rule(self.index_rule, self.vqgan_config().quantizer, self.model)
        except ValueError as err:
            raise dg.Failure(description=f"{settings.INDEX_RULE.env}: {err}") from err
        return self.index_rule

    def model_yaml(self) -> str | None:
        """The model YAML the architecture came from (`auto`, an explicit YAML, or one checked beside the
        checkpoint); None for a registry model with no YAML beside its checkpoint."""
        from laion_vq.vqgan.model_yaml import checkpoint_yaml

        model = (self.model or "").strip()
        if model.endswith((".yaml", ".yml")):
            return _absolute(model)
        return checkpoint_yaml(_absolute(self.checkpoint)) if self.checkpoint else None

    def provenance(self) -> dict:
        """What made a code parquet: stored in its key-value metadata and shown on its partition's page. `model`
        is the model resolved (with `auto`, the one its YAML describes), `model_setting` what was asked for.
        `image_size` and `resize_mode` are the dataset's: a change makes another version (as does the filter, which
        each shard's record adds: `encode.shard.shard_source_provenance`)."""
        from laion_vq.shards.storage import sha256_of

        yaml = self.model_yaml()
        return {
            "model": self.vqgan_config().name,
            "model_setting": self.model,
            **({"model_yaml": yaml, "model_yaml_sha256": sha256_of(yaml)} if yaml else {}),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256(),
            "index_rule": self.checked_index_rule(),
            "encode_mode": self.checked_mode(),
            "dtype": self.dtype,
            "random_weights": self.random_weights(),
            "image_size": self.image_size,
            "resize_mode": settings.RESIZE_MODE.get_str(),
        }

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load(self):
        """The encoder module on its device; a missing checkpoint setting is a clear error."""
        if self._loaded is None:
            if not self.checkpoint:
                raise dg.Failure(
                    description=f"No VQGAN checkpoint configured: set {settings.CHECKPOINT.env} to the "
                    f"{self.model} checkpoint (last.ckpt), or configure the `encoder` resource's `checkpoint`."
                )
            from laion_vq.vqgan import load_encoder

            self._loaded = load_encoder(self.vqgan_config(), _absolute(self.checkpoint), device=self.resolved_device())
        return self._loaded

    def load_decoder(self):
        """The decoder from the same checkpoint, for reconstructions in previews (loaded on first use)."""
        if self._decoder is None:
            from laion_vq.vqgan import load_decoder

            # the decoder only reconstructs codes the encoder made, and load() refuses a missing checkpoint
            assert self.checkpoint, "no checkpoint configured"
            self._decoder = load_decoder(self.vqgan_config(), _absolute(self.checkpoint), device=self.resolved_device())
        return self._decoder

    def checked_mode(self) -> str:
        from laion_vq.encode.engine import ENCODE_MODES

        if self.mode not in ENCODE_MODES:
            raise dg.Failure(description=f"{settings.ENCODE_MODE.env} must be one of {ENCODE_MODES}, got {self.mode!r}")
        return self.mode

    @property
    def dtype(self) -> str:
        """The precision the mode runs the encoder body in (recorded as the codes' `dtype`)."""
        from laion_vq.encode.engine import MODE_DTYPE

        return MODE_DTYPE[self.checked_mode()]

    def engine(self, log=None):
        """The model in its mode on its device, batch size chosen (once per process, like the model)."""
        if self._engine is None:
            from laion_vq.encode.engine import ModelEngine

            self._engine = ModelEngine(
                self.load(),
                mode=self.checked_mode(),
                batch_size=self.batch_size,
                index_rule=self.checked_index_rule(),
                compile_cache_dir=self.compile_cache or settings.compile_cache_dir(),
                log=log,
                image_size=self.image_size,
            )
        return self._engine

    def image_decoder(self):
        """JPEG decoding beside this encoder: nvJPEG on the encoder's GPU (auto), or PIL on every core."""
        from laion_vq.encode.decode import ImageDecoder

        if self.decode_device not in ("auto", "cpu"):
            raise dg.Failure(
                description=f"{settings.DECODE_DEVICE.env} must be auto or cpu, got {self.decode_device!r}"
            )
        device = self.resolved_device() if self.decode_device == "auto" else "cpu"
        return ImageDecoder(self.image_size, device, cpu_workers=self.decode_workers or None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._watch = _start_pool_watch(context)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Free the GPU between runs of one process: drop the model, engine and decoder, give cached blocks
        back to the driver (the next run loads again: ~2 s, README *Run granularity*)."""
        if self._watch is not None:
            self._watch.stop()
        engine = self._engine
        self._engine = self._loaded = self._decoder = None
        if engine is not None:
            engine.release()


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources the code location uses, from the environment (see README: Configuration)."""
    settings.refuse_retired()
    return {
        "storage": StorageResource(root=_from_env(settings.STORAGE)),
        "metadata": LaionMetadataResource(
            source=_from_env(settings.METADATA),
            samples_per_shard=_from_env(settings.SAMPLES_PER_SHARD),
            format=_from_env(settings.METADATA_FORMAT),
            url_column=_from_env(settings.URL_COLUMN),
            caption_column=_from_env(settings.CAPTION_COLUMN),
            input_format=_from_env(settings.INPUT_FORMAT),
            row_filter=_from_env(settings.FILTER),
        ),
        "downloader": DownloaderResource(
            thread_count=_from_env(settings.DOWNLOAD_THREADS),
            timeout=_from_env(settings.DOWNLOAD_TIMEOUT),
            retries=_from_env(settings.DOWNLOAD_RETRIES),
            deadline=_from_env(settings.DOWNLOAD_DEADLINE),
            max_bytes=_from_env(settings.DOWNLOAD_MAX_BYTES),
            max_redirects=_from_env(settings.DOWNLOAD_MAX_REDIRECTS),
            buffer_bytes=_from_env(settings.DOWNLOAD_BUFFER_BYTES),
            allow_networks=_from_env(settings.DOWNLOAD_ALLOW_NETWORKS) or None,
            min_rate_ratio=_from_env(settings.DOWNLOAD_MIN_RATE_RATIO),
            replace_worse=_from_env(settings.DOWNLOAD_REPLACE_WORSE),
            image_size=_from_env(settings.IMAGE_SIZE),
            resize_mode=_from_env(settings.RESIZE_MODE),
        ),
        "encoder": VQGANEncoderResource(
            model=_from_env(settings.MODEL),
            checkpoint=_from_env(settings.CHECKPOINT),
            device=_from_env(settings.DEVICE),
            batch_size=_from_env(settings.ENCODE_BATCH_SIZE),
            mode=_from_env(settings.ENCODE_MODE),
            compile_cache=_from_env(settings.COMPILE_CACHE),
            decode_device=_from_env(settings.DECODE_DEVICE),
            decode_workers=_from_env(settings.DECODE_WORKERS),
            index_rule=_from_env(settings.INDEX_RULE),
            preview_samples=_from_env(settings.PREVIEW_SAMPLES),
            codes_name=_from_env(settings.CODES_NAME),
            replace_codes=_from_env(settings.REPLACE_CODES),
            image_size=_from_env(settings.IMAGE_SIZE),
        ),
    }
