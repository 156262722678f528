"""The commands that read a finished run: ``serve``, ``query``, ``export`` and ``info``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from engine.cli.options import setup_logging

LOCALHOST = "127.0.0.1"


def query(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    image: Annotated[Path, typer.Option(help="The query image (any format PIL reads).")],
    caption: Annotated[str, typer.Option(help="The caption the image should match.")],
    k: Annotated[int, typer.Option("-k", help="Influencers per sign.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Top positive and negative training influencers of a new image and caption."""
    from engine.explore.query import QueryEngine

    setup_logging(False)
    result = QueryEngine.load(run, device=device).query(image, caption, k=k)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"caption          {result.caption!r}")
    typer.echo(f"CLIP similarity  {result.clip_similarity:.3f}   margin {result.margin:.3f}")
    for title, cards in (
        ("helps most", result.positive),
        ("hurts most", result.negative),
        ("most similar (CLIP)", result.similar),
    ):
        typer.echo(f"\n{title}:")
        for c in cards:
            typer.echo(f"  {c.rank:>3}  {c.score:+.4g}  {c.id:<10} {c.caption}")


def export(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    fmt: Annotated[
        str, typer.Option("--format", help="zip, html, png (contact sheet), csv or json.")
    ],
    out: Annotated[Path, typer.Option(help="File to write (its folder is created if needed).")],
    val: Annotated[
        str | None, typer.Option(help="Validation pair id to export (or --image and --caption).")
    ] = None,
    image: Annotated[
        Path | None, typer.Option(help="A new query's image (with --caption, instead of --val).")
    ] = None,
    caption: Annotated[
        str | None, typer.Option(help="A new query's caption (with --image, instead of --val).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Influencers per sign.")] = 10,
    device: Annotated[str, typer.Option(help="cpu or cuda (new queries only).")] = "cpu",
) -> None:
    """Export a pair's influencer gallery as a zip, an offline html page, a png, csv or json."""
    from engine.data.images import open_query_image
    from engine.errors import InputError
    from engine.explore import export as export_mod
    from engine.explore.run_data import RunData

    setup_logging(False)
    new_query = image is not None or caption is not None
    if (val is not None and new_query) or (val is None and (image is None or caption is None)):
        flags = (("--val", val), ("--image", image), ("--caption", caption))
        given = [flag for flag, value in flags if value is not None]
        raise InputError(
            "give either --val ID or both --image PATH and --caption TEXT; got "
            f"{' and '.join(given) or 'none of them'}"
        )
    export_mod.parse_format(fmt)
    if val is not None:  # stored scores: no model, no torch
        result, query_image = RunData(run).for_val(val, k=k), None
    else:
        from engine.explore.query import QueryEngine

        query_image = open_query_image(image)
        result = QueryEngine.load(run, device=device).query(query_image, caption, k=k)
    typer.echo(str(export_mod.export(run, result, fmt, out, query_image=query_image)))


def serve(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    port: Annotated[int, typer.Option(help="Port of the dashboard.")] = 8501,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on: 127.0.0.1 (default) serves this machine only; 0.0.0.0 "
            "(or an interface's address) exposes the run's images to anyone who can reach it."
        ),
    ] = LOCALHOST,
    base_url_path: Annotated[
        str, typer.Option(help="URL prefix behind a reverse proxy, e.g. trakview.")
    ] = "",
    compare: Annotated[
        Path | None,
        typer.Option(help="A second run for the Compare page: the run built after a fix."),
    ] = None,
) -> None:
    """Open the dashboard on a run (Streamlit; Ctrl-C stops it). It only reads the run."""
    import importlib.util
    import os
    import signal
    import subprocess

    from engine.data.images import MAX_UPLOAD_MB
    from engine.run.manifest import open_manifest

    open_manifest(run)
    env = {**os.environ, "TRAKVIEW_RUN": str(Path(run).resolve())}
    if compare is not None:
        open_manifest(compare)
        env["TRAKVIEW_COMPARE"] = str(Path(compare).resolve())
    app_py = Path(importlib.util.find_spec("dashboard").origin).parent / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_py), "--server.port", str(port)]
    cmd += ["--server.address", host, "--server.baseUrlPath", base_url_path]
    cmd += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    # Streamlit's defaults, stated so that no config file turns them off: XSRF protection on
    # uploads, and the upload limit of the Upload page.
    cmd += ["--server.enableXsrfProtection", "true", "--server.maxUploadSize", str(MAX_UPLOAD_MB)]
    cmd += ["--server.fileWatcherType", "none", "--server.runOnSave", "false"]
    # a full gc.collect() after every page run costs ~0.1 s of CPU with torch loaded (a third
    # of a selection's, bench_serve); Python's own collector still runs
    cmd += ["--runner.postScriptGC", "false"]
    cmd += ["--theme.primaryColor", "#4575b4"]  # red and green mean negative and positive
    shown = "localhost" if host == LOCALHOST else host
    url = f"http://{shown}:{port}/{base_url_path.strip('/')}".rstrip("/")
    if host == LOCALHOST:
        typer.echo(f"dashboard of {run} on {url}, this machine only (Ctrl-C stops it)")
    else:
        typer.echo(
            f"dashboard of {run} on {url}, EXPOSED on {host}: anyone who can reach this machine "
            "can browse the run's images and upload files (Ctrl-C stops it)"
        )
    proc = subprocess.Popen(cmd, env=env)
    # Ctrl-C and SIGTERM go on to Streamlit, so stopping this process never leaves it running.
    stops = (signal.SIGINT, signal.SIGTERM)
    forward = {s: signal.signal(s, lambda n, _: proc.send_signal(n)) for s in stops}
    try:
        code = proc.wait()
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise typer.Exit(code)


def info(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest.")] = False,
) -> None:
    """Summarise a run directory: model, checkpoints, sizes, settings, timings and whether its
    attributions can be trusted."""
    from engine.explore.trust import run_verdict
    from engine.run.manifest import open_manifest, summary

    manifest = open_manifest(run)
    verdict = run_verdict(run, manifest)
    if as_json:
        typer.echo(json.dumps({**manifest.to_json(), "trust": verdict.to_json()}, indent=2))
        return
    typer.echo(summary(manifest))
    typer.echo(f"trust        {verdict.level}: {verdict.reason}")
    for line in verdict.evidence:
        typer.echo(f"  {line}")
