"""``lenspipe view``: the explorer's routes, its numbers, its safety and its page in a real
browser, on a copy of the tiny workflow's outputs (``tiny_run``)."""

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RUN = {"model": "tiny", "corpus": "tiny-txt"}


def view_config(root: Path, tiny_workdir: Path) -> Path:
    """The tiny config with absolute paths into ``root`` (a copy of the run's outputs)."""
    for name in ("data", "tiny"):
        shutil.copytree(tiny_workdir / name, root / name, symlinks=True)
    raw = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    raw["data_dir"] = str(root / "data")
    raw["models"]["tiny"]["source"] = str(root / "tiny" / "model")
    raw["corpora"]["tiny-txt"]["source"] = str(root / "tiny" / "corpus" / "*.txt")
    path = root / "view.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The explorer on a free port of 127.0.0.1, in a thread (uvicorn, as ``lenspipe view``)."""

    def __init__(self, config: Path):
        import uvicorn

        from pipeline.config import load_config
        from pipeline.view.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(load_config(config)), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the explorer did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def request(self, path: str, body: bytes | None = None, **headers) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"} | {k.replace("_", "-"): v for k, v in headers.items()}
        req = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except json.JSONDecodeError:  # Starlette's own plain-text answers (a bad Host)
                return e.code, {"error": text.decode()}

    def get(self, path: str, **params) -> tuple[int, dict]:
        query = urllib.parse.urlencode({**RUN, **params}) if params is not None else ""
        return self.request(f"{path}?{query}")

    def post(self, payload) -> tuple[int, dict]:
        return self.request("/api/trajectory", json.dumps(payload).encode())


@pytest.fixture(scope="module")
def view_root(tiny_run, tmp_path_factory) -> Path:
    workdir, first = tiny_run
    assert first.returncode == 0, first.stderr[-3000:]
    root = tmp_path_factory.mktemp("view")
    view_config(root, workdir)
    return root


@pytest.fixture(scope="module")
def server(view_root):
    s = Server(view_root / "view.yaml")
    yield s
    s.stop()


def test_runs_metrics_and_findings_list_what_the_workflow_wrote(server):
    status, runs = server.request("/api/runs")
    assert status == 200 and runs["runs"][0] | RUN == runs["runs"][0]
    assert runs["runs"][0]["kinds"] == ["affine", "scaling"] and runs["runs"][0]["tokens_ready"]
    status, metrics = server.request("/api/metrics")
    rows = pd.DataFrame(metrics["rows"])
    assert status == 200 and not metrics["missing"]
    assert set(rows.lens) == {"logit", "tuned", "model"} and set(rows.translator.dropna()) == {"affine", "scaling"}
    assert (rows.kl_lo <= rows.kl).all() and (rows.kl <= rows.kl_hi).all()
    status, findings = server.request("/api/findings")
    from pipeline.analyses import ANALYSES

    assert status == 200 and {a["rule"] for a in findings["analyses"]} == {a.rule for a in ANALYSES}
    facts = next(a for a in findings["analyses"] if a["rule"] == "fact_localization")
    assert facts["examples"] and all(e["prompt"] for e in facts["examples"])
    assert all(f["verdict"] for a in findings["analyses"] for f in a["findings"])


def test_a_stored_tokens_cells_are_the_evaluations_numbers(server, view_root):
    """The cache browser's trajectory of a token, from its stored states, gives the KL and
    top-1 that evaluation wrote for that token at every layer, for both lenses."""
    status, page = server.get("/api/tokens", sort="kl_tuned", desc="true", limit=5)
    assert status == 200 and len(page["rows"]) == 5 and page["total"] > 100
    kl = [r["kl_tuned"] for r in page["rows"]]
    assert kl == sorted(kl, reverse=True)
    index = page["rows"][0]["index"]
    status, t = server.get("/api/token", index=index)
    assert status == 200, t
    table = pd.read_parquet(view_root / "data" / "tables" / "tiny" / "tiny-txt" / "token_metrics")
    table = table[(table.token_index == index) & (table.position == "block")]
    for name, (lens, tr) in {"logit lens": ("logit", "none"), "tuned (affine)": ("tuned", "affine")}.items():
        rows = table[(table.lens == lens) & (table.translator == tr)].sort_values("layer")
        grid = t["lenses"][name]
        got = np.array([grid["kl"][layer][0] for layer in rows.layer])
        np.testing.assert_allclose(got, rows.kl.to_numpy(), rtol=1e-4, atol=1e-5)
        top = [grid["top"][layer][0] for layer in rows.layer]
        np.testing.assert_allclose([t5[0][1] for t5 in top], rows.top1_prob.to_numpy(), rtol=1e-3, atol=1e-4)
        assert all(len(t5) == 5 and t5[0][1] >= t5[-1][1] for t5 in top)
    # the mean over layers in the page is the same table's
    mean = table[(table.lens == "tuned") & (table.translator == "affine")].kl.mean()
    assert page["rows"][0]["kl_tuned"] == pytest.approx(mean, rel=1e-5)
    assert t["context"]["tokens"] and t["context"]["start"] <= index


