"""One real browser session: `trakview serve` on the small run, driven by headless Chromium.

Deep link -> influencer images, text search, upload -> influencers, zip download whose
influencers.csv matches scores.npy, the trust banner on a run of untrained checkpoints only.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
START_TIMEOUT_S = 120
WAIT_MS = 60_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, log: Path):
    """`trakview serve RUN --port N` in its own process group; stopped even if a test fails."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="needs `pip install playwright`")
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", str(run), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: teardown can stop Streamlit with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"trakview serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard not up after {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # trakview forwards it to Streamlit
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # anything left in the group
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    with serving(run_dir, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=WAIT_MS
        )
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1200})
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


def wait_images(page, selector: str, n: int) -> None:
    """Waits until ``n`` images under ``selector`` have loaded their pixels."""
    page.wait_for_function(
        """([sel, n]) => {
            const imgs = [...document.querySelectorAll(sel)];
            return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=[selector, n],
    )


def test_deep_link_shows_the_influencers(page, server, arrays):
    j = 4
    val = arrays["val"][j]
    page.goto(f"{server}/?val={val['id']}")
    page.get_by_text(val["caption"], exact=False).first.wait_for()
    order = np.argsort(-arrays["scores"][:, j], kind="stable")[:6]
    for i in order:  # a card: the bordered column holding the training pair's open button
        wait_images(page, f'[data-testid="stColumn"]:has(.st-key-ex-pos-open-{i}) img', 1)
    wait_images(page, '[data-testid="stColumn"]:has([class*="st-key-ex-neg-open-"]) img', 6)
    assert f"val={val['id']}" in page.url
    # the plots are drawn once their section is opened, not before
    assert page.locator(".js-plotly-plot").count() == 0
    page.locator(".st-key-ex-plots summary").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.st-key-ex-plots .js-plotly-plot')]"
        ".filter(p => p.querySelector('.main-svg')).length == 2"
    )


def test_search_by_text_then_select(page, server, arrays):
    page.goto(f"{server}/?val={arrays['val'][0]['id']}")
    page.get_by_text("words in caption").click()
    box = page.get_by_placeholder("e.g. a red circle on the left")
    box.fill("square")
    box.press("Enter")
    expected = [str(r["id"]) for r in arrays["val"] if "square" in r["caption"].lower()][:12]
    page.wait_for_function(
        """ids => {
            const at = b => b.getBoundingClientRect();  // reading order: rows, then columns
            const shown = [...document.querySelectorAll('[class*="st-key-pick-"] button')]
                .filter(b => at(b).width > 0);
            shown.sort((a, b) => Math.round(at(a).top - at(b).top) || at(a).left - at(b).left);
            return [...new Set(shown.map(b => b.innerText.trim()))].join() === ids.join();
        }""",
        arg=expected,
    )
    page.locator(f".st-key-pick-{expected[0]} button").first.click()
    caption = next(r["caption"] for r in arrays["val"] if str(r["id"]) == expected[0])
    page.get_by_role("heading", name=caption).wait_for()
    page.wait_for_url(f"**val={expected[0]}")


def test_zip_download_matches_scores(page, server, arrays, tmp_path):
    j = 9
    page.goto(f"{server}/?val={arrays['val'][j]['id']}")
    page.get_by_text(arrays["val"][j]["caption"]).first.wait_for()
    button = page.locator(".st-key-ex-export-zip button")
    with page.expect_download(timeout=WAIT_MS) as info:
        button.click()
    path = tmp_path / "gallery.zip"
    info.value.save_as(path)
    with zipfile.ZipFile(path) as archive:
        rows = list(csv.DictReader(io.StringIO(archive.read("influencers.csv").decode())))
    column = arrays["scores"][:, j]
    pos = [r for r in rows if r["sign"] == "positive"]
    neg = [r for r in rows if r["sign"] == "negative"]
    assert len(pos) == len(neg) == 6  # the page's default k
    assert [int(r["train_index"]) for r in pos] == list(np.argsort(-column, kind="stable")[:6])
    assert [int(r["train_index"]) for r in neg] == list(np.argsort(column, kind="stable")[:6])
    for r in rows:
        assert float(r["score"]) == pytest.approx(float(column[int(r["train_index"])]), rel=1e-6)


def test_upload_gets_influencers(page, server, run_dir, arrays):
    rec = arrays["val"][2]
    page.goto(f"{server}/upload")
    page.locator('[data-testid="stFileUploader"] input[type=file]').set_input_files(
        str(run_dir / rec["image"])
    )
    page.get_by_label("Caption", exact=True).fill(rec["caption"])
    page.get_by_role("button", name="Find influencers").click()
    page.get_by_role("heading", name=rec["caption"]).wait_for()
    wait_images(page, '[data-testid="stColumn"]:has([class*="-pos-open-"]) img', 6)
    wait_images(page, '[data-testid="stColumn"]:has([class*="-neg-open-"]) img', 6)


def test_trust_banner_only_where_the_model_is_at_chance(page, server, untrained_run, tmp_path):
    banner = '[data-testid="stAlertContentError"]'
    page.goto(server)
    page.wait_for_selector('h1:has-text("Why does the model match this pair?")')
    page.wait_for_selector('[data-testid="stImage"] img')  # the page has drawn its pair
    assert page.locator(banner).count() == 0
    with serving(untrained_run, tmp_path / "serve.log") as url:
        page.goto(url)
        alert = page.wait_for_selector(banner)
        assert "Attributions: no signal." in alert.inner_text()
        page.screenshot(path=str(tmp_path / "no-signal.png"))


# --- the basket: add from a card, see the predicted effect, download the cleaned CSV ---


def test_basket_from_a_card_to_the_cleaned_csv(page, csv_run, arrays, tmp_path):
    run = csv_run  # the session run as if built from CSVs (conftest)
    j, train = 3, arrays["train"]
    i = int(np.argsort(-arrays["scores"][:, j], kind="stable")[0])
    with serving(run, tmp_path / "serve.log") as url:
        page.goto(f"{url}/?val={arrays['val'][j]['id']}")
        card = f'[data-testid="stColumn"]:has(.st-key-ex-pos-open-{i})'
        wait_images(page, f"{card} img", 1)
        page.locator(f".st-key-ex-pos-open-{i} button").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_label("Why").fill("dominates its concept")
        dialog.get_by_role("button", name="Add to basket").click()
        dialog.get_by_text("1 of 1 pairs added to basket").wait_for()
        page.goto(f"{url}/basket")
        page.get_by_text("Removing 1 pair should").wait_for()
        delta = -arrays["scores"][i].astype(np.float64)
        page.get_by_text(f"{delta.mean():+.4f}", exact=True).first.wait_for()
        wait_images(page, '[data-testid="stColumn"]:has([data-testid="stPageLink"]) img', 8)
        page.screenshot(path=str(tmp_path / "basket.png"), full_page=True)
        with page.expect_download(timeout=WAIT_MS) as info:
            page.get_by_role("button", name="Cleaned train.csv").click()
        path = tmp_path / "cleaned.csv"
        info.value.save_as(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["id"] for r in rows] == [r["id"] for n, r in enumerate(train) if n != i]
    assert rows[0]["title"] == train[0 if i else 1]["caption"]


# --- Compare: run B (retrained without a basket of A) against A, predicted against actual ---


def test_compare_page_before_and_after(page, compare_runs, tmp_path, monkeypatch):
    """`serve A` with run B (the session's ``compare_runs``, as tests/dashboard/test_compare.py):
    the headline numbers, the predicted-against-actual scatter, a point clicked selects its pair,
    and both runs' influencer images load for it."""
    from engine.curate import baskets
    from engine.files import read_jsonl
    from engine.run.layout import RunLayout

    a, b = compare_runs
    val_a = read_jsonl(a / "val.jsonl")
    margin_b = {
        r["id"]: m
        for r, m in zip(read_jsonl(b / "val.jsonl"), np.load(b / "val_margin.npy"), strict=True)
    }
    matched = [j for j, r in enumerate(val_a) if r["id"] in margin_b]
    delta = (
        np.array([margin_b[val_a[j]["id"]] for j in matched])
        - np.load(a / "val_margin.npy")[matched]
    )
    gone = [e.row for e in baskets.read_basket(RunLayout(a), "sus").entries]
    predicted = -np.load(a / "scores.npy")[gone].sum(0)[matched]
    at = int(np.argmax(predicted))  # the rightmost point: clear of the others
    at = at if at != int(np.argmin(delta)) else int(np.argmin(predicted))
    picked = val_a[matched[at]]
    monkeypatch.setenv("TRAKVIEW_COMPARE", str(b))  # what `serve --compare` sets (test_compare)
    with serving(a, tmp_path / "serve.log") as url:
        page.goto(url)  # through the app's navigation, as a user gets there
        page.get_by_role("link", name="Compare runs").click()
        page.get_by_role("heading", name="Did the fix work? Two runs compared").wait_for()
        page.get_by_text("Matched validation pairs").wait_for()
        assert page.locator('[data-testid="stMetricValue"]').first.inner_text() == "37"
        worst = val_a[matched[int(np.argmin(delta))]]
        page.get_by_role("heading", name=worst["caption"]).wait_for()  # the most regressed first
        for side in ("a", "b"):
            wait_images(
                page, f'[data-testid="stColumn"]:has([class*="st-key-cmp-{side}-pos"]) img', 6
            )
        points = ".st-key-cmp-scatter .scatterlayer .trace:first-child .point"
        page.wait_for_function(
            "([sel, n]) => document.querySelectorAll(sel).length === n", arg=[points, len(matched)]
        )
        box = page.locator(points).nth(at).bounding_box()  # plotly's drag layer takes the click
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_function(
            "id => document.querySelector('.st-key-cmp-pair input').value.startsWith(id + ':')",
            arg=picked["id"],
        )
        page.get_by_role("heading", name=picked["caption"]).wait_for()
        for side in ("a", "b"):
            wait_images(
                page, f'[data-testid="stColumn"]:has([class*="st-key-cmp-{side}-pos"]) img', 6
            )
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)


# --- a failing group: deep link, the wrong matches attributed, the causes into a basket ---


def test_group_page_from_failing_pairs_to_a_basket(page, csv_run, arrays, tmp_path):
    from engine.curate import baskets
    from engine.run.layout import RunLayout

    ranks = np.load(csv_run / "val_caption_rank.npy")
    worst = arrays["val"][int(np.argmax(ranks))]
    with serving(csv_run, tmp_path / "serve.log") as url:
        page.goto(f"{url}/group?group=failing:6")  # a deep link straight to the page
        page.get_by_role("heading", name="Why do these pairs fail?").wait_for()
        page.get_by_role("heading", name="Group: worst-matched 6").wait_for()
        page.get_by_text(worst["caption"]).first.wait_for()  # among the group's pairs
        wait_images(page, '[data-testid="stColumn"]:has([class*="st-key-gr-help-open-"]) img', 4)
        page.get_by_role("button", name="Attribute the wrong matches").click()
        page.get_by_role(
            "heading", name="The causes: training pairs that drive the wrong matches"
        ).wait_for()
        wait_images(page, '[data-testid="stColumn"]:has([class*="st-key-gr-causes-open-"]) img', 4)
        assert "confusion=1" in page.url and "group=failing" in page.url
        page.get_by_role("button", name="Add the top causes").click()
        page.get_by_text("causes added to basket").wait_for()
        page.screenshot(path=str(tmp_path / "group.png"), full_page=True)
    names = baskets.basket_names(RunLayout(csv_run))
    basket = baskets.read_basket(RunLayout(csv_run), names[0])
    assert basket.group["spec"] == "failing:6" and len(basket.group["held_out"]) == 3
