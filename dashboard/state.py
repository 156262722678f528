"""Which run the dashboard shows, and what is cached for it (the only module that caches).

The run is opened once per server process and shared by every session (``st.cache_resource``),
keyed by its manifest's size and modification time, so a run rebuilt in place is not served
stale. Search results and the figures of a validation pair are cached with ``st.cache_data``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import streamlit as st

from dashboard import plots
from engine.errors import TrakviewError
from engine.evaluate import compare_report
from engine.evaluate.compare import CompareConfig, Comparison, compare
from engine.explain import report
from engine.explain.describe import TrainingFeatures
from engine.explain.report import GroupReport
from engine.explain.rules import GroupSpec
from engine.explore.view import RunView
from engine.run.layout import RunLayout

RUN_ENV = "TRAKVIEW_RUN"
COMPARE_ENV = "TRAKVIEW_COMPARE"  # the Compare page's second run (`trakview serve --compare`)
TIMINGS_ENV = "TRAKVIEW_TIMINGS"  # a file: each page run appends its seconds (bench_serve)


def run_dir(argv: list[str] | None = None) -> Path | None:
    """The run to show: ``--run DIR`` after ``--`` on the command line, else $TRAKVIEW_RUN."""
    return _path_flag("--run", RUN_ENV, argv)


def _path_flag(flag: str, env_name: str, argv: list[str] | None) -> Path | None:
    """``FLAG DIR`` or ``FLAG=DIR`` among the arguments after ``--``, else the variable."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith(flag + "="):
            return Path(arg.split("=", 1)[1])
    env = os.environ.get(env_name)
    return Path(env) if env else None


@contextlib.contextmanager
def timed(page: str) -> Iterator[None]:
    """Records how long this page run took (wall and its thread's CPU seconds) in the file
    ``$TRAKVIEW_TIMINGS`` names, when it names one: what ``bench/bench_serve.py`` reads."""
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        yield
        return
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        line = {
            "page": page,
            "query": st.query_params.to_dict(),
            "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.thread_time() - cpu,
        }
        with open(path, "a", encoding="utf-8") as fh:  # one short line: appends do not interleave
            fh.write(json.dumps(line) + "\n")


def _stamp(path: Path) -> str:
    """Changes when the run is rebuilt: its manifest is written last, atomically."""
    try:
        info = RunLayout(path).manifest.stat()
    except OSError:
        return "no manifest"
    return f"{info.st_size}-{info.st_mtime_ns}"


@st.cache_resource(show_spinner="Opening the run…", max_entries=4)
def _load_view(path: str, stamp: str) -> RunView:
    return RunView.load(path)


def open_run() -> RunView:
    """The run of this server, or a clear error on the page (and the page stops)."""
    path = run_dir()
    if path is None:
        st.error(
            "No run to show. Start the dashboard with `trakview serve RUN` "
            f"(or set ${RUN_ENV}, or pass `-- --run RUN` to `streamlit run`)."
        )
        st.stop()
    path = path.resolve()
    try:
        return _load_view(str(path), _stamp(path))
    except TrakviewError as err:
        st.error(f"Cannot open the run: {err}")
        st.stop()


def run_key(run: RunView) -> str:
    """What cached results of ``run`` are keyed by."""
    return f"{run.run}:{_stamp(run.run)}"


@st.cache_data(max_entries=512, show_spinner="Searching…")
def search_val(_run: RunView, key: str, text: str, mode: str) -> list[int]:
    """Validation rows matching a search (``RunView.search_val``), cached per run and query."""
    return _run.search_val(text, mode)


@st.cache_resource(max_entries=256, show_spinner=False)
def val_figures(_run: RunView, key: str, val_id: str, k: int) -> tuple[go.Figure, go.Figure]:
    """The figures of a validation pair's result, shared by every session that selects it (a
    shared object, not a copy: unpickling a plotly figure validates it again, ~25 ms)."""
    return plots.result_figures(_run, _run.for_val(val_id, k), k)


def compare_dir(argv: list[str] | None = None) -> Path | None:
    """The Compare page's second run: ``--compare DIR`` after ``--`` on the command line, else
    $TRAKVIEW_COMPARE (``trakview serve RUN --compare RUN_B`` sets it)."""
    return _path_flag("--compare", COMPARE_ENV, argv)


def open_other(path: Path) -> RunView:
    """A second run (the Compare page's), opened once per server and shared like the first.

    Raises:
        TrakviewError: not a finished run.
    """
    path = path.resolve()
    return _load_view(str(path), _stamp(path))


@st.cache_data(ttl=30, show_spinner=False)
def sibling_runs(run: str) -> list[str]:
    """Finished runs beside ``run``: folders up to three levels under its parent (bench_compare
    keeps its runs B in ``compare/NAME/run``) holding a manifest and pair lists, ``run`` itself
    left out."""
    here = Path(run).resolve()
    found = set()
    for depth in range(1, 4):
        for manifest in here.parent.glob("*/" * depth + RunLayout(".").manifest.name):
            layout = RunLayout(manifest.parent)
            if layout.config.is_file() and layout.pairs("val").is_file():
                found.add(manifest.parent)
    return [str(p) for p in sorted(found - {here})]


@st.cache_resource(max_entries=16, show_spinner="Comparing the two runs…")
def comparison(
    _a: RunView, _b: RunView, key: str, basket: str | None, columns: tuple[str, ...]
) -> tuple[Comparison, dict[str, Any]]:
    """Two runs compared (``engine.evaluate.compare``) and its summaries (``compare_report``),
    once per pair of runs (``key``), basket and column groups, shared by every session."""
    c = compare(_a, _b, CompareConfig(basket=basket, columns=list(columns)))
    return c, compare_report.to_json(c)


@st.cache_resource(
    max_entries=4, show_spinner="Counting the training pairs' words, columns and clusters…"
)
def _features(_run: RunView, key: str) -> TrainingFeatures:
    return report.training_features(_run)


def training_features(run: RunView) -> TrainingFeatures:
    """The run's training features (``engine.explain.report.training_features``), once per run
    and server."""
    return _features(run, run_key(run))


@st.cache_resource(max_entries=64, show_spinner="Explaining the group…")
def group_report(_run: RunView, key: str, param: str, confusion: bool) -> GroupReport:
    """A group's explanation (``engine.explain.report.explain_group``), once per run, group and
    whether its wrong matches were attributed (new queries), shared by every session."""
    return report.explain_group(
        _run, GroupSpec.parse(param), confusion, features=training_features(_run)
    )
