"""Ahead-of-time artifacts: `sglc compile --out DIR`, then `Engine(compiled=DIR)` / `sglc serve --compiled DIR`
behave like compiling directly, without re-running passes; mismatches are refused clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
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


def test_engine_from_artifact_equals_direct_compile(artifact, smollm2_gguf) -> None:
    out, _ = artifact
    with Engine(model=str(smollm2_gguf), max_total_tokens=4096) as direct:
        want = [o["output_ids"] for o in direct.generate(PROMPTS, GREEDY)]
    with Engine(compiled=str(out), max_total_tokens=4096) as loaded:
        got = loaded.generate(PROMPTS, GREEDY)
        assert [o["output_ids"] for o in got] == want
        assert loaded.tokenizer.encode(prompts.MIXED) == direct.tokenizer.encode(prompts.MIXED)


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


def test_int8_artifact_is_a_quarter_of_the_projections(artifact, smollm2_gguf, tmp_path) -> None:
    """fp32 -> int8 shrinks each projection 4x, plus one fp32 scale per output row (K >= 576: < 0.2%);
    the embedding / LM head, the norms and the rope table stay as they were."""
    out, _ = artifact
    _compile(smollm2_gguf, tmp_path / "int8", "--quantization", "int8")
    (full, full_other), (int8, int8_other) = _projection_bytes(out), _projection_bytes(tmp_path / "int8")
    assert 0.25 <= int8 / full <= 0.25 + 1 / 576 and int8_other == full_other


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


def test_serve_from_missing_artifact_fails_with_one_line(tmp_path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sgl_compile.cli", "generate", "--compiled", str(tmp_path), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a compiled artifact" in r.stderr


def test_serve_compiled_uses_the_artifacts_model_and_tokenizer(tmp_path) -> None:
    """`sglc serve --compiled DIR` must not fall back to the default model for its tokenizer or name
    (the HTTP process never loads the program): an artifact of another model serves as that model."""
    import os
    import socket
    import time
    import urllib.request

    out = tmp_path / "dummy"
    _compile(Path("dummy:smollm2-135m"), out)  # byte tokenizer, not the default model's
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sgl_compile.cli", "serve", "--compiled", str(out), "--port", str(port),
           "--max-total-tokens", "2048"]  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=30) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.time() < deadline, "server not healthy in time"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/get_model_info", timeout=30) as r:
            assert json.loads(r.read())["model_path"] == "dummy:smollm2-135m"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
