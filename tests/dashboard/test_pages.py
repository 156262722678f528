"""Every dashboard page on a real (small) run, driven through Streamlit's AppTest.

What a page shows is checked against the run's arrays read here with numpy: the influencers of a
validation pair are the argsort of its column of scores.npy, the overall ones the argsort of the
row sums, the suspects the argsort of suspect_mislabeled.npy.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard import state
from engine.data.loading import tokenize
from engine.explore.view import RunView
from engine.models import embed
from engine.models.checkpoints import load_into
from engine.models.factory import create

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def app(run: Path, monkeypatch, query_params: dict | None = None) -> AppTest:
    monkeypatch.setenv(state.RUN_ENV, str(run))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params.update(query_params or {})
    return at.run()


def ids_shown(at: AppTest, prefix: str) -> list[str]:
    """Labels (training ids) of a gallery's card buttons, in the order drawn."""
    return [b.label for b in at.button if b.key and b.key.startswith(prefix)]


def picker_ids(at: AppTest) -> list[str]:
    """The picker's pair ids in reading order: it fills its 3 columns in turn (pair n in column
    n % 3), and AppTest lists elements column by column."""
    labels = [b.label for b in at.button if b.key and b.key.startswith("pick-")]
    columns, start = [], 0
    for c in range(3):
        size = len(range(c, len(labels), 3))
        columns.append(labels[start : start + size])
        start += size
    return [columns[n % 3][n // 3] for n in range(len(labels))]


def top(values: np.ndarray, k: int, records: list[dict]) -> list[str]:
    return [str(records[i]["id"]) for i in np.argsort(-values, kind="stable")[:k]]


def header(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("### "))


def test_explore_shows_a_pairs_influencers_in_score_order(run_dir, monkeypatch, arrays):
    at = app(run_dir, monkeypatch)
    assert not at.exception
    j, val, train = 0, arrays["val"], arrays["train"]
    assert header(at) == f"### “{val[j]['caption']}”"
    k = at.slider(key="ex-k").value
    column = arrays["scores"][:, j]
    assert ids_shown(at, "ex-pos-open-") == top(column, k, train)
    assert ids_shown(at, "ex-neg-open-") == top(-column, k, train)
    similarity = arrays["train_img"] @ arrays["val_img"][j]
    assert ids_shown(at, "ex-sim-open-") == top(similarity, k, train)
    assert at.query_params["val"] == str(val[j]["id"])
    # the score printed on the first card is the stored score
    best = int(np.argmax(column))
    assert any(f"{column[best]:+.4f}" in m.value for m in at.markdown)
    assert [b.label for b in at.get("download_button")] == ["ZIP", "HTML", "PNG", "CSV"]
    # the plots are drawn only while their section is open, and it stays open on a new pair
    assert not at.get("plotly_chart")
    at.session_state["ex-plots"] = True
    at.run()
    assert len(at.get("plotly_chart")) == 2  # score histogram; influence vs similarity + map
    at.button(key=f"pick-{val[1]['id']}").click().run()
    assert header(at) == f"### “{val[1]['caption']}”"
    assert len(at.get("plotly_chart")) == 2


def test_explore_deep_link_k_and_picker(run_dir, monkeypatch, arrays):
    val, train, scores = arrays["val"], arrays["train"], arrays["scores"]
    j = 7
    at = app(run_dir, monkeypatch, {"val": str(val[j]["id"])})
    assert header(at) == f"### “{val[j]['caption']}”"
    at.slider(key="ex-k").set_value(3).run()
    assert ids_shown(at, "ex-pos-open-") == top(scores[:, j], 3, train)
    assert ids_shown(at, "ex-neg-open-") == top(-scores[:, j], 3, train)
    # a click in the thumbnail grid selects that pair and moves the URL along
    at.button(key=f"pick-{val[2]['id']}").click().run()
    assert header(at) == f"### “{val[2]['caption']}”"
    assert at.query_params["val"] == str(val[2]["id"])
    assert ids_shown(at, "ex-pos-open-") == top(scores[:, 2], 3, train)
    at.button(key="picker-random").click().run()
    assert at.query_params["val"] in {str(r["id"]) for r in val}


def test_explore_unknown_deep_link_warns(run_dir, monkeypatch, arrays):
    at = app(run_dir, monkeypatch, {"val": "no-such-id"})
    assert not at.exception
    assert "no-such-id" in at.warning[0].value
    assert header(at) == f"### “{arrays['val'][0]['caption']}”"


def test_search_by_words_and_by_meaning(run_dir, monkeypatch, arrays, checkpoints):
    val = arrays["val"]
    at = app(run_dir, monkeypatch)
    at.radio(key="picker-mode").set_value("words")
    at.text_input(key="picker-text").input("circle").run()
    expected = [str(r["id"]) for r in val if "circle" in r["caption"].lower()]
    assert expected, "the small world should have circles"
    shown = picker_ids(at)
    assert shown == expected[: len(shown)] and len(shown) == min(12, len(expected))

    # by meaning: mean cosine of the query's CLIP text embedding with val captions and images,
    # recomputed here from the checkpoints
    query = "a big red square in the center"
    at.radio(key="picker-mode").set_value("meaning")
    at.text_input(key="picker-text").input(query).run()
    per_ckpt = []
    for path in checkpoints:
        bundle = create("trakview-tiny")
        load_into(bundle.model, path)
        tokens = tokenize(bundle.tokenizer, [query])
        with torch.no_grad():
            per_ckpt.append(embed.encode(bundle.model, None, tokens)[1].numpy())
    q = embed.ensemble(per_ckpt)[0]
    relevance = (arrays["val_txt"] @ q + arrays["val_img"] @ q) / 2
    assert picker_ids(at) == top(relevance, 12, val)


def test_card_opens_the_training_pair(run_dir, monkeypatch, arrays):
    at = app(run_dir, monkeypatch)
    best = int(np.argmax(arrays["scores"][:, 0]))
    at.button(key=f"ex-pos-open-{best}").click().run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert arrays["train"][best]["caption"] in text
    assert "Validation pairs it helps most" in text
    # the validation pair it helps most comes from the scores.npy row
    helped = str(arrays["val"][int(np.argmax(arrays["scores"][best]))]["id"])
    assert helped in [link.label for link in at.get("page_link")]


def png_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_runs_a_query(run_dir, monkeypatch, arrays):
    files_before = sorted(run_dir.rglob("*"))
    at = app(run_dir, monkeypatch)
    at.switch_page("views/upload.py").run()
    assert not at.exception
    j = 3
    rec = arrays["val"][j]
    at.get("file_uploader")[0].upload("pair.png", png_bytes(run_dir / rec["image"]), "image/png")
    at.text_input[0].input(rec["caption"])
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert header(at) == f"### “{rec['caption']}”"
    k = at.slider(key="up-k").value
    result = at.session_state["upload-result"][2]
    # the page shows the query's own top-k, and they are the argsort of its full score column
    pos = [b.label for b in at.button if b.key and b.key.startswith("up-") and "-pos-open" in b.key]
    assert pos == top(result.scores, k, arrays["train"])
    # the same image and caption as a stored validation pair: the same influencers as stored
    assert np.corrcoef(result.scores, arrays["scores"][:, j])[0, 1] > 0.99
    assert [b.label for b in at.get("download_button")] == ["ZIP", "HTML", "PNG", "CSV"]
    assert not at.get("plotly_chart")
    at.session_state["up-plots"] = True
    at.run()
    assert len(at.get("plotly_chart")) == 2 and not at.exception
    assert sorted(run_dir.rglob("*")) == files_before  # nothing written into the run


def test_upload_refuses_a_file_that_is_not_an_image(run_dir, monkeypatch):
    at = app(run_dir, monkeypatch)
    at.switch_page("views/upload.py").run()
    at.get("file_uploader")[0].upload("fake.png", b"not a png at all", "image/png")
    at.text_input[0].input("a red circle")
    at.button[0].click().run()
    assert not at.exception
    assert "is not an image PIL can read" in at.error[0].value


def test_overview_galleries(run_dir, monkeypatch, arrays):
    at = app(run_dir, monkeypatch)
    at.switch_page("views/overview.py").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Training pairs"] == f"{len(arrays['train']):,}"
    assert metrics["Validation pairs"] == f"{len(arrays['val']):,}"
    k = at.slider(key="ov-k").value
    total = arrays["scores"].astype(np.float64).sum(axis=1)
    assert ids_shown(at, "ov-pos-open-") == top(total, k, arrays["train"])
    assert ids_shown(at, "ov-neg-open-") == top(-total, k, arrays["train"])
    assert ids_shown(at, "ov-sus-open-") == top(arrays["suspect"], k, arrays["train"])
    # demo ground truth: a truly mislabeled suspect shows its true caption
    suspects = np.argsort(-arrays["suspect"], kind="stable")[:k]
    text = " ".join(m.value for m in at.markdown)
    for i in suspects:
        if arrays["train"][i].get("mislabeled"):
            assert arrays["train"][i]["true_caption"] in text
    assert len(at.get("download_button")) == 8


BAD_RUNS = {
    "missing": (None, "does not exist"),
    "incomplete": (("config.json", {}), "has not finished"),
    "other-version": (("manifest.json", {"format_version": 99}), "format version 99"),
}


@pytest.mark.parametrize("kind", BAD_RUNS)
@pytest.mark.parametrize("page", ["views/explore.py", "views/upload.py", "views/overview.py"])
def test_a_bad_run_shows_a_message(tmp_path, monkeypatch, kind, page):
    content, message = BAD_RUNS[kind]
    bad = tmp_path / "run"
    if content is not None:
        bad.mkdir()
        (bad / content[0]).write_text(json.dumps(content[1]))
    at = app(bad, monkeypatch)
    at.switch_page(page).run()
    assert not at.exception
    assert "Cannot open the run" in at.error[0].value and message in at.error[0].value


def test_run_dir_comes_from_the_command_line_or_the_environment(monkeypatch):
    monkeypatch.setenv(state.RUN_ENV, "/from/env")
    assert state.run_dir(["--run", "/from/argv"]) == Path("/from/argv")
    assert state.run_dir(["--run=/eq"]) == Path("/eq")
    assert state.run_dir([]) == Path("/from/env")
    monkeypatch.delenv(state.RUN_ENV)
    assert state.run_dir([]) is None


@pytest.mark.parametrize("faiss_index", [False, True], ids=["numpy", "faiss"])
def test_val_relevance_is_the_mean_cosine_with_captions_and_images(
    run_dir, arrays, tmp_path, faiss_index
):
    path = run_dir  # the build makes the search indexes
    if not faiss_index:  # a copy of the run without them: the numpy fallback
        path = tmp_path / "run"
        shutil.copytree(run_dir, path)
        shutil.rmtree(path / "index")
    assert (path / "index" / "val_text.faiss").is_file() == faiss_index
    run = RunView.load(path)
    assert (run._val_indexes is not None) == faiss_index
    q = np.random.default_rng(0).standard_normal(arrays["val_txt"].shape[1]).astype(np.float32)
    q /= np.linalg.norm(q)
    expected = (arrays["val_txt"] @ q + arrays["val_img"] @ q) / 2
    np.testing.assert_allclose(run.val_relevance(q), expected, rtol=1e-4, atol=1e-5)
