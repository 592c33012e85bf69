"""Compiled Triton kernels shipped in artifacts: saved from a collecting cache, installed into the local
cache without overwriting or exposing half-copied entries; on a GPU, serving an artifact compiled there
compiles no kernel of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgl_compile.artifact import KERNELS, load_artifact, save_artifact
from sgl_compile.codegen import kernel_cache
from sgl_compile.driver import CompileOptions, compile_model
from sgl_compile.runtime.launch import EngineArgs, warm_up


def _entry(root: Path, name: str, payload: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "kernel.cubin").write_text(payload)
    (d / "__grp__kernel.json").write_text("{}")
    return d


def test_collecting_points_triton_at_the_directory_and_restores(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(kernel_cache.ENV, str(tmp_path / "user"))
    with kernel_cache.collecting(tmp_path / "fresh") as d:
        assert kernel_cache.active_dir() == d == tmp_path / "fresh" and d.is_dir()
    assert kernel_cache.active_dir() == tmp_path / "user"
    monkeypatch.delenv(kernel_cache.ENV)
    with kernel_cache.collecting(tmp_path / "fresh"):
        pass
    assert kernel_cache.ENV not in os.environ


def test_save_skips_temporary_files_and_install_adds_only_missing_entries(tmp_path) -> None:
    src = tmp_path / "collected"
    _entry(src, "AAA", "a")
    (_entry(src, "BBB", "b") / "tmp.pid_12_abc").write_text("half written")
    shipped = tmp_path / "artifact" / KERNELS
    assert kernel_cache.save(src, shipped) == 2
    assert not (shipped / "BBB" / "tmp.pid_12_abc").exists()
    local = tmp_path / "local"
    _entry(local, "AAA", "already here")
    assert kernel_cache.install(shipped, local) == 1
    assert (local / "AAA" / "kernel.cubin").read_text() == "already here"  # never overwritten
    assert (local / "BBB" / "kernel.cubin").read_text() == "b"
    assert sorted(p.name for p in local.iterdir()) == ["AAA", "BBB"]  # no private copies left
    assert kernel_cache.install(shipped, local) == 0
    assert kernel_cache.install(tmp_path / "absent", local) == 0


def test_installed_kernels_are_found_by_triton_after_the_compile_cache_is_gone(tmp_path, monkeypatch) -> None:
    """Triton finds a compilation through its group file, which lists absolute paths: installed as
    shipped, they would name the compile's deleted temporary cache and Triton would compile again."""
    import shutil

    from triton.runtime.cache import get_cache_manager

    key = "0f" * 32
    with kernel_cache.collecting(tmp_path / "compile"):
        manager = get_cache_manager(key)
        files = {
            "k.cubin": manager.put(b"binary", "k.cubin"),
            "k.json": manager.put("{}", "k.json", binary=False),
        }
        manager.put_group("k.json", files)
        assert get_cache_manager(key).get_group("k.json") == files
    shipped = tmp_path / "artifact" / KERNELS
    kernel_cache.save(tmp_path / "compile", shipped)
    shutil.rmtree(tmp_path / "compile")
    local = tmp_path / "local"
    assert kernel_cache.install(shipped, local) == 1
    monkeypatch.setenv(kernel_cache.ENV, str(local))
    found = get_cache_manager(key).get_group("k.json")
    (entry,) = kernel_cache.entries(local)
    assert found == {name: str(entry / name) for name in files}
    assert Path(found["k.cubin"]).read_bytes() == b"binary"
    # A group file Triton could not read either is installed as it is, and the others still are.
    for name, text in (("BAD1", "{bad"), ("BAD2", "[]")):
        (shipped / name).mkdir()
        (shipped / name / "__grp__k.json").write_text(text)
    assert kernel_cache.install(shipped, local) == 2
    assert (local / "BAD1" / "__grp__k.json").read_text() == "{bad"
    assert not [p for p in local.iterdir() if p.name.startswith("tmp.")]


