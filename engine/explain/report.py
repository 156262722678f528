"""A group's explanation, as ``trakview explain`` prints it and the Group page draws it.

1. The group: its validation pairs, how well they match against the rest (median caption rank,
   R@5, mean margin).
2. Its aggregated effect (``aggregate``): the training pairs that help and hurt the group's
   margins most, and how few carry most of it.
3. The confusion (``confusion``), for the pairs that prefer another caption: what they are
   matched to instead among the training captions, and the training pairs that drive those
   wrong matches (the **causes**, summed over the group).
4. What the top causes share (``describe``), and what the wrong captions share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import files
from engine.attribution.summaries import top_rows
from engine.explain import aggregate, confusion, describe
from engine.explain.groups import GroupSource, select_group
from engine.explain.rules import GroupSpec
from engine.explore.view import RunView

DESCRIBED = 100  # top training pairs whose shared features are shown
MAX_CONFUSED = 60  # failing pairs whose wrong matches are attributed (each costs new queries)
# Fields of the demo world that are its planted ground truth, not data a user would have: never
# offered as what causes share (a real data set's columns are all offered).
GROUND_TRUTH_FIELDS = ("planted_failure", "mislabeled", "true_caption", "near_duplicate_of", "rare")


def group_source(view: RunView) -> GroupSource:
    """What ``select_group`` needs, from an open run."""
    return GroupSource(
        val=view.val,
        caption_rank=view.val_caption_rank,
        margin=view.val_margin,
        search=view.search_val,
        val_map=view.val_map,
    )


def training_features(view: RunView) -> describe.TrainingFeatures:
    """The run's training features: caption words, categorical fields (not the demo's ground
    truth) and visual clusters (k-means of the training images' ensemble embeddings). Seconds
    for a million pairs: the dashboard computes them once per run."""
    clusters = describe.kmeans_clusters(files.load_npy(view.layout.embeddings("train", "image")))
    return describe.TrainingFeatures(view.train, clusters, skip_fields=GROUND_TRUTH_FIELDS)


def split_stats(view: RunView, rows: np.ndarray) -> dict[str, float]:
    """How well some validation pairs match: median caption rank, R@1/R@5, mean margin."""
    ranks = np.asarray(view.val_caption_rank)[rows]
    margins = np.asarray(view.val_margin)[rows]
    return {
        "pairs": int(len(rows)),
        "median_caption_rank": float(np.median(ranks)) if len(rows) else float("nan"),
        "r1": float((ranks <= 1).mean()) if len(rows) else float("nan"),
        "r5": float((ranks <= 5).mean()) if len(rows) else float("nan"),
        "mean_margin": float(margins.mean()) if len(rows) else float("nan"),
    }


@dataclass
class Confusion:
    """The wrong matches of a group's failing pairs and the training pairs behind them."""

    matches: list[confusion.WrongMatch]
    causes: np.ndarray  # (n_train,) float64: summed help to the wrong matches
    pairs_confused: int  # failing pairs attributed (at most MAX_CONFUSED)

    def top(self, k: int) -> np.ndarray:
        order = top_rows(self.causes, k)
        return order[self.causes[order] > 0]


@dataclass
class GroupReport:
    spec: GroupSpec
    rows: np.ndarray  # the group's validation rows
    stats: dict[str, float]
    rest: dict[str, float]  # the other validation pairs
    effect: aggregate.GroupEffect
    confusion: Confusion | None = None
    shared: list[describe.Feature] = field(default_factory=list)  # what the top causes share
    wrong_shared: list[describe.Feature] = field(default_factory=list)  # the wrong captions'

    def ranking(self) -> np.ndarray:
        """(n_train,) the group's cause ranking: help to the wrong matches when attributed, else
        harm to the group's margins (higher = more likely a cause)."""
        if self.confusion is not None:
            return self.confusion.causes
        return -self.effect.total

    def to_json(self, train: Any, val: list[dict[str, Any]], k: int = 10) -> dict[str, Any]:
        def cards(rows: np.ndarray, values: np.ndarray) -> list[dict[str, Any]]:
            return [
                {
                    "row": int(i),
                    "id": str(train[int(i)]["id"]),
                    "caption": train[int(i)]["caption"],
                    "score": float(values[int(i)]),
                }
                for i in rows
            ]

        out: dict[str, Any] = {
            "group": self.spec.param,
            "val_ids": [str(val[int(j)]["id"]) for j in self.rows],
            "stats": self.stats,
            "rest": self.rest,
            "helpful": cards(self.effect.helpful(k), self.effect.total),
            "harmful": cards(self.effect.harmful(k), self.effect.total),
            "concentration": self.effect.concentration(),
            "shared": [f.to_json() for f in self.shared],
        }
        if self.confusion is not None:
            c = self.confusion
            out["confusion"] = {
                "pairs_attributed": c.pairs_confused,
                "wrong_matches": [
                    {
                        **m.to_json(),
                        "val_id": str(val[m.val_row]["id"]),
                        "other_id": str(train[m.other_row]["id"]),
                        "other_caption": train[m.other_row]["caption"],
                    }
                    for m in c.matches
                ],
                "causes": cards(c.top(k), c.causes),
                "wrong_captions_share": [f.to_json() for f in self.wrong_shared],
            }
        return out


def explain_group(
    view: RunView,
    spec: GroupSpec,
    with_confusion: bool = True,
    per_pair: int = 3,
    progress: Callable[[int, int], None] | None = None,
    features: describe.TrainingFeatures | None = None,
) -> GroupReport:
    """The whole explanation of a group (see the module docstring); ``with_confusion`` costs
    one new query per wrong match (about 0.3 s each on the demo's CPU)."""
    rows = select_group(group_source(view), spec)
    rest = np.setdiff1d(np.arange(len(view.val)), rows)
    report = GroupReport(
        spec,
        rows,
        split_stats(view, rows),
        split_stats(view, rest),
        aggregate.group_effect(view.scores, rows),
    )
    features = features or training_features(view)
    if with_confusion:
        report.confusion = attribute_confusion(view, rows, per_pair, progress)
    if report.confusion is not None and report.confusion.matches:
        report.shared = describe.describe(features, report.confusion.top(DESCRIBED))
        others = [m.other_row for m in report.confusion.matches]
        report.wrong_shared = describe.describe(features, others, min_count=2)
    else:
        report.shared = describe.describe(features, report.effect.harmful(DESCRIBED))
    return report


def attribute_confusion(
    view: RunView,
    rows: np.ndarray,
    per_pair: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> Confusion | None:
    """The wrong matches among the training captions of (at most ``MAX_CONFUSED`` of) the
    group's pairs, worst-matched first, and every training pair's summed help to them."""
    ranks = np.asarray(view.val_caption_rank)[rows]
    chosen = rows[np.argsort(-ranks, kind="stable")][:MAX_CONFUSED]
    emb = {
        (s, m): files.load_npy(view.layout.embeddings(s, m), mmap=s == "train")
        for s in ("train", "val")
        for m in ("image", "text")
    }
    matches = confusion.wrong_matches(
        emb[("val", "image")],
        emb[("val", "text")],
        chosen,
        gallery_text=np.asarray(emb[("train", "text")]),
        gallery_image=np.asarray(emb[("train", "image")]),
        per_pair=per_pair,
    )
    if not matches:
        return None
    engine = view.engine
    total = confusion.confusion_gradients(
        matches,
        view.val,
        view.train,
        view.image,
        engine.batch_gradients,
        progress,
    )
    causes = view.scores.column_for(list(total)).astype(np.float64)
    return Confusion(matches, causes, int(len({m.val_row for m in matches})))


def read_new_pairs(path: Any) -> list[dict[str, Any]]:
    """The new pairs of a JSONL file: one ``{"image": PATH, "caption": TEXT}`` per line (an
    ``id`` is kept; image paths relative to the file), checked before anything is computed.

    Raises:
        InputError: no pair, a record without an image or caption, or an image that cannot be
            opened (each named with its line).
    """
    from pathlib import Path

    from engine.data.images import open_query_image
    from engine.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--pairs {path} does not exist; expected a JSONL file of image/caption")
    records = files.read_jsonl(path)
    if not records:
        raise InputError(f"--pairs {path} holds no pair; one JSON object per line")
    out = []
    for n, rec in enumerate(records, 1):
        if (
            not isinstance(rec, dict)
            or not rec.get("image")
            or not str(rec.get("caption", "")).strip()
        ):
            raise InputError(
                f"{path}:{n} needs an 'image' (a path) and a non-empty 'caption', got "
                f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}"
            )
        image = Path(str(rec["image"]))
        image = image if image.is_absolute() else path.parent / image
        try:
            open_query_image(image).close()
        except InputError as err:
            raise InputError(f"{path}:{n}: {err}") from err
        out.append(
            {
                "id": str(rec.get("id", f"pair-{n}")),
                "caption": str(rec["caption"]),
                "image": str(image),
            }
        )
    return out


def explain_pairs(
    view: RunView,
    pairs: list[dict[str, Any]],
    with_confusion: bool = True,
    per_pair: int = 3,
    progress: Callable[[int, int], None] | None = None,
    features: describe.TrainingFeatures | None = None,
) -> GroupReport:
    """A group of new pairs (``read_new_pairs``): their summed effect and confusion, computed
    as new queries with one loaded engine (the model load is paid once)."""
    from engine.data.images import open_query_image

    engine = view.engine
    grads, images, texts, margins = [], [], [], []
    for n, rec in enumerate(pairs, 1):
        image = open_query_image(rec["image"])
        g, img_emb, info = engine.target_gradients(image, rec["caption"])
        grads.append(np.asarray(g, np.float64))
        images.append(img_emb)
        texts.append(engine.embed_text(rec["caption"]))
        margins.append(info["margin"])
        if progress is not None:
            progress(n, len(pairs) * (2 if with_confusion else 1))
    total = view.scores.column_for(list(np.sum(grads, axis=0))).astype(np.float64)
    effect = aggregate.GroupEffect(np.zeros(0, np.int64), total)
    img, txt = np.stack(images), np.stack(texts)
    sims = (img * txt).sum(1)
    stats = {
        "pairs": len(pairs),
        "mean_margin": float(np.mean(margins)),
        "mean_clip_similarity": float(sims.mean()),
    }
    report = GroupReport(
        GroupSpec("pairs", f"{len(pairs)} new pairs"),
        np.zeros(0, np.int64),
        stats,
        split_stats(view, np.arange(len(view.val))),
        effect,
    )
    features = features or training_features(view)
    if with_confusion:
        train_txt = np.asarray(files.load_npy(view.layout.embeddings("train", "text"), mmap=True))
        matches = confusion.wrong_matches(
            img, txt, range(len(pairs)), gallery_text=train_txt, per_pair=per_pair
        )
        if matches:
            summed = confusion.confusion_gradients(
                matches, pairs, view.train, open_query_image, engine.batch_gradients, progress
            )
            causes = view.scores.column_for(list(summed)).astype(np.float64)
            report.confusion = Confusion(matches, causes, len({m.val_row for m in matches}))
            report.shared = describe.describe(features, report.confusion.top(DESCRIBED))
            report.wrong_shared = describe.describe(
                features, [m.other_row for m in matches], min_count=2
            )
    if report.confusion is None:
        report.shared = describe.describe(features, effect.harmful(DESCRIBED))
    return report
