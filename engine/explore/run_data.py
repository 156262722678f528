"""A finished run opened for reading: its manifest, pair lists and stored arrays.

``RunData`` opens what every explorer needs (validation records and statistics; the training
records, embeddings and scores read on demand) and answers a validation pair's influencers from
the run's per-pair summaries: O(k) reads, whatever the size of the training set.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image

from engine import files
from engine.attribution.summaries import top_rows
from engine.attribution.suspects import suspect_signals
from engine.data.images import materialize, open_image
from engine.errors import InputError
from engine.explore.results import Influencer, Points, QueryResult, make_cards
from engine.explore.scores import StoredScores
from engine.explore.trust import Verdict, run_verdict
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

MAP_POINTS = 800  # training pairs drawn in the plots besides the shown ones


class RunData:
    """A finished run's stored results (``open_manifest`` refuses an unfinished one)."""

    def __init__(self, run: str | os.PathLike) -> None:
        self.run = Path(run)
        self.layout = RunLayout(self.run)
        self.manifest = open_manifest(self.run)
        self.cfg = self.manifest.config
        self.n_models = self.manifest.n_models
        self.train = files.JsonLines(self.layout.pairs("train"))  # records read on demand
        self.val = files.read_jsonl(self.layout.pairs("val"))
        self.val_index = {str(r["id"]): j for j, r in enumerate(self.val)}
        self.scores = StoredScores(self.layout, self.manifest)
        # (n_train, M*d) mapped, not read: a selection touches a few hundred of its rows
        self.train_image_emb = files.load_npy(self.layout.embeddings("train", "image"), mmap=True)
        self.val_image_emb = files.load_npy(self.layout.embeddings("val", "image"))
        self.val_clip_sim = files.load_npy(self.layout.clip_sim("val"))
        self.val_margin = files.load_npy(self.layout.margin("val"))

    @functools.cached_property
    def val_caption_rank(self) -> np.ndarray:
        """(n_val,) rank of each validation pair's own caption, 1 = best."""
        return files.load_npy(self.layout.caption_rank("val"))

    @functools.cached_property
    def suspect(self) -> np.ndarray | None:
        """(n_train,) suspected-mislabeled ranking (higher = more suspect), if the run has one."""
        path = self.layout.suspect
        return files.load_npy(path) if path.is_file() else None

    def suspect_signals(self) -> dict[str, np.ndarray]:
        """Every suspected-mislabeled signal of the training pairs (higher = more suspect)."""
        return suspect_signals(
            files.load_npy(self.layout.self_influence),
            files.load_npy(self.layout.clip_sim("train")),
            files.load_npy(self.layout.caption_rank("train")),
        )

    def image_ref(self, rel: str) -> str:
        """A pair's image as ``open_image`` reads it, writing nothing: a path (paths are relative
        to the run directory, or absolute) or ``SHARD.tar::MEMBER``."""
        return rel if Path(rel).is_absolute() else str(self.run / rel)

    def image(self, rel: str) -> Image.Image:
        """A pair's image, decoded in memory (a shard member too), as RGB."""
        return open_image(self.image_ref(rel))

    def image_path(self, rel: str) -> str:
        """A pair's image as a file, for viewers that need one (the command line): an image
        inside a WebDataset shard is extracted once into the run's cache."""
        return str(materialize(self.image_ref(rel), self.layout.image_cache))

    def val_position(self, val_id: str) -> int:
        """Row of a validation id, with a clear error for an unknown one."""
        if str(val_id) not in self.val_index:
            examples = ", ".join(list(self.val_index)[:3])
            raise InputError(
                f"unknown validation id {val_id!r}; ids look like {examples} (see val.jsonl)"
            )
        return self.val_index[str(val_id)]

    def cards(self, order: np.ndarray, values: np.ndarray, sign: str) -> list[Influencer]:
        """Gallery cards for training rows ``order`` (strongest first), scored by ``values``
        (one value per training pair)."""
        return make_cards(self.train, order, values[order], sign)

    @functools.cached_property
    def map_sample(self) -> np.ndarray:
        """Sorted rows of at most ``MAP_POINTS`` training pairs, drawn once per run (seeded):
        the plots' background, the same for every selection and session."""
        n = len(self.train)
        if n <= MAP_POINTS:
            return np.arange(n)
        return np.sort(np.random.default_rng(0).choice(n, MAP_POINTS, replace=False))

    def similarity(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """(len(rows),) float32 mean cosine of some training images with a (M*d,) embedding."""
        return (np.asarray(self.train_image_emb[rows]) @ query).astype(np.float32)

    def verdict(self) -> Verdict:
        """Can this run's attributions be trusted? (Read anew: an evaluation may finish while
        the run is open.)"""
        return run_verdict(self.run, self.manifest)

    def with_trust(self, result: QueryResult) -> QueryResult:
        """``result`` carrying the run's verdict, and a note saying it when it is not reliable."""
        verdict = self.verdict()
        result.trust = verdict.to_json()
        if not verdict.reliable:
            result.notes.append(f"trust: {verdict.level}: {verdict.reason}")
        return result

    def for_val(self, val_id: str, k: int = 10) -> QueryResult:
        """A validation pair's influencers from what the run stores (O(k) reads; a full column
        is recomputed only for a k above the run's top-k)."""
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        j = self.val_position(val_id)
        rec = self.val[j]
        k = min(k, len(self.train))
        pos, pos_scores, neg, neg_scores = self.scores.top(j, k)
        near, near_scores = self._similar(j, k)
        drawn = np.union1d(self.map_sample, np.concatenate([pos, neg]))
        result = QueryResult(
            caption=rec["caption"],
            positive=make_cards(self.train, pos, pos_scores, "positive"),
            negative=make_cards(self.train, neg, neg_scores, "negative"),
            similar=make_cards(self.train, near, near_scores, "similar"),
            clip_similarity=float(self.val_clip_sim[j]),
            margin=float(self.val_margin[j]),
            histogram=self.scores.histogram(j),
            points=Points(
                drawn,
                self.scores.scores_of(j, drawn),
                self.similarity(drawn, self.val_image_emb[j]),
            ),
            val_id=str(rec["id"]),
            image=rec["image"],
        )
        return self.with_trust(result)

    def _similar(self, j: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k training images most similar to validation pair j's, and their similarity."""
        if self.layout.similar.is_file():
            stored = files.load_npy(self.layout.similar, mmap=True)
            if k <= stored.shape[1]:
                scores = files.load_npy(self.layout.similar_scores, mmap=True)
                return np.asarray(stored[j, :k]), np.asarray(scores[j, :k])
        similarity = self.similarity(np.arange(len(self.train)), self.val_image_emb[j])
        near = top_rows(similarity, k)
        return near, similarity[near]
