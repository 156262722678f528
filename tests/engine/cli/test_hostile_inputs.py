"""Hostile inputs on the command line: every bad image, caption or id gets one clear error line
and writes nothing; every usable one gets its influencers."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.data.images import open_query_image
from engine.errors import InputError, TrakviewError


def _tree(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_every_hostile_image_opens_or_gets_its_reason(hostile_images):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for name, (raw, problem) in hostile_images.items():
        if name == "20 MB + 1":  # a file on the command line has no upload limit
            continue
        if problem is None:
            img = open_query_image(raw)
            assert img.mode == "RGB" and min(img.size) > 0, name
        else:
            with pytest.raises(InputError, match=problem):
                open_query_image(raw)
    # the decompression bomb was refused from its header: nothing near 400 MP was decoded
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mib < 200, grown_mib


def test_exif_orientation_is_applied(hostile_images):
    img = open_query_image(hostile_images["exif-rotated jpeg"][0])
    assert img.size == (80, 96)  # the 96 x 80 image, turned upright


def test_query_and_export_refuse_bad_input_in_one_line(
    run_dir, tmp_path, hostile_images, hostile_captions, hostile_ids
):
    before = _tree(run_dir)
    runner = CliRunner()
    image = tmp_path / "ok.png"
    image.write_bytes(hostile_images["palette+alpha png"][0])
    for name, (raw, problem) in hostile_images.items():
        path = tmp_path / f"{name.replace(' ', '_')}.img"
        path.write_bytes(raw)
        result = runner.invoke(app, ["query", str(run_dir), "--image", str(path), "--caption", "x"])
        if problem is None or name == "20 MB + 1":
            assert result.exit_code == 0, (name, result.output, result.exception)
        else:
            assert isinstance(result.exception, InputError), (name, result.exception)
            assert problem in str(result.exception), name
    for name, (text, problem) in hostile_captions.items():
        result = runner.invoke(
            app, ["query", str(run_dir), "--image", str(image), "--caption", text, "--json"]
        )
        if problem is None:
            assert result.exit_code == 0, (name, result.output, result.exception)
        else:
            assert problem in str(result.exception), name
    for bad in hostile_ids:
        out = tmp_path / "x.json"
        result = runner.invoke(
            app, ["export", str(run_dir), "--val", bad, "--format", "json", "--out", str(out)]
        )
        assert isinstance(result.exception, TrakviewError) and "unknown validation id" in str(
            result.exception
        )
        assert not out.exists()
    assert _tree(run_dir) == before  # nothing written into the run
    # as a user sees it: one line on stderr, exit status 2, no traceback
    bomb = tmp_path / "decompression_bomb.img"
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "query", str(run_dir), "--image", str(bomb)]
        + ["--caption", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: image ") and "downscale it first" in line
