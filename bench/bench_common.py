"""What the benchmark scripts share: the machine, BENCHMARKS.md sections, tables and timings,
measured child processes, the demo world's models, and the featurize paths (trakview's build and
traker's stock CLIP pipeline) on inputs in memory.

``TRAKVIEW_BENCHMARKS=PATH`` points every script at another copy of BENCHMARKS.md (to try a
script without touching the real figures); ``--no-write`` leaves it alone altogether.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import files
from engine.assemble.context import WorkContext
from engine.attribution.margin import SimulatedBatch
from engine.attribution.projection import KeyedProjector
from engine.attribution.settings import BuildConfig
from engine.data.loading import image_tensors, tokenize
from engine.data.pairs import PairSet, pair_list_path, read_pairs
from engine.demo import DemoConfig
from engine.models import train
from engine.models.factory import ClipBundle, create

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(os.environ.get("TRAKVIEW_BENCHMARKS") or ROOT / "BENCHMARKS.md")
# --quick: a demo of minutes, not hours, kept in one folder for every script
QUICK_DEMO = DemoConfig(n_train=600, n_val=60, members=2, epochs=6, base_epochs=6)
QUICK_DEMO_DIR = Path(tempfile.gettempdir()) / "trakview-bench" / "quick-demo"


# --- the machine and BENCHMARKS.md -------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def arguments(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the script's docstring, with ``--no-write``."""
    out = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    out.add_argument("--no-write", action="store_true", help="print only, BENCHMARKS.md untouched")
    return out


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def read_section(name: str, path: Path | None = None) -> str:
    """The text of section ``name`` of BENCHMARKS.md ("" when it has none)."""
    path = path or BENCHMARKS
    start, end = _markers(name)
    text = path.read_text() if path.is_file() else ""
    found = re.search(re.escape(start) + r"(.*?)" + re.escape(end), text, re.S)
    return found.group(1) if found else ""


def write_section(name: str, body: str, path: Path | None = None) -> None:
    """Replaces the section between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` (appends it
    when missing)."""
    path = path or BENCHMARKS
    start, end = _markers(name)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    files.write_text(path, text)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def spread(values: Sequence[float], digits: int = 1, scale: float = 1.0) -> tuple[str, str]:
    """(median, "min-max") of ``values`` times ``scale``, with ``digits`` decimals."""
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f}", f"{min(v):.{digits}f}-{max(v):.{digits}f}"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- a measured child process ------------------------------------------------------------------

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
scope = {"__name__": "__bench__", "result": {}}
exec(sys.argv[1], scope)
mib = [resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
out = {"seconds": time.perf_counter() - t0, "main_mib": mib[0], "worker_mib": mib[1]}
print("BENCH", json.dumps({**out, **scope["result"]}))
"""


def run_child(code: str, *args: str) -> dict[str, Any]:
    """Runs ``code`` in its own Python process (it sees ``args`` as ``sys.argv[2:]``), so that its
    peak memory is its own. Returns its seconds, the peak resident memory of the process and of
    its largest child process (MiB), and what the code put in its dict ``result``."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, code, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH "))
    return json.loads(line[len("BENCH ") :])


# --- the demo world ----------------------------------------------------------------------------


def fill_basket(data: Any, name: str, rows: np.ndarray, how: str, why: str, val_ids=()) -> None:
    """The basket ``name`` of a run (``RunData``) holding exactly ``rows`` (emptied first when
    it held others)."""
    from engine.curate import baskets

    have = baskets.find_basket(data.layout, name)
    wanted = {str(data.train[int(i)]["id"]) for i in rows}
    if have is not None and set(have.ids) == wanted:
        return
    if have is not None:
        baskets.remove_ids(data.layout, name, have.ids)
    baskets.add_rows(data.layout, name, data.train, rows, why, how, "bench", val_ids)


def demo_pairs(demo_dir: Path) -> tuple[PairSet, PairSet]:
    """The training and validation pairs of a demo folder (``trakview demo --out DIR``)."""
    data = Path(demo_dir) / "data"
    return read_pairs(pair_list_path(data, "train")), read_pairs(pair_list_path(data, "val"))


