"""Influencers of a new image–caption pair, computed exactly as the build scored its targets.

``QueryEngine.load(run)`` pays the costs once (checkpoints, projection matrix, TRAK features);
``engine.query(image, caption)`` then computes the pair's projected gradient for every checkpoint
with the build's model output, simulated-batch rule, parameters and projection, and scores every
training pair: score_i = mean_m(phi_m[i] . g_m) * mean_m(out_to_loss_m[i]) (TRAK paper, eq. 9 /
traker's ``finalize_scores``). ``engine.for_val(j)`` reads a validation pair's stored scores.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine import data, embed, models, runs, store
from engine.attribute import BuildConfig, projector_for
from engine.trak import (
    CheckpointStack,
    ClipMargin,
    SelectiveGradientComputer,
    SimulatedBatch,
    select_parameters,
)

# A new query differentiates every checkpoint in one vmap (CheckpointStack) when their weights
# together are at most this many numbers (a second copy of them is kept); else one by one.
STACK_MAX_ELEMENTS = 200_000_000


@dataclass
class Influencer:
    """One training pair in a gallery."""

    rank: int  # 1 = strongest
    sign: str  # "positive", "negative" or "similar" (nearest by CLIP similarity)
    index: int  # row in train.jsonl / scores.npy
    id: str
    caption: str
    image: str  # path as stored in train.jsonl (relative to the run directory, or absolute)
    score: float  # TRAK score, or the CLIP similarity for "similar"


@dataclass
class QueryResult:
    """A target (a validation pair or a new query) and its influencers."""

    caption: str
    positive: list[Influencer]
    negative: list[Influencer]
    similar: list[Influencer]  # nearest training pairs by CLIP similarity (image to image)
    clip_similarity: float  # mean cosine of the target's image and caption over the ensemble
    margin: float  # the CLIP margin (the attributed model output), mean over checkpoints
    scores: np.ndarray = field(repr=False)  # (n_train,) TRAK score of every training pair
    train_similarity: np.ndarray = field(repr=False)  # (n_train,) CLIP similarity to the target
    val_id: str | None = None
    image: str | None = None  # the validation pair's image path, when it is one
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Everything but the full arrays, as plain JSON types."""
        out = asdict(self)
        out.pop("scores")
        out.pop("train_similarity")
        return out


