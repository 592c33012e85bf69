"""Ahead-of-time artifacts: `sglc compile --out DIR`, then `Engine(compiled=DIR)` / `sglc serve --compiled DIR`
behave like compiling directly, without re-running passes; mismatches are refused clearly."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors import safe_open

from sgl_compile.artifact import load_artifact
from sgl_compile.errors import SglcError
from sgl_compile.runtime.engine import Engine
from tests import prompts

PROMPTS = [prompts.CODE, "The capital of France is", prompts.NON_ENGLISH, prompts.MIXED]
GREEDY = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}


def _compile(model: Path, out: Path, *flags: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "sgl_compile.cli",
        "compile",
        "--model",
        str(model),
        "--out",
        str(out),
        *flags,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def artifact(smollm2_gguf, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("artifact") / "smollm2"
    return out, _compile(smollm2_gguf, out)


def test_manifest_records_what_was_compiled(artifact) -> None:
    out, manifest = artifact
    assert manifest["options"]["quantization"] is None and manifest["options"]["dtype"] == "float32"
    assert manifest["device"] == "cpu" and set(manifest["versions"]) == {"sgl_compile", "torch"}
    assert {p["name"] for p in manifest["passes"]} >= {"merge_qkv", "fuse_rope_store_kv", "lower_attention"}
    assert {f.name for f in out.iterdir()} == {"manifest.json", "program.pt", "weights.safetensors",
                                                "tuning.json", "tokenizer"}  # fmt: skip


@pytest.fixture(scope="module")
def direct_greedy(smollm2_gguf) -> list[list[int]]:
    """Greedy outputs of PROMPTS from compiling SmolLM2 directly (no artifact)."""
    with Engine(model=str(smollm2_gguf), max_total_tokens=4096) as direct:
        return [o["output_ids"] for o in direct.generate(PROMPTS, GREEDY)]


def test_engine_from_artifact_equals_direct_compile(artifact, direct_greedy, smollm2) -> None:
    out, _ = artifact
    with Engine(compiled=str(out), max_total_tokens=4096) as loaded:
        got = loaded.generate(PROMPTS, GREEDY)
        assert [o["output_ids"] for o in got] == direct_greedy
        assert loaded.tokenizer.encode(prompts.MIXED) == smollm2.tokenizer.encode(prompts.MIXED)


def _projection_bytes(directory: Path) -> tuple[int, int]:
    """(bytes of the q/k/v, o, gate/up, down tensors, bytes of everything else) in an artifact's weights."""
    proj = other = 0
    with safe_open(str(directory / "weights.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_slice(name)
            nbytes = math.prod(t.get_shape()) * {"F32": 4, "I8": 1, "U8": 1, "BF16": 2}[t.get_dtype()]
            if "proj" in name:
                proj += nbytes
            else:
                other += nbytes
    return proj, other


@pytest.mark.parametrize(("method", "low", "high"), [("int8", 0.25, 0.25 + 1 / 576), ("int4", 0.125, 0.145)])
def test_quantized_artifact_shrinks_the_projections(
    artifact, smollm2_gguf, tmp_path, method, low, high
) -> None:
    """On disk, relative to the fp32 artifact: int8 is 1 byte per weight plus one fp32 scale per output row
    (K >= 576: < 0.2%); int4 half a byte plus a scale per group of 128 and rows of K = 576 padded to 640
    (the bounds of test_quantize's pass report). The embedding / LM head, norms and rope table stay."""
    out, _ = artifact
    _compile(smollm2_gguf, tmp_path / method, "--quantization", method)
    (full, full_other), (quant, quant_other) = _projection_bytes(out), _projection_bytes(tmp_path / method)
    assert low <= quant / full <= high and quant_other == full_other


def test_mismatched_versions_or_device_are_refused(artifact, tmp_path) -> None:
    out, manifest = artifact
    for field, value, message in (
        ("versions", {**manifest["versions"], "torch": "1.0.0"}, "compiled with torch 1.0.0"),
        ("device", "NVIDIA H100 80GB HBM3", "compiled for NVIDIA H100 80GB HBM3"),
        ("format", 99, "artifact format 99"),
    ):
        bad = tmp_path / field
        bad.mkdir()
        for f in out.iterdir():
            (bad / f.name).symlink_to(f)
        (bad / "manifest.json").unlink()
        (bad / "manifest.json").write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(SglcError, match=message):
            load_artifact(bad)
    with pytest.raises(SglcError, match="not a compiled artifact"):
        load_artifact(tmp_path)


def test_attention_backends_are_chosen_at_load(artifact) -> None:
    """The program is the same for every attention backend: flags pick them for an artifact too (a new
    --attention-backend resets the phases; a phase flag keeps the artifact's other choices)."""
    from sgl_compile.driver import CompileOptions
    from sgl_compile.runtime.launch import EngineArgs, artifact_options, check_args, load_program

    out, _ = artifact
    loaded = load_program(EngineArgs(compiled=str(out), decode_attention_backend="torch"))
    assert (loaded.options.prefill_attention_backend, loaded.options.decode_attention_backend) == (
        "torch",
        "torch",
    )
    with pytest.raises(SglcError, match="runs on CUDA"):
        check_args(EngineArgs(compiled=str(out), attention_backend="flashinfer"))
    cuda = CompileOptions(device="cuda", dtype="bfloat16", attention_backend="triton",
                          prefill_attention_backend="triton", decode_attention_backend="triton")  # fmt: skip
    assert artifact_options(cuda, EngineArgs()) is cuda
    with pytest.raises(SglcError, match="CPU reference"):
        artifact_options(cuda, EngineArgs(prefill_attention_backend="torch"))


def test_serve_from_missing_artifact_fails_with_one_line(tmp_path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sgl_compile.cli", "generate", "--compiled", str(tmp_path), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a compiled artifact" in r.stderr


@contextmanager
def _serve_compiled(artifact_dir: Path, tmp_path: Path) -> Iterator[str]:
    """`sglc serve --compiled DIR` on a free port, healthy (/health_generate); yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sgl_compile.cli", "serve", "--compiled", str(artifact_dir), "--port", str(port),
           "--max-total-tokens", "4096"]  # fmt: skip
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health_generate", timeout=30) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, "server not healthy in time"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def test_serve_compiled_equals_direct_compile(artifact, direct_greedy, tmp_path) -> None:
    out, _ = artifact
    with _serve_compiled(out, tmp_path) as url:
        got = _post_json(url + "/generate", {"text": PROMPTS, "sampling_params": GREEDY})
    assert [o["output_ids"] for o in got] == direct_greedy


def test_serve_compiled_uses_the_artifacts_model_and_tokenizer(tmp_path) -> None:
    """`sglc serve --compiled DIR` must not fall back to the default model for its tokenizer or name
    (the HTTP process never loads the program): an artifact of another model serves as that model."""
    out = tmp_path / "dummy"
    _compile(Path("dummy:smollm2-135m"), out)  # byte tokenizer, not the default model's
    with (
        _serve_compiled(out, tmp_path) as url,
        urllib.request.urlopen(url + "/get_model_info", timeout=30) as r,
    ):
        assert json.loads(r.read())["model_path"] == "dummy:smollm2-135m"
