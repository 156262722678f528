"""Influencers of a new image–caption pair, computed exactly as the build scored its targets.

``QueryEngine.load(run)`` opens the run; the first new query pays the costs once (checkpoints,
projection matrix, TRAK features). ``engine.query(image, caption)`` then computes the pair's
projected gradient for every checkpoint with the build's model output, simulated-batch rule,
parameters and projection, and scores every training pair: score_i = mean_m(phi_m[i] . g_m) *
mean_m(out_to_loss_m[i]) (TRAK paper, eq. 9 / traker's ``finalize_scores``).
``engine.for_val(j)`` reads a validation pair's stored scores (``RunData``).
"""

from __future__ import annotations

import copy
import functools
import math
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine import files
from engine.attribution.factored import gradient_computer_for
from engine.attribution.gradients import (
    CheckpointStack,
    select_parameters,
)
from engine.attribution.margin import ClipMargin, SimulatedBatch
from engine.attribution.projection import projector_for
from engine.data.images import open_query_image
from engine.data.loading import check_caption, clean_caption, tokenize
from engine.errors import DeviceError, InputError
from engine.explore.results import QueryResult, ranked_result
from engine.explore.run_data import RunData
from engine.models.checkpoints import load_into
from engine.models.embed import clip_margin, encode, ensemble
from engine.models.factory import ClipBundle, create

# A new query differentiates every checkpoint in one vmap (CheckpointStack) when their weights
# together are at most this many numbers (a second copy of them is kept); else one by one.
STACK_MAX_ELEMENTS = 200_000_000


