"""The MLflow UI as a user sees it (issue: share a trained bundle, item 5): a small real study through the runner,
then the exact ``mlflow ui`` command the runner prints (on a free port), opened in headless Chromium with Selenium.

The runs table must list the runs by the names a person can tell apart, and the analysis run's report artifact
must render (its text and its embedded figures). ``./vfm test`` installs Debian's ``chromium`` and
``chromium-driver`` where it can (root with apt-get); where no browser is installed the test is skipped, saying so.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000")  # fmt: skip
WAIT_S = 60


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no Chromium and ChromeDriver on this machine: install Debian's chromium and chromium-driver "
                    "(./vfm test does so where it runs as root with apt-get)")  # fmt: skip
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow ui exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow ui did not answer at {url} within {WAIT_S} s")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A reduced study (ProViCNet pretraining, one finetune, the analysis; one epoch each) and the runner's output."""
    from common.data.phantom import make_cohort

    root = tmp_path_factory.mktemp("ui")
    datalist = make_cohort(root / "cohort", cases=10, seed=0, size=(32, 64, 64))
    study_dir = root / "study"
    command = [sys.executable, "-m", "tools.study", "--profile", "smoke", "--study_dir", str(study_dir),
               "--datalist", str(datalist), "--jobs", "2", "--only", "provicnet_pretrain",
               "provicnet_classification_finetune", "--override", "*", "epochs=1",
               "--override", "provicnet_pretrain", "out_dim=64",
               "--override", "provicnet_pretrain", "patch_out_dim=256",
               "--override", "analysis", "n_bootstrap=20", "--override", "analysis", "n_permutations=20"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    uri = "sqlite:///" + str(study_dir / "mlflow.db")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vfm-study").experiment_id
    runs = client.search_runs([experiment])
    return {"stdout": proc.stdout, "uri": uri, "experiment": experiment, "runs": runs}


@pytest.fixture(scope="module")
def ui(study: dict) -> str:
    """The runner's printed ``mlflow ui`` command, on a free port: the address of its runs page."""
    line = next(x for x in study["stdout"].splitlines() if x.startswith("See the runs: "))
    shown, _, opened = line[len("See the runs: ") :].partition("   (then open ")
    args = shlex.split(shown)
    assert args[args.index("--host") + 1] == "127.0.0.1"  # never reachable from another machine
    port = _free_port()
    args[args.index("--port") + 1] = str(port)
    page = opened.rstrip(")").replace(":5000", f":{port}")
    assert page.endswith(f"/#/experiments/{study['experiment']}/runs")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/health", proc)
        yield page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def _body_text(session) -> str:
    from selenium.webdriver.common.by import By

    return session.find_element(By.TAG_NAME, "body").text


@pytest.mark.slow
def test_the_runs_table_lists_the_runs_by_their_names(study: dict, ui: str, browser) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    names = {r.info.run_name for r in study["runs"]}
    assert {"provicnet pretrain s0", "provicnet cls finetune s0"} <= names  # model, task, regime, seed
    browser.get(ui)
    WebDriverWait(browser, WAIT_S).until(lambda s: all(n in _body_text(s) for n in names))
    shown = _body_text(browser).splitlines()
    for name in names:
        assert name in shown, f"run {name!r} is not a row of the runs table:\n{shown}"


@pytest.mark.slow
def test_the_analysis_report_renders_in_the_ui(study: dict, ui: str, browser) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    analysis = next(r for r in study["runs"] if r.data.tags.get("regime") == "analysis")
    page = ui.replace("/runs", f"/runs/{analysis.info.run_id}/artifacts/report.html")
    browser.get(page)
    frame = WebDriverWait(browser, WAIT_S).until(lambda s: s.find_element(By.CSS_SELECTOR, "iframe.mlflow-html-iframe"))
    browser.switch_to.frame(frame)
    try:
        WebDriverWait(browser, WAIT_S).until(lambda s: "How to read this report" in _body_text(s))
        assert browser.find_element(By.TAG_NAME, "h1").text == "Transfer-limits analysis: vfm-study"
        widths = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
        assert widths and all(w > 0 for w in widths), widths  # every figure decoded
    finally:
        browser.switch_to.default_content()
