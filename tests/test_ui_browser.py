"""The Dagster UI in a real browser: `merge-dag dev` over a copy of the ci zoo project, driven by
Playwright in Debian's Chromium (/usr/bin/chromium; .ci/run installs it, Playwright's own browser
download cannot work here).

One `merge-dag dev` start for the whole module. Before it starts, the project is materialized
in-process into the same DAGSTER_HOME, except merged/ties (which the test materializes by clicking
in the UI). Then: the asset graph loads; Materialize on merged/ties leads to a successful run; the
allocation page's heatmap image is loaded; the leaderboard shows sorted rows with an average; the
merged page lists all its inputs; SIGTERM to `merge-dag dev` stops every process it started.
Screenshots go to tests/.screenshots/ (git-ignored).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import zoo_cache_dir

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "tests" / ".screenshots"
EVAL_LIMIT = 4
CI = "data/models/ci"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
RECIPES = {
    "ties_lewis": f"""
name: ties_lewis
merge_method: ties
base_model: {CI}/base
models:
  - {{model: {CI}/arev, calibration: arev}}
  - {{model: {CI}/sort, calibration: sort}}
parameters: {{weight: 1.0, density: 0.5, lambda: 1.0}}
guidance:
  sparsity: {{method: lewis, gamma: 0.2, epsilon: 0.9, mean_density: 0.5}}
evals: [zoo_arev, zoo_sort]
""",
    "ta": f"""
name: ta
merge_method: task_arithmetic
base_model: {CI}/base
models:
  - model: {CI}/arev
  - model: {CI}/sort
parameters: {{weight: 1.0, lambda: 0.5}}
evals: [zoo_arev, zoo_sort]
""",
    "ties": f"""
name: ties
merge_method: ties
base_model: {CI}/base
models:
  - model: {CI}/arev
  - model: {CI}/sort
