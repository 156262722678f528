"""``ShardSaver``: a traker saver (``trak.savers.AbstractSaver``) over arrays in memory, so that
``TRAKer`` featurizes, scores and finalizes scores one shard of a build at a time
(``engine.assemble.units``), and each unit writes its own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from trak.savers import AbstractSaver, ModelIDException


class ShardSaver(AbstractSaver):
    """traker's saver over arrays in memory: one shard of training pairs (``featurize``), one
    shard of targets (``score``), or given arrays of the run (``finalize_scores``).

    Nothing is written to ``save_dir``: each unit saves its own shard files. A model id added with
    ``add_finalized`` counts as featurized and finalized, its features being other units' work.
    """

    def __init__(
        self,
        save_dir: str | Path,
        metadata: dict[str, Any],
        train_set_size: int,
        proj_dim: int,
        load_from_save_dir: bool,
        logging_level: int,
        use_half_precision: bool,
    ) -> None:
        # not AbstractSaver.__init__: it creates folders and traker's json files in save_dir
        self.metadata = metadata
        self.save_dir = Path(save_dir)
        self.train_set_size = train_set_size
        self.proj_dim = proj_dim
        self.dtype = np.float16 if use_half_precision else np.float32
        self.model_ids: dict[int, dict[str, int]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.stores: dict[int, dict[str, Any]] = {}
        self.scores: dict[str, np.ndarray] = {}
        self.current_model_id: int | None = None
        self.current_experiment_name: str | None = None
        self.current_store: dict[str, Any] = {}

    def register_model_id(
        self, model_id: int, _allow_featurizing_already_registered: bool = False
    ) -> None:
        self.model_ids[model_id] = {"is_featurized": 0, "is_finalized": 0}
        self.init_store(model_id)

    def init_store(self, model_id: int) -> None:
        n, k = self.train_set_size, self.proj_dim
        self.stores[model_id] = {
            "grads": np.zeros((n, k), self.dtype),
            "out_to_loss": np.zeros((n, 1), self.dtype),
            "features": None,
            "is_featurized": np.zeros(n, np.int32),
        }
        self.load_current_store(model_id)

    def add_finalized(self, model_id: int, arrays: dict[str, Any]) -> None:
        self.model_ids[model_id] = {"is_featurized": 1, "is_finalized": 1}
        self.stores.setdefault(model_id, {}).update(arrays)

    def serialize_current_model_id_metadata(self, already_exists: bool = True) -> None:
        done = self.current_store["is_featurized"]
        self.model_ids[self.current_model_id]["is_featurized"] = int(done.sum() == len(done))

    def init_experiment(self, exp_name: str, num_targets: int, model_id: int) -> None:
        if model_id not in self.model_ids:
            raise ModelIDException(f"model id {model_id} was not added to this shard's saver")
        self.experiments[exp_name] = {"num_targets": num_targets}
        grads = np.zeros((num_targets, self.proj_dim), self.dtype)
        self.stores[model_id][f"{exp_name}_grads"] = grads
        self.load_current_store(model_id, exp_name, num_targets)

    def load_current_store(
        self,
        model_id: int,
        exp_name: str | None = None,
        exp_num_targets: int = -1,
        mode: str = "r+",
    ) -> None:
        self.current_model_id = model_id
        self.current_store.update(self.stores[model_id])
        if exp_name is not None:
            self.current_experiment_name = exp_name
            if exp_name in self.scores:
                self.current_store[f"{exp_name}_scores"] = self.scores[exp_name]

    def init_scores(self, exp_name: str, num_targets: int) -> None:
        """Where ``finalize_scores`` writes the scores of experiment ``exp_name``."""
        self.experiments[exp_name] = {"num_targets": num_targets}
        self.scores[exp_name] = np.zeros((self.train_set_size, num_targets), self.dtype)

    def save_scores(self, exp_name: str) -> None:
        """The scores stay in memory: the unit saves them."""

    def del_grads(self, model_id: int) -> None:
        self.stores[model_id]["grads"] = None