class QueryEngine:
    """A loaded run: checkpoints, projection and TRAK features, ready for queries."""

    def __init__(self, run: Path, device: str = "cpu") -> None:
        self.run = Path(run)
        self.manifest = runs.read_manifest(self.run)
        self.cfg = self.manifest["config"]
        self.device = device
        self.train = store.read_jsonl(store.pairs_path(self.run, "train"))
        self.val = store.read_jsonl(store.pairs_path(self.run, "val"))
        self.val_index = {str(r["id"]): j for j, r in enumerate(self.val)}
        self.n_models = self.manifest["counts"]["n_checkpoints"]
        self.scores = store.load_npy(store.scores_path(self.run), mmap=True)  # (n_train, n_val)
        self.train_image_emb = store.load_npy(store.embeddings_path(self.run, "train", "image"))
        self.val_image_emb = store.load_npy(store.embeddings_path(self.run, "val", "image"))
        self.val_clip_sim = store.load_npy(self.run / "val_clip_sim.npy")
        self.val_margin = store.load_npy(self.run / "val_margin.npy")
        self._models: list[dict[str, Any]] | None = None

    @classmethod
    def load(cls, run: str | os.PathLike, device: str = "cpu") -> QueryEngine:
        """Opens a run; checkpoints and features are loaded on the first new query."""
        return cls(Path(run), device)

    # --- stored targets ------------------------------------------------------------------------

    def val_position(self, val_id: str) -> int:
        """Row of a validation id, with a clear error for an unknown one."""
        if str(val_id) not in self.val_index:
            examples = ", ".join(list(self.val_index)[:3])
            raise data.InputError(
                f"unknown validation id {val_id!r}; ids look like {examples} (see val.jsonl)"
            )
        return self.val_index[str(val_id)]

    def for_val(self, val_id: str, k: int = 10) -> QueryResult:
        """A validation pair's influencers from the stored scores (nothing is recomputed)."""
        j = self.val_position(val_id)
        rec = self.val[j]
        column = np.asarray(self.scores[:, j], dtype=np.float32)
        similarity = self.train_image_emb @ self.val_image_emb[j]  # (n_train,)
        return self._result(
            rec["caption"],
            column,
            similarity,
            float(self.val_clip_sim[j]),
            float(self.val_margin[j]),
            k,
            val_id=str(rec["id"]),
            image=rec["image"],
        )

    # --- new queries ---------------------------------------------------------------------------

    def _load_models(self) -> list[dict[str, Any]]:
        """Per checkpoint: model, gradient computer and TRAK features (once per engine)."""
        if self._models is not None:
            return self._models
        if "fast_jl" in self.manifest.get("projection", "") and not self.device.startswith("cuda"):
            raise store.RunError(
                f"run {self.run} was projected with traker's CudaProjector (fast_jl), which "
                "runs only on CUDA, so a new query needs --device cuda (stored validation pairs "
                "open on any device)"
            )
        self.bundle = models.create(
            self.cfg["model"], device=self.device, pretrained=self.cfg.get("pretrained")
        )
        names = select_parameters(self.bundle.model, self.cfg["grad_params"])
        shapes = {n: tuple(p.shape) for n, p in self.bundle.model.named_parameters() if n in names}
        # runs built before --projector existed were projected with the dense Gaussian
        build_cfg = BuildConfig(**{"projector": "gaussian", **self.cfg, "device": self.device})
        self.projector = projector_for(self.bundle.model, build_cfg, names)
        # traker divides projected gradients by sqrt(#attributed parameters) (TRAKer.featurize)
        self.normalize = math.sqrt(sum(int(np.prod(s)) for s in shapes.values()))
        self.sim = SimulatedBatch(
            len(self.train), self.cfg["sim_batch_size"], seed=self.cfg["seed"]
        )
        loaded = []
        out_to_loss = 0.0
        for m, ckpt in enumerate(self.manifest["checkpoints"]):
            bundle = models.create(
                self.cfg["model"], device=self.device, pretrained=self.cfg.get("pretrained")
            )
            models.load_into(bundle.model, self.run / ckpt["path"])  # relative to the run
            task = ClipMargin()
            task.set_embeddings(
                torch.from_numpy(
                    store.load_npy(store.checkpoint_embeddings_path(self.run, "train", "image", m))
                ),
                torch.from_numpy(
                    store.load_npy(store.checkpoint_embeddings_path(self.run, "train", "text", m))
                ),
            )
            computer = SelectiveGradientComputer(
                bundle.model, task, 0, torch.float32, self.device, grad_wrt=names
            )
            trak_m = store.trak_dir(self.run) / str(m)
            features = np.load(trak_m / "features.mmap", mmap_mode="r")  # (n_train, k)
            out_to_loss = out_to_loss + np.load(trak_m / "out_to_loss.mmap")[:, 0] / self.n_models
            loaded.append(
                {
                    "model": bundle.model,
                    "task": task,
                    "computer": computer,
                    "features": np.ascontiguousarray(features, dtype=np.float32),
                }
            )
        self.out_to_loss = np.asarray(out_to_loss, dtype=np.float32)  # (n_train,)
        self.stack = None  # every checkpoint in one vmap when their weights are small enough
        if CheckpointStack.elements(self.bundle.model, len(loaded)) <= STACK_MAX_ELEMENTS:
            self.stack = CheckpointStack([item["computer"] for item in loaded])
        self._models = loaded
        return loaded

    def target_gradients(
        self, image: Image.Image, caption: str
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Projected gradients of the pair's CLIP margin for every checkpoint.

        Returns:
            (M, proj_dim) projected gradients; the pair's ensemble image embedding (M*d,);
            and its mean CLIP similarity, mean margin and timings.
        """
        loaded = self._load_models()
        x = self.bundle.preprocess(image).unsqueeze(0).to(self.device)  # (1, 3, H, W)
        t = data.tokenize(self.bundle.tokenizer, [caption.strip()]).to(self.device)  # (1, L)
        t0 = time.perf_counter()
        if self.stack is not None:
            grads, images, sims, margins = self._stacked_gradients(loaded, x[0], t[0])
        else:
            grads, images, sims, margins = self._gradients(loaded, x, t)
        t1 = time.perf_counter()
        if self.projector.dense_projector is None:
            # One projection for all checkpoints: the matrix is read from memory once.
            projected = self.projector.project(grads, model_id=0)  # (M, k)
        else:  # traker's CudaProjector draws a different matrix per checkpoint
            projected = torch.cat(
                [self.projector.project(_row(grads, m), model_id=m) for m in range(len(loaded))]
            )
        projected = projected / self.normalize
        info = {
            "clip_similarity": float(np.mean(sims)),
            "margin": float(np.mean(margins)),
            "timings": {"gradient": t1 - t0, "projection": time.perf_counter() - t1},
        }
        return projected.cpu().numpy(), embed.ensemble(images)[0], info

    def _stacked_gradients(
        self, loaded: list[dict[str, Any]], x: torch.Tensor, t: torch.Tensor
    ) -> tuple[dict[str, Any], list[np.ndarray], list[float], list[float]]:
        """Every checkpoint's gradient, embeddings, similarity and margin in one vmap each."""
        assert self.stack is not None
        sim = [
            item["task"]._sim(self.sim.for_targets(1, m).to(self.device))
            for m, item in enumerate(loaded)
        ]
        sim_img = torch.cat([s[0] for s in sim])  # (M, S, d)
        sim_txt = torch.cat([s[1] for s in sim])
        grads = self.stack.margin_grads(x, t, sim_img, sim_txt)
        img, txt = self.stack.embeddings(x, t)  # (M, d) each
        img_np, txt_np = img.cpu().numpy(), txt.cpu().numpy()
        margins = embed.clip_margin(img_np, txt_np, sim_img.cpu().numpy(), sim_txt.cpu().numpy())
        sims = (img_np * txt_np).sum(1)
        return (
            grads,
            [img_np[m : m + 1] for m in range(len(loaded))],
            sims.tolist(),
            margins.tolist(),
        )

    def _gradients(
        self, loaded: list[dict[str, Any]], x: torch.Tensor, t: torch.Tensor
    ) -> tuple[dict[str, Any], list[np.ndarray], list[float], list[float]]:
        """One checkpoint after another (large models: no second copy of every weight)."""
        grads, images, sims, margins = [], [], [], []
        for m, item in enumerate(loaded):
            sim_idx = self.sim.for_targets(1, m).to(self.device)  # the build's target batch
            grads.append(item["computer"].compute_per_sample_grad((x, t, sim_idx)))
            img, txt = embed.encode(item["model"], x, t, device=self.device)  # (1, d) each
            sim_img, sim_txt = item["task"]._sim(sim_idx)
            images.append(img.numpy())
            sims.append(float((img * txt).sum()))
            margins.append(
                float(
                    embed.clip_margin(
                        img.numpy(), txt.numpy(), sim_img.cpu().numpy(), sim_txt.cpu().numpy()
                    )[0]
                )
            )
        stacked = {
            "dense": {n: torch.cat([g["dense"][n] for g in grads]) for n in grads[0]["dense"]},
            "token": None if grads[0]["token"] is None else torch.cat([g["token"] for g in grads]),
            "ids": torch.cat([g["ids"] for g in grads]),
        }
        return stacked, images, sims, margins

    def query(
        self, image: Image.Image | str | os.PathLike | bytes, caption: str, k: int = 10
    ) -> QueryResult:
        """Top-k positive and negative influencers of a new image and caption.

        Args:
            image: a PIL image, a path, or the bytes of an image file.
            caption: the caption the image should match (truncated to the model's context).
            k: influencers per sign.
        """
        if not isinstance(image, Image.Image):
            image = data.open_query_image(image)
        self._load_models()
        notes = data.check_caption(caption, self.bundle.tokenizer, self.bundle.context_length)
        grads, img_emb, info = self.target_gradients(image, caption)
        t0 = time.perf_counter()
        column = sum(item["features"] @ grads[m] for m, item in enumerate(self._models))
        column = (column / self.n_models * self.out_to_loss).astype(np.float32)  # (n_train,)
        similarity = self.train_image_emb @ img_emb  # (n_train,)
        result = self._result(
            caption.strip(),
            column,
            similarity,
            info["clip_similarity"],
            info["margin"],
            k,
            notes=notes,
        )
        result.timings = {**info["timings"], "search": time.perf_counter() - t0}
        return result

    # --- shared --------------------------------------------------------------------------------

    def cards(self, order: np.ndarray, values: np.ndarray, sign: str) -> list[Influencer]:
        """Gallery cards for training rows ``order`` (strongest first), scored by ``values``."""
        return [
            Influencer(
                rank=r + 1,
                sign=sign,
                index=int(i),
                id=str(self.train[i]["id"]),
                caption=self.train[i]["caption"],
                image=self.train[i]["image"],
                score=float(values[i]),
            )
            for r, i in enumerate(order)
        ]

    def _result(
        self,
        caption: str,
        column: np.ndarray,
        similarity: np.ndarray,
        clip_sim: float,
        margin: float,
        k: int,
        **extra: Any,
    ) -> QueryResult:
        if k < 1:
            raise data.InputError(f"k must be at least 1, got {k}")
        k = min(k, len(column))
        pos = np.argsort(-column, kind="stable")[:k]
        neg = np.argsort(column, kind="stable")[:k]
        near = np.argsort(-similarity, kind="stable")[:k]
        return QueryResult(
            caption=caption,
            positive=self.cards(pos, column, "positive"),
            negative=self.cards(neg, column, "negative"),
            similar=self.cards(near, similarity, "similar"),
            clip_similarity=clip_sim,
            margin=margin,
            scores=column,
            train_similarity=similarity.astype(np.float32),
            **extra,
        )


def _row(grads: dict[str, Any], m: int) -> dict[str, Any]:
    """Checkpoint m's gradients out of the stacked ones."""
    return {
        "dense": {n: g[m : m + 1] for n, g in grads["dense"].items()},
        "token": None if grads["token"] is None else grads["token"][m : m + 1],
        "ids": grads["ids"][m : m + 1],
    }