def test_a_prompts_trajectory_is_the_reports(server, view_root):
    """Top-1 and probability per lens and layer equal pipeline.trajectory's (the report's)."""
    from pipeline.trajectory import trajectories

    status, traj = server.post(RUN | {"prompt": "summer3 day summer4"})
    assert status == 200, traj
    data = view_root / "data"
    lenses = {"affine": data / "lenses/tiny/tiny-txt/affine", "scaling": data / "lenses/tiny/tiny-txt/scaling"}
    from pipeline.corpus import split_separator

    ref = trajectories(
        data / "models/tiny", lenses, "summer3 day summer4", split_separator(data / "corpora/tiny-txt/tiny/test.npz")
    )
    assert traj["inputs"] == ref["inputs"] and set(traj["lenses"]) == set(ref["lenses"])
    for name, want in ref["lenses"].items():
        grid = traj["lenses"][name]
        np.testing.assert_allclose(np.array(grid["prob"]), want["prob"], rtol=1e-4, atol=1e-6)
        assert [[cell[0][0] for cell in row] for row in grid["top"]] == want["tokens"]
    # the next-token rank is known everywhere but after the last token
    assert all(row[-1] == -1 and min(row[:-1]) >= 0 for row in traj["lenses"]["logit lens"]["rank"])


@pytest.mark.parametrize(
    "path, status, words",
    [
        ("/files/../view.yaml", 404, "no file"),
        ("/files/%2e%2e/view.yaml", 404, "no file"),
        ("/files//etc/passwd", 404, "no file"),
        ("/files/outside-link", 404, "no file"),
        ("/api/tokens?model=tiny&corpus=tiny-txt&sort=secret", 400, "sort must be"),
        ("/api/tokens?model=tiny&corpus=tiny-txt&limit=100000", 400, "limit"),
        ("/api/tokens?model=tiny&corpus=tiny-txt&min_kl_tuned=abc", 400, "bad filter"),
        ("/api/tokens?model=tiny&corpus=tiny-txt&password=1", 400, "unknown filter"),
        ("/api/tokens?model=nope&corpus=tiny-txt", 404, "no run nope/tiny-txt"),
        ("/api/tokens?corpus=tiny-txt", 400, "missing 'model'"),
        ("/api/token?model=tiny&corpus=tiny-txt&index=99999999", 404, "not in the store"),
        ("/api/token?model=tiny&corpus=tiny-txt&index=x", 400, "must be an integer"),
        ("/api/token?model=tiny&corpus=tiny-txt", 400, "missing 'index'"),
        ("/api/tokens?model=tiny&corpus=tiny-txt&table=1", 400, "unknown filter"),
        ("/api/tokens?model=tiny&corpus=tiny-txt&seq=1e99x", 400, "not a number"),
        ("/files/a%00b", 404, "no file"),
        ("/files/" + "x" * 300, 404, "no file"),
        ("/nothing/here", 404, "no such page"),
    ],
)
def test_bad_requests_get_a_4xx_and_a_message(server, view_root, path, status, words):
    link = view_root / "data" / "outside-link"
    if not link.exists():
        link.symlink_to(view_root / "view.yaml")  # a link inside the data dir to a file outside it
    got, body = server.request(path)
    assert got == status and words in body["error"], body
    assert server.request("/api/runs")[0] == 200  # the server lives on


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps(RUN).encode(), "missing 'prompt'"),
        (json.dumps(RUN | {"prompt": "   "}).encode(), "empty"),
        (json.dumps(RUN | {"prompt": "x" * 2001}).encode(), "at most 2000"),
        (json.dumps(RUN | {"prompt": 7}).encode(), "must be a string"),
        (b"[" * 5000 + b"]" * 5000, "not JSON"),
    ],
)
def test_bad_prompts_get_a_400(server, body, words):
    got, answer = server.request("/api/trajectory", body)
    assert got == 400 and words in answer["error"], answer


def test_what_another_site_could_send_is_refused(server):
    """A form post from another page (not JSON), an oversized body, a DNS name rebound to
    this machine: refused before anything runs."""
    body = json.dumps(RUN | {"prompt": "summer1"}).encode()
    assert server.request("/api/trajectory", body, Content_Type="text/plain")[0] == 415
    assert server.request("/api/trajectory", b'{"prompt": "' + b"x" * 20_000 + b'"}')[0] == 413
    status, answer = server.request("/api/runs", Host="attacker.example")
    assert status == 400 and "host" in answer["error"].lower()
    assert server.request("/api/runs", Host=f"localhost:{server.port}")[0] == 200


