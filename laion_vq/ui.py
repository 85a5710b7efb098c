"""`make ui`: the Dagster UI (`dg dev`: webserver and daemon) on an instance, with that instance's settings.

    python -m laion_vq.ui [--port 3000]     # DAGSTER_HOME, default .demo/dagster_home (the demo's)

Every process `dg dev` starts reads the instance's settings file (`$DAGSTER_HOME/laion_vq.env`, written by
`make demo`), so what the UI launches runs on the same storage, metadata and checkpoint as the demo did. On
the demo's instance it also serves the demo's images again, on the port the demo's metadata URLs name, so
shards the demo left for the user download from the UI as they did in the demo.

SIGTERM or SIGINT (Ctrl-C, `kill`) stops `dg dev` and everything it started, also when this was started in
the background with SIGINT ignored (`make ui &`, nohup): the child gets default signal handlers back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from laion_vq import settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO / ".demo" / "dagster_home"
#: What the demo leaves beside its instance for `make ui`: the port its image server used.
DEMO_STATE_FILE = "laion_vq_demo.json"
STOP_GRACE_S = 20.0


def write_demo_state(dagster_home: str, image_port: int) -> None:
    """Record the demo's image server port, so `make ui` serves the same URLs."""
    path = Path(dagster_home) / DEMO_STATE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"image_server_port": image_port}))
    tmp.replace(path)


@contextlib.contextmanager
def demo_image_server(dagster_home: Path) -> Iterator[str | None]:
    """The demo's image server on its recorded port, when `dagster_home` is a demo's instance."""
    state = dagster_home / DEMO_STATE_FILE
    if not state.exists():
        yield None
        return
    from laion_vq.testing.image_server import ImageServer

    port = int(json.loads(state.read_text())["image_server_port"])
    try:
        server = ImageServer(port=port).start()
    except OSError as err:
        raise SystemExit(
            f"cannot serve the demo's images on 127.0.0.1:{port} ({err}); the demo's metadata names that port. "
            "Stop what holds it, or run `make demo` again."
        ) from err
    try:
        yield server.base_url
    finally:
        server.stop()


def _default_signals() -> None:
    """In the child: default SIGINT/SIGTERM handling, whatever this process inherited (a background job
    starts with SIGINT ignored, and Dagster then ignores SIGTERM too)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_dg_dev(port: int, env: dict[str, str]) -> int:
    """`dg dev` in its own process group until it exits; SIGTERM/SIGINT here stop it (then its group)."""
    command = [str(Path(sys.executable).parent / "dg"), "dev", "--host", "127.0.0.1", "--port", str(port)]
    child = subprocess.Popen(command, cwd=REPO, env=env, preexec_fn=_default_signals, start_new_session=True)
    stopping = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGINT)  # dg dev's own clean shutdown of webserver, daemon, code servers

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        while True:
            try:
                return child.wait(timeout=STOP_GRACE_S if stopping else None)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)  # anything of the group that outlived dg dev


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("UI_PORT", "3000")))
    args = parser.parse_args(argv)
    home = Path(os.environ.get("DAGSTER_HOME") or DEFAULT_HOME).resolve()
    if not (home / "dagster.yaml").exists():
        print(f"no Dagster instance at {home}: run `make demo` first, or set DAGSTER_HOME", file=sys.stderr)
        return 2
    # VIRTUAL_ENV: dg warns when the active venv is not the project's, and this interpreter is that venv
    env = {**os.environ, "DAGSTER_HOME": str(home), "VIRTUAL_ENV": sys.prefix}
    path = settings.instance_settings_path(str(home))
    if path and os.path.exists(path):
        from_file = settings.read_settings_file(path)
        overridden = sorted(k for k in from_file if os.environ.get(k))
        print(f"settings: {path} ({len(from_file)} variables)")
        if overridden:
            print(f"          overridden by this shell's environment: {', '.join(overridden)}")
    else:
        print(f"settings: no {settings.INSTANCE_SETTINGS_FILE} in {home}; the environment and defaults apply")
    with demo_image_server(home) as images:
        if images:
            print(f"demo images served again at {images}")
        print(f"Dagster UI: http://127.0.0.1:{args.port}  (DAGSTER_HOME={home})", flush=True)
        return run_dg_dev(args.port, env)


if __name__ == "__main__":
    sys.exit(main())
