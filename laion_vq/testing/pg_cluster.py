"""A throwaway PostgreSQL cluster for fault tests: crash it, stop it, start it again.

The suite's other tests share the machine's server on 127.0.0.1:5432 (`dagster_services.postgres_database`);
a test that crashes PostgreSQL must never touch that one. `pg_cluster()` runs `initdb` into a fresh temp
folder (as the `postgres` OS user when we are root: PostgreSQL refuses to run as root), starts it with
`pg_ctl` on a free loopback port, its unix socket in its own folder, trust auth, creates one database, and
always stops and deletes the cluster on exit. fsync stays on: an immediate stop is a real crash and the
restart a real recovery from the WAL.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from laion_vq.testing.dagster_services import free_port

OS_USER = "postgres"  # the Debian packages' service user, who runs the cluster when we are root
STOP_MODES = ("smart", "fast", "immediate")


class PgClusterError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped (its log's tail in the message)."""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_bin_dir() -> Path:
    """The folder of `initdb`/`pg_ctl`: Debian's newest /usr/lib/postgresql/<version>/bin, else what
    `pg_config --bindir` says, else `initdb` on PATH. No version is hard-coded: the machine picks."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if candidates:
        return Path(candidates[-1]).parent
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(bindir) / "initdb").exists():
            return Path(bindir)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PgClusterError(
        "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: no /usr/lib/postgresql/*/bin/initdb, "
        "no pg_config, no initdb on PATH. Debian/Ubuntu: `sudo apt-get install -y postgresql`"
    )


@dataclass
class PgCluster:
    """One running throwaway cluster: `url` to connect, `stop`/`start`/`restart` to fault it."""

    base: Path
    bin_dir: Path
    port: int
    database: str
    run_as: str | None  # the OS user running the server (None: this process's user)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.base / "postgres.log"

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "socket"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (first line of postmaster.pid), or None when the server is not running."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    @property
    def running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a PostgreSQL binary as the cluster's OS user; a failure raises with its output and log tail."""
        command = [str(self.bin_dir / args[0]), *args[1:]]
        kwargs: dict = {}
        if self.run_as is not None:
            kwargs = {"user": self.run_as, "group": self.run_as, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # the caller's PGHOST etc. not ours
        done = subprocess.run(
            command,
            cwd=self.base,  # an OS user that cannot read the caller's cwd would warn on every command
            env={**env, "LC_ALL": "C"},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if done.returncode != 0:
            raise PgClusterError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}\n"
                f"log tail ({self.log_path}):\n{self.log_tail()}"
            )
        return done

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it accepts connections (after a crash: once recovery is done)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", str(int(timeout)), "start")

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """Stop the server. `immediate` is a crash: no checkpoint, backends killed, the next start recovers
        from the WAL; `fast` rolls back open transactions and checkpoints; `smart` waits for clients."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode {mode!r}: one of {STOP_MODES}")
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(timeout)), "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop (`mode`) and start again on the same port: the same URL works afterwards."""
        self.stop(mode)
        self.start()

    def _kill(self) -> None:
        """Last resort on exit when `pg_ctl stop` failed: SIGKILL the postmaster we started (its backends exit
        when they notice it gone)."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.running and time.monotonic() < deadline:
                time.sleep(0.1)


def _os_user() -> str | None:
    """Who runs the server: `postgres` when we are root (initdb and postgres refuse root), else ourselves."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        raise PgClusterError(
            f"running as root, PostgreSQL must run as another OS user and there is no `{OS_USER}` user "
            "(the Debian package creates it: `sudo apt-get install -y postgresql`)"
        ) from None
    return OS_USER


@contextlib.contextmanager
def pg_cluster(database: str = "test", *, start_attempts: int = 3) -> Iterator[PgCluster]:
    """A fresh PostgreSQL cluster on a free 127.0.0.1 port with `database` created; yields it running.

    Always stopped (immediately: nothing in it is kept) and deleted on exit, exceptions included. The temp
    folder is made outside pytest's tmp_path on purpose: that one is private to root, and the server runs as
    `postgres`.
    """
    bin_dir = find_bin_dir()
    run_as = _os_user()
    base = Path(tempfile.mkdtemp(prefix="laion_vq_pg_"))
    try:
        cluster = PgCluster(base=base, bin_dir=bin_dir, port=0, database=database, run_as=run_as)
        cluster.socket_dir.mkdir()
        if run_as is not None:
            shutil.chown(base, run_as, run_as)
            shutil.chown(cluster.socket_dir, run_as, run_as)
        # --no-sync: initdb's own final flush only; the server below runs with fsync on
        cluster._run("initdb", "-D", str(cluster.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{cluster.socket_dir}'",
            "fsync": "on",
            "shared_buffers": "'32MB'",
            "max_connections": "200",  # daemon + webserver + code servers + run workers, each a small pool
            "logging_collector": "off",
        }
        try:
            for attempt in range(start_attempts):
                cluster.port = free_port()
                conf = "\n".join(f"{k} = {v}" for k, v in {**settings, "port": str(cluster.port)}.items())
                auto_conf = cluster.data_dir / "postgresql.auto.conf"
                auto_conf.write_text(f"{conf}\n")
                if run_as is not None:
                    shutil.chown(auto_conf, run_as, run_as)
                try:
                    cluster.start()
                    break
                except PgClusterError:
                    if attempt == start_attempts - 1 or cluster.running:
                        raise  # a port taken between free_port() and the start is retried, nothing else
            cluster._run("createdb", "-h", str(cluster.socket_dir), "-p", str(cluster.port), "-U", "postgres", database)
            yield cluster
        finally:
            if cluster.running:
                try:
                    cluster.stop("immediate", timeout=30)
                except (PgClusterError, subprocess.TimeoutExpired):
                    cluster._kill()
    finally:
        shutil.rmtree(base, ignore_errors=True)
