"""Atomic writes: a reader never sees a half-written file or folder, and a crash leaves no debris
under the final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from distilray.errors import DistilrayError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name beside `path` for any writer (h5py, pyarrow, ...); on success the
    file is flushed to disk and renamed onto `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


# Written into every folder `atomic_dir` creates: it marks the folder as replaceable output, so a later
# write to the same path replaces it, while a folder without it (a working directory, someone's data)
# is never deleted.
OUTPUT_MARKER = ".distilray-output"


def _check_replaceable(path: Path) -> bool:
    """True when `path` holds a previous output (the marker) or an empty folder, False when nothing is
    there; DistilrayError for anything else, which is not ours to delete."""
    if not os.path.lexists(path):
        return False
    if path.is_symlink() or not path.is_dir():
        raise DistilrayError(f"cannot write the folder {path}: something else (a file or a link) is there")
    if (path / OUTPUT_MARKER).is_file() or not any(path.iterdir()):
        return True
    raise DistilrayError(
        f"refusing to replace {path}: it is a non-empty folder that distilray did not write (no {OUTPUT_MARKER} "
        "file); choose another output folder, or empty or remove this one yourself"
    )


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes `path`.

    An existing `path` is replaced only when it is an earlier output of `atomic_dir` (it holds
    OUTPUT_MARKER) or an empty folder; anything else is refused with a DistilrayError, before the
    work starts and again before the swap.
    """
    path = Path(os.path.abspath(path))  # "." has no name and no parent of its own; links are not followed
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by distilray: replaced as a whole by its next write\n")
        if _check_replaceable(path):
            # move the old output aside first: the path never holds a half-deleted folder
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def folder_fingerprint(path: str | Path) -> str:
    """Identifies a model folder's weights (its config and the sizes and times of its safetensors files), or
    a hub name by itself: what a cache key holds for a model given by path."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    h = hashlib.sha256((p / "config.json").read_bytes() if (p / "config.json").is_file() else b"")
    for f in sorted(p.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:12]
