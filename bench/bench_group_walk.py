"""The walk from "something fails" to a fix, timed in a real browser on the Group page.

Starts ``trakview serve RUN`` and drives headless Chromium through what a user does: open the
Group page on the worst-matched pairs (``/group?group=failing:N``), switch to the failing
source's pairs in the sidebar form (the page shows which column value they share), attribute
their wrong matches, add the top causes to a basket (chosen on half of the group), grow it by
the shared feature, and open the Basket page with its predicted effect. Each step is timed from
the click to the page being complete (its new elements present, nothing stale). The verification
by retraining (`trakview eval clean`) is a command, timed in `bench_failure`.

    python bench/bench_group_walk.py --run demo-run/run --group column:source=stockshots

Works on a copy of the run (the walk writes a basket); repeats with a fresh server each time.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_dashboard import CHROMIUM_ARGS, serve

from bench_common import arguments, machine, md_table, write_section

STALE_DONE = "() => !document.querySelector('[data-stale=\"true\"]')"


def step(page, action, wait_for) -> float:
    t0 = time.perf_counter()
    action()
    wait_for()
    page.wait_for_function(STALE_DONE, timeout=300_000)
    return time.perf_counter() - t0


def walk(browser, url: str, group: str) -> dict[str, float]:
    context = browser.new_context(viewport={"width": 1600, "height": 1200})
    page = context.new_page()
    page.set_default_timeout(300_000)
    out = {}
    out["open the worst-matched pairs"] = step(
        page,
        lambda: page.goto(f"{url}/group?group=failing:40"),
        lambda: page.get_by_role("heading", name="Group: worst-matched 40").wait_for(),
    )
    out["switch to the failing group (deep link)"] = step(
        page,
        lambda: page.goto(f"{url}/group?group={group}"),
        lambda: page.get_by_role("heading", name="The group's own margins").wait_for(),
    )
    out["attribute the wrong matches"] = step(
        page,
        lambda: page.get_by_role("button", name="Attribute the wrong matches").click(),
        lambda: page.get_by_role(
            "heading", name="The causes: training pairs that drive the wrong matches"
        ).wait_for(),
    )
    out["add the top 100 causes (ranked on half the group)"] = step(
        page,
        lambda: page.get_by_role("button", name="Add the top causes").click(),
        lambda: page.get_by_text("causes added to basket").wait_for(),
    )
    out["grow the basket by the top shared feature"] = step(
        page,
        lambda: page.locator('[class*="st-key-gr-grow-0"] button').first.click(),
        lambda: page.get_by_text("pairs added to").first.wait_for(),
    )
    out["open the Basket page with the predicted effect"] = step(
        page,
        lambda: page.goto(f"{url}/basket"),
        lambda: page.get_by_text("should…").first.wait_for(),
    )
    page.screenshot(path=str(Path(tempfile.gettempdir()) / "group-walk.png"), full_page=True)
    context.close()
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--group", default="column:source=stockshots")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        work = Path(tempfile.mkdtemp()) / args.run.name
        shutil.copytree(
            args.run, work, ignore=shutil.ignore_patterns("eval", "baskets", "estimators")
        )
        for sibling in args.run.resolve().parent.iterdir():  # its relative paths resolve again
            if sibling.name != args.run.name:
                (work.parent / sibling.name).symlink_to(sibling)
        with serve(work) as (url, _), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            for name, seconds in walk(browser, url, args.group).items():
                times.setdefault(name, []).append(seconds)
            browser.close()
        shutil.rmtree(work.parent, ignore_errors=True)
    rows = [
        [name, f"{statistics.median(v):.1f}", f"{min(v):.1f}-{max(v):.1f}"]
        for name, v in times.items()
    ]
    total = [sum(v[i] for v in times.values()) for i in range(args.repeats)]
    rows.append(
        [
            "**the whole walk**",
            f"**{statistics.median(total):.1f}**",
            f"{min(total):.1f}-{max(total):.1f}",
        ]
    )
    body = (
        f"### From failing pairs to a basket of their cause, in the dashboard (`bench_group_walk`)\n\n"
        f"`python bench/bench_group_walk.py --run {args.run} --group {args.group}`: headless Chromium, a fresh server "
        f"and a copy of the run per repeat ({args.repeats}); each step timed from its click to the page complete. "
        f"{machine()}.\n\n" + md_table(["step", "median s", "range"], rows)
    )
    print(body)
    if not args.no_write:
        write_section("bench_group_walk", body)


if __name__ == "__main__":
    main()
