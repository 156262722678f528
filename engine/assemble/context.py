"""What the units of one build share within one process (``WorkContext``)."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from trak import TRAKer

from engine import files
from engine.assemble.graph import score_shard_size, shard_rows
from engine.attribution.factored import gradient_computer_for
from engine.attribution.gradients import SelectiveGradientComputer, select_parameters
from engine.attribution.margin import ClipMargin, SimulatedBatch, training_output
from engine.attribution.projection import KeyedProjector, projector_for
from engine.attribution.saver import ShardSaver
from engine.attribution.scoring import RegularizedScoreComputer
from engine.attribution.settings import BuildConfig
from engine.data.loading import loader
from engine.data.pairs import PairSet, read_pairs
from engine.errors import DeviceError
from engine.models.checkpoints import read_state_dict
from engine.models.factory import ClipBundle, create
from engine.run.layout import SPLITS, RunLayout


class WorkContext:
    """What the units of one run share within one process, each made on first use: the pairs,
    the model, the current checkpoint's weights, the projection. The local executor keeps one for
    a whole build; each Ray task makes its own."""

    def __init__(self, out: Path, cfg: BuildConfig) -> None:
        self.out = Path(out)
        self.layout = RunLayout(self.out)
        self.cfg = cfg
        self._state: tuple[int, dict[str, torch.Tensor]] | None = None
        self._embeddings_of: int | None = None

    @functools.cached_property
    def pairs(self) -> dict[str, PairSet]:
        return {s: read_pairs(self.layout.pairs(s)) for s in SPLITS}

    @property
    def n_models(self) -> int:
        return len(self.cfg.checkpoints)

    def shards(self, split: str) -> list[tuple[int, int]]:
        return shard_rows(len(self.pairs[split]), self.cfg.shard_size)

    def score_shards(self) -> list[tuple[int, int]]:
        n_train, n_val = len(self.pairs["train"]), len(self.pairs["val"])
        return shard_rows(n_val, score_shard_size(n_train, self.cfg.shard_size))

    @functools.cached_property
    def bundle(self) -> ClipBundle:
        device = self.cfg.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}, but torch sees no CUDA device on {socket.gethostname()}; "
                "give each task a GPU (--gpus-per-task 1) or build with --device cpu"
            )
        return create(self.cfg.model, device=device, pretrained=self.cfg.pretrained)

    @functools.cached_property
    def names(self) -> list[str]:
        return select_parameters(self.bundle.model, self.cfg.grad_params)

    @functools.cached_property
    def projector(self) -> KeyedProjector:
        return projector_for(self.bundle.model, self.cfg, self.names)

    @functools.cached_property
    def gradient_computer(self) -> type[SelectiveGradientComputer] | functools.partial:
        """What makes each TRAKer's gradient computer (the factored one shares its factors)."""
        return gradient_computer_for(self.bundle.model, self.cfg, self.names)

    @functools.cached_property
    def sim(self) -> SimulatedBatch:
        return SimulatedBatch(len(self.pairs["train"]), self.cfg.sim_batch_size, seed=self.cfg.seed)

    @functools.cached_property
    def task(self) -> ClipMargin:
        """The targets' model output: the CLIP margin the scores attribute."""
        return ClipMargin()

    @functools.cached_property
    def train_task(self) -> ClipMargin:
        """The training side's model output (``--output``: the margin, or the pair's loss)."""
        return self.task if self.cfg.output == "margin" else training_output(self.cfg.output)

    def state(self, m: int) -> dict[str, torch.Tensor]:
        """Checkpoint m's weights (the last one read is kept)."""
        if self._state is None or self._state[0] != m:
            self._state = None  # free the previous checkpoint first
            self._state = (m, read_state_dict(self.cfg.checkpoints[m]))
        return self._state[1]

    def set_embeddings(self, m: int) -> None:
        """The margin's simulated batches use checkpoint m's training embeddings."""
        if self._embeddings_of != m:
            img = files.load_npy(self.layout.checkpoint_embeddings("train", "image", m))
            txt = files.load_npy(self.layout.checkpoint_embeddings("train", "text", m))
            self.task.set_embeddings(torch.from_numpy(img), torch.from_numpy(txt))
            if self.train_task is not self.task:
                self.train_task.set_embeddings(torch.from_numpy(img), torch.from_numpy(txt))
            self._embeddings_of = m

    def stream(
        self, split: str, rows: tuple[int, int], batch_size: int
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Batches of the split's rows [start, stop), read in DataLoader workers."""
        start, stop = rows
        batches = [range(s, min(stop, s + batch_size)) for s in range(start, stop, batch_size)]
        return loader(
            self.pairs[split],
            self.bundle.preprocess,
            self.bundle.tokenizer,
            batch_size,
            workers=self.cfg.workers,
            batches=batches,
        )

    @property
    def blocks(self) -> list[int] | None:
        """The modules' blocks of dimensions of ``--estimator modules`` (else None)."""
        return getattr(self.projector, "blocks", None)

    def scorer(self, lambda_reg: float | None) -> RegularizedScoreComputer:
        return RegularizedScoreComputer(
            self.dtype,
            self.cfg.device,
            lambda_reg=lambda_reg,
            lambda_rel=self.cfg.lambda_rel,
            blocks=self.blocks,
            normalize=self.cfg.normalize,
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.cfg.half else torch.float32

    def traker(self, n: int, train: bool = False) -> TRAKer:
        """A TRAKer over ``n`` pairs whose arrays live in a ``ShardSaver`` (``train``: with the
        training side's model output, to featurize)."""
        return TRAKer(
            model=self.bundle.model,
            task=self.train_task if train else self.task,
            train_set_size=n,
            save_dir=str(self.layout.trak_dir),
            load_from_save_dir=False,
            device=self.cfg.device,
            gradient_computer=self.gradient_computer,
            projector=self.projector,
            saver=ShardSaver,
            score_computer=functools.partial(
                RegularizedScoreComputer,
                lambda_rel=self.cfg.lambda_rel,
                blocks=self.blocks,
                normalize=self.cfg.normalize,
            ),
            use_half_precision=self.cfg.half,
            grad_wrt=self.names,
            lambda_reg=self.cfg.lambda_reg,
            logging_level=logging.WARNING,
        )

    def marker(self, unit_id: str) -> dict[str, Any]:
        return files.read_json(self.layout.unit(unit_id))

    def seconds(self, unit_ids: list[str]) -> float:
        return sum(self.marker(u)["seconds"] for u in unit_ids)
