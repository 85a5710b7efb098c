"""`make demo` (the tiny model), then the README's "after `make demo`" tour clicked through the real Dagster UI
in headless Chromium. One demo run serves both tests: what the demo left, then what the UI does with it.

A new user runs the demo, starts `make ui` and, in the browser: materializes the shard the demo left
(00002) from the asset graph's *Materialize* dialog, launches `audit_shards` from its Launchpad after
damaging a tar, and materializes `corrupted_shards_report`. Each step must work on the demo's settings
(its instance's `laion_vq.env`), leave its files in the demo's workdir and nowhere else, and `make ui`
must stop on SIGTERM. A screenshot per step lands in $LAION_VQ_UI_SCREENSHOTS (default: the test's tmp
folder), for a person to look at.

Needs Chromium at /usr/bin/chromium (Debian's package; `.ci/run` installs it) and Playwright (a dev extra);
Playwright never downloads a browser here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = "vqgan_gumbel_f8_tiny"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHARD_ASSETS = ["raw_metadata_shards", "image_tars", "code_parquets"]
NEW_SHARD = "00002"  # the demo makes metadata for 3 shards and materializes 2: this one is the user's
DAMAGED_SHARD = "00001"
UI_TIMEOUT_MS = 60_000


def _clean_env() -> dict[str, str]:
    """This shell's environment without laion_vq's settings or an instance: the demo's instance file alone
    must configure every process, as on a new user's machine (conftest sets LAION_VQ_DOWNLOAD_ALLOW_NETWORKS)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LAION_VQ_") and k != "DAGSTER_HOME"}


def _tail(path: Path, chars: int = 4000) -> str:
    """The end of a log, for failure messages."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no {path})"


def _stray_paths() -> set[str]:
    """What git does not track in the repo, ignored paths included (a stray `data/` is gitignored), minus
    caches. New `.py` files are left out: source edited in the tree while the suite runs is not the UI's doing."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    caches = ("__pycache__", ".pytest_cache", ".ruff_cache", ".egg-info")
    return {p for p in paths if not any(c in p for c in caches) and not p.endswith(".py")}


def _wait_for(condition: Callable[[], object], timeout_s: float, what: str, diagnose: Callable[[], str] = str):
    """Poll until `condition()` is truthy (returned); fail naming `what`, with `diagnose()`'s text."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{diagnose()}")
        time.sleep(2)


@dataclass
class Demo:
    """The demo's workdir (instance, storage) and what git did not track in the repo before it ran."""

    workdir: Path
    stray_before: set[str]

    @property
    def home(self) -> Path:
        return self.workdir / "dagster_home"

    @property
    def data(self) -> Path:
        return self.workdir / "data"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Demo:
    """`make demo` with the tiny model into a tmp workdir: shards 00000 and 00001 done, 00002 left."""
    stray_before = _stray_paths()
    workdir = tmp_path_factory.mktemp("ui_demo")
    log = workdir / "demo.log"
    command = [sys.executable, "-m", "laion_vq.demo", "--workdir", str(workdir), "--model", MODEL]
    with log.open("w") as out:
        done = subprocess.run(
            [*command, "--samples-per-shard", "6"], env=_clean_env(), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )
    assert done.returncode == 0, f"the demo failed:\n{_tail(log)}"
    return Demo(workdir, stray_before)


def _free_port() -> int:
    """A port nobody listens on, so the test's UI does not clash with a user's `make ui` (3000)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(base: str, query: str) -> dict:
    """The webserver's own API: what the UI itself asks, without a browser."""
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


def _location_loaded(base: str) -> bool:
    """Whether the webserver answers and has loaded the `laion_vq` code location (a load error fails)."""
    try:
        with urllib.request.urlopen(f"{base}/server_info", timeout=5) as response:
            if response.status != 200:
                return False
        data = _graphql(
            base,
            "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
            "locationOrLoadError { __typename ... on PythonError { message } } } } } }",
        )
    except (OSError, urllib.error.URLError):
        return False
    for entry in data["workspaceOrError"]["locationEntries"]:
        if entry["name"] == "laion_vq" and entry["loadStatus"] == "LOADED":
            error = entry["locationOrLoadError"]
            assert error["__typename"] == "RepositoryLocation", f"laion_vq failed to load: {error}"
            return True
    return False


