"""Hostile inputs on every page: uploads, captions and ids in the URL each get one clear message
(or a result), the app keeps running, memory stays bounded, and nothing is written."""

from __future__ import annotations

import resource
from pathlib import Path

from streamlit.testing.v1 import AppTest

from dashboard import state, ui

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def _tree(folder: Path) -> list:
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _upload_page(run: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv(state.RUN_ENV, str(run))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    at.switch_page("views/upload.py").run()
    return at


def _submit(at: AppTest, raw: bytes, caption: str) -> AppTest:
    at.get("file_uploader")[0].upload("upload.png", raw, "image/png")
    at.text_input[0].input(caption)
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def test_hostile_uploads_and_captions(run_dir, monkeypatch, hostile_images, hostile_captions):
    before = _tree(run_dir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    at = _upload_page(run_dir, monkeypatch)
    for name, (raw, problem) in hostile_images.items():
        _submit(at, raw, "a red circle")
        errors = [e.value for e in at.error]
        if problem is None:
            assert not errors, (name, errors)
            assert at.session_state["upload-result"][2].positive, name
        else:
            assert len(errors) == 1 and problem in errors[0], (name, errors)
            assert "upload-result" not in at.session_state, name
    image = hostile_images["cmyk jpeg"][0]
    for name, (text, problem) in hostile_captions.items():
        _submit(at, image, text)
        errors = [e.value for e in at.error]
        if problem is None:
            assert not errors, (name, errors)
            result = at.session_state["upload-result"][2]
            heading = next(m.value for m in at.markdown if m.value.startswith("### "))
            assert heading == f"### “{ui.plain(result.caption)}”"  # shown as text, not markup
        else:
            assert errors == ["Type the caption the image should match."], (name, errors)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mib < 300, grown_mib  # no 400-megapixel decode, no 20 MB copies kept
    assert _tree(run_dir) == before


def test_hostile_ids_in_the_url(run_dir, monkeypatch, hostile_ids):
    before = _tree(run_dir)
    monkeypatch.setenv(state.RUN_ENV, str(run_dir))
    for bad in hostile_ids:
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["val"] = bad
        at.run()
        assert not at.exception, (bad, at.exception)
        (warning,) = [w.value for w in at.warning]
        said = f"No validation pair with id {ui.plain(bad)} in this run; pick one on the left."
        assert warning == said
        assert "<script>" not in warning and "](" not in warning.replace("\\](", "")
    assert _tree(run_dir) == before


def test_hostile_search_text(run_dir, monkeypatch, hostile_captions):
    before = _tree(run_dir)
    monkeypatch.setenv(state.RUN_ENV, str(run_dir))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    for mode in ("words", "meaning"):
        at.radio(key="picker-mode").set_value(mode)
        for text, _ in hostile_captions.values():
            at.text_input(key="picker-text").input(text).run()
            assert not at.exception, (mode, text[:40], at.exception)
            assert not at.error, (mode, text[:40])
    assert _tree(run_dir) == before


def test_plain_text_survives_markdown():
    assert ui.plain("**b** [x](y) <i> $m$ :red[c] `t`") == (
        "\\*\\*b\\*\\* \\[x\\](y) \\<i\\> \\$m\\$ \\:red\\[c\\] \\`t\\`"
    )
