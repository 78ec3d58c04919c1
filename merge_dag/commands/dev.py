"""`merge-dag dev`: `dagster dev -w workspace.yaml` with DAGSTER_HOME under the project, so the UI,
the daemon, the checkpoint sensor and the nightly schedule come up with one command and runs persist.

`dagster dev` runs in its own process group; SIGTERM and SIGINT sent to `merge-dag dev` are passed on
to that whole group (the webserver, the daemon and the code servers), so a script that starts
`merge-dag dev` and terminates it leaves nothing behind. Anything still alive in the group 30 s after
`dagster dev` itself exited is killed.

Dagster 1.13 marks `dagster dev` as superseded by `dg dev`, which needs the separate dagster-dg-cli
package and a dg project layout ([tool.dg] in pyproject.toml); a merge_dag project is a plain
workspace.yaml project, which `dagster dev` serves unchanged. So the SupersessionWarning ("Use 'dg
dev' instead") is filtered in the `dagster dev` process (by its message, nothing else).
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .home import ensure_dagster_home

GRACE_S = 30.0
LAUNCH = (
    "import re, sys, warnings\n"
    "warnings.filterwarnings('ignore', message=r'.* is superseded and its usage is discouraged\\. "
    "Use .dg dev. instead', category=FutureWarning)\n"
    "from dagster._cli import main\n"
    "sys.argv[0] = 'dagster'\n"
    "sys.exit(main())\n"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=Path.cwd(), help="project root holding workspace.yaml")
    p.add_argument("--port", default="3000")
    p.add_argument("--host", default="127.0.0.1")


def dagster_dev_command(root: Path, host: str, port: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, "dev", "-w", str(root / "workspace.yaml"), "-h", host, "-p", str(port)]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def run(args: argparse.Namespace) -> int:
    root = args.root.absolute()
    home = ensure_dagster_home(root)
    os.environ.setdefault("MERGE_DAG_ROOT", str(root))
    _fail_dead_runs(root)
    cmd = dagster_dev_command(root, args.host, args.port)
    print(f"DAGSTER_HOME={home}\ndagster dev -w {root / 'workspace.yaml'} -h {args.host} -p {args.port}", flush=True)
    started: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum, _frame):
        if not started:  # arrived before dagster dev existed: delivered right after it starts
            pending.append(signum)
        for p in started:
            try:
                os.killpg(p.pid, signum)
            except ProcessLookupError:
                pass

    # handlers first: a caught signal is reset to the default in the child, while an ignored one (a
    # script's background job ignores SIGINT, some launchers SIGTERM) would stay ignored in dagster dev
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    proc = subprocess.Popen(cmd, cwd=root, start_new_session=True)  # its own process group (pgid = pid)
    started.append(proc)
    for signum in pending:
        forward(signum, None)
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        deadline = time.monotonic() + GRACE_S
        while _alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    return 0 if rc in (0, -signal.SIGTERM, -signal.SIGINT) else rc


def _fail_dead_runs(root: Path) -> None:
    """Runs of this instance left STARTED by a killed process are marked failed (see stale_runs)."""
    from dagster import DagsterInstance

    from ..dagster.stale_runs import fail_dead_runs
    from ..lineage.store import LineageStore
    from ..settings import settings

    s = settings()
    db = s.db_path(s.data_dir(root))
    try:
        with DagsterInstance.get() as instance:
            for line in fail_dead_runs(instance, LineageStore(db) if db.exists() else None):
                print(line, flush=True)
    except Exception as e:  # noqa: BLE001 - never keep the UI from starting; say what was not checked
        print(f"merge_dag: runs left STARTED by a killed process were not checked: {type(e).__name__}: {e}", flush=True)
