"""The dashboard only reads its run: every page, a card's dialog, a search, an upload and the
export buttons leave the run directory as it was, images inside WebDataset shards included."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from streamlit.testing.v1 import AppTest

from dashboard import state
from engine.assemble.orchestrate import build
from engine.attribution.settings import BuildConfig
from engine.data.sources import read_source

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def _shard(pairs, path: Path) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(len(pairs)):
            for ext, payload in (
                (".png", pairs.image_path(i).read_bytes()),
                (".txt", pairs.captions[i].encode()),
            ):
                info = tarfile.TarInfo(f"{pairs.ids[i]}{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _tree(folder: Path) -> list:
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_every_page_leaves_a_webdataset_run_untouched(tmp_path, pairs, checkpoints, monkeypatch):
    train, val = (
        read_source(_shard(p, tmp_path / f"{s}.tar")) for s, p in zip("tv", pairs, strict=True)
    )
    cfg = BuildConfig(checkpoints=[str(c) for c in checkpoints], topk=5, projector="gaussian")
    run = build(train, val, cfg, tmp_path / "run")
    before = _tree(run)
    monkeypatch.setenv(state.RUN_ENV, str(run))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception, at.exception
    at.get("download_button")[0].click().run()  # the zip export, rendered in memory
    at.text_input(key="picker-text").input("a red circle").run()  # search by meaning
    card = next(b for b in at.button if b.key and b.key.startswith("ex-pos-open-"))
    card.click().run()  # the training pair's dialog, with the images it moves
    assert not at.exception, at.exception
    at.switch_page("views/upload.py").run()
    at.get("file_uploader")[0].upload("q.png", pairs[1].image_path(0).read_bytes(), "image/png")
    at.text_input[0].input(pairs[1].captions[0])
    at.button[0].click().run()
    at.switch_page("views/overview.py").run()
    assert not at.exception, at.exception
    assert _tree(run) == before
    assert not (run / "cache").exists()