def train_on(pairs: PairSet, cfg: train.TrainConfig, out: Path, jobs: int = 0) -> list[Path]:
    """``train_ensemble`` on the pairs' preprocessed images and tokens (finished members kept)."""
    bundle = create(cfg.model)
    images = image_tensors(pairs, bundle.preprocess, progress=False)
    tokens = tokenize(bundle.tokenizer, pairs.captions)
    return train.train_ensemble(images, tokens, cfg, out, jobs=jobs)


# --- featurize: trakview's build path and traker's stock pipeline ------------------------------


def warm_up(projector: KeyedProjector, device: str = "cpu") -> None:
    """Draws the projection of the dense parameters (Gaussian matrix, or the sketch's buckets and
    signs) now, so that no timing includes it."""
    shapes = projector.param_shapes
    zeros = {n: torch.zeros(1, *shapes[n], device=device) for n in projector.dense_names}
    projector.project({"dense": zeros, "token": None}, model_id=0)


class InMemoryWork(WorkContext):
    """The build's ``WorkContext`` (``engine.assemble.context``) over tensors in memory instead of a
    run's pair files: ``bundle``'s model, the CLIP margin over the given training embeddings,
    the simulated batches over their rows; its ``traker`` is the build's (trakview's extension
    points, ``ShardSaver``: nothing is written)."""

    def __init__(
        self,
        cfg: BuildConfig,
        bundle: ClipBundle,
        img_emb: torch.Tensor,
        txt_emb: torch.Tensor,
        projector: KeyedProjector | None = None,
    ) -> None:
        super().__init__(Path(tempfile.gettempdir()), cfg)
        self.bundle = bundle  # WorkContext's cached properties, given instead of made
        if projector is not None:
            self.projector = projector
        self.sim = SimulatedBatch(len(img_emb), cfg.sim_batch_size, seed=cfg.seed)
        self.task.set_embeddings(img_emb, txt_emb)

    def featurize(self, traker: Any, state: dict, model_id: int, images, tokens) -> None:
        """What a featurize unit does (``engine.assemble.units``), the batches already in memory
        (the build reads and preprocesses them in DataLoader workers)."""
        traker.load_checkpoint(state, model_id=model_id)
        batch = self.cfg.batch_size
        for s in range(0, len(images), batch):
            inds = list(range(s, min(len(images), s + batch)))
            b = (images[inds], tokens[inds], self.sim.for_train(inds, model_id))
            traker.featurize(batch=b, inds=np.asarray(inds))


def stock_traker(
    model: torch.nn.Module,
    names: list[str],
    n_train: int,
    save_dir: Path,
    proj_dim: int,
    sim_batch_size: int,
) -> Any:
    """traker's stock CLIP pipeline as its tutorial runs it, with only the fixes it needs on CPU:
    float32, and the out-to-loss term shaped (B, 1). Set the embeddings of each checkpoint with
    ``set_stock_embeddings`` (``get_embeddings`` calls ``.cuda()``)."""
    import logging

    from trak import TRAKer
    from trak.modelout_functions import CLIPModelOutput

    class StockClipOnCpu(CLIPModelOutput):
        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch).reshape(-1, 1)

    return TRAKer(
        model=model,
        task=StockClipOnCpu(simulated_batch_size=sim_batch_size),
        train_set_size=n_train,
        save_dir=str(save_dir),
        device="cpu",
        proj_dim=proj_dim,
        use_half_precision=False,
        grad_wrt=names,
        logging_level=logging.ERROR,
    )


def set_stock_embeddings(img_emb: torch.Tensor, txt_emb: torch.Tensor) -> None:
    """What traker's ``get_embeddings`` would store for a checkpoint, minus its ``.cuda()``."""
    from trak.modelout_functions import CLIPModelOutput

    CLIPModelOutput.image_embeddings = img_emb
    CLIPModelOutput.text_embeddings = txt_emb
    CLIPModelOutput.num_computed_embeddings = len(img_emb)
