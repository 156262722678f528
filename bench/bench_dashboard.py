"""Dashboard latency in a real browser: a page's first load, and a click on a new validation pair.

Starts ``trakview serve RUN`` on a free port, drives headless Chromium with playwright and times

* cold load: the first page load after the server started (imports, run opening);
* first load: a fresh browser session opening ``/?val=ID`` until the galleries are complete;
* new selection: a click on another pair's thumbnail until its galleries are complete, with the
  plots section closed (the default) and, separately, open (its plots drawn on every selection).

"Complete" means the header shows the new caption, every card of the helps / hurts / similar
galleries (the ids the run's stored scores and CLIP embeddings give) has its image loaded, and
no element is stale (Streamlit's rerun has finished, the open section's plots drawn). Prints a table and writes it
into BENCHMARKS.md between ``<!-- bench_dashboard:start -->`` and ``<!-- bench_dashboard:end -->``.

    .venv/bin/python bench/bench_dashboard.py                  # /tmp/demo-full/run, ~2 minutes
    .venv/bin/python bench/bench_dashboard.py --run RUN --repeats 20 --no-write
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench_common import ROOT, arguments, machine, md_table, spread, write_section
from engine.explore.run_data import RunData

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
K = 6  # the Explore page's default k
PICKER_PAGE = 12  # thumbnails on the picker's first page
GALLERIES_JS = """([caption, keys]) => {
    const heads = [...document.querySelectorAll('h3')].map(h => h.innerText);
    if (!heads.some(h => h.includes(caption))) return false;
    return keys.every(key => {
        const card = document.querySelector(key);
        const img = card && card.querySelector('img');
        return img && img.complete && img.naturalWidth > 0
            && !card.closest('[data-stale="true"]');
    });
}"""
# ... and the rerun has finished: nothing stale, at least `plots` plots drawn (2 with the plots
# section open: histogram, maps).
COMPLETE_JS = (
    """([caption, keys, plots]) => {
    if (document.querySelector('[data-stale="true"]')) return false;
    const drawn = [...document.querySelectorAll('.js-plotly-plot')].filter(
        p => p.querySelector('.main-svg'));
    if (drawn.length < plots) return false;
    return ("""
    + GALLERIES_JS
    + """)([caption, keys]);
}"""
)


def expected_cards(run: RunData, j: int) -> list[str]:
    """CSS selectors of the cards the page must show for validation row j (its stored result):
    a gallery's card is the bordered column holding its open button; a similar one, a box."""
    result = run.for_val(str(run.val[j]["id"]), k=K)
    cards = [
        f'[data-testid="stColumn"]:has(.st-key-ex-{key}-open-{c.index})'
        for key, group in (("pos", result.positive), ("neg", result.negative))
        for c in group
    ]
    return cards + [f".st-key-ex-sim-card-{c.index}" for c in result.similar]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(run: Path):
    """``trakview serve`` in its own process group; yields its URL and the ``trakview``
    process (Streamlit is its child), stops it on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", str(run), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise SystemExit(f"trakview serve exited with {proc.returncode}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2),
            ):
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the dashboard did not start in 120 s")
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def until_complete(
    page, t0: float, val: dict, keys: list[str], timeout_ms: int, plots: int = 0
) -> tuple:
    """Seconds since t0 until the galleries are complete, and until the whole page is (with
    ``plots`` plots drawn)."""
    page.wait_for_function(GALLERIES_JS, arg=[val["caption"], keys], timeout=timeout_ms)
    galleries = time.perf_counter() - t0
    page.wait_for_function(COMPLETE_JS, arg=[val["caption"], keys, plots], timeout=timeout_ms)
    return galleries, time.perf_counter() - t0


def load(browser, url: str, val: dict, keys: list[str], timeout_ms: int) -> tuple:
    """A fresh session opening the pair's deep link (see ``until_complete``)."""
    context = browser.new_context(viewport={"width": 1600, "height": 1200})
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(f"{url}/?val={val['id']}")
    seconds = until_complete(page, t0, val, keys, timeout_ms)
    context.close()
    return seconds


