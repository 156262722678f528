"""The dashboard's backend: everything its pages show that is not drawing (no Streamlit here).

``RunView`` is a run's stored results (``RunData``) plus what depends only on the run (PCA map,
score totals, the validation mosaic, thumbnails) and the validation-pair search; the dashboard
opens one per run and shares it between sessions. New queries and searches by meaning go to a
``QueryEngine`` made on first use: opening a run imports neither torch nor open_clip.
"""

from __future__ import annotations

import base64
import functools
import io
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from engine.attribution.summaries import top_rows
from engine.data.images import open_image
from engine.errors import RunError
from engine.explore.results import QueryResult
from engine.explore.run_data import RunData
from engine.search.faiss_ops import nearest
from engine.search.run_indexes import load_index

THUMB = 160  # largest side of a card's inline image
if TYPE_CHECKING:
    from engine.explore.query import QueryEngine

RANKED = 50  # the most and least of a per-pair array kept sorted (the largest k shown)
PIXELATED_BELOW = 128  # smaller images are upscaled without smoothing (crisp demo shapes)


class RunView(RunData):
    """A run as the dashboard shows it."""

    @classmethod
    def load(cls, run: str | os.PathLike) -> RunView:
        return cls(run)

    @functools.cached_property
    def engine(self) -> QueryEngine:
        """The run's query engine (checkpoints load on its first query), made on first use."""
        from engine.explore.query import QueryEngine

        return QueryEngine.load(self.run)

    def query(self, image: Image.Image, caption: str, k: int = 10) -> QueryResult:
        """A new image and caption's influencers (``QueryEngine.query``)."""
        return self.engine.query(image, caption, k)

    def embed_text(self, text: str) -> np.ndarray:
        """(M*d,) ensemble CLIP text embedding of a free text (``QueryEngine.embed_text``)."""
        return self.engine.embed_text(text)

    def thumbnail(self, rel: str) -> str:
        """An ``<img>`` tag with the pair's image inline (a data URI, at most THUMB pixels).

        Inline images arrive with the card's text in one element: no extra request per card.
        """
        return thumbnail_tag(self.image_ref(rel))

    @functools.cached_property
    def _pca(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and first two principal axes of the training image embeddings, fitted on the
        plots' sample (numpy SVD): the same map for every selection, at any training size."""
        x = np.asarray(self.train_image_emb[self.map_sample], dtype=np.float64)
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        return mean, vt[:2]

    def map_coordinates(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 2) float32 the map (PCA) coordinates of some training images."""
        mean, axes = self._pca
        return ((np.asarray(self.train_image_emb[rows]) - mean) @ axes.T).astype(np.float32)

    def val_map(self) -> np.ndarray:
        """(n_val, 2) float32 the validation images on the same map (the training map's axes)."""
        mean, axes = self._pca
        return ((np.asarray(self.val_image_emb) - mean) @ axes.T).astype(np.float32)

    @functools.cached_property
    def val_mosaic(self) -> Image.Image:
        """A 4x4 mosaic of the first validation images: the exports' picture of the whole set."""
        side = 64
        mosaic = Image.new("RGB", (4 * side, 4 * side), "white")
        for i, rec in enumerate(self.val[:16]):
            thumb = self.image(rec["image"]).resize((side, side))
            mosaic.paste(thumb, (side * (i % 4), side * (i // 4)))
        return mosaic

    @functools.cached_property
    def ranked_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """The ``RANKED`` training rows of the highest and of the lowest score totals."""
        return top_rows(self.total_scores, RANKED), top_rows(-self.total_scores, RANKED)

    @functools.cached_property
    def ranked_suspects(self) -> np.ndarray:
        """The ``RANKED`` most suspect training rows (the run must have a suspect ranking)."""
        return top_rows(self.suspect, RANKED)

    @property
    def total_scores(self) -> np.ndarray:
        """(n_train,) sum of each training pair's scores over the whole validation set."""
        return self.scores.totals

    @functools.cached_property
    def _val_indexes(self) -> dict[str, object] | None:
        """The run's faiss indexes of the val captions and images, None if it has none."""
        try:
            return {m: load_index(self.run, f"val_{m}") for m in ("text", "image")}
        except RunError:
            return None

    def val_relevance(self, q: np.ndarray) -> np.ndarray:
        """(n_val,) mean cosine of a query embedding with each val caption and val image."""
        n_val = len(self.val)
        if self._val_indexes is not None:
            relevance = np.zeros(n_val, dtype=np.float32)
            for ix in self._val_indexes.values():
                sims, ids = nearest(ix, q, k=n_val)  # (1, n_val) each
                relevance[ids[0]] += sims[0] / 2
            return relevance
        text = np.load(self.layout.embeddings("val", "text"), mmap_mode="r")
        return (np.asarray(text) @ q + self.val_image_emb @ q) / 2

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
def thumbnail_tag(ref: str) -> str:
    """An ``<img>`` tag of the image ``ref`` (a path or a shard member) at most THUMB pixels,
    inline as a WebP data URI (quality 90: a fifth of a PNG's bytes, the same to the eye, also
    for the demo's noisy 64-pixel images). Shared by every session of the process."""
    img = open_image(ref)
    small = max(img.size) < PIXELATED_BELOW  # shown upscaled by the browser, without smoothing
    img.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, format="WEBP", quality=90)
    uri = "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="tv-img{" px" if small else ""}" src="{uri}" alt="">'
