"""Resume a backfill that a fault the platform cannot heal stopped (a full disk: the shards that could not be
written failed, naming the path and the space needed; free the space, then run this). The one command:

    python -m laion_vq.deploy.retry_backfill BACKFILL_ID [--url http://127.0.0.1:3000]

1. It retries the backfill's failed partitions as the backfill page's *Retry failed* button does: the UI's own
   mutation (`reexecutePartitionBackfill`, strategy FROM_FAILURE) to the webserver: a new backfill of the failed
   partitions and what depends on them; partitions already materialized are not redone.
2. It audits the backfill's materialized shards whose checks never ran on their latest materialization (a check
   step that failed with the disk, or was skipped with its run): one `audit_shards` run tagged with those shards
   (`laion_vq/shards`), launched as the launchpad does. Dagster's retry does not re-run checks of partitions
   that did materialize, so without this they would stay unchecked.

It reads the instance (DAGSTER_HOME, as the dagster CLI) to find those shards, and talks to the webserver to
launch, so the runs are queued and placed as any other.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

import dagster as dg

from laion_vq.dagster_internals import BACKFILL_ID_TAG

COMMAND = "python -m laion_vq.deploy.retry_backfill"
DEFAULT_URL = "http://127.0.0.1:3000"
RETRY_FAILED = """
mutation ($params: ReexecutionParams!) {
  reexecutePartitionBackfill(reexecutionParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}"""
LOCATIONS = "query { workspaceOrError { ... on Workspace { locationEntries { name } } } }"
LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}"""


def _graphql(url: str, query: str, variables: dict | None = None, timeout: float = 120) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = json.loads(response.read())
    if payload.get("errors"):
        raise RuntimeError(f"the webserver at {url} refused: {payload['errors']}")
    return dict(payload["data"])


def retry_failed(backfill_id: str, url: str = DEFAULT_URL) -> str:
    """Launch the retry of `backfill_id`'s failed partitions; returns the new backfill's id."""
    params = {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}
    result = _graphql(url, RETRY_FAILED, {"params": params})["reexecutePartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill {backfill_id} not retried: {result.get('message', result)}")
    return str(result["backfillId"])


def unchecked_shards(instance: dg.DagsterInstance, backfill_id: str) -> list[str]:
    """The backfill's shards materialized with a check that has no current result (never run on the latest
    materialization)."""
    from laion_vq.defs.check_state import SHARD_CHECK_KEYS, latest_results
    from laion_vq.defs.feeding import run_partition_keys

    keys: set[str] = set()
    for run in instance.get_runs(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id})):
        keys.update(run_partition_keys(dict(run.tags)))
    unchecked: set[str] = set()
    for check in SHARD_CHECK_KEYS:
        materialized = sorted(keys & set(instance.get_materialized_partitions(check.asset_key)))
        if materialized:
            current = {r.shard for r in latest_results(instance, check, materialized) if r.current}
            unchecked.update(set(materialized) - current)
    return sorted(unchecked)


def audit(shards: list[str], url: str = DEFAULT_URL) -> str:
    """Launch `audit_shards` over `shards` (the `laion_vq/shards` tag); returns the run id."""
    from laion_vq.defs.checks import AUDIT_SHARDS_TAG
    from laion_vq.defs.jobs import check_job

    location = _graphql(url, LOCATIONS)["workspaceOrError"]["locationEntries"][0]["name"]
    params = {
        "selector": {"repositoryLocationName": location, "repositoryName": "__repository__", "jobName": check_job.name},
        "executionMetadata": {"tags": [{"key": AUDIT_SHARDS_TAG, "value": ",".join(shards)}]},
    }
    result = _graphql(url, LAUNCH_RUN, {"params": params})["launchRun"]
    if result["__typename"] != "LaunchRunSuccess":
        raise RuntimeError(f"audit of {len(shards)} shard(s) not launched: {result.get('message', result)}")
    return str(result["run"]["runId"])


def resume(instance: dg.DagsterInstance, backfill_id: str, url: str = DEFAULT_URL) -> tuple[str, str | None, list[str]]:
    """Both steps: (the retry backfill's id, the audit run's id or None, the shards it audits)."""
    new = retry_failed(backfill_id, url)
    shards = unchecked_shards(instance, backfill_id)
    return new, (audit(shards, url) if shards else None), shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("backfill_id")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the Dagster webserver (default {DEFAULT_URL})")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        new, run_id, shards = resume(instance, args.backfill_id, args.url)
    print(f"backfill {new} retries the failed partitions of backfill {args.backfill_id}")
    if run_id:
        print(f"run {run_id} audits {len(shards)} shard(s) whose checks never ran: {', '.join(shards[:20])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