def server_mib(trakview_pid: int) -> float:
    """Resident memory of the Streamlit server that ``trakview serve`` started."""
    children = Path(f"/proc/{trakview_pid}/task/{trakview_pid}/children").read_text().split()
    for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(run: Path, repeats: int, with_memory: bool = False) -> dict:
    from playwright.sync_api import sync_playwright

    data = RunData(run)
    val = data.val
    picks = list(range(1, min(PICKER_PAGE, len(val))))  # on the picker's first page
    keys = {j: expected_cards(data, j) for j in [0, *picks]}
    times: dict[str, list[tuple[float, float]]] = {
        "cold load (first after start)": [],
        "first load (new session)": [],
        "new selection, plots open (click)": [],
        "new selection (click)": [],
    }
    with serve(run) as (url, proc), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        times["cold load (first after start)"].append(load(browser, url, val[0], keys[0], 180_000))
        for _ in range(repeats):
            times["first load (new session)"].append(load(browser, url, val[0], keys[0], 60_000))
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.goto(f"{url}/?val={val[0]['id']}")
        until_complete(page, time.perf_counter(), val[0], keys[0], 60_000)
        shown = 0
        # plots open first: the pairs' figures are not in the server's cache yet
        for name, plots in (("new selection, plots open (click)", 2), ("new selection (click)", 0)):
            toggle_plots(page, val[shown], keys[shown], plots)
            for r in range(repeats):
                shown = picks[r % len(picks)]  # never the pair already shown (picks holds no 0)
                button = page.locator(f".st-key-pick-{val[shown]['id']} button").first
                t0 = time.perf_counter()
                button.click()
                times[name].append(until_complete(page, t0, val[shown], keys[shown], 60_000, plots))
        browser.close()
        memory = server_mib(proc.pid) if with_memory else None
    return {**times, "server_mib": memory} if with_memory else times


def toggle_plots(page, val: dict, keys: list[str], plots: int, section: str = "ex-plots") -> None:
    """Opens (``plots`` 2) or closes (0) the page's plots section unless it already is so, and
    waits for the page to be complete again."""
    is_open = page.evaluate(f"() => !!document.querySelector('.st-key-{section} details')?.open")
    if is_open != bool(plots):
        page.locator(f".st-key-{section} summary").first.click()
    until_complete(page, time.perf_counter(), val, keys, 60_000, plots)


def full_height(page) -> None:
    """Grows the viewport to the page's content: Streamlit scrolls inside its own container
    (scrolled back to the top first: opening the plots section scrolls it there)."""
    height = page.evaluate(
        """() => {
            for (const el of document.querySelectorAll('*')) if (el.scrollTop) el.scrollTop = 0;
            window.scrollTo(0, 0);
            const main = document.querySelector('[data-testid="stMainBlockContainer"]');
            return main.getBoundingClientRect().top + main.scrollHeight;
        }"""
    )
    page.set_viewport_size({"width": 1600, "height": int(height) + 40})
    page.wait_for_timeout(1500)  # plots re-layout to the new size


def save(page, path: Path) -> None:
    """A screenshot without the empty band Streamlit leaves below the content."""
    from PIL import Image

    page.screenshot(path=path)
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"))  # (H, W)
    sidebar = int(
        page.evaluate(
            "() => document.querySelector('[data-testid=\"stSidebar\"]')?.offsetWidth || 0"
        )
    )
    busy = np.flatnonzero((pixels[:, sidebar + 8 :] < 250).any(axis=1))
    if len(busy):
        with Image.open(path) as img:
            img.crop((0, 0, img.width, min(img.height, int(busy[-1]) + 48))).save(path)


