"""Retry a backfill's failed partitions, as the backfill page's *Retry failed* button does: the one command
that resumes a backfill a fault the platform cannot heal stopped (a full disk: the shards that could not be
written failed, naming the path and the space needed; free the space, then run this).

    python -m laion_vq.deploy.retry_backfill BACKFILL_ID [--url http://127.0.0.1:3000]

It sends the UI's own mutation (`reexecutePartitionBackfill`, strategy FROM_FAILURE) to the webserver: a new
backfill of the failed partitions and what depends on them; partitions already materialized are not redone.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

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


def retry_failed(backfill_id: str, url: str = DEFAULT_URL, timeout: float = 120) -> str:
    """Launch the retry of `backfill_id`'s failed partitions; returns the new backfill's id."""
    body = json.dumps(
        {"query": RETRY_FAILED, "variables": {"params": {"parentRunId": backfill_id, "strategy": "FROM_FAILURE"}}}
    ).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = json.loads(response.read())
    if payload.get("errors"):
        raise RuntimeError(f"the webserver at {url} refused: {payload['errors']}")
    result = payload["data"]["reexecutePartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill {backfill_id} not retried: {result.get('message', result)}")
    return str(result["backfillId"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("backfill_id")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the Dagster webserver (default {DEFAULT_URL})")
    args = parser.parse_args(argv)
    new = retry_failed(args.backfill_id, args.url)
    print(f"backfill {new} retries the failed partitions of backfill {args.backfill_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
