"""Which run the dashboard shows, opened once per server process and shared by all sessions."""

from __future__ import annotations

import base64
import functools
import io
import os
import sys
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from engine import data, embed, index, runs, store
from engine.query import Influencer, QueryEngine, QueryResult

RUN_ENV = "TRAKVIEW_RUN"
THUMB = 160  # largest side of a card's inline image
PIXELATED_BELOW = 128  # smaller images are upscaled without smoothing (crisp demo shapes)


def run_dir(argv: list[str] | None = None) -> Path | None:
    """The run to show: ``--run DIR`` after ``--`` on the command line, else $TRAKVIEW_RUN."""
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--run" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--run="):
            return Path(arg.split("=", 1)[1])
    env = os.environ.get(RUN_ENV)
    return Path(env) if env else None


@dataclass
class Run:
    """A loaded run: the query engine plus the per-run arrays the pages draw."""

    path: Path
    engine: QueryEngine
    caption_rank: np.ndarray  # (n_val,) rank of the pair's own caption, 1 = best
    suspect: np.ndarray | None  # (n_train,) higher = more likely mislabeled
    # The engine's models are loaded lazily and are not safe to use from two sessions at once.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def train(self) -> list[dict]:
        return self.engine.train

    @property
    def val(self) -> list[dict]:
        return self.engine.val

    def image_path(self, rel: str) -> str:
        """A pair's image file (paths are relative to the run directory, or absolute; an image
        inside a WebDataset shard is extracted once into the run's cache)."""
        path = rel if Path(rel).is_absolute() else str(self.path / rel)
        return str(data.materialize(path, self.path / "cache" / "images"))

    def thumbnail(self, rel: str) -> str:
        """An ``<img>`` tag with the pair's image inline (a data URI, at most THUMB pixels).

        Inline images arrive with the card's text in one element: no extra request per card.
        """
        return _thumbnail_tag(self.image_path(rel))

    @cached_property
    def pca(self) -> np.ndarray:
        """(n_train, 2) PCA of the training image embeddings (numpy SVD), for the 2-D map."""
        x = self.engine.train_image_emb - self.engine.train_image_emb.mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return (x @ vt[:2].T).astype(np.float32)

    @cached_property
    def val_mosaic(self) -> Image.Image:
        """A 4x4 mosaic of the first validation images: the exports' picture of the whole set."""
        side = 64
        mosaic = Image.new("RGB", (4 * side, 4 * side), "white")
        for i, rec in enumerate(self.val[:16]):
            with Image.open(self.image_path(rec["image"])) as img:
                thumb = img.convert("RGB").resize((side, side))
            mosaic.paste(thumb, (side * (i % 4), side * (i // 4)))
        return mosaic

    @cached_property
    def total_scores(self) -> np.ndarray:
        """(n_train,) sum of each training pair's scores over the whole validation set."""
        scores = self.engine.scores
        total = np.zeros(scores.shape[0], dtype=np.float64)
        for s in range(0, scores.shape[0], 4096):  # row blocks: bounded memory on big runs
            total[s : s + 4096] = np.asarray(scores[s : s + 4096], dtype=np.float64).sum(axis=1)
        return total.astype(np.float32)

    def cards(self, rows: np.ndarray, values: np.ndarray, sign: str) -> list[Influencer]:
        """Gallery cards for training rows, ranked in the given order."""
        return self.engine.cards(rows, values, sign)

    def for_val(self, val_id: str, k: int) -> QueryResult:
        return self.engine.for_val(val_id, k)

    def query(self, image: Image.Image, caption: str, k: int) -> QueryResult:
        with self.lock:
            return self.engine.query(image, caption, k)

    def embed_text(self, text: str) -> np.ndarray:
        """(M*d,) ensemble CLIP text embedding of a free-text query (unit norm)."""
        with self.lock:
            loaded = self.engine._load_models()
            tokens = data.tokenize(self.engine.bundle.tokenizer, [text.strip()])
            per_ckpt = [
                embed.encode(m["model"], None, tokens, device=self.engine.device)[1].numpy()
                for m in loaded
            ]
        return embed.ensemble(per_ckpt)[0]

    @cached_property
    def _val_indexes(self) -> dict[str, object] | None:
        """The run's faiss indexes of the val captions and images, None if it has none."""
        try:
            return {m: index.load_index(self.path, f"val_{m}") for m in ("text", "image")}
        except store.RunError:
            return None

    def val_relevance(self, q: np.ndarray) -> np.ndarray:
        """(n_val,) mean cosine of a query embedding with each val caption and val image."""
        n_val = len(self.val)
        if self._val_indexes is not None:
            relevance = np.zeros(n_val, dtype=np.float32)
            for ix in self._val_indexes.values():
                sims, ids = index.nearest(ix, q, k=n_val)  # (1, n_val) each
                relevance[ids[0]] += sims[0] / 2
            return relevance
        text = store.load_npy(store.embeddings_path(self.path, "val", "text"), mmap=True)
        return (np.asarray(text) @ q + self.engine.val_image_emb @ q) / 2

    def search_val(self, text: str, mode: str) -> list[int]:
        """Validation rows matching a query, best first.

        ``mode="meaning"`` ranks every pair by the mean cosine of the query's CLIP text embedding
        with the pair's caption and image embeddings; ``mode="words"`` keeps the pairs whose
        caption or id contains the text (case-insensitive), in file order.
        """
        text = text.strip()
        if not text:
            return list(range(len(self.val)))
        if mode == "words":
            needle = text.lower()
            return [
                j
                for j, rec in enumerate(self.val)
                if needle in rec["caption"].lower() or needle in str(rec["id"]).lower()
            ]
        relevance = self.val_relevance(self.embed_text(text))
        return np.argsort(-relevance, kind="stable").tolist()


@functools.lru_cache(maxsize=8192)
def _thumbnail_tag(path: str) -> str:
    with Image.open(path) as img:
        img = img.convert("RGB")
    small = max(img.size) < PIXELATED_BELOW  # shown upscaled by the browser, without smoothing
    img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="tv-img{" px" if small else ""}" src="{uri}" alt="">'


@st.cache_resource(show_spinner="Opening the run…")
def load_run(path: str) -> Run:
    """Opens a run once per server process (``runs.read_manifest`` refuses a bad one)."""
    run = Path(path)
    runs.read_manifest(run)
    engine = QueryEngine.load(run)
    suspect = run / "suspect_mislabeled.npy"
    return Run(
        path=run,
        engine=engine,
        caption_rank=store.load_npy(run / "val_caption_rank.npy"),
        suspect=store.load_npy(suspect) if suspect.is_file() else None,
    )


def open_run() -> Run:
    """The run of this server, or a clear error on the page (and the page stops)."""
    path = run_dir()
    if path is None:
        st.error(
            "No run to show. Start the dashboard with `trakview serve RUN` "
            f"(or set ${RUN_ENV}, or pass `-- --run RUN` to `streamlit run`)."
        )
        st.stop()
    try:
        return load_run(str(path.resolve()))
    except (store.RunError, FileNotFoundError, ValueError) as err:
        st.error(f"Cannot open the run: {err}")
        st.stop()