def test_a_long_prompt_is_cut_to_the_bound(server):
    from pipeline.view.live import MAX_PROMPT_TOKENS

    status, traj = server.post(RUN | {"prompt": " ".join(["summer1 day"] * 150)})
    assert status == 200 and len(traj["inputs"]) == MAX_PROMPT_TOKENS and traj["truncated"]


def test_a_missing_artifact_names_the_command_that_makes_it(view_root, tmp_path):
    shutil.copytree(view_root, tmp_path / "copy", symlinks=True)
    root = tmp_path / "copy"
    shutil.rmtree(root / "data" / "tables" / "tiny" / "tiny-txt" / "token_metrics")
    (root / "view.yaml").write_text((root / "view.yaml").read_text().replace(str(view_root), str(root)))
    s = Server(root / "view.yaml")
    try:
        status, body = s.get("/api/tokens")
        assert status == 404 and "lenspipe evaluate --model tiny --corpus tiny-txt" in body["error"]
        status, runs = s.request("/api/runs")
        assert status == 200 and not runs["runs"][0]["tokens_ready"]
    finally:
        s.stop()


def test_a_page_of_100k_tokens_holds_only_the_page():
    from pipeline.view.tokens import page

    n = 100_000
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "index": np.arange(n),
            "seq": np.arange(n) // 256,
            "document": np.where(np.arange(n) < n // 2, "a", "b"),
            "category": "word start",
            **{c: rng.random(n) for c in ("kl_tuned", "kl_logit", "kl_gap", "disagree")},
            **{c: rng.integers(0, 30, n) for c in ("depth_tuned", "depth_logit", "model_rank")},
        }
    )
    out = page(table, {"document": "b"}, sort="kl_tuned", desc=True, offset=49_950, limit=100)
    assert out["total"] == n // 2 and len(out["rows"]) == 50 and out["offset"] == 49_950
    assert out["rows"][0]["kl_tuned"] >= out["rows"][-1]["kl_tuned"]
    first = page(table, {}, offset=0, limit=100)  # a page is the page, not the rest of the table
    assert first["total"] == n and [r["index"] for r in first["rows"]] == list(range(100))


def test_the_cli_binds_to_this_machine_by_default_and_names_the_missing_extra(monkeypatch):
    from pipeline.cli import build_parser
    from pipeline.errors import LenspipeError
    from pipeline.view import app

    args = build_parser().parse_args(["view"])
    assert args.host == "127.0.0.1"
    real = app.importlib.util.find_spec
    monkeypatch.setattr(app.importlib.util, "find_spec", lambda m: None if m == "uvicorn" else real(m))
    with pytest.raises(LenspipeError, match=r"needs uvicorn: .*pip install -e \."):
        app.require_extra()


# ------------------------------------------------------------------------ a real browser


def _chromium():
    """A headless Chromium driven by Selenium, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[test]')"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        return None, "no chromium / chromedriver (apt-get install chromium chromium-driver; .ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options), None


@pytest.fixture(scope="module")
def browser():
    driver, reason = _chromium()
    if driver is None:
        pytest.skip(reason)
    yield driver
    driver.quit()


def test_in_a_browser_prompt_hover_cache_and_findings(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "run").find_elements(By.TAG_NAME, "option"))
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys("summer2 day summer5 day")
    browser.find_element(By.ID, "run-prompt").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heatmaps table.heatmap")) == 3)  # logit + 2 kinds
    cell = browser.find_elements(By.CSS_SELECTOR, "#heatmaps table.heatmap td.cell")[7]
    ActionChains(browser).move_to_element(cell).perform()
    tip = wait.until(ec.visibility_of_element_located((By.ID, "tooltip")))
    items = tip.find_elements(By.CSS_SELECTOR, "ol.top5 li")
    assert len(items) == 5 and all("%" in li.text for li in items)
    cell.click()  # that position's curve over the layers
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#position-curve .main-svg"))
    browser.save_screenshot(str(tmp_path / "trajectory.png"))

    browser.find_element(By.CSS_SELECTOR, "nav button[data-view=cache]").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#token-rows tr")) == 50)
    assert "of" in browser.find_element(By.ID, "page-info").text
    browser.find_elements(By.CSS_SELECTOR, "#token-rows tr")[3].click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#token-trajectory table.heatmap td.cell"))
    assert browser.find_element(By.CSS_SELECTOR, "#token-trajectory .context .here").text

    browser.find_element(By.CSS_SELECTOR, "nav button[data-view=findings]").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#metrics-plot .main-svg"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#findings section.analysis")) >= 10)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
