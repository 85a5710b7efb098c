"""Asset checks, one result per shard: each check is partitioned like its asset (Dagster 1.13's partitioned
checks, Preview), so the UI's check page shows shard 04711 failed while 04712 passed.

Dagster stores a check result returned from a multi-partition run (a backfill batch, an audit over many
shards) without a partition. So the checks yield one `AssetCheckEvaluation` per shard with `partition=`
set and the latest materialization of that partition as its target (what makes the result *current* in
the check's partition status), and `can_subset=True` lets a step produce only those. Run for a shard or
a range of shards, a check audits those; run on its own (the `audit_shards` job, the nightly schedule) it
audits every shard that is materialized or on storage. Shards on the exclusion list are not audited.

The two checks on `code_parquets` are declared by the encoder's op itself (`codes.CODE_CHECK_SPECS`), which
evaluates them as it records each shard; `audit_code_checks` runs them alone. `audit_every_shard` (the job
`audit_shards`) audits every check in one op with no pool.

Severity: ERROR for corruption, WARN for quality (success rate under the floor). `image_tars_complete`
is blocking: in a run that also encodes, a failed tar stops the encoder; across runs `code_parquets`
waits for it to pass (its automation condition) and refuses shards whose latest result failed.
"""

import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import dagster as dg

from laion_vq.audit import (
    MIN_SUCCESS_RATE,
    ShardVerdict,
    audit_code_shard,
    audit_each,
    audit_image_shard,
    audit_metadata_shard,
)
from laion_vq.audit.removals import audit_removed_in_codes, audit_removed_in_images
from laion_vq.dagster_internals import AssetCheckEvaluationTargetMaterializationData
from laion_vq.defs import metadata_keys as keys
from laion_vq.defs.assets import image_tars, raw_metadata_shards
from laion_vq.defs.check_state import (
    CODES_CHECK,
    IMAGES_CHECK,
    METADATA_CHECK,
    REMOVED_CODES_CHECK,
    REMOVED_IMAGES_CHECK,
    latest_materializations,
)
from laion_vq.defs.partitions import shard_partitions
from laion_vq.defs.resources import LaionMetadataResource, StorageResource, VQGANEncoderResource
from laion_vq.shards.exclusions import read_exclusions
from laion_vq.shards.metadata import ShardOutOfRange
from laion_vq.shards.numbering import parse_shard_key
from laion_vq.shards.storage import StorageLayout, stored_shards

#: Run tag that scopes an `audit_shards` run to some shards (`00001,00007`): set in the Launchpad's *Edit tags*,
#: since a partitioned check cannot be executed on its own from the UI.
AUDIT_SHARDS_TAG = "laion_vq/shards"


def tagged_shards(tags: Mapping[str, str]) -> list[str] | None:
    """The shards an `AUDIT_SHARDS_TAG` names (None without the tag); a key that is no partition is an error."""
    value = tags.get(AUDIT_SHARDS_TAG)
    if value is None:
        return None
    keys = sorted({k.strip() for k in value.replace(" ", ",").split(",") if k.strip()})
    unknown = [k for k in keys if not shard_partitions.has_partition_key(k)]
    if unknown or not keys:
        raise dg.Failure(
            description=f"run tag {AUDIT_SHARDS_TAG}={value!r}: {', '.join(unknown) or 'no shard'} is not a shard "
            f"partition of this code location (00000 … {shard_partitions.get_last_partition_key()})"
        )
    return keys


AuditContext = dg.AssetCheckExecutionContext | dg.AssetExecutionContext | dg.OpExecutionContext


def _shards_to_audit(context: AuditContext, asset_key: dg.AssetKey, directory: str) -> list[str]:
    """The run's shards; else the shards the run's `laion_vq/shards` tag names; else every materialized shard
    and every shard parquet in `directory`."""
    if context.has_partition_key or context.has_partition_key_range:
        return sorted(context.partition_keys)
    tagged = tagged_shards(context.run.tags)
    if tagged is not None:
        return tagged
    keys = set(context.instance.get_materialized_partitions(asset_key)) | stored_shards(directory, ".parquet")
    return sorted(k for k in keys if shard_partitions.has_partition_key(k))


