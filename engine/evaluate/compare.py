"""``trakview compare``: did the fix work? Two runs of the same validation pairs, compared.

A user removes a basket from run A's training set, retrains in their own way and builds run B.
Per validation pair (matched by id) this compares what each run measured of its own checkpoints:
the CLIP margin (``val_margin``: the model output TRAK attributes), the caption rank, and
image->text / text->image R@1 and R@5 among the matched pairs (the ensemble embeddings: mean
cosine over each run's checkpoints). Summaries are given overall and per group of validation
pairs (a column value, a caption search, the pairs the basket was predicted to move most), with
bootstrap intervals over the pairs (``engine.evaluate.compare_report``).

With the pairs that turned A's training set into B's (a basket of A, or else A's training ids
missing from B), TRAK's prediction is held against what B's models did: the predicted change of
pair j's margin is -sum_{i in R} score_ij of run A (the linear datamodel, TRAK paper Section 2;
``engine.curate.effect``). ``compare_report`` reports how well it agrees with the actual change
and renders the comparison as JSON and HTML.

Each run's margin is taken over its own simulated target batches, drawn from its own training
set: a removal also changes which training pairs a margin is contrasted with. When B's training
pairs are all A's, the change is also measured at a fixed contrast batch (``fixed``): A's
checkpoints' margins over B's batches, so that B minus that is the change of the models alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import files
from engine.curate import baskets, select
from engine.curate.effect import held_out_mask, summed_rows
from engine.errors import CompareError
from engine.explore.run_data import RunData
from engine.models.retrieval import retrieval_ranks

REMOVED = "removed pairs"  # the basket when none is named: A's training ids missing from B's
HITS = {
    "i2t_r1": "image->text R@1 among the matched pairs",
    "i2t_r5": "image->text R@5",
    "t2i_r1": "text->image R@1",
    "t2i_r5": "text->image R@5",
}
LISTED = 50  # ids listed of unmatched, removed and added pairs


@dataclass
class CompareConfig:
    """Settings of ``trakview compare`` (recorded with the result)."""

    basket: str | None = None  # run A's basket that made B's training set; None = detect
    columns: list[str] = field(default_factory=list)  # groups: validation pairs with KEY=VALUE
    searches: list[str] = field(default_factory=list)  # groups: caption or id contains a text
    top: int = 20  # groups: the pairs the basket was predicted to raise / lower most
    k: int = 10  # pairs listed as improved and as regressed most
    bootstrap: int = 1000  # resamples of the validation pairs for every interval
    seed: int = 0
    level: float = 0.95


@dataclass
class Comparison:
    """Two runs' measurements of their matched validation pairs, in run A's order."""

    a: RunData
    b: RunData
    cfg: CompareConfig
    rows_a: np.ndarray  # (n,) matched pairs' rows in A's val.jsonl
    rows_b: np.ndarray  # (n,) the same pairs' rows in B's
    margin_a: np.ndarray  # (n,) float64
    margin_b: np.ndarray
    rank_a: np.ndarray  # (n,) caption rank among each run's own validation captions
    rank_b: np.ndarray
    hits_a: dict[str, np.ndarray]  # HITS name -> (n,) 0/1 among the matched pairs
    hits_b: dict[str, np.ndarray]
    predicted: np.ndarray | None  # (n,) TRAK's predicted margin change; None: nothing removed
    fixed_a: np.ndarray | None  # (n,) A's margins over B's contrast batches (see module doc)
    basket: dict[str, Any] | None  # name, pairs, rows, in_b
    val: dict[str, Any]  # counts and ids of unmatched validation pairs
    train: dict[str, Any]  # counts and ids of removed / added training pairs
    groups: dict[str, np.ndarray]  # name -> positions among the matched pairs
    notes: list[str]
    gone: set[str] = field(default_factory=set)  # A's training ids missing from B's
    new: set[str] = field(default_factory=set)  # B's training ids missing from A's

    @property
    def ids(self) -> list[str]:
        return [str(self.a.val[int(j)]["id"]) for j in self.rows_a]

    @property
    def delta(self) -> np.ndarray:
        """(n,) each matched pair's margin in B minus in A (> 0: it matches better)."""
        return self.margin_b - self.margin_a

    @property
    def fixed_delta(self) -> np.ndarray | None:
        """(n,) B's margin minus A's models' over the same (B's) contrast batches."""
        return None if self.fixed_a is None else self.margin_b - self.fixed_a

    def position(self, val_id: str) -> int:
        """Position of a validation id among the matched pairs."""
        ids = self.ids
        if val_id not in ids:
            raise CompareError(f"validation pair {val_id!r} is not in both runs")
        return ids.index(val_id)

    def ranked(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the (at most) k pairs whose margin rose most, and fell most."""
        d = self.delta
        up = np.argsort(-d, kind="stable")[:k]
        down = np.argsort(d, kind="stable")[:k]
        return up[d[up] > 0], down[d[down] < 0]


def describe(data: RunData) -> dict[str, Any]:
    """What identifies a run in a comparison."""
    counts = data.manifest.counts
    return {
        "run": str(data.run),
        "model": data.cfg.model,
        "checkpoints": counts.n_checkpoints,
        "n_train": counts.n_train,
        "n_val": counts.n_val,
        "scores": "dense" if data.scores.dense else "topk",
        "format_version": data.manifest.format_version,
    }


def check_comparable(a: RunData, b: RunData) -> list[str]:
    """Refuses runs whose margins are not the same model output; returns notes on the
    differences that leave them comparable.

    Raises:
        CompareError: a different architecture or simulated batch size, saying which.
    """
    ca, cb = a.cfg, b.cfg
    if ca.model != cb.model:
        raise CompareError(
            f"the runs were built on different models: A ({a.run}) on {ca.model!r}, B ({b.run}) "
            f"on {cb.model!r}; margins of different architectures are not comparable: compare "
            "runs of one architecture"
        )
    if ca.sim_batch_size != cb.sim_batch_size:
        raise CompareError(
            f"the runs measure different model outputs: simulated batch size {ca.sim_batch_size} "
            f"in A ({a.run}), {cb.sim_batch_size} in B ({b.run}); the margins are not comparable: "
            f"build B again with --sim-batch-size {ca.sim_batch_size}"
        )
    notes = []
    if ca.seed != cb.seed:
        notes.append(
            f"the runs draw their contrast batches with other seeds ({ca.seed}, {cb.seed}): "
            "per-pair changes include that draw"
        )
    if ca.pretrained != cb.pretrained:
        notes.append(f"pretrained tags differ ({ca.pretrained!r}, {cb.pretrained!r})")
    return notes


def compare_runs(run_a: Any, run_b: Any, cfg: CompareConfig) -> Comparison:
    """Opens two finished runs and compares them (``compare``)."""
    return compare(RunData(run_a), RunData(run_b), cfg)


def compare(a: RunData, b: RunData, cfg: CompareConfig) -> Comparison:
    """Compares two runs' validation pairs (see the module doc).

    Raises:
        CompareError: the runs share no validation pair or measure incomparable margins.
    """
    notes = check_comparable(a, b)
    ids_a = [str(r["id"]) for r in a.val]
    rows_a = np.array([j for j, i in enumerate(ids_a) if i in b.val_index], dtype=np.int64)
    if rows_a.size == 0:
        raise CompareError(
            f"runs A ({a.run}) and B ({b.run}) share no validation pair: A's ids look like "
            f"{', '.join(ids_a[:3])}, B's like {', '.join(list(b.val_index)[:3])}; build B on "
            "the same validation set (--val-data)"
        )
    rows_b = np.array([b.val_index[ids_a[j]] for j in rows_a], dtype=np.int64)
    matched = set(ids_a[j] for j in rows_a)
    only_a = [i for i in ids_a if i not in matched]
    only_b = [i for i in b.val_index if i not in matched]
    val = {"n_a": len(ids_a), "n_b": len(b.val), "matched": int(rows_a.size)}
    val |= {"only_a": len(only_a), "only_b": len(only_b)}
    val |= {"only_a_ids": only_a[:LISTED], "only_b_ids": only_b[:LISTED]}
    captions = sum(
        a.val[int(j)]["caption"] != b.val[int(k)]["caption"]
        for j, k in zip(rows_a, rows_b, strict=True)
    )
    if captions:
        notes.append(f"{captions} matched validation pairs have another caption in B")
    if only_a or only_b:
        notes.append(
            f"caption ranks are among each run's own validation captions ({len(ids_a)} in A, "
            f"{len(b.val)} in B); R@k among the {rows_a.size} matched pairs"
        )

    train_a = [str(r["id"]) for r in a.train]
    train_b = [str(r["id"]) for r in b.train]
    in_a, in_b = set(train_a), set(train_b)
    removed = [i for i in train_a if i not in in_b]
    added = [i for i in train_b if i not in in_a]
    train = {"n_a": len(train_a), "n_b": len(train_b), "removed": len(removed)}
    train |= {"added": len(added), "removed_ids": removed[:LISTED], "added_ids": added[:LISTED]}

    basket, held = removal(a, cfg.basket, train_a, in_b, removed, notes)
    if added:
        notes.append(
            f"B's training set has {len(added)} pairs that A's lacks: TRAK's prediction covers "
            "only the pairs removed"
        )
    predicted = None
    if basket is not None:
        predicted = -summed_rows(a.scores, basket["rows"])[rows_a]
    fixed_a = None
    if not added and a.layout.checkpoint_embeddings("train", "image", 0).is_file():
        fixed_a = fixed_contrast_margin(a, b, train_b)[rows_a]

    hits_a, hits_b = (
        hits(
            files.load_npy(d.layout.embeddings("val", "image"))[rows],
            files.load_npy(d.layout.embeddings("val", "text"))[rows],
        )
        for d, rows in ((a, rows_a), (b, rows_b))
    )
    comparison = Comparison(
        a=a,
        b=b,
        cfg=cfg,
        rows_a=rows_a,
        rows_b=rows_b,
        margin_a=np.asarray(a.val_margin, np.float64)[rows_a],
        margin_b=np.asarray(b.val_margin, np.float64)[rows_b],
        rank_a=np.asarray(a.val_caption_rank)[rows_a],
        rank_b=np.asarray(b.val_caption_rank)[rows_b],
        hits_a=hits_a,
        hits_b=hits_b,
        predicted=predicted,
        fixed_a=fixed_a,
        basket=basket,
        val=val,
        train=train,
        groups={},
        notes=notes,
        gone=in_a - in_b,
        new=in_b - in_a,
    )
    comparison.groups = groups(comparison, cfg, None if held is None else held[rows_a])
    return comparison


def removal(
    a: RunData,
    name: str | None,
    train_a: list[str],
    in_b: set[str],
    removed: list[str],
    notes: list[str],
) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """The training pairs whose removal is predicted: run A's basket ``name``, else A's pairs
    missing from B. Returns the basket's description (with its rows) and, for a basket chosen
    with some validation pairs' scores, which validation pairs of A are held out."""
    if name is None:
        if not removed:
            notes.append(
                "B's training set holds every pair of A's: there is no removal to predict "
                "(TRAK predicts the effect of removing pairs)"
            )
            return None, None
        index = {i: r for r, i in enumerate(train_a)}
        rows = np.array([index[i] for i in removed], dtype=np.int64)
        return {"name": REMOVED, "pairs": len(removed), "rows": rows, "in_b": 0}, None
    basket = baskets.read_basket(a.layout, name)
    rows = baskets.basket_rows(basket, a.train)
    if rows.size == 0:
        raise CompareError(f"basket {name!r} of run A is empty: nothing to predict")
    still = sum(i in in_b for i in basket.ids)
    if still:
        notes.append(
            f"{still} of basket {name!r}'s {rows.size} pairs are still in B's training set: B "
            "was not trained without them, and the prediction assumes it was"
        )
    others = len(set(removed) - set(basket.ids))
    if others:
        notes.append(
            f"B's training set also lacks {others} of A's pairs that are not in the basket; "
            "the prediction covers the basket alone"
        )
    held = None
    if basket.chosen_with_val or basket.chosen_with_every_val:
        held = held_out_mask(basket, [str(r["id"]) for r in a.val])
    info = {"name": name, "pairs": int(rows.size), "rows": rows, "in_b": int(still)}
    return info, held


def hits(image: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
    """Per pair, 0/1 retrieval hits among the given pairs (ensemble embeddings, ties lose)."""
    i2t, t2i = retrieval_ranks(image, text)
    return {
        f"{name}_r{k}": (ranks <= k).astype(np.float64)
        for name, ranks in (("i2t", i2t), ("t2i", t2i))
        for k in (1, 5)
    }


def fixed_contrast_margin(a: RunData, b: RunData, train_b: list[str]) -> np.ndarray:
    """(n_val_a,) A's checkpoints' validation margins over B's simulated target batches (checkpoint
    m of A over B's batch m mod M_B), B's training pairs all being A's: B's margin minus this is
    the change of the models at a fixed contrast batch (``ensemble_margin`` of the build)."""
    # torch-free until asked: the dashboard opens runs without importing torch
    from engine.attribution.margin import SimulatedBatch
    from engine.models.embed import clip_margin

    index = {str(r["id"]): i for i, r in enumerate(a.train)}
    to_a = np.array([index[i] for i in train_b], dtype=np.int64)  # B's rows -> A's
    sim = SimulatedBatch(len(train_b), b.cfg.sim_batch_size, seed=b.cfg.seed)
    total = np.zeros(len(a.val), np.float64)
    for m in range(a.n_models):
        draw = to_a[sim.for_targets(1, m % b.n_models)[0].numpy()]  # (S,) A's rows
        emb = {
            (split, mod): files.load_npy(a.layout.checkpoint_embeddings(split, mod, m), mmap=True)
            for split in ("train", "val")
            for mod in ("image", "text")
        }
        va_img, va_txt = np.asarray(emb[("val", "image")]), np.asarray(emb[("val", "text")])
        shape = (va_img.shape[0], draw.size, va_img.shape[1])
        batch = [
            np.broadcast_to(np.asarray(emb[("train", mod)][draw]), shape)
            for mod in ("image", "text")
        ]
        total += clip_margin(va_img, va_txt, *batch)
    return total / a.n_models


def groups(c: Comparison, cfg: CompareConfig, held: np.ndarray | None) -> dict[str, np.ndarray]:
    """The groups of matched pairs summarised besides all of them, name -> positions."""
    records = [c.a.val[int(j)] for j in c.rows_a]
    out: dict[str, np.ndarray] = {}
    for spec in cfg.columns:
        key, sep, value = spec.partition("=")
        key, value = key.strip(), value.strip()
        fields = select.extra_fields(records)
        if not sep or key not in fields:
            raise CompareError(
                f"a column group is KEY=VALUE with KEY a field of the validation pairs "
                f"({', '.join(fields) or 'none'}), got {spec!r}"
            )
        at = [p for p, rec in enumerate(records) if select.field_text(rec.get(key)) == value]
        out[f"{key} = {value}"] = np.array(at, np.int64)
    for text in cfg.searches:
        needle = text.strip().lower()
        at = [
            p
            for p, rec in enumerate(records)
            if needle in str(rec["caption"]).lower() or needle in str(rec["id"]).lower()
        ]
        out[f"caption contains {text.strip()!r}"] = np.array(at, np.int64)
    if c.predicted is not None and cfg.top > 0:
        p = c.predicted
        up = np.argsort(-p, kind="stable")[: cfg.top]
        down = np.argsort(p, kind="stable")[: cfg.top]
        out[f"predicted to rise most ({cfg.top})"] = up[p[up] > 0]
        out[f"predicted to fall most ({cfg.top})"] = down[p[down] < 0]
    if held is not None:
        out["held out (did not choose the basket)"] = np.flatnonzero(held)
        out["chose the basket"] = np.flatnonzero(~held)
    return out
