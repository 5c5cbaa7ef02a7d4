"""`dartsweep report`: one self-contained HTML page, rendered in a real browser (Debian's headless Chromium,
driven by Playwright) with the network off: no console error, no request leaves the page, every accuracy
plot has one point per network the frames hold, hovering a point shows its genotype and cell diagrams, a
legend click hides a genotype, the trials table filters, the screenshot is not blank. Several sweeps
merge; a folder that is not a sweep, an empty sweep and a sweep whose every trial diverged are handled.
The same sweeps are tracked in a real MLflow server started here (and one whose server is down)."""

import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from analysis.pareto import network_means
from analysis.report import load_sweeps
from sweeps.driver import run_sweep
from sweeps.spec import parse_sweep
from tests.ray_helpers import sweep_file

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AXES = ("gmac", "params_m", "latency_ms", "layers")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on localhost (``mlflow server``, SQLite and a local artifact folder)."""
    import time
    import urllib.request

    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    if mlflow is None:
        pytest.skip("mlflow is not installed (pip install 'dartsweep[mlflow]', a dev dependency)")
    root = tmp_path_factory.mktemp("mlflow")
    port = _port()
    server = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                               "--artifacts-destination", str(root / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, mlflow_server):
    """A finished two-stage sweep, tracked in MLflow; and one whose every trial diverged (a learning rate of
    1e12), run through the CLI with its tracking server down."""
    root = tmp_path_factory.mktemp("report")
    raw = sweep_file(root, "looked", search={"op_sets": ["pibconv"], "F": [2.0], "epochs": 2},
                     evaluation={"genotypes": ["searched", "DARTS_V2"], "layers": [1, 2], "epochs": 2})
    raw["tracking"] = {"mlflow": mlflow_server}
    looked = Path(run_sweep(parse_sweep(raw), storage=str(root), verbose=0))
    raw = sweep_file(root, "blown", evaluation={"genotypes": ["DARTS_V2"], "layers": [1], "epochs": 2, "lr": 1e12},
                     max_failures=0)
    raw["tracking"] = {"mlflow": f"http://127.0.0.1:{_port()}"}  # nothing listens there
    (root / "blown.yaml").write_text(yaml.safe_dump(raw))
    blown = cli("sweep", "up", str(root / "blown.yaml"), "--storage", str(root), "--verbose", "0")
    return looked, root / "blown", blown


def test_mlflow_tracks_every_trial_and_a_server_that_is_down_is_one_warning(sweeps, mlflow_server):
    import mlflow

    looked, _, blown = sweeps
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("looked")
    runs = client.search_runs([experiment.experiment_id])
    trials, _ = load_sweeps([looked])
    assert len(runs) == len(trials) == 5  # one search trial, four eval trials
    for run in runs:
        params, kind = run.data.params, run.data.params.get("genotype") and "eval" or "search"
        assert run.info.status == "FINISHED" and params["seed"] == "0" and params["epochs"] == "2", params
        metric = "test_acc" if kind == "eval" else "valid_acc"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == [1, 2], (kind, steps)  # the epoch is the step, each once
        if kind == "eval":
            assert params["layers"] in ("1", "2") and params["genotype"], params
        else:
            assert params["op_set"] == "pibconv" and params["F"] == "2.0"
        artifact = client.download_artifacts(run.info.run_id, "genotype.json")
        assert {"normal", "reduce"} <= set(yaml.safe_load(Path(artifact).read_text()))
    # the other sweep's server is down: one warning, and its trials ran (and diverged) all the same
    assert blown.stderr.count("does not answer") == 1 and "Traceback" not in blown.stderr, blown.stderr[-3000:]
    assert "1 trial(s) failed" in blown.stderr and "diverged" in blown.stderr


def _browser():
    if CHROMIUM is None:
        if os.environ.get("DARTSWEEP_REQUIRE_BROWSER"):
            pytest.fail("no chromium: .ci/run installs Debian's package")
        pytest.skip("no chromium here (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    manager = playwright.sync_playwright().start()
    browser = manager.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])
    return manager, browser


def _external_refs(page: str) -> list[str]:
    """src/href attributes of the page's own tags (an HTML parser: the JavaScript's strings are not tags)."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Refs(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(f"{tag} {k}={v}" for k, v in attrs if k in ("src", "href") and v)

    Refs().feed(page)
    return found


