"""Compiled Triton kernels carried by an artifact, so that serving it compiles none at start-up.

Triton compiles each kernel specialization on first launch (seconds each on a fresh machine: the
memory plan's forward and the CUDA-graph capture of an 8B model took 18 of its 35 s start-up on
the H100) and keeps the result in its cache directory, one entry (a directory named by the
compilation's hash: binary, metadata, launcher module) per specialization. `sglc compile` on a GPU
points that cache at an empty directory, runs what serving runs first, and ships the directory;
loading the artifact copies the entries the local cache lacks. The hash covers the source, the
options and the GPU target, so an entry made for another GPU or Triton is never used, only missed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "TRITON_CACHE_DIR"


def active_dir() -> Path:
    """The directory Triton reads and writes compiled kernels in, now."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    import triton

    return Path(triton.knobs.cache.dir)


@contextmanager
def collecting(directory: Path) -> Iterator[Path]:
    """Within the block, Triton compiles into (and reads from) `directory` only."""
    directory.mkdir(parents=True, exist_ok=True)
    before = os.environ.get(ENV)
    os.environ[ENV] = str(directory)
    try:
        yield directory
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


# Triton writes each file under a temporary name (tmp.pid_...) and renames it; skip those.
_SKIP = shutil.ignore_patterns("tmp.*", "lock")


def entries(directory: Path) -> list[Path]:
    """The cache's entries (skipping any half-installed one of ours)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("tmp."))


def save(src: Path, dst: Path) -> int:
    """Copy the entries of cache `src` to `dst`; the number copied."""
    found = entries(src)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in found:
        shutil.copytree(entry, dst / entry.name, ignore=_SKIP, dirs_exist_ok=True)
    return len(found)


def _relocate_groups(entry: Path, home: Path, keep_valid: bool = False) -> bool:
    """Point the entry's group files at `home`; whether any was rewritten. A group file
    (`__grp__NAME.json`) lists the absolute paths of a compilation's files (binary, metadata, ...), and
    Triton counts the group as missing, so compiles again, unless every one of them exists. Shipped as
    written, they name the compile's temporary cache, long deleted: each installed kernel was compiled
    again at its first launch (25 s of an 8B start-up's 49 on the H100, docs/benchmarks.md). Each file
    is replaced whole (written aside, renamed), so a reader sees the old group or the new one;
    `keep_valid` leaves a group whose files all exist as it is."""
    rewritten = False
    for group in entry.glob("__grp__*.json"):
        try:
            data = json.loads(group.read_text())
        except (OSError, ValueError):  # unreadable: Triton counts it as a miss too, and recompiles
            continue
        paths = data.get("child_paths") if isinstance(data, dict) else None
        if not isinstance(paths, dict) or (keep_valid and all(Path(p).exists() for p in paths.values())):
            continue
        moved = {name: str(home / Path(p).name) for name, p in paths.items()}
        if moved != paths:
            data["child_paths"] = moved
            aside = group.with_name(f"tmp.sglc.{uuid.uuid4().hex}")
            aside.write_text(json.dumps(data))
            os.replace(aside, group)
            rewritten = True
    return rewritten


def _repair(entry: Path) -> bool:
    """An entry already in the cache whose group files name another directory (installed before they
    were relocated) gets them pointed at itself, where its files are; Triton would otherwise compile
    the kernel once more into it. Entries Triton wrote itself already name their own files."""
    try:
        return _relocate_groups(entry, entry, keep_valid=True)
    except OSError:  # a read-only or concurrently replaced entry: Triton's own miss handles it
        return False


def install(src: Path, dst: Path | None = None) -> int:
    """Add the entries of `src` that `dst` (default: the active cache) lacks; the number added.

    Each entry is copied under a private name and renamed into place, so a concurrent reader (another
    server sharing the cache) never sees half an entry."""
    dst = (dst or active_dir()).resolve()  # (group files list absolute paths)
    dst.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    added = 0
    repaired = 0
    for entry in entries(src):
        target = dst / entry.name
        if target.exists():
            repaired += _repair(target)
            continue
        partial = dst / f"tmp.sglc.{uuid.uuid4().hex}"
        try:
            shutil.copytree(entry, partial, ignore=_SKIP)
            _relocate_groups(partial, target)
            partial.rename(target)
            added += 1
        except OSError:  # another process installed it first (or the copy failed): leave no private copy
            shutil.rmtree(partial, ignore_errors=True)
    if added or repaired:
        log.info(
            "installed %d compiled kernels into %s in %.2fs (%d installed earlier pointed at themselves)",
            added, dst, time.perf_counter() - start, repaired,
        )  # fmt: skip
    return added