parameters: {{weight: 1.0, density: 0.5}}
""",
}

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, ci_zoo):
    root = tmp_path_factory.mktemp("ui")
    for name in ("base", "arev", "sort"):
        shutil.copytree(zoo_cache_dir() / "ci" / name, root / CI / name)
    for folder in ("tasks", "eval", "calibration"):
        shutil.copytree(ROOT / "data" / folder, root / "data" / folder)
    (root / "data" / "recipes").mkdir(parents=True)
    for name, text in RECIPES.items():
        (root / "data" / "recipes" / f"{name}.yaml").write_text(text)
    shutil.copy(ROOT / "workspace.yaml", root)
    shutil.copy(ROOT / "definitions.py", root)
    return root


def env_for(root: Path) -> dict[str, str]:
    return {
        "MERGE_DAG_ROOT": str(root),
        "MERGE_DAG_EVAL_LIMIT": str(EVAL_LIMIT),
        "DAGSTER_HOME": str(root / "data" / "dagster_home"),
        "TQDM_DISABLE": "1",
    }


def prebuild(root: Path, monkeypatch) -> None:
    """Everything but merged/ties, in-process, into the DAGSTER_HOME `merge-dag dev` will use."""
    import dagster as dg

    from merge_dag.commands.home import ensure_dagster_home
    from merge_dag.dagster.definitions import ALL_JOB, build_definitions

    for k, v in env_for(root).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MERGE_DAG_DB", raising=False)
    monkeypatch.delenv("MERGE_DAG_ARTIFACTS", raising=False)
    ensure_dagster_home(root)
    defs = build_definitions(root)
    keys = [k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path != ["merged", "ties"]]
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def(ALL_JOB).execute_in_process(instance=instance, asset_selection=keys)
        assert result.success


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"merge-dag dev exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/server_info", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the Dagster UI did not come up at {url} in {timeout:.0f} s")


@pytest.fixture(scope="module")
def ui(project, tmp_path_factory):
    """(url, dev process, its descendants at start) with the UI up; stopped (and checked) at the end."""
    import psutil

    mp = pytest.MonkeyPatch()
    try:
        prebuild(project, mp)
    finally:
        mp.undo()
    port = free_port()
    env = {
        **os.environ,
        **env_for(project),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    log = open(tmp_path_factory.mktemp("devlog") / "dev.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "merge_dag.cli", "dev", "--root", str(project), "--port", str(port)],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    state = {"url": url, "proc": proc, "log": log.name}
    try:
        wait_http(url, proc)
        yield state
    finally:
        kids = [p for p in psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
        state["children"] = kids
        proc.send_signal(signal.SIGTERM)  # merge-dag dev forwards it to dagster dev's process group
        try:
            proc.wait(timeout=60)
        finally:
            alive = [p for p in kids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            for p in alive:
                p.kill()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            log.close()
        assert not alive, f"still running after SIGTERM: {[p.cmdline()[:3] for p in alive]}"


@pytest.fixture(scope="module")
def page(ui, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            args=ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            pg = ctx.new_page()
            pg.set_default_timeout(60_000)
            yield pg
        finally:
            ctx.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def asset_page(page, ui, key: str, wait_text: str):
    page.goto(f"{ui['url']}/assets/{key}")
    page.get_by_text(wait_text, exact=True).first.wait_for()
    return page


def open_markdown(page, key: str):
    """Open a long markdown metadata value (the UI shows it behind "[Show Markdown]") in its dialog."""
    row = page.locator("tr", has=page.get_by_text(key, exact=True)).last
    row.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    return dialog


def close_dialog(page):
    page.get_by_role("dialog").get_by_role("button", name="Close").click()
    page.get_by_role("dialog").wait_for(state="detached")


def loaded_image(page, scope) -> int:
    """naturalWidth of the first data-URI PNG in `scope`, once the browser decoded it."""
    img = scope.locator('img[src^="data:image/png;base64,"]').first
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    return img.evaluate("img => img.naturalWidth")


def test_asset_graph_loads(page, ui):
    page.goto(f"{ui['url']}/asset-groups")
    page.get_by_text("Global asset lineage").first.wait_for()
    for group in ("sources", "guidance", "task_vectors", "merges", "evals"):
        page.locator("svg, div").get_by_text(group, exact=True).first.wait_for()
    page.get_by_role("button", name="Materialize all").first.wait_for()
    assert page.get_by_text("Join the Dagster community").count() == 0  # dagster.yaml: nux disabled
    shot(page, "1_asset_graph")


def test_materialize_merged_leads_to_a_successful_run(page, ui, project):
    import dagster as dg

    with dg.DagsterInstance.from_config(str(project / "data" / "dagster_home")) as instance:
        before = {r.run_id for r in instance.get_runs()}
        asset_page(page, ui, "merged/ties", "Definition")
        page.locator("button", has_text="Materialize").first.click()
        deadline, run = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            new = [r for r in instance.get_runs() if r.run_id not in before]
            if new and new[0].is_finished:
                run = new[0]
                break
            time.sleep(2)
        assert run is not None, "no run finished within 300 s of clicking Materialize"
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
    page.goto(f"{ui['url']}/runs/{run.run_id}")
    page.get_by_text("Success").first.wait_for()
    shot(page, "2_run_success")


def test_allocation_heatmap_is_shown(page, ui):
    asset_page(page, ui, "allocation/ties_lewis", "heatmap")
    dialog = open_markdown(page, "heatmap")
    assert loaded_image(page, dialog) > 300
    shot(page, "3_allocation_heatmap")
    close_dialog(page)


def test_leaderboard_rows_are_sorted_with_an_average(page, ui):
    asset_page(page, ui, "leaderboard", "best_merge_average")
    board = page.locator("tr", has=page.get_by_text("leaderboard", exact=True)).last
    rows = [[c.strip() for c in r.split("\t")] for r in board.locator("table tr").all_inner_texts()]
    assert rows[0] == ["model", "arev", "sort", "avg ± SE", "Δ avg vs base"]
    names = [r[0] for r in rows[1:]]
    assert names[:3] == ["ci_base (base)", "ci_arev (expert)", "ci_sort (expert)"]
    avgs = {r[0]: float(r[3].split("±")[0]) for r in rows[4:]}
    assert sorted(avgs) == ["ta", "ties_lewis"] and list(avgs) == sorted(avgs, key=lambda m: -avgs[m])
    assert rows[4][3].endswith("★")  # the best merge on average
    board.scroll_into_view_if_needed()
    shot(page, "4_leaderboard")
    dialog = open_markdown(page, "chart")
    assert loaded_image(page, dialog) > 300
    shot(page, "5_leaderboard_chart")
    close_dialog(page)


def test_merged_page_lists_all_its_inputs(page, ui):
    asset_page(page, ui, "merged/ties", "provenance")
    inputs = page.locator("tr", has=page.get_by_text("inputs", exact=True)).last
    rows = [r.split("\t")[:2] for r in inputs.locator("table tr").all_inner_texts()]
    assert rows[1:] == [
        ["recipe", "recipe/ties"],
        ["base", "model/ci_base"],
        ["expert", "task_vector/ci_arev"],
        ["expert", "task_vector/ci_sort"],
    ]
    inputs.scroll_into_view_if_needed()
    shot(page, "6_merged")
    dialog = open_markdown(page, "provenance")
    for name in (
        "recipe/ties",
        "model/ci_base",
        "task_vector/ci_arev",
        "task_vector/ci_sort",
        "model/ci_arev",
        "model/ci_sort",
    ):
        dialog.get_by_text(name).first.wait_for()
    assert "method ties" in dialog.inner_text()
    shot(page, "7_merged_provenance")
    close_dialog(page)