def _expected_points(trials) -> dict[str, int]:
    means = network_means(trials)
    means = means[means.final_acc.map(math.isfinite)]
    return {axis: int(means[axis].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v)).sum())
            for axis in AXES if axis in means}


def test_report_renders_in_a_browser_offline_with_every_network_hover_and_legend(sweeps, tmp_path):
    looked, _, _ = sweeps
    out = tmp_path / "report.html"
    done = cli("report", str(looked), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    page = out.read_text()
    assert _external_refs(page) == []  # every script and style inlined
    trials, _ = load_sweeps([looked])
    expected = _expected_points(trials)
    assert expected["gmac"] == 4 and expected["layers"] == 4  # two genotypes (searched, DARTS_V2) x 2 depths

    manager, browser = _browser()
    try:
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000})
        requests, errors = [], []
        context.route("**/*", lambda route: (requests.append(route.request.url), route.continue_()
                                             if route.request.url.startswith("file:") else route.abort()))
        tab = context.new_page()
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(out.as_uri())
        tab.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0")
        assert errors == [] and [u for u in requests if not u.startswith("file:")] == [], (errors, requests)
        drawn = tab.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.plots .js-plotly-plot')]
            .map(g => [g.id.replace('plot-', ''), g.data.filter(t => t.meta === 'network')
                                                        .reduce((n, t) => n + t.x.length, 0)]))""")
        assert drawn == expected, (drawn, expected)

        # hover the first point of the GMAC plot, with the mouse, where Plotly drew it
        x, y, genotype = tab.evaluate("""() => {
            const gd = document.getElementById('plot-gmac'), t = gd.data[0];
            const box = gd.querySelector('.nsewdrag').getBoundingClientRect();
            return [box.left + gd._fullLayout.xaxis.l2p(t.x[0]), box.top + gd._fullLayout.yaxis.l2p(t.y[0]),
                    t.customdata[0][0]];
        }""")
        tab.mouse.move(x, y)
        tab.wait_for_function("document.querySelector('#plot-gmac .hoverlayer').textContent.length > 0")
        label = tab.evaluate("document.querySelector('#plot-gmac .hoverlayer').textContent")
        assert genotype in label, label
        panel = tab.inner_html("#cell-panel")
        assert genotype in panel and panel.count("<svg") == 2, panel[:500]  # its normal and reduce cells

        # a legend click hides that genotype
        tab.mouse.move(0, 0)
        tab.click("#plot-gmac .legend .traces .legendtoggle >> nth=0", force=True)
        tab.wait_for_function("document.getElementById('plot-gmac').data[0].visible === 'legendonly'", timeout=5000)

        # the trials table filters
        total = len(trials)
        assert tab.inner_text("#trial-count") == f"{total} of {total} trials"
        tab.fill("#trial-filter", "search")
        assert tab.inner_text("#trial-count") == f"{(trials.stage == 'search').sum()} of {total} trials"

        shot = tab.screenshot(full_page=False)
        from PIL import Image

        image = Image.open(io.BytesIO(shot)).convert("RGB")
        colours = image.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 100, "the screenshot is (nearly) blank"
    finally:
        browser.close()
        manager.stop()


def test_report_merges_sweeps_and_handles_empty_diverged_and_wrong_folders(sweeps, tmp_path):
    looked, blown, _ = sweeps
    twin = tmp_path / "twin"
    shutil.copytree(looked, twin)
    merged = tmp_path / "merged.html"
    done = cli("report", str(looked), str(twin), "--out", str(merged))
    assert done.returncode == 0, done.stderr[-3000:]
    page = merged.read_text()
    assert "[looked]" in page and "[twin]" in page  # each network labelled with its sweep, never pooled

    # every trial diverged: a page that says so, no point drawn as 0
    done = cli("report", str(blown), "--out", str(tmp_path / "blown.html"))
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "blown.html").read_text()
    assert "diverged" in page and "No eval trial has finished with a finite accuracy yet" in page
    assert "plot-gmac" not in page

    # a sweep with no trial yet (its driver just started)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(looked / "sweep.yaml", empty / "sweep.yaml")
    (empty / "state.json").write_text('{"stages": {}}')
    done = cli("report", str(empty), "--out", str(tmp_path / "empty.html"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "No trial has reported yet" in (tmp_path / "empty.html").read_text()

    # not a sweep: one line, exit 2
    done = cli("report", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "is not a sweep directory" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert yaml.safe_load((looked / "sweep.yaml").read_text())["name"] == "looked"