def _processes_of(home: Path) -> list[int]:
    """Our UI's processes (`dg dev`'s own session included): those whose environment names this instance.
    The tmp DAGSTER_HOME is unique to this test, so these are processes this test started."""
    needle = f"DAGSTER_HOME={home}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def ui(demo: Demo) -> Iterator[str]:
    """`make ui` on the demo's instance on a free port; its base URL. Afterwards SIGTERM must stop it all."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = demo.workdir / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["make", "ui", f"UI_PORT={port}"],
            cwd=REPO,
            env={**_clean_env(), "DAGSTER_HOME": str(demo.home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def started() -> bool:
        assert proc.poll() is None, f"make ui exited ({proc.returncode}):\n{_tail(log)}"
        return _location_loaded(base)

    stopped = False
    try:
        _wait_for(started, 240, f"make ui to serve {base} with laion_vq loaded", lambda: _tail(log))
        yield base
        os.killpg(proc.pid, signal.SIGTERM)
        _wait_for(lambda: proc.poll() is not None, 30, "make ui to exit on SIGTERM", lambda: _tail(log))
        _wait_for(lambda: not _processes_of(demo.home), 30, "dg dev's processes to exit", lambda: _tail(log))
        stopped = True
    finally:
        if not stopped:  # a failed start or stop: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in _processes_of(demo.home):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)


class Screenshots:
    """Numbered screenshots (01_asset_graph.png, …) in the order taken, kept for a person to look at."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.taken: list[str] = []

    def take(self, page, name: str) -> None:
        path = self.folder / f"{len(self.taken) + 1:02d}_{name}.png"
        page.screenshot(path=str(path))
        self.taken.append(path.name)

    @contextlib.contextmanager
    def kept(self, page, note: Callable[[], str] = str) -> Iterator[None]:
        """A last screenshot when the block fails; where they all are (and `note()`) printed either way."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.take(page, "failure")
            raise
        finally:
            print(f"screenshots in {self.folder}: {', '.join(self.taken)}{note()}")


@pytest.fixture()
def screenshots(tmp_path) -> Screenshots:
    return Screenshots(Path(os.environ.get("LAION_VQ_UI_SCREENSHOTS") or tmp_path / "screenshots"))


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium: skipped without it on a developer's machine, a failure in CI (`.ci/run` installs it)."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium (.ci/run)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); this test drives the UI in it")
    return CHROMIUM


@contextlib.contextmanager
def _chromium_page(chromium: str):
    """A Chromium page; Dagster's one-time "Join the community" dialog is dismissed whenever it shows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.add_locator_handler(page.get_by_role("button", name="Skip", exact=True), lambda skip: skip.click())
            yield page
        finally:
            browser.close()


@pytest.fixture()
def page(chromium: str, ui: str):
    """A Chromium page on the demo's UI."""
    with _chromium_page(chromium) as page:
        yield page


