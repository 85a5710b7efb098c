"""Screenshots of what the UI shows for corrupted shards (for the README and issue notes; not a test).

Runs the demo on 4 shards (tiny model), damages three of them on storage (shard 00001: tar truncated to
half; 00002: a byte flipped inside a stored JPEG; 00003: a code out of range), drops a removal list naming one
image of shard 00000, starts the webserver and daemon again, runs `apply_removals`, the audit and the report
through the code location, then photographs the pages with
headless Chromium driven by Playwright (a dev extra; Debian's `apt-get install chromium`):

    .venv/bin/python docs/ui/screenshots.py [--out docs/ui]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHOOT = r"""
import sys
from playwright.sync_api import sync_playwright
base, out = sys.argv[1], sys.argv[2]
checks = "/assets/image_tars?view=checks&checkDetail=image_tars_complete"
codes = "/assets/code_parquets?view=partitions&partition=00003"
pages = [  # file, path, tab to click, partition to pick, metadata row to scroll to
    ("check_partitions.png", checks, "Partitions", None, None),
    ("check_partition_00001.png", checks, "Partitions", "00001", None),
    ("check_overview.png", "/assets/code_parquets?view=checks&checkDetail=code_parquets_contract", None, None, None),
    ("report.png", "/assets/corrupted_shards_report", None, None, None),
    ("code_partition.png", codes, None, None, None),
    ("code_partition_run.png", codes, None, None, "run_images_per_second"),
    ("code_partition_preview.png", codes, None, None, "samples_vs_reconstructions"),
    ("image_tars_removed.png", "/assets/image_tars?view=partitions&partition=00000", None, None, "removal_lists"),
    ("removal_lists.png", "/assets/removal_lists", None, None, None),
]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    for name, path, tab, partition, scroll_to in pages:
        page.goto(base + path, wait_until="networkidle", timeout=120000)
        page.wait_for_timeout(3000)
        skip = page.get_by_role("button", name="Skip")  # the first visit's "Join the community" dialog
        if skip.count():
            skip.first.click()
            page.wait_for_timeout(1000)
        if tab:
            # the check's own tab (the asset page has a "Partitions" tab too, above it)
            for locator in (page.get_by_role("tab", name=tab), page.get_by_text(tab, exact=True)):
                try:
                    locator.last.click(timeout=5000)
                    page.wait_for_timeout(3000)
                    break
                except Exception as err:
                    print(f"no {tab!r} via {locator}: {err}")
        if partition:
            page.get_by_placeholder("Filter by partition").fill(partition)
            page.wait_for_timeout(1500)
            page.get_by_text(partition).first.click(timeout=10000)
            page.wait_for_timeout(3000)
        if scroll_to:
            page.get_by_text(scroll_to, exact=True).first.scroll_into_view_if_needed(timeout=10000)
            page.wait_for_timeout(1000)
        page.screenshot(path=f"{out}/{name}", full_page=not scroll_to)
        print("wrote", f"{out}/{name}")
    browser.close()
"""


def damage(data: Path, model: str) -> None:
    tar1 = data / "images" / "00001.tar"
    tar1.write_bytes(tar1.read_bytes()[: tar1.stat().st_size // 2 + 100])  # mid-member
    tar2 = data / "images" / "00002.tar"
    with tarfile.open(tar2) as t:
        member = next(m for m in t if m.name.endswith(".jpg"))
    raw = bytearray(tar2.read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0xFF
    tar2.write_bytes(bytes(raw))
    codes3 = data / "codes" / model / "00003.parquet"
    table = pq.read_table(codes3)
    blobs = table.column("code").to_pylist()
    grid = np.frombuffer(blobs[1], np.int16).copy()
    grid[5] = 9000
    blobs[1] = grid.tobytes()
    table = table.set_column(table.column_names.index("code"), "code", pa.array(blobs, pa.binary()))
    pq.write_table(table.replace_schema_metadata(pq.read_table(codes3).schema.metadata), codes3)


def removal_list(data: Path) -> None:
    """A takedown of one image of shard 00000, by its key (applied by the `apply_removals` job)."""
    status = pq.read_table(data / "images" / "00000.parquet").to_pylist()
    key = next(row["key"] for row in status if row["status"] == "success")
    (data / "removals").mkdir(exist_ok=True)
    (data / "removals" / "takedown.csv").write_text(f"key,reason,date\n{key},takedown request 17,2026-12-01\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--model", default="vqgan_gumbel_f8_tiny")
    parser.add_argument("--reuse", help="a workdir of an earlier run: only start the UI and photograph it")
    args = parser.parse_args()
    python = os.environ.get("PLAYWRIGHT_PYTHON", sys.executable)  # playwright is a dev extra
    from laion_vq import demo
    from laion_vq.testing.dagster_services import EMBEDDED_YAML, dagster_services

    if args.reuse:
        workdir = Path(args.reuse)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="laion_vq_shots-"))
        demo.main(["--workdir", str(workdir), "--model", args.model, "--shards", "4", "--samples-per-shard", "8"])
        damage(workdir / "data", args.model)
        removal_list(workdir / "data")
    with dagster_services(workdir / "dagster_home", None, instance_yaml=EMBEDDED_YAML) as services:
        if not args.reuse:
            for job in ("apply_removals", "audit_shards", "corrupted_shards_report_job"):
                # the audit run itself fails (a blocking check found corruption); every shard's result is kept
                print(job, services.wait_for_run(services.launch_run(job)))
        subprocess.run([python, "-c", SHOOT, services.url, os.path.abspath(args.out)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