def _evaluation(check: dg.AssetCheckKey, verdict: ShardVerdict, target: dg.EventLogRecord | None, blocking: bool):
    first = verdict.first
    problems = verdict.errors + verdict.warnings
    return dg.AssetCheckEvaluation(
        asset_key=check.asset_key,
        check_name=check.name,
        passed=verdict.passed,
        severity=dg.AssetCheckSeverity.ERROR if verdict.errors or verdict.passed else dg.AssetCheckSeverity.WARN,
        description=None if first is None else first.detail,
        metadata={
            "shard": verdict.shard,  # the run log's check events name no partition: this does
            **verdict.counts,
            keys.REASON: first.reason if first else "",
            "problems": dg.MetadataValue.json([{"reason": p.reason, "detail": p.detail} for p in problems]),
            **({"what_to_do": dg.MetadataValue.md(_what_to_do(check, verdict))} if problems else {}),
        },
        partition=verdict.shard,
        target_materialization_data=None
        if target is None
        else AssetCheckEvaluationTargetMaterializationData(
            storage_id=target.storage_id, run_id=target.run_id, timestamp=target.timestamp
        ),
        blocking=blocking,
    )


def _what_to_do(check: dg.AssetCheckKey, verdict: ShardVerdict) -> str:
    """Actions the UI allows (a partitioned check has no Execute button of its own)."""
    asset = check.asset_key.to_user_string()
    shard = verdict.shard
    rematerialize = (
        f"In the asset graph select `{asset}`, *Materialize*, partition `{shard}`: its files are replaced "
        "atomically and its checks run with it."
    )
    audit_again = (
        f"To audit only this shard again: *Launchpad* of job `audit_shards`, *Edit tags*, add "
        f"`{AUDIT_SHARDS_TAG}` = `{shard}`, *Launch Run*."
    )
    if not verdict.errors:
        return f"Quality only, when the network is healthy. {rematerialize} {audit_again}"
    return (
        f"{rematerialize} {audit_again} If the source itself is broken, add the line `{shard},<reason>` to "
        "`excluded_shards.csv` under the storage root."
    )


def step_done(context: dg.AssetCheckExecutionContext | dg.AssetExecutionContext, check: dg.AssetCheckKey) -> dg.Output:
    """The per-shard evaluations are a check step's results; this empty output only tells Dagster the step
    produced what it promised (else it logs "did not yield or return expected outputs")."""
    assets_def = context.op_execution_context.assets_def
    return dg.Output(None, output_name=assets_def.get_output_name_for_asset_check_key(check))