def test_install_points_entries_installed_earlier_at_themselves(tmp_path) -> None:
    """An entry installed before group files were relocated still names the compile's deleted cache:
    installing the artifact again repairs it in place (Triton would compile it once more), and leaves
    a group whose files exist, as Triton writes them, byte for byte."""
    shipped = tmp_path / "artifact" / KERNELS
    for name in ("OLD", "OK"):
        (shipped / name).mkdir(parents=True)
        (shipped / name / "k.cubin").write_text("binary")
    local = tmp_path / "local"
    stale = {"child_paths": {"k.cubin": str(tmp_path / "compile-tmp" / "OLD" / "k.cubin")}}
    (local / "OLD").mkdir(parents=True)
    (local / "OLD" / "k.cubin").write_text("binary")
    (local / "OLD" / "__grp__k.json").write_text(json.dumps(stale))
    # Triton's own group names its files by a valid path other than the resolved one
    (tmp_path / "link").symlink_to(local, target_is_directory=True)
    own = json.dumps({"child_paths": {"k.cubin": str(tmp_path / "link" / "OK" / "k.cubin")}}, indent=2)
    (local / "OK").mkdir()
    (local / "OK" / "k.cubin").write_text("binary")
    (local / "OK" / "__grp__k.json").write_text(own)
    assert kernel_cache.install(shipped, local) == 0  # nothing added: both are there
    repaired = json.loads((local / "OLD" / "__grp__k.json").read_text())
    assert repaired == {"child_paths": {"k.cubin": str((local / "OLD" / "k.cubin").resolve())}}
    assert (local / "OK" / "__grp__k.json").read_text() == own
    assert sorted(p.name for p in (local / "OLD").iterdir()) == ["__grp__k.json", "k.cubin"]  # no aside file


def test_artifact_carries_the_kernels_it_is_given(tmp_path) -> None:
    compiled = compile_model(CompileOptions("dummy:smollm2-135m", "float32", "cpu"))
    src = tmp_path / "collected"
    _entry(src, "AAA", "a")
    out = save_artifact(compiled, tmp_path / "art", src)
    assert json.loads((out / "manifest.json").read_text())["compiled_kernels"] == 1
    assert (out / KERNELS / "AAA" / "kernel.cubin").read_text() == "a"
    load_artifact(out)  # a CPU artifact loads (nothing to install on the CPU)
    warm_up(compiled, EngineArgs(model="dummy:smollm2-135m", max_total_tokens=2048))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_serving_a_compiled_artifact_compiles_no_kernel(tmp_path) -> None:
    cli = [sys.executable, "-m", "sgl_compile.cli"]
    art = tmp_path / "art"
    env = {**os.environ, kernel_cache.ENV: str(tmp_path / "compile-cache")}
    gpu = ["--device", "cuda", "--dtype", "bfloat16"]
    subprocess.run(cli + ["compile", "--model", "dummy:smollm2-135m", *gpu, "--out", str(art)], env=env,
                   check=True, timeout=900)  # fmt: skip
    shipped = {p.name for p in kernel_cache.entries(art / KERNELS)}
    assert shipped, "the warm-up compiled no kernel"
    serve_cache = tmp_path / "serve-cache"
    env[kernel_cache.ENV] = str(serve_cache)
    r = subprocess.run(cli + ["generate", "--compiled", str(art), "--prompt", "Hello", "--max-new-tokens", "8"],
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # A shipped kernel Triton fails to find is compiled again into the same entry: only the log says so.
    assert "start-up compiled" not in r.stderr, r.stderr[-3000:]
    compiled_at_serve = {p.name for p in kernel_cache.entries(serve_cache)} - shipped
    assert not compiled_at_serve, _describe(serve_cache, compiled_at_serve, art / KERNELS)


def _describe(cache: Path, names: set[str], shipped: Path) -> str:
    """The kernels compiled at serve time, each with how its metadata differs from a shipped entry of
    the same kernel (what made Triton's cache key differ)."""

    def meta(entry: Path) -> dict:
        return next((json.loads(f.read_text()) for f in entry.glob("*.json") if not f.name.startswith("__grp__")),
                    {})  # fmt: skip

    lines = []
    for name in sorted(names):
        new = meta(cache / name)
        twin = next(
            (meta(e) for e in kernel_cache.entries(shipped) if meta(e).get("name") == new.get("name")), None
        )
        diff = {
            k: (twin.get(k), v)
            for k, v in new.items()
            if twin is not None and twin.get(k) != v and k != "hash"
        }
        lines.append(f"{new.get('name', name)}: {'no shipped twin' if twin is None else diff}")
    return "compiled while serving:\n" + "\n".join(lines)
