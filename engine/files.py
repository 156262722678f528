"""Atomic file I/O: JSON, JSON lines, numpy arrays, PNGs and faiss indexes.

Every write goes to a temporary file in the same folder, then ``os.replace``: a process killed at
any point leaves either the old file or the new one, never half of one. This module knows no file
names; the run directory's names belong to ``engine.run.layout``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; moves it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; runs are shared (other users, workers)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def claim_folder(
    folder: Path,
    marker: Path,
    wanted: dict[str, Any],
    overwrite: bool,
    keep: tuple[Path, ...] = (),
) -> dict[str, Any] | None:
    """A folder that records the settings it was made with in ``marker``.

    Returns the recorded settings when the folder was made before (the caller compares them
    with ``wanted``); else, or with ``overwrite``, empties (all but ``keep``) and (re)creates the
    folder, records ``wanted`` and returns None.
    """
    if marker.is_file() and not overwrite:
        return read_json(marker)
    if overwrite and folder.exists():
        for entry in folder.iterdir():
            if entry in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(marker, wanted)
    return None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (blank lines skipped).

    Raises:
        DataError: a line that is not valid JSON, naming the file and line.
    """
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno} is not valid JSON: {err.msg}") from err
    return records


class JsonLines(Sequence):
    """The records of a JSON-lines file, read one at a time on demand: a million training pairs
    cost an index of line offsets (8 bytes each), not a million dicts in memory."""

    def __init__(self, path: str | os.PathLike) -> None:
        import numpy as np

        self.path = Path(path)
        data = np.fromfile(self.path, dtype=np.uint8)
        ends = np.flatnonzero(data == ord("\n"))
        starts = np.concatenate([[0], ends + 1])[: len(ends) + (len(data) > 0 and data[-1] != 10)]
        stops = np.concatenate([ends, [len(data)]])[: len(starts)]
        keep = stops - starts > 0  # blank lines are not records
        self._starts, self._stops = starts[keep], stops[keep]

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)} in {self.path}")
        with open(self.path, "rb") as fh:
            fh.seek(int(self._starts[i]))
            line = fh.read(int(self._stops[i] - self._starts[i]))
        try:
            return json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{self.path}: record {i + 1} is not valid JSON: {err.msg}") from err

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from read_jsonl(self.path)


def save_npy(path: str | os.PathLike, array: Any) -> None:
    import numpy as np

    # through a handle: np.save adds ".npy" to a file name that lacks it
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array))


def load_npy(path: str | os.PathLike, mmap: bool = False) -> Any:
    import numpy as np

    return np.load(path, mmap_mode="r" if mmap else None)


def save_png(path: str | os.PathLike, pixels: Any) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def save_faiss_index(path: str | os.PathLike, index: Any) -> None:
    """Writes a (CPU) faiss index atomically."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_faiss_index(path: str | os.PathLike) -> Any:
    import faiss

    return faiss.read_index(str(path))
