"""Asset checks, one result per shard: each check is partitioned like its asset (Dagster 1.13's partitioned
checks, Preview), so the UI's check page shows shard 04711 failed while 04712 passed.

Dagster stores a check result returned from a multi-partition run (a backfill batch, an audit over many
shards) without a partition. So the checks yield one `AssetCheckEvaluation` per shard with `partition=`
set and the latest materialization of that partition as its target (what makes the result *current* in
the check's partition status), and `can_subset=True` lets a step produce only those. Run for a shard or
a range of shards, a check audits those; run on its own (the `audit_shards` job, the nightly schedule) it
audits every shard that is materialized or on storage. Shards on the exclusion list are not audited.

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
from laion_vq.defs.assets import code_parquets, image_tars, raw_metadata_shards
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


def _shards_to_audit(context: dg.AssetCheckExecutionContext, asset_key: dg.AssetKey, directory: str) -> list[str]:
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


def step_done(context: dg.AssetCheckExecutionContext, check: dg.AssetCheckKey) -> dg.Output:
    """The per-shard evaluations are a check step's results; this empty output only tells Dagster the step
    produced what it promised (else it logs "did not yield or return expected outputs")."""
    assets_def = context.op_execution_context.assets_def
    return dg.Output(None, output_name=assets_def.get_output_name_for_asset_check_key(check))


def evaluate_shards(
    context: dg.AssetCheckExecutionContext | dg.OpExecutionContext,
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
    source = metadata.open(layout)

    def expected_rows(shard: int) -> int | None:
        try:
            return source.locate(shard).num_rows
        except ShardOutOfRange:
            return None

    def audit(key: str) -> ShardVerdict:
        return audit_metadata_shard(layout, key, expected_rows(parse_shard_key(key)), metadata.samples_per_shard)

    keys = _shards_to_audit(context, METADATA_CHECK.asset_key, layout.metadata_dir())
    yield from evaluate_shards(context, METADATA_CHECK, layout, keys, audit)
    yield step_done(context, METADATA_CHECK)


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


@dg.multi_asset_check(
    specs=[
        dg.AssetCheckSpec(
            CODES_CHECK.name,
            asset=code_parquets,
            partitions_def=shard_partitions,
            description="32×32 int16 codes in [0, n_embed), unique sorted keys of the shard, the seed schema, "
            "and a code row for every downloaded image except those recorded as undecodable.",
        )
    ],
    can_subset=True,
    name=CODES_CHECK.name,
)
def code_parquets_contract(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    layout = storage.existing_layout()
    config = encoder.vqgan_config()
    grid = config.code_grid(encoder.image_size)
    folder = encoder.codes_folder
    keys = _shards_to_audit(context, CODES_CHECK.asset_key, layout.codes_dir(folder))
    yield from evaluate_shards(
        context, CODES_CHECK, layout, keys, lambda key: audit_code_shard(layout, folder, key, grid, config.n_embed)
    )
    yield step_done(context, CODES_CHECK)


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
            key.name,
            asset=key.asset_key,
            partitions_def=shard_partitions,
            description="No item of a removal list (`removals/` under the storage root) is left in the shard: "
            "every listed key is marked removed, and no removed key has a tar sample"
            + (" (e.g. a tar restored from an old backup)." if key == REMOVED_IMAGES_CHECK else " or a code row."),
        )
        for key in (REMOVED_IMAGES_CHECK, REMOVED_CODES_CHECK)
    ],
    can_subset=True,
    name="no_removed_items",
)
def no_removed_items(
    context: dg.AssetCheckExecutionContext, storage: StorageResource, encoder: VQGANEncoderResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    layout = storage.existing_layout()
    folder = encoder.codes_folder
    directories = {REMOVED_IMAGES_CHECK: layout.images_dir(), REMOVED_CODES_CHECK: layout.codes_dir(folder)}
    checks = [key for key in (REMOVED_IMAGES_CHECK, REMOVED_CODES_CHECK) if key in context.selected_asset_check_keys]
    yield from audit_removals(
        context, layout, folder, checks, lambda check: _shards_to_audit(context, check.asset_key, directories[check])
    )
    for check in checks:
        yield step_done(context, check)


SHARD_CHECKS = [raw_metadata_shards_valid, image_tars_complete, code_parquets_contract, no_removed_items]


class InlineCodeChecks:
    """`code_parquets_contract` and `no_removed_items` on one code shard, evaluated by the encoder step right
    after it records the shard: a run that records shards as it goes yields no output, so its check steps are
    skipped, and a fed shard is not in the run's partitions anyway. Same audits, same evaluations, current."""

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