@pytest.fixture()
def instance(demo: Demo, ui: str):
    """The demo's instance (SQLite under its DAGSTER_HOME), to check what the UI's clicks did."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(demo.home))
    try:
        yield instance
    finally:
        instance.dispose()


def _runs_since(instance, since: datetime) -> list:
    """The runs created after a click: the ones it launched (a backfill's runs come one after another)."""
    import dagster as dg

    return list(instance.get_runs(filters=dg.RunsFilter(created_after=since)))


def _no_failed_run_since(instance, since: datetime) -> None:
    """Fail at once (instead of at a timeout) when a run the UI launched failed."""
    from dagster import DagsterRunStatus

    bad = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
    failed = [(r.run_id, r.job_name, r.status) for r in _runs_since(instance, since) if r.status in bad]
    assert not failed, f"run(s) launched from the UI failed: {failed}"


def _runs_summary(instance, since: datetime) -> str:
    """The runs since a click, for a timeout's message."""
    runs = [
        (r.run_id[:8], r.job_name, r.status.value, r.tags.get("dagster/partition"))
        for r in _runs_since(instance, since)
    ]
    return f"runs since the click: {runs}"


def materialize_new_shard(page, base: str, shots: Screenshots, instance, demo: Demo) -> None:
    """Asset graph of group `laion` → select the three shard assets → *Materialize* → partition 00002 only →
    launch; then all three assets have 00002, from the demo's storage, metadata and model."""
    import dagster as dg

    page.goto(f"{base}/locations/laion_vq/asset-groups/laion")
    for i, asset in enumerate(SHARD_ASSETS):  # click one node, shift-click the others
        page.get_by_text(asset, exact=True).first.click(modifiers=["Shift"] if i else None)
    materialize = page.get_by_role("button", name=f"Materialize selected ({len(SHARD_ASSETS)})")
    materialize.wait_for()
    shots.take(page, "asset_graph")

    materialize.click()
    dialog = page.get_by_role("dialog").filter(has_text=f"Launch runs to materialize {len(SHARD_ASSETS)} assets")
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_placeholder("Filter partitions").fill(NEW_SHARD)
    # the partition list is a popover outside the dialog; its entries also have hidden measuring copies
    page.get_by_text(NEW_SHARD, exact=True).filter(visible=True).last.click()
    dialog.get_by_text(f"Launch runs to materialize {len(SHARD_ASSETS)} assets").click()  # closes the popover
    dialog.get_by_text("1 partition", exact=True).wait_for()
    shots.take(page, "materialize_dialog")

    since = datetime.now(UTC)
    # one run for a partition of assets with a single backfill policy, a backfill otherwise
    dialog.get_by_role("button", name=re.compile(r"^Launch (backfill|\d+ runs?)$")).click()
    dialog.wait_for(state="hidden")
    # the graph's progress bar, or (if the run is already done) the launch notice
    launched = page.get_by_text(re.compile(r"^Launched run|backfill", re.IGNORECASE))
    page.get_by_text("Materializing 1 partition").or_(launched).first.wait_for()
    shots.take(page, "materialize_launched")

    def done() -> bool:
        _no_failed_run_since(instance, since)
        return all(NEW_SHARD in instance.get_materialized_partitions(dg.AssetKey(a)) for a in SHARD_ASSETS)

    _wait_for(done, 300, f"{SHARD_ASSETS} to have partition {NEW_SHARD}", lambda: _runs_summary(instance, since))
    for path in (
        demo.data / "metadata" / f"{NEW_SHARD}.parquet",
        demo.data / "images" / f"{NEW_SHARD}.tar",
        demo.data / "codes" / MODEL / f"{NEW_SHARD}.parquet",
    ):
        assert path.is_file(), f"{path} missing: the UI's run did not use the demo's settings"

    page.goto(f"{base}/assets/code_parquets?view=partitions&partition={NEW_SHARD}")
    page.get_by_text(str(demo.data / "codes" / MODEL / f"{NEW_SHARD}.parquet")).first.wait_for()
    shots.take(page, f"code_parquets_{NEW_SHARD}")


def audit_from_launchpad(page, base: str, shots: Screenshots, instance) -> None:
    """Jobs → audit_shards → Launchpad → Launch Run; the run fails on the blocking check, and each shard's
    verdict is on its own partition of `image_tars_complete`: 00001 (truncated) failed, the others passed."""
    from dagster import DagsterRunStatus
    from dagster._core.events import DagsterEventType

    page.goto(base)
    page.get_by_role("navigation").get_by_role("link", name="Jobs").click()
    page.get_by_text("audit_shards", exact=True).click()
    page.get_by_role("tab", name="Launchpad").click()
    launch = page.get_by_role("button", name="Launch Run")
    launch.wait_for()
    shots.take(page, "audit_launchpad")

    launch.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    run = _wait_for(
        lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r, 300, f"audit run {run_id} to finish"
    )
    # the blocking check failed the run; every shard was still audited
    assert run.status == DagsterRunStatus.FAILURE, run.status
    page.get_by_text("Failure", exact=True).first.wait_for()
    page.get_by_text("RUN_FAILURE", exact=True).first.wait_for()  # the log has caught up with the run's end
    shots.take(page, "audit_run")

    verdicts = {}
    for record in instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        if evaluation.check_name == "image_tars_complete":
            verdicts[evaluation.partition] = evaluation.passed
    assert verdicts == {"00000": True, DAMAGED_SHARD: False, NEW_SHARD: True}, verdicts

    page.goto(f"{base}/assets/image_tars?view=checks&checkDetail=image_tars_complete")
    page.get_by_role("tab", name="Execution history").wait_for()  # the check's own tabs have loaded
    page.get_by_role("tab", name="Partitions").last.click()  # the check's (the asset has a Partitions tab above)
    page.get_by_placeholder(re.compile("^Filter by partition")).wait_for()  # the verdicts are asserted above
    page.get_by_placeholder(re.compile("^Filter by partition")).fill(DAMAGED_SHARD)
    page.get_by_text(DAMAGED_SHARD, exact=True).filter(visible=True).last.click()
    page.get_by_text(re.compile("^tar (unreadable|missing images)$")).first.wait_for()  # where the cut fell
    shots.take(page, "check_image_tars_complete")


TAKEDOWN_SHARD = "00000"  # intact in the demo: two of its images are taken down
TAKEDOWN_REASON = "takedown request 77"


def _statuses(demo: Demo, shard: str) -> list[str]:
    table = pq.read_table(demo.data / "images" / f"{shard}.parquet", columns=["status"])
    return table.column("status").to_pylist()


def _metadata_row(page, name: str) -> str:
    """The text of one row of the partition page's metadata table."""
    row = page.locator("tr").filter(has=page.get_by_text(name, exact=True)).first
    row.wait_for()
    return row.inner_text()


def apply_takedown_from_launchpad(page, base: str, shots: Screenshots, instance, demo: Demo) -> list[str]:
    """A takedown list for two images of 00000 (and a list with a misspelt column beside it) → Jobs →
    apply_removals → Launch Run; the partition page of 00000 then counts what its files hold and names each
    removed key's list and reason; `removal_lists_parse` names the bad list. Returns the removed keys."""
    import dagster as dg

    status = pq.read_table(demo.data / "images" / f"{TAKEDOWN_SHARD}.parquet", columns=["key", "status"])
    taken = [k for k, s in zip(status["key"].to_pylist(), status["status"].to_pylist(), strict=True) if s == "success"]
    taken = taken[:2]
    removals = demo.data / "removals"
    removals.mkdir(exist_ok=True)
    (removals / "takedown.csv").write_text(
        "key,reason,date\n" + "".join(f"{k},{TAKEDOWN_REASON},2026-12-01\n" for k in taken)
    )
    (removals / "bad.csv").write_text("key,reasn,date\n000000000,typo,2026-12-01\n")

    page.goto(base)
    page.get_by_role("navigation").get_by_role("link", name="Jobs").click()
    page.get_by_text("apply_removals", exact=True).click()
    page.get_by_role("tab", name="Launchpad").click()
    since = datetime.now(UTC)
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    run = _wait_for(
        lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r, 300, f"apply_removals {run_id} to end"
    )
    assert run.status == dg.DagsterRunStatus.SUCCESS, _runs_summary(instance, since)  # bad.csv holds nothing up
    assert _statuses(demo, TAKEDOWN_SHARD).count("removed") == len(taken)

    # the partition page: the counts the files hold, and each removed key's list and reason
    rows = pq.ParquetFile(demo.data / "codes" / MODEL / f"{TAKEDOWN_SHARD}.parquet").metadata.num_rows
    page.goto(f"{base}/assets/code_parquets?view=partitions&partition={TAKEDOWN_SHARD}")
    page.get_by_text("Materialized", exact=True).first.wait_for()
    page.get_by_text(run_id[:8]).first.wait_for()  # the apply's materialization is the latest
    assert re.search(rf"^encoded\s+{rows}$", _metadata_row(page, "encoded").strip()), _metadata_row(page, "encoded")
    assert re.search(rf"\s{rows}$", _metadata_row(page, "dagster/row_count").strip())
    removed_items = _metadata_row(page, "removed_items")
    assert TAKEDOWN_REASON in removed_items and "takedown.csv" in removed_items, removed_items
    shots.take(page, f"code_parquets_{TAKEDOWN_SHARD}_after_takedown")

    page.goto(f"{base}/assets/removal_lists?view=checks")
    page.get_by_text("removal_lists_parse").first.wait_for()
    shots.take(page, "removal_lists_checks")
    [check] = [
        e
        for e in instance.get_records_for_run(run_id).records
        if e.event_log_entry.dagster_event
        and e.event_log_entry.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_log_entry.dagster_event.event_specific_data.check_name == "removal_lists_parse"
    ]
    evaluation = check.event_log_entry.dagster_event.event_specific_data
    assert not evaluation.passed and "bad.csv" in evaluation.description
    (removals / "bad.csv").unlink()  # the operator fixes the typo: downloads refuse to run beside it
    return taken


def materialize_report(page, base: str, shots: Screenshots, instance, demo: Demo) -> None:
    """The report's page → *Materialize*; the report names 00001 corrupted and the dataset card is rewritten
    with the new shard."""
    import dagster as dg

    report_key = dg.AssetKey("corrupted_shards_report")
    card = demo.data / "codes" / MODEL / "README.md"
    card_mtime = card.stat().st_mtime_ns
    before = instance.fetch_materializations(report_key, limit=1).records
    before_id = before[0].storage_id if before else -1

    page.goto(f"{base}/assets/corrupted_shards_report")
    since = datetime.now(UTC)
    page.get_by_role("button").filter(has_text=re.compile(r"^Materialize$")).click()
    page.get_by_text("Launched run").first.wait_for()
    shots.take(page, "report_launched")

    def done() -> bool:
        _no_failed_run_since(instance, since)
        latest = instance.fetch_materializations(report_key, limit=1).records
        return bool(latest) and latest[0].storage_id > before_id

    _wait_for(done, 300, "a new corrupted_shards_report materialization", lambda: _runs_summary(instance, since))

    # the report and the card count what the files hold: removed rows, downloads, codes
    files = {"removed": 0, "downloaded": 0, "codes": 0}
    for shard in ("00000", DAMAGED_SHARD, NEW_SHARD):
        statuses = _statuses(demo, shard)
        files["removed"] += statuses.count("removed")
        files["downloaded"] += statuses.count("success")
    files["codes"] = sum(pq.ParquetFile(p).metadata.num_rows for p in (demo.data / "codes" / MODEL).glob("*.parquet"))
    report = {
        k: v.value
        for k, v in instance.fetch_materializations(report_key, limit=1)
        .records[0]
        .asset_materialization.metadata.items()
    }
    assert report["images_removed"] == files["removed"] == 2, (report, files)
    assert report["images_downloaded"] == files["downloaded"], (report, files)
    assert report["codes"] == files["codes"] <= files["downloaded"], (report, files)  # the footers' rows
    assert f"{files['removed']} item(s) were removed" in card.read_text()

    reports = sorted(p.name for p in (demo.data / "reports").iterdir())
    assert "corrupted_shards.parquet" in reports, reports
    table = pq.read_table(demo.data / "reports" / "corrupted_shards.parquet", columns=["shard", "corrupted"])
    corrupted = {s for s, c in zip(table["shard"].to_pylist(), table["corrupted"].to_pylist(), strict=True) if c}
    assert corrupted == {DAMAGED_SHARD}, table.to_pylist()
    assert card.stat().st_mtime_ns > card_mtime, "the dataset card was not regenerated"
    text = card.read_text()
    assert f"{NEW_SHARD}.parquet" in text, "the dataset card does not list the new shard"
    assert f"{DAMAGED_SHARD}.parquet" not in text, "the dataset card lists the corrupted shard"

    page.reload()
    summary = page.get_by_text("summary", exact=True).first
    summary.scroll_into_view_if_needed()
    page.get_by_text(DAMAGED_SHARD, exact=True).filter(visible=True).first.wait_for()  # in the summary's table
    shots.take(page, "report_asset")


def test_the_demo_runs_through_the_code_location(demo: Demo) -> None:
    """`make demo` as a new user's first look (before the browser test changes anything): its work went
    through the code location and the daemon, so the pages the UI opens first show it — the pipeline job's
    runs, a backfill, the audits — and its settings are the instance's, for every later process."""
    import dagster as dg

    settings_file = (demo.home / "laion_vq.env").read_text()
    assert f"LAION_VQ_STORAGE={demo.data}\n" in settings_file and f"LAION_VQ_MODEL={MODEL}\n" in settings_file
    instance = dg.DagsterInstance.from_config(str(demo.home))
    try:
        runs = instance.get_runs()
        assert all(run.remote_job_origin is not None for run in runs)  # launched through the code location
        jobs = {"laion_vq_pipeline", "audit_shards", "corrupted_shards_report_job", "__ASSET_JOB"}
        assert {run.job_name for run in runs} >= jobs
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        (backfill,) = instance.get_backfills()
        assert backfill.status.value.startswith("COMPLETED")
        assert instance.get_materialized_partitions(dg.AssetKey("code_parquets")) == {"00000", "00001"}
        # the report ran over the audited shards and wrote the dataset card of both shards
        card = (demo.data / "codes" / MODEL / "README.md").read_text()
        assert "00000.parquet" in card and "00001.parquet" in card and "RANDOM" in card.upper()
    finally:
        instance.dispose()


@pytest.mark.timeout(900)
def test_after_make_demo_in_the_browser(demo: Demo, ui: str, page, screenshots: Screenshots, instance):
    with screenshots.kept(page):
        materialize_new_shard(page, ui, screenshots, instance, demo)
        tar = demo.data / "images" / f"{DAMAGED_SHARD}.tar"
        os.truncate(tar, tar.stat().st_size // 2 + 100)  # off a 512-byte boundary: mid-member, unreadable
        audit_from_launchpad(page, ui, screenshots, instance)
        apply_takedown_from_launchpad(page, ui, screenshots, instance, demo)
        materialize_report(page, ui, screenshots, instance, demo)

    shots = screenshots.folder.resolve()
    stray = {p for p in _stray_paths() - demo.stray_before if not (REPO / p).resolve().is_relative_to(shots)}
    assert not stray, f"files appeared in the repo, outside the demo's workdir: {sorted(stray)}"


FED_SHARDS = 10  # downloads land over ~1 min: the fed run waits for some, and the daemon requests them meanwhile
FALSE_ALARMS = re.compile(r"was canceled|failed, and did not materialize|did not materialize this asset")


@pytest.mark.timeout(900)
def test_a_fed_backfill_reads_true_in_the_browser(
    tmp_path, image_server, tiny_checkpoint, pg_url, chromium, screenshots: Screenshots
):
    """The UI's whole-graph backfill over 10 shards on the production instance (PostgreSQL, daemon, pools of
    one slot), one encoder run fed the shards as their tars landed. What the pages then say must be what
    happened: each fed partition *Materialized* with no "was canceled, and did not materialize" banner; no
    red (cancelled or failed) run in the backfill's run list; a queued run the fed run covered ended
    successfully and its page says which run encoded its shards."""
    import dagster as dg

    from laion_vq.defs.feeding import ENCODED_BY_TAG, FED_TAG, run_partition_keys
    from laion_vq.testing.dagster_services import dagster_services

    from .conftest import backfill_runs, is_encoder_run, tiny_backfill_env

    keys = [f"{i:05d}" for i in range(FED_SHARDS)]
    # the fed run looks for new tars every 40 s: the backfill daemon (every 30 s) requests runs for the tars
    # landed meanwhile, queued behind the GPU slot, and the fed run must then end them without a false alarm
    env = tiny_backfill_env(
        tmp_path, image_server, tiny_checkpoint, FED_SHARDS, 3, LAION_VQ_ENCODE_FEED_POLL_SECONDS="40"
    )
    with dagster_services(tmp_path / "dagster_home", pg_url, env=env) as services, services.instance() as instance:
        instance.event_log_storage.set_concurrency_slots("download", 1)
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        backfill_id = services.launch_backfill(SHARD_ASSETS, keys)
        assert services.wait_for_backfill(backfill_id, timeout=800) == "COMPLETED_SUCCESS"
        runs = backfill_runs(instance, backfill_id)
        summary = [(r.dagster_run.run_id[:8], r.dagster_run.status.value, dict(r.dagster_run.tags)) for r in runs]
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs), summary
        encoders = [r.dagster_run for r in runs if is_encoder_run(r)]
        fed_runs = [r for r in encoders if FED_TAG in r.tags and r.tags[FED_TAG][0].isdigit()]
        assert fed_runs, summary  # one run took shards beyond its own range, and its tag says how many
        closed = [r for r in encoders if ENCODED_BY_TAG in r.tags]
        assert closed, summary  # the case a "was canceled" banner came from
        # the page to show: a partition whose queued run was covered (where a false banner would be), else the last
        shown = next(iter(run_partition_keys(closed[0].tags)), keys[-1]) if closed else keys[-1]
        codes = {
            r.partition_key: r.run_id
            for r in instance.fetch_materializations(dg.AssetKey("code_parquets"), limit=100).records
        }
        assert sorted(codes) == keys, codes

        with _chromium_page(chromium) as page, screenshots.kept(page, lambda: f"; {len(closed)} covered run(s)"):
            base = services.url
            # every partition: materialized, and no banner about a run that did not materialize it
            for key in keys:
                page.goto(f"{base}/assets/code_parquets?view=partitions&partition={key}")
                page.get_by_text("Materialized", exact=True).first.wait_for()
                page.get_by_text(codes[key][:8]).first.wait_for()  # the materialization's run has loaded
                if key == shown:
                    screenshots.take(page, f"fed_partition_{key}")
                assert page.get_by_text(FALSE_ALARMS).count() == 0, f"partition {key}: a false banner"
            page.goto(f"{base}/runs/b/{backfill_id}?tab=runs")
            page.get_by_text("Success", exact=True).first.wait_for()
            screenshots.take(page, "fed_backfill_runs")
            assert page.get_by_text(re.compile(r"^(Canceled|Failure)$")).count() == 0
            # the fed run: one step, its checks evaluated in it (its own checks: no check step shown skipped)
            fed = fed_runs[0]
            kinds = [e.dagster_event.event_type_value for e in instance.all_logs(fed.run_id) if e.dagster_event]
            assert "STEP_SKIPPED" not in kinds and kinds.count("ASSET_CHECK_EVALUATION") == 2 * kinds.count(
                "ASSET_MATERIALIZATION"
            ), kinds
            page.goto(f"{base}/runs/{fed.run_id}")
            page.get_by_text("ASSET_CHECK_EVALUATION").first.wait_for()
            screenshots.take(page, "fed_run")
            assert page.get_by_text(re.compile(r"^Skipped")).count() == 0
            for run in closed:  # a run the fed run covered: green, and it says why it did nothing
                page.goto(f"{base}/runs/{run.run_id}")
                page.get_by_text(f"encoded by run {run.tags[ENCODED_BY_TAG]}").first.wait_for()
                if run is closed[0]:
                    screenshots.take(page, "fed_backfill_covered_run")