class QueryEngine(RunData):
    """A run ready for new queries: checkpoints and projection, loaded on first use and shared
    by the threads of one process (a dashboard's sessions); the TRAK features are streamed from
    the run's store by each query (``StoredScores.column_for``)."""

    def __init__(self, run: str | os.PathLike, device: str = "cpu") -> None:
        super().__init__(run)
        self.device = device
        self._lock = threading.Lock()
        self._loaded: list[dict[str, Any]] | None = None

    @classmethod
    def load(cls, run: str | os.PathLike, device: str = "cpu") -> QueryEngine:
        """Opens a run; checkpoints and features are loaded on the first new query."""
        return cls(Path(run), device)

    @functools.cached_property
    def bundle(self) -> ClipBundle:
        """The run's architecture with its preprocessing and tokenizer (no checkpoint loaded)."""
        return create(self.cfg.model, device=self.device, pretrained=self.cfg.pretrained)

    @functools.cached_property
    def checkpoint_models(self) -> list[torch.nn.Module]:
        """Each checkpoint of the run loaded into the architecture (for embeddings)."""
        # copies of one architecture: making each anew would build its tokenizer too (~0.1 s)
        return [
            load_into(copy.deepcopy(self.bundle.model), path)
            for path in self.manifest.checkpoint_paths(self.run)
        ]

    def embed_text(self, text: str) -> np.ndarray:
        """(M*d,) ensemble CLIP text embedding of a free text (unit norm); loads the checkpoints
        only, not the TRAK features."""
        text, _ = clean_caption(text)
        with self._lock:
            tokens = tokenize(self.bundle.tokenizer, [text])
            per_ckpt = [
                encode(model, None, tokens, device=self.device)[1].numpy()
                for model in self.checkpoint_models
            ]
        return ensemble(per_ckpt)[0]

    def warm(self) -> QueryEngine:
        """Loads the checkpoints, projection and TRAK features now (else: on the first query)."""
        with self._lock:
            self._gradient_models()
        return self

    def _gradient_models(self) -> list[dict[str, Any]]:
        """Per checkpoint: margin, gradient computer and TRAK features (once per engine)."""
        if self._loaded is not None:
            return self._loaded
        if self.manifest.projected_with_fast_jl and not self.device.startswith("cuda"):
            raise DeviceError(
                f"run {self.run} was projected with traker's CudaProjector (fast_jl), which "
                "runs only on CUDA, so a new query needs --device cuda (stored validation pairs "
                "open on any device)"
            )
        model = self.bundle.model
        names = select_parameters(model, self.cfg.grad_params)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
        # the projection is generated on the query's device
        cfg = replace(self.cfg, device=self.device)
        self.projector = projector_for(model, cfg, names)
        make_computer = gradient_computer_for(model, cfg, names)  # factored: shared factors
        # traker divides projected gradients by sqrt(#attributed parameters) (TRAKer.featurize)
        self.normalize = math.sqrt(sum(int(np.prod(s)) for s in shapes.values()))
        self.sim = SimulatedBatch(len(self.train), self.cfg.sim_batch_size, seed=self.cfg.seed)
        loaded = []
        for m, checkpoint in enumerate(self.checkpoint_models):
            task = ClipMargin()
            task.set_embeddings(
                *(
                    torch.from_numpy(
                        files.load_npy(self.layout.checkpoint_embeddings("train", modality, m))
                    )
                    for modality in ("image", "text")
                )
            )
            computer = make_computer(
                checkpoint, task, 0, torch.float32, self.device, grad_wrt=names
            )
            loaded.append({"model": checkpoint, "task": task, "computer": computer})
        self.stack = None  # every checkpoint in one vmap when their weights are small enough
        if CheckpointStack.elements(model, len(loaded)) <= STACK_MAX_ELEMENTS:
            self.stack = CheckpointStack([item["computer"] for item in loaded])
        self._loaded = loaded
        return loaded

    def target_gradients(
        self, image: Image.Image, caption: str
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Projected gradients of the pair's CLIP margin for every checkpoint.

        Returns:
            (M, proj_dim) projected gradients; the pair's ensemble image embedding (M*d,);
            and its mean CLIP similarity, mean margin and timings.
        """
        loaded = self._gradient_models()
        x = self.bundle.preprocess(image).unsqueeze(0).to(self.device)  # (1, 3, H, W)
        t = tokenize(self.bundle.tokenizer, [caption.strip()]).to(self.device)  # (1, L)
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
        return projected.cpu().numpy(), ensemble(images)[0], info

    def _stacked_gradients(
        self, loaded: list[dict[str, Any]], x: torch.Tensor, t: torch.Tensor
    ) -> tuple[dict[str, Any], list[np.ndarray], list[float], list[float]]:
        """Every checkpoint's gradient, embeddings, similarity and margin in one vmap each."""
        assert self.stack is not None
        sim = [
            item["task"].batch_embeddings(self.sim.for_targets(1, m).to(self.device))
            for m, item in enumerate(loaded)
        ]
        sim_img = torch.cat([s[0] for s in sim])  # (M, S, d)
        sim_txt = torch.cat([s[1] for s in sim])
        grads = self.stack.margin_grads(x, t, sim_img, sim_txt)
        img, txt = self.stack.embeddings(x, t)  # (M, d) each
        img_np, txt_np = img.cpu().numpy(), txt.cpu().numpy()
        margins = clip_margin(img_np, txt_np, sim_img.cpu().numpy(), sim_txt.cpu().numpy())
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
            img, txt = encode(item["model"], x, t, device=self.device)  # (1, d) each
            sim_img, sim_txt = item["task"].batch_embeddings(sim_idx)
            images.append(img.numpy())
            sims.append(float((img * txt).sum()))
            margins.append(
                float(
                    clip_margin(
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

    def gradients_of(self, image: Image.Image, caption: str) -> np.ndarray:
        """(M, proj_dim) projected margin gradients of a new image and caption, as the build
        computed its targets' (``target_gradients``, under the engine's lock)."""
        caption, _ = clean_caption(caption)
        with self._lock:
            return self.target_gradients(image, caption)[0]

    def batch_gradients(
        self, images: list[Image.Image], captions: list[str], batch_size: int = 32
    ) -> np.ndarray:
        """(n, M, proj_dim) projected margin gradients of many new pairs, computed as the build
        computes its targets': a batch of pairs per checkpoint (about ten times faster than one
        ``gradients_of`` per pair for a group's wrong matches)."""
        if len(images) != len(captions):
            raise InputError(f"{len(images)} images but {len(captions)} captions")
        with self._lock:
            loaded = self._gradient_models()
            out = np.zeros((len(images), self.n_models, self.projector.proj_dim), np.float32)
            for s in range(0, len(images), batch_size):
                x = torch.stack([self.bundle.preprocess(im) for im in images[s : s + batch_size]])
                texts = [clean_caption(c)[0].strip() for c in captions[s : s + batch_size]]
                t = tokenize(self.bundle.tokenizer, texts).to(self.device)
                x = x.to(self.device)
                for m, item in enumerate(loaded):
                    sim_idx = self.sim.for_targets(len(texts), m).to(self.device)
                    grads = item["computer"].compute_per_sample_grad((x, t, sim_idx))
                    projected = self.projector.project(grads, model_id=m) / self.normalize
                    out[s : s + len(texts), m] = projected.cpu().numpy()
        return out

    def query(
        self, image: Image.Image | str | os.PathLike | bytes, caption: str, k: int = 10
    ) -> QueryResult:
        """Top-k positive and negative influencers of a new image and caption.

        Args:
            image: a PIL image, a path, or the bytes of an image file.
            caption: the caption the image should match (truncated to the model's context).
            k: influencers per sign.
        """
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        caption, cleaned = clean_caption(caption)
        if not isinstance(image, Image.Image):
            image = open_query_image(image)
        with self._lock:
            self._gradient_models()
            notes = cleaned + check_caption(
                caption, self.bundle.tokenizer, self.bundle.context_length
            )
            grads, img_emb, info = self.target_gradients(image, caption)
        t0 = time.perf_counter()
        column = self.scores.column_for(list(grads))  # (n_train,), streamed from the store
        similarity = self.train_image_emb @ img_emb  # (n_train,)
        result = ranked_result(
            self.train,
            caption,
            column,
            similarity,
            info["clip_similarity"],
            info["margin"],
            k,
            self.map_sample,
            notes=notes,
        )
        result.timings = {**info["timings"], "search": time.perf_counter() - t0}
        return self.with_trust(result)


def _row(grads: dict[str, Any], m: int) -> dict[str, Any]:
    """Checkpoint m's gradients out of the stacked ones."""
    return {
        "dense": {n: g[m : m + 1] for n, g in grads["dense"].items()},
        "token": None if grads["token"] is None else grads["token"][m : m + 1],
        "ids": grads["ids"][m : m + 1],
    }
