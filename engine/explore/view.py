"""The dashboard's backend: everything its pages show that is not drawing (no Streamlit here).

``RunView`` is a ``QueryEngine`` plus what depends only on the run (PCA map, score totals, the
validation mosaic, thumbnails) and the validation-pair search; the dashboard opens one per run and
shares it between sessions.
"""

from __future__ import annotations

import base64
import functools
import io

import numpy as np
from PIL import Image

from engine.data.images import open_image
from engine.errors import RunError
from engine.explore.query import QueryEngine
from engine.search.faiss_ops import nearest
from engine.search.run_indexes import load_index

THUMB = 160  # largest side of a card's inline image
PIXELATED_BELOW = 128  # smaller images are upscaled without smoothing (crisp demo shapes)
MAP_POINTS = 1500  # training pairs drawn in the plots besides the shown ones


class RunView(QueryEngine):
    """A run as the dashboard shows it."""

    def thumbnail(self, rel: str) -> str:
        """An ``<img>`` tag with the pair's image inline (a data URI, at most THUMB pixels).

        Inline images arrive with the card's text in one element: no extra request per card.
        """
        return thumbnail_tag(self.image_ref(rel))

    @functools.cached_property
    def pca(self) -> np.ndarray:
        """(n_train, 2) PCA of the training image embeddings (numpy SVD), for the 2-D map."""
        x = self.train_image_emb - self.train_image_emb.mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return (x @ vt[:2].T).astype(np.float32)

    @functools.cached_property
    def train_ids(self) -> list[str]:
        return [str(r["id"]) for r in self.train]

    @functools.cached_property
    def map_sample(self) -> np.ndarray:
        """Sorted rows of at most ``MAP_POINTS`` training pairs, drawn once per run (seeded):
        the plots' background, the same for every selection and session."""
        n = len(self.train)
        if n <= MAP_POINTS:
            return np.arange(n)
        return np.sort(np.random.default_rng(0).choice(n, MAP_POINTS, replace=False))

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
    def total_scores(self) -> np.ndarray:
        """(n_train,) sum of each training pair's scores over the whole validation set."""
        scores = self.scores
        total = np.zeros(scores.shape[0], dtype=np.float64)
        for s in range(0, scores.shape[0], 4096):  # row blocks: bounded memory on big runs
            total[s : s + 4096] = np.asarray(scores[s : s + 4096], dtype=np.float64).sum(axis=1)
        return total.astype(np.float32)

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
