"""The overlapped encode pipeline: tar → decode → encode → parquet, over all the shards of a run.

Four stages, each in its own thread, joined by bounded queues so none runs ahead by more than a few batches::

    reader ──chunks──▶ decoder ──images──▶ encoder (caller's thread) ──shard──▶ writer
    (tar stream,        (PIL on every       (ModelEngine: device copy,         (reconcile, contract
     next shard          core, or nvJPEG     forward, async codes copy;          check, atomic parquet)
     read ahead)         + CPU fallback)     one batch in flight)

The encoder never waits on a file: while it runs batch *i*, batch *i+1* is decoded and read, codes of *i-1*
come back, the finished shard is written, and the next shard's tar is already streaming. Shards are yielded
in the order given, each as its result or as the exception that stopped it (one bad shard never stops the
others). The shards may come from a feed that blocks until the next one is ready (an encoder run fed while
downloads land): finished shards are still yielded while it waits, and the wait is counted apart from the
encoder's input stalls. Nothing here knows Dagster; ``laion_vq.stages.codes`` and the ``code_parquets`` asset call it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from laion_vq.encode.decode import ImageDecoder
from laion_vq.encode.engine import CallableEngine, EngineStats, ModelEngine
from laion_vq.encode.shard import (
    CodeShardResult,
    CodeSpec,
    ShardAccumulator,
    publish_shard,
    refuse_other_version,
    shard_source_provenance,
    status_table,
)
from laion_vq.shards.storage import StorageLayout, require_upstream
from laion_vq.shards.tar_reader import TruncatedTarError, iter_samples

__all__ = ["EncodePipeline", "PipelineStats"]

#: batches each queue holds: enough to ride out a slow tar read or a long shard publish
QUEUE_DEPTH = 4
NO_IMAGE = "no image file in tar sample"


@dataclass
class PipelineStats:
    """Where a run's time went: `input_wait_seconds` is the encoder idle while a shard is being read and
    decoded (a pipeline stall); `feed_wait_seconds` is the encoder idle because no shard was ready yet."""

    shards: int = 0
    images: int = 0
    seconds: float = 0.0
    input_wait_seconds: float = 0.0
    feed_wait_seconds: float = 0.0
    gpu_decoded: int = 0
    cpu_fallbacks: Counter = field(default_factory=Counter)
    engine: EngineStats | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def working_seconds(self) -> float:
        """Wall time with a shard to work on (the feed's waits left out)."""
        return max(self.seconds - self.feed_wait_seconds, 0.0)

    def as_metadata(self) -> dict[str, Any]:
        """The numbers a user checks on the run: throughput, encoder idle share, OOM retries."""
        engine = self.engine or EngineStats()
        return {
            "images_per_second": round(self.images_per_second, 2),
            "encoder_idle_share": round(self.input_wait_seconds / self.working_seconds, 4)
            if self.working_seconds
            else 0.0,
            "waiting_for_shards_seconds": round(self.feed_wait_seconds, 1),
            "batch_size": engine.batch_sizes[-1] if engine.batch_sizes else 0,
            "oom_retries": engine.oom_retries,
            "compile_seconds": round(engine.compile_seconds, 2),
            "gpu_decoded": self.gpu_decoded,
            "cpu_decode_fallbacks": dict(self.cpu_fallbacks),
        }

    def describe(self) -> str:
        """`as_metadata` as a sentence, for the run's log."""
        m = self.as_metadata()
        fallbacks = ", ".join(f"{n} {why}" for why, n in m["cpu_decode_fallbacks"].items()) or "none"
        return (
            f"{self.images} images in {self.shards} shard(s) at {m['images_per_second']} images/s; encoder idle "
            f"{m['encoder_idle_share']:.1%} of its working time, {m['waiting_for_shards_seconds']} s waiting for "
            f"shards; batch {m['batch_size']}, {m['oom_retries']} out-of-memory retries, compile "
            f"{m['compile_seconds']} s; {m['gpu_decoded']} decoded on the GPU, CPU decode fallbacks: {fallbacks}"
        )


@dataclass
class _Start:
    acc: ShardAccumulator


@dataclass
class _Chunk:
    acc: ShardAccumulator
    items: list[tuple[str, bytes]]
    missing: list[str]
    decoded: Any = None


@dataclass
class _End:
    shard_id: int
    acc: ShardAccumulator | None = None
    error: BaseException | None = None
    tar_error: str | None = None


@dataclass
class _Fatal:
    error: BaseException


class _Stopped(Exception):
    pass


_IDLE = object()  # the encoder's queue stayed empty for a moment


class EncodePipeline:
    """Encodes shards with one engine and one decoder; ``run`` may be called for several batches of shards."""

    def __init__(
        self,
        layout: StorageLayout,
        spec: CodeSpec,
        engine: ModelEngine | CallableEngine,
        decoder: ImageDecoder,
        *,
        progress: Callable[[str], None] | None = None,
        queue_depth: int = QUEUE_DEPTH,
    ) -> None:
        self.layout, self.spec, self.engine, self.decoder = layout, spec, engine, decoder
        self.progress = progress or (lambda _message: None)
        self.queue_depth = queue_depth
        self.stats = PipelineStats(engine=engine.stats)
        self._waiting_for_shards = threading.Event()

    # -- the two feeding threads --------------------------------------------------------------------------------

    def _put(self, q: queue.Queue, item: object, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, q: queue.Queue, stop: threading.Event) -> object:
        """The next item, or _Stopped once the run is stopping: the reader may stop without sending its end
        marker, and a bare `get()` would then wait forever (a thread left behind per stopped run)."""
        while not stop.is_set():
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                continue
        raise _Stopped

    def _open_shard(self, shard_id: int, keep: int) -> ShardAccumulator:
        dest = self.spec.destination(self.layout, shard_id)
        provenance = {**self.spec.provenance, **shard_source_provenance(self.layout, shard_id)}
        if not self.spec.replace_other_versions:
            refuse_other_version(dest, provenance)
        status = status_table(self.layout, shard_id)
        tar_url = self.layout.image_tar(shard_id)
        require_upstream(tar_url, "image_tars", read=False)
        rows = {row["key"]: row for row in status.to_pylist()}
        return ShardAccumulator(
            shard_id,
            rows,
            tar_url,
            dest,
            keep_samples=keep,
            status_schema=status.schema,
            provenance=provenance,
            status_url=self.layout.image_status(shard_id),
        )

    def _read(self, shard_ids: Iterable[int], keep: Mapping[int, int], out: queue.Queue, stop: threading.Event) -> None:
        """Stream each tar into chunks of one batch; a shard's failure ends that shard only."""
        try:
            for shard_id in self._feed(shard_ids):
                try:
                    acc = self._open_shard(shard_id, keep.get(shard_id, 0))
                except Exception as err:  # that shard's outcome, yielded in order
                    self._put(out, _End(shard_id, error=err), stop)
                    continue
                self._put(out, _Start(acc), stop)
                items: list[tuple[str, bytes]] = []
                missing: list[str] = []
                end = _End(shard_id, acc)
                try:
                    for sample in iter_samples(acc.tar_url):
                        acc.tar_keys.add(sample.key)
                        image = sample.image
                        if image is None:
                            missing.append(sample.key)
                        else:
                            items.append((sample.key, image))
                        if len(items) >= self.engine.batch_size:
                            self._put(out, _Chunk(acc, items, missing), stop)
                            items, missing = [], []
                except TruncatedTarError as err:
                    end.tar_error = str(err)
                except _Stopped:
                    raise
                except Exception as err:  # the shard's outcome
                    end.error = err
                if end.error is None and (items or missing):
                    self._put(out, _Chunk(acc, items, missing), stop)
                self._put(out, end, stop)
            self._put(out, None, stop)
        except _Stopped:
            return
        except BaseException as err:  # a bug here must surface in the caller's thread
            self._put(out, _Fatal(err), stop)

    def _feed(self, shard_ids: Iterable[int]) -> Iterator[int]:
        """The shards in order, flagging while the source blocks (a feed waiting for the next ready shard)."""
        source = iter(shard_ids)
        while True:
            self._waiting_for_shards.set()
            try:
                shard_id = next(source)
            except StopIteration:
                return
            finally:
                self._waiting_for_shards.clear()
            yield shard_id

    def _decode(self, inbox: queue.Queue, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while True:
                msg = self._get(inbox, stop)
                if isinstance(msg, _Chunk) and msg.items:
                    msg.decoded = self.decoder.decode(msg.items)
                self._put(out, msg, stop)
                if msg is None or isinstance(msg, _Fatal):
                    return
        except _Stopped:
            return
        except BaseException as err:  # surfaces in the caller's thread
            with contextlib.suppress(_Stopped):
                self._put(out, _Fatal(err), stop)

    # -- the encoder, in the caller's thread --------------------------------------------------------------------

    def run(
        self, shard_ids: Iterable[int], keep_samples: Mapping[int, int] | None = None
    ) -> Generator[tuple[int, CodeShardResult | BaseException], None, None]:
        """Yield ``(shard_id, result or exception)`` for each shard, in the order given. ``shard_ids`` is read
        lazily, in the reader thread: it may block until the next shard is ready."""
        stop = threading.Event()
        chunks: queue.Queue = queue.Queue(self.queue_depth)
        decoded: queue.Queue = queue.Queue(self.queue_depth)
        # not `keep_samples or {}`: a mapping that decides per shard (the first shard's samples) may be empty
        keep = keep_samples if keep_samples is not None else {}
        threads = [
            threading.Thread(target=self._read, args=(shard_ids, keep, chunks, stop), daemon=True),
            threading.Thread(target=self._decode, args=(chunks, decoded, stop), daemon=True),
        ]
        for thread in threads:
            thread.start()
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="laion-vq-publish")
        outcomes: deque[tuple[int, Future | BaseException]] = deque()
        inflight: tuple[ShardAccumulator, Any, Any, float] | None = None
        started = time.perf_counter()
        earlier = self.stats.seconds  # a pipeline may run several batches of shards

        def tick() -> None:
            self.stats.seconds = earlier + time.perf_counter() - started

        shard_started: dict[int, float] = {}

        def collect() -> None:
            nonlocal inflight
            if inflight is None:
                return
            acc, pending, batch, submitted = inflight
            t0 = time.perf_counter()
            codes = pending.result()
            acc.encode_seconds += time.perf_counter() - t0 + submitted
            images = None
            if len(acc.samples) < acc.keep_samples:
                images = batch.images[: acc.keep_samples - len(acc.samples)].cpu().numpy()
            acc.add(batch.keys, codes, batch.sha256, images)
            self.stats.images += len(batch.keys)
            inflight = None

        try:
            while True:
                t0 = time.perf_counter()
                try:
                    msg = decoded.get(timeout=0.25)
                except queue.Empty:
                    msg = _IDLE
                waited = time.perf_counter() - t0
                if self._waiting_for_shards.is_set() and decoded.empty():
                    self.stats.feed_wait_seconds += waited
                else:
                    self.stats.input_wait_seconds += waited
                if msg is _IDLE:  # nothing new: hand out the shards whose parquet got written meanwhile
                    while outcomes and (not isinstance(outcomes[0][1], Future) or outcomes[0][1].done()):
                        tick()
                        yield _resolve(*outcomes.popleft())
                    continue
                if msg is None:
                    break
                if isinstance(msg, _Fatal):
                    raise msg.error
                if isinstance(msg, _Start):
                    shard_started[msg.acc.shard_id] = time.perf_counter()
                elif isinstance(msg, _Chunk):
                    acc = msg.acc
                    for key in msg.missing:
                        acc.fail(key, NO_IMAGE)
                    batch = msg.decoded
                    if batch is not None:
                        for key, reason, _sha in batch.failed:
                            acc.fail(key, reason)
                        self.stats.gpu_decoded += batch.gpu_decoded
                        self.stats.cpu_fallbacks.update(batch.cpu_fallbacks)
                        if batch.keys:
                            t1 = time.perf_counter()
                            pending = self.engine.submit(batch.images, batch.keys)
                            submitted = time.perf_counter() - t1
                            collect()  # the previous batch's codes, while this one runs
                            inflight = (acc, pending, batch, submitted)
                    if acc.keys:  # not "0 encoded" while the shard's first batch is still on the encoder
                        self.progress(acc.progress())
                elif isinstance(msg, _End):
                    collect()
                    self.stats.shards += 1
                    if msg.error is not None or msg.acc is None:
                        outcomes.append((msg.shard_id, msg.error or RuntimeError("shard not read")))
                    else:
                        elapsed = time.perf_counter() - shard_started.get(msg.shard_id, started)
                        outcomes.append(
                            (msg.shard_id, writer.submit(publish_shard, msg.acc, self.spec, msg.tar_error, elapsed))
                        )
                while outcomes and (not isinstance(outcomes[0][1], Future) or outcomes[0][1].done()):
                    tick()
                    yield _resolve(*outcomes.popleft())
            collect()
            while outcomes:
                outcome = _resolve(*outcomes.popleft())
                tick()
                yield outcome
        finally:
            stop.set()
            writer.shutdown(wait=True)
            for thread in threads:
                thread.join(timeout=5)
            tick()

    def encode_all(self, shard_ids: Sequence[int], keep_samples: Mapping[int, int] | None = None) -> dict:
        """Run to the end: {shard_id: result or exception}."""
        return dict(self.run(shard_ids, keep_samples))


def _resolve(shard_id: int, outcome: Future | BaseException) -> tuple[int, CodeShardResult | BaseException]:
    if isinstance(outcome, BaseException):
        return shard_id, outcome
    error = outcome.exception()
    return shard_id, error if error is not None else outcome.result()
