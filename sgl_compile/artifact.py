"""Ahead-of-time artifacts: a compiled program written to a directory and loaded back without recompiling.

Layout of DIR:
  manifest.json       model, options, versions, device, model config, pass log, tensor aliases
  program.pt          the rewritten GraphModule, its tensors replaced by meta placeholders
  weights.safetensors the program's (merged, quantized) tensors, each stored once
  tuning.json         the tuned kernel configs for the device, used instead of the global cache
  triton-cache/       compiled Triton kernels (when compiled on a GPU; see codegen.kernel_cache)
  tokenizer/          see tokenizer.serialize

Loading checks the package and torch versions and the device against the manifest,
since a pickled program and tuned configs are only valid where they were made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import fx

import sgl_compile
from sgl_compile.codegen import autotune, kernel_cache
from sgl_compile.driver import CompiledModel, CompileOptions, prepare_device
from sgl_compile.errors import SglcError
from sgl_compile.models.config import ModelConfig, RopeScaling
from sgl_compile.models.loading import resolve_dtype
from sgl_compile.passes import PassReport
from sgl_compile.tokenizer import Tokenizer
from sgl_compile.tokenizer.serialize import load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
KERNELS = "triton-cache"


def _versions() -> dict[str, str]:
    return {"sgl_compile": sgl_compile.__version__, "torch": torch.__version__}


def _set_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(path)
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return dict(gm.state_dict(keep_vars=False))


def save_artifact(compiled: CompiledModel, out: Path, kernels: Path | None = None) -> Path:
    """Write `compiled` to `out` (replaced if it exists), with the Triton cache `kernels` if given."""
    start = time.perf_counter()
    if out.exists():
        if not (out / MANIFEST).exists():
            raise SglcError(f"{out} exists and is not an artifact directory; not overwriting it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    gm = compiled.program
    tensors = _tensors(gm)
    # Tied weights (embedding = LM head) are one tensor under two names; safetensors stores each once.
    unique, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous().cpu()
    save_file(unique, str(out / "weights.safetensors"))
    try:
        for name, t in tensors.items():
            _set_tensor(gm, name, torch.empty_like(t, device="meta"))
        torch.save(gm, out / "program.pt")
    finally:
        for name, t in tensors.items():
            _set_tensor(gm, name, t)
    tuned = {
        k: v
        for k, v in autotune.load_entries().items()
        if k.endswith("|" + autotune.device_name(compiled.device))
    }
    (out / "tuning.json").write_text(json.dumps(tuned, indent=1, sort_keys=True))
    save_tokenizer(compiled.tokenizer, out / "tokenizer")
    num_kernels = kernel_cache.save(kernels, out / KERNELS) if kernels else 0
    manifest = {
        "format": FORMAT,
        "model": compiled.source,
        "options": dataclasses.asdict(compiled.options),
        "versions": _versions(),
        "device": autotune.device_name(compiled.device),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(compiled.config),
        "passes": [{"name": r.name, "counts": r.counts} for r in compiled.reports],
        "aliases": aliases,
        "weight_bytes": sum(t.nbytes for t in unique.values()),
        "compiled_kernels": num_kernels,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("wrote artifact %s (%.1f MiB, %d compiled kernels) in %.1fs", out, manifest["weight_bytes"] / 2**20,
             num_kernels, time.perf_counter() - start)  # fmt: skip
    return out


def read_manifest(directory: Path) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise SglcError(
            f"{directory}: not a compiled artifact (no {MANIFEST}); make one with sglc compile --out"
        ) from None
    except ValueError as e:
        raise SglcError(f"{directory}/{MANIFEST}: unreadable ({e})") from None
    if manifest.get("format") != FORMAT:
        raise SglcError(f"{directory}: artifact format {manifest.get('format')}, this version reads {FORMAT}")
    return manifest


def artifact_tokenizer(directory: Path | str) -> tuple[str, Tokenizer]:
    """(model name, tokenizer) of an artifact, without loading its program or weights."""
    directory = Path(directory)
    return read_manifest(directory)["model"], load_tokenizer(directory / "tokenizer")


def check_compatible(manifest: dict, directory: Path, device: torch.device) -> None:
    ours = _versions()
    for name, version in manifest["versions"].items():
        if ours.get(name) != version:
            raise SglcError(
                f"{directory} was compiled with {name} {version}, this is {ours.get(name)}; recompile it"
            )
    here = autotune.device_name(device)
    if manifest["device"] != here:
        raise SglcError(
            f"{directory} was compiled for {manifest['device']}, this device is {here}; recompile it"
        )


def _config(raw: dict) -> ModelConfig:
    scaling = raw.get("rope_scaling")
    return ModelConfig(
        **{**raw, "rope_scaling": RopeScaling(**scaling) if scaling else None,
           "eos_token_ids": tuple(raw["eos_token_ids"])}
    )  # fmt: skip


def load_artifact(directory: Path | str) -> CompiledModel:
    directory = Path(directory)
    manifest = read_manifest(directory)
    options = CompileOptions(**manifest["options"])
    device = torch.device(options.device)
    check_compatible(manifest, directory, device)
    prepare_device(device)
    start = time.perf_counter()
    gm = torch.load(directory / "program.pt", weights_only=False)
    weights = load_file(str(directory / "weights.safetensors"), device=str(device))
    for name, target in manifest["aliases"].items():
        weights[name] = weights[target]
    expected = set(_tensors(gm))
    if expected != set(weights):
        raise SglcError(
            f"{directory}: weights do not match the program ({len(expected ^ set(weights))} differ)"
        )
    for name, t in weights.items():
        _set_tensor(gm, name, t)
    autotune.use_cache_file(directory / "tuning.json")
    if device.type == "cuda":
        kernel_cache.install(directory / KERNELS)
    log.info("loaded artifact %s in %.1fs", directory, time.perf_counter() - start)
    reports = [PassReport(p["name"], p["counts"]) for p in manifest["passes"]]
    return CompiledModel(
        gm, _config(manifest["config"]), load_tokenizer(directory / "tokenizer"),
        resolve_dtype(options.dtype), device, manifest["model"], reports, options,
    )  # fmt: skip