def screenshots(run: Path, out: Path, val_id: str, upload_image: Path, caption: str) -> None:
    """Explore, Upload and Overview of the run as ``out/{explore,upload,overview}.png``."""
    from playwright.sync_api import sync_playwright

    data = RunData(run)
    j = data.val_position(val_id)
    val = data.val[j]
    out.mkdir(parents=True, exist_ok=True)
    with serve(run) as (url, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.goto(f"{url}/?val={val_id}")
        until_complete(page, time.perf_counter(), val, expected_cards(data, j), 180_000)
        toggle_plots(page, val, expected_cards(data, j), 2)
        full_height(page)
        save(page, out / "explore.png")

        page.set_viewport_size({"width": 1600, "height": 1200})
        page.goto(f"{url}/upload")
        page.locator('[data-testid="stFileUploader"] input[type=file]').set_input_files(
            str(upload_image)
        )
        page.get_by_label("Caption", exact=True).fill(caption)
        page.get_by_role("button", name="Find influencers").click()
        page.get_by_role("heading", name=caption).wait_for(timeout=180_000)
        page.locator(".st-key-up-plots summary").first.click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot')]"
            ".filter(p => p.querySelector('.main-svg')).length >= 2"
            " && !document.querySelector('[data-stale=\"true\"]')",
            timeout=60_000,
        )
        full_height(page)
        save(page, out / "upload.png")

        page.set_viewport_size({"width": 1600, "height": 1200})
        page.goto(f"{url}/overview")
        page.get_by_role("heading", name="Suspected mislabeled training pairs").wait_for(
            timeout=60_000
        )
        page.wait_for_function(
            "() => [...document.querySelectorAll('.tv-img')].every(i => i.complete)"
        )
        full_height(page)
        save(page, out / "overview.png")
        browser.close()


def table(run: Path, times: dict[str, list[tuple[float, float]]], load: tuple) -> str:
    counts = RunData(run).manifest.counts
    rows = []
    for name, values in times.items():
        cells = [c for part in zip(*values, strict=True) for c in spread(part, digits=3)]
        rows.append((name, *cells, len(values)))
    header = (
        "measurement",
        "galleries complete: median s",
        "(min - max)",
        "whole page: median s",
        "(min - max)",
        "repeats",
    )
    return "\n".join(
        [
            "### Dashboard latency in a browser",
            "",
            f"`trakview serve` on {run} ({counts.n_train} train, {counts.n_val} val pairs), "
            f"headless Chromium (playwright), k = {K} per gallery. Galleries complete: the pair's "
            "caption and every helps / hurts / similar card image loaded; whole page: also "
            "nothing stale and, with the plots section open, both plots drawn. "
            f"{machine()}; load average {load[0]:.1f} before / "
            f"{load[1]:.1f} after ("
            + ("other jobs shared the cores" if load[0] > 1.0 else "nothing else running before")
            + f"; the server and Chromium themselves load both cores), {dt.date.today()}. "
            "`python bench/bench_dashboard.py`",
            "",
            md_table(header, rows),
        ]
    )


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--run", type=Path, default=Path("/tmp/demo-full/run"))
    parser.add_argument("--repeats", type=int, default=12, help="at least 10 for a median")
    parser.add_argument(
        "--screenshots", type=Path, help="only save explore/upload/overview.png in this folder"
    )
    parser.add_argument("--val", default="v0257", help="validation pair of the screenshots")
    parser.add_argument(
        "--upload",
        type=Path,
        default=Path("/tmp/demo-full/data/images/val/v0113.png"),
        help="image uploaded for the Upload screenshot",
    )
    parser.add_argument("--caption", default="a blue circle in the top left corner")
    args = parser.parse_args()
    if args.screenshots:
        screenshots(args.run.resolve(), args.screenshots, args.val, args.upload, args.caption)
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    before = os.getloadavg()[0]
    times = measure(args.run.resolve(), args.repeats)
    text = table(args.run, times, (before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section("bench_dashboard", text)


if __name__ == "__main__":
    main()