def evaluate_shards(
    context: AuditContext,
    check: dg.AssetCheckKey,
    layout: StorageLayout,
    keys: Iterable[str],
    audit_one: Callable[[str], ShardVerdict],
    blocking: bool = False,
) -> Iterator[dg.AssetCheckEvaluation]:
    """Audit each shard (skipping excluded ones, with a log line) and yield its own evaluation."""
    excluded = read_exclusions(layout)
    keys = list(keys)
    skipped = [k for k in keys if k in excluded]
    if skipped:
        context.log.info(f"not auditing {len(skipped)} excluded shard(s): {', '.join(skipped[:20])}")
    keys = [k for k in keys if k not in excluded]
    targets = latest_materializations(context.instance, check.asset_key, keys)
    failed: list[str] = []
    last_log = time.monotonic()
    for index, verdict in enumerate(audit_each(keys, audit_one), start=1):
        if not verdict.passed:
            failed.append(verdict.shard)
            assert verdict.first is not None  # a verdict that did not pass holds a problem
            context.log.warning(f"{check.name} {verdict.shard}: {verdict.first.detail}")
        if time.monotonic() - last_log > 30:
            last_log = time.monotonic()
            context.log.info(f"{check.name}: {index}/{len(keys)} shards audited, {len(failed)} failed")
        yield _evaluation(check, verdict, targets.get(verdict.shard), blocking)
    context.log.info(
        f"{check.name}: {len(keys)} shard(s) audited, {len(failed)} failed"
        + (f": {', '.join(failed[:50])}" if failed else "")
    )


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            METADATA_CHECK.name,
            asset=raw_metadata_shards,
            partitions_def=shard_partitions,
            description="The shard holds the rows the LAION parts give it (10,000, or the partial last shard), "
            "the URL and TEXT columns, and a URL on every row.",
        )
    ],
    can_subset=True,
    name=METADATA_CHECK.name,
)
def raw_metadata_shards_valid(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, metadata: LaionMetadataResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    layout = storage.existing_layout()
    keys = _shards_to_audit(context, METADATA_CHECK.asset_key, layout.metadata_dir())
    yield from evaluate_shards(context, METADATA_CHECK, layout, keys, _metadata_audit(layout, metadata))
    yield step_done(context, METADATA_CHECK)


def _metadata_audit(layout: StorageLayout, metadata: LaionMetadataResource) -> Callable[[str], ShardVerdict]:
    """`raw_metadata_shards_valid` on one shard: its rows against what the LAION parts give it."""
    source = metadata.open(layout)

    def expected_rows(shard: int) -> int | None:
        try:
            return source.locate(shard).num_rows
        except ShardOutOfRange:
            return None

    def audit(key: str) -> ShardVerdict:
        return audit_metadata_shard(layout, key, expected_rows(parse_shard_key(key)), metadata.samples_per_shard)

    return audit


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            IMAGES_CHECK.name,
            asset=image_tars,
            partitions_def=shard_partitions,
            blocking=True,
            # requested with every new tar (by the `shard_automation` sensor), so the encoder that waits
            # for it (`all_deps_blocking_checks_passed`) can be requested in the same tick, behind it
            automation_condition=dg.AutomationCondition.eager(),
            description="One status row per metadata row; img2dataset's stats agree; the tar reads to the end "
            "with an image, caption and json per success and each image hashing to the sha256 recorded at "
            f"download. ERROR names the first bad key; a success rate below {MIN_SUCCESS_RATE:.0%} is a WARN.",
        )
    ],
    can_subset=True,
    name=IMAGES_CHECK.name,
)
def image_tars_complete(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    layout = storage.existing_layout()
    keys = _shards_to_audit(context, IMAGES_CHECK.asset_key, layout.images_dir())
    yield from evaluate_shards(
        context, IMAGES_CHECK, layout, keys, lambda key: audit_image_shard(layout, key), blocking=True
    )
    yield step_done(context, IMAGES_CHECK)


def audit_code_checks(
    context: AuditContext,
    layout: StorageLayout,
    encoder: VQGANEncoderResource,
    checks: Iterable[dg.AssetCheckKey],
) -> Iterator[dg.AssetCheckEvaluation]:
    """`code_parquets_contract` and `no_removed_items` on code parquets, over the run's shards (else the tagged
    ones, else every one materialized or stored). The encoder evaluates them on each shard it records (its own
    checks, `CODE_CHECK_SPECS`); this is for runs of the checks alone: `audit_shards`, `apply_removals`."""
    config = encoder.vqgan_config()
    grid, folder = config.code_grid(encoder.image_size), encoder.codes_folder
    checks = list(checks)
    keys = _shards_to_audit(context, CODES_CHECK.asset_key, layout.codes_dir(folder))
    if CODES_CHECK in checks:
        yield from evaluate_shards(
            context, CODES_CHECK, layout, keys, lambda key: audit_code_shard(layout, folder, key, grid, config.n_embed)
        )
    if REMOVED_CODES_CHECK in checks:
        yield from audit_removals(context, layout, folder, [REMOVED_CODES_CHECK], lambda _check: keys)


def listed_keys_by_shard(layout: StorageLayout) -> dict[str, set[str]]:
    """Keys the removal lists name that are not removed yet, per shard: one plan over every status parquet. A
    list that does not parse contributes nothing (it fails `removal_lists_parse`); the others count in full."""
    from laion_vq.removals import plan_removals

    plan = plan_removals(layout)
    return {shard: {m.key for m in matches} for shard, matches in plan.shards.items()}


def audit_removals(
    context,
    layout: StorageLayout,
    folder: str,
    checks: Iterable[dg.AssetCheckKey],
    keys_of,
) -> Iterator[dg.AssetCheckEvaluation]:
    """`no_removed_items` on tars and codes for the shards `keys_of(check)` names (also used by apply_removals)."""
    listed = listed_keys_by_shard(layout)
    audits = {
        REMOVED_IMAGES_CHECK: lambda key: audit_removed_in_images(layout, key, listed.get(key, set())),
        REMOVED_CODES_CHECK: lambda key: audit_removed_in_codes(layout, folder, key, listed.get(key, set())),
    }
    for check in checks:
        yield from evaluate_shards(context, check, layout, keys_of(check), audits[check])


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            REMOVED_IMAGES_CHECK.name,
            asset=REMOVED_IMAGES_CHECK.asset_key,
            partitions_def=shard_partitions,
            description="No item of a removal list (`removals/` under the storage root) is left in the shard: "
            "every listed key is marked removed, and no removed key has a tar sample (e.g. a tar restored from "
            "an old backup).",
        )
    ],
    can_subset=True,
    name="no_removed_items",
)
def no_removed_items(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    layout = storage.existing_layout()
    yield from audit_removals(
        context,
        layout,
        "",  # images only: no code folder is read
        [REMOVED_IMAGES_CHECK],
        lambda check: _shards_to_audit(context, check.asset_key, layout.images_dir()),
    )
    yield step_done(context, REMOVED_IMAGES_CHECK)


#: The shard checks defined on their own; the two on `code_parquets` are the encoder's own (`CODE_CHECK_SPECS`).
SHARD_CHECKS = [raw_metadata_shards_valid, image_tars_complete, no_removed_items]


class InlineCodeChecks:
    """`code_parquets_contract` and `no_removed_items` on one code shard, evaluated by the encoder step (whose
    own checks they are, `codes.CODE_CHECK_SPECS`) right after it records the shard: a fed shard is not in the
    run's partitions, and a backfill's run records each shard as published. Same audits as `audit_code_checks`,
    the evaluations current on the shard's new materialization."""

    def __init__(self, instance: dg.DagsterInstance, layout: StorageLayout, folder: str, grid: int, n_embed: int):
        self.instance, self.layout, self.folder, self.grid, self.n_embed = instance, layout, folder, grid, n_embed
        self._listed: dict[str, set[str]] | None = None
        self._lists_seen: tuple = ()

    def _listed_keys(self) -> dict[str, set[str]]:
        """The removal lists' keys by shard, planned again only when the lists change (a plan reads every status
        parquet; a fed run lives for hours, and a list landing meanwhile must be checked against)."""
        from laion_vq.removals.lists import lists_signature  # as listed_keys_by_shard: polars on first use

        signature = lists_signature(self.layout)
        if self._listed is None or signature != self._lists_seen:
            self._listed, self._lists_seen = listed_keys_by_shard(self.layout), signature
        return self._listed

    def evaluations(self, key: str) -> list[dg.AssetCheckEvaluation]:
        target = latest_materializations(self.instance, CODES_CHECK.asset_key, [key]).get(key)
        [contract] = audit_each([key], lambda k: audit_code_shard(self.layout, self.folder, k, self.grid, self.n_embed))
        [removed] = audit_each(
            [key], lambda k: audit_removed_in_codes(self.layout, self.folder, k, self._listed_keys().get(k, set()))
        )
        return [
            _evaluation(CODES_CHECK, contract, target, False),
            _evaluation(REMOVED_CODES_CHECK, removed, target, False),
        ]


@dg.op(
    out={},  # its results are the evaluations it yields
    description="Every shard check over the shards the run's `laion_vq/shards` tag names, else every shard "
    "materialized or on storage: metadata, tars, code parquets, removed items. Each result lands on its shard's "
    "partition of its check. Fails when a tar is corrupted (as the blocking `image_tars_complete` does in any "
    "run). No pool: an audit never waits for the GPU the encoder holds for hours.",
)
def audit_every_shard(
    context: dg.OpExecutionContext,
    storage: StorageResource,
    metadata: LaionMetadataResource,
    encoder: VQGANEncoderResource,
) -> Iterator[dg.AssetCheckEvaluation]:
    layout = storage.existing_layout()
    evaluations: list[dg.AssetCheckEvaluation] = []

    def audits() -> Iterator[dg.AssetCheckEvaluation]:
        keys = _shards_to_audit(context, METADATA_CHECK.asset_key, layout.metadata_dir())
        yield from evaluate_shards(context, METADATA_CHECK, layout, keys, _metadata_audit(layout, metadata))
        keys = _shards_to_audit(context, IMAGES_CHECK.asset_key, layout.images_dir())
        yield from evaluate_shards(
            context, IMAGES_CHECK, layout, keys, lambda key: audit_image_shard(layout, key), True
        )
        yield from audit_removals(context, layout, "", [REMOVED_IMAGES_CHECK], lambda _check: keys)
        yield from audit_code_checks(context, layout, encoder, [CODES_CHECK, REMOVED_CODES_CHECK])

    for evaluation in audits():  # yielded, not logged: the run's result holds them even when the op fails below
        evaluations.append(evaluation)
        yield evaluation
    corrupt_tars = [
        e.partition
        for e in evaluations
        if e.check_name == IMAGES_CHECK.name and not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
    ]
    if corrupt_tars:
        raise dg.Failure(
            description=f"{IMAGES_CHECK.name} failed on {len(corrupt_tars)} shard(s): "
            f"{', '.join(str(k) for k in corrupt_tars[:20])}; each shard's result is on its partition of the check",
            metadata={"corrupted_tars": dg.MetadataValue.json(corrupt_tars)},
        )
