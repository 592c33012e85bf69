"""Tuned kernel configs: a JSON cache keyed by kernel, shape key, dtype and device name.

Launchers ask `get_config(kernel, key, heuristic)`: the tuned winner when the cache has
one for this device, else the kernel's heuristic. `sglc tune` fills the cache; an
ahead-of-time artifact carries its own copy (`use_cache_file`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Config = dict[str, int]
_cache_file: Path | None = None
_entries: dict[str, Config] | None = None


def device_name(device: torch.device | None = None) -> str:
    """What tuned configs and artifacts are keyed by: the GPU's name, or "cpu"."""
    if device is None:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_cache_file() -> Path:
    root = Path(os.environ.get("SGLC_CACHE_DIR") or Path.home() / ".cache" / "sgl-compile")
    return root / "tuning" / f"{device_name().replace(' ', '_')}.json"


def use_cache_file(path: Path | None) -> None:
    """Read tuned configs from `path` (None: the default per-device file) from now on."""
    global _cache_file, _entries
    _cache_file, _entries = path, None
    _lookup.cache_clear()


def cache_file() -> Path:
    return _cache_file or default_cache_file()


def entry_key(kernel: str, key: Sequence[object]) -> str:
    return "|".join([kernel, *map(str, key), device_name()])


def load_entries() -> dict[str, Config]:
    global _entries
    if _entries is None:
        path = cache_file()
        try:
            _entries = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable tuning cache %s: %s", path, e)
            _entries = {}
    return _entries


def save_entries(entries: dict[str, Config], path: Path | None = None) -> Path:
    path = path or cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1, sort_keys=True))
    use_cache_file(_cache_file)
    return path


@cache
def _lookup(entry: str) -> Config | None:
    return load_entries().get(entry)


def get_config(kernel: str, key: Sequence[object], heuristic: Callable[[], Config]) -> Config:
    """The tuned config for (kernel, key, this device), else `heuristic()`. Key: shapes and dtype."""
    return _lookup(entry_key(kernel, tuple(key))) or heuristic()
