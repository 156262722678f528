"""`trakview serve`: the run is checked first, then Streamlit is started on the dashboard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from engine import cli

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


class FakeStreamlit:
    started: list[tuple[list[str], dict]] = []

    def __init__(self, cmd, env=None):
        FakeStreamlit.started.append((cmd, env))

    def wait(self):
        return 0

    def send_signal(self, signum):
        raise AssertionError("no signal expected")


def test_serve_starts_streamlit_on_the_run(run_dir, monkeypatch):
    FakeStreamlit.started.clear()
    monkeypatch.setattr(subprocess, "Popen", FakeStreamlit)
    result = CliRunner().invoke(cli.app, ["serve", str(run_dir), "--port", "8642"])
    assert result.exit_code == 0, result.output
    assert "http://localhost:8642, this machine only" in result.output.splitlines()[0]
    ((cmd, env),) = FakeStreamlit.started
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(cmd[4]) == APP
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--server.port"] == "8642"
    assert flags["--server.headless"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false"
    assert flags["--server.address"] == "127.0.0.1"  # not every interface
    assert flags["--server.enableXsrfProtection"] == "true"
    assert flags["--server.maxUploadSize"] == "20"
    assert env["TRAKVIEW_RUN"] == str(run_dir.resolve())
    FakeStreamlit.started.clear()
    args = ["serve", str(run_dir), "--host", "0.0.0.0", "--base-url-path", "tv"]
    result = CliRunner().invoke(cli.app, args)
    first = result.output.splitlines()[0]
    assert "http://0.0.0.0:8501/tv" in first and "EXPOSED on 0.0.0.0" in first
    ((cmd, _),) = FakeStreamlit.started
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--server.address"] == "0.0.0.0" and flags["--server.baseUrlPath"] == "tv"


def test_serve_refuses_a_bad_run_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: run directory {tmp_path / 'nope'} does not exist; build one with `trakview build`"
    ]
