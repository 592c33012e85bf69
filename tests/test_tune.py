"""Autotuning plumbing (on CPU through the interpreter, where only the bookkeeping is meaningful):
every kernel of a model is tried with its candidates, and the winner is what its launcher then uses."""

from __future__ import annotations

import dataclasses
import json

import torch

from sgl_compile.codegen import autotune, norm, tune
from sgl_compile.models.loading.dummy import DUMMY_CONFIGS


def test_tuned_configs_are_what_launchers_look_up(tmp_path) -> None:
    # A small vocabulary: the interpreter runs the fused LM-head GEMV one program at a time.
    cfg = dataclasses.replace(DUMMY_CONFIGS["smollm2-135m"], vocab_size=512)
    cases = list(tune.model_cases(cfg, torch.float32, torch.device("cpu"), [1], 16, 8, quantization="int4"))
    kernels = {c.kernel for c in cases}
    assert kernels == {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_store_kv", "linear_w4a16",
                       "norm_linear", "decode_attention", "shared_prefix_attention", "extend_attention"}  # fmt: skip
    calls = []

    def timer(fn) -> float:  # deterministic: the second candidate of every kernel "wins"
        fn()
        calls.append(1)
        return 1.0 if len(calls) % 2 else 0.5

    entries = tune.tune(cases, timer, max_candidates=2)
    assert len(entries) == len({autotune.entry_key(c.kernel, c.key) for c in cases})
    path = autotune.save_entries(entries, tmp_path / "tuning.json")
    try:
        autotune.use_cache_file(path)
        x = torch.randn(3, cfg.hidden_size)
        got = autotune.get_config("rms_norm", norm.rms_norm_key(x), lambda: {"fallback": 1})
        assert got == norm.CONFIG_SPACE["rms_norm"][1]
        assert autotune.get_config("rms_norm", (7, "float32"), lambda: {"fallback": 1}) == {"fallback": 1}
    finally:
        autotune.use_cache_file(None)
    # The file keys each winner by kernel, shapes, dtype and device name.
    keys = list(json.loads(path.read_text()))
    assert all(k.split("|")[0] in kernels and k.endswith("|cpu") and "float32" in k for k in keys), keys


def test_configs_tuned_on_another_device_are_not_used(tmp_path, monkeypatch) -> None:
    x = torch.randn(3, 64)
    winner = dict(norm.CONFIG_SPACE["rms_norm"][-1])
    entry = autotune.entry_key("rms_norm", norm.rms_norm_key(x))
    path = autotune.save_entries({entry: winner}, tmp_path / "tuning.json")
    try:
        autotune.use_cache_file(path)
        assert autotune.get_config("rms_norm", norm.rms_norm_key(x), lambda: {"fallback": 1}) == winner
        monkeypatch.setattr(autotune, "device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
        autotune.use_cache_file(path)
        assert autotune.get_config("rms_norm", norm.rms_norm_key(x), lambda: {"fallback": 1}) == {
            "fallback": 1
        }
    finally:
        autotune.use_cache_file(None)


def test_tune_refuses_without_a_gpu() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sgl_compile.cli", "tune", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "CUDA GPU" in r.stderr


def test_decode_attention_is_tuned_in_the_variant_the_program_runs(monkeypatch) -> None:
    # Without a q/k norm, fuse_rope_attention folds rope and the KV store into decode attention, so
    # the tuner times that variant: each request's new key at its last slot, at position context - 1.
    # Qwen3's q/k norm keeps rope_store_kv before a plain attention kernel.
    seen = []
    monkeypatch.setattr(tune.attention, "decode_attention", lambda *a, **kw: seen.append((a, kw)))
    for name, rope_inside in (("smollm2-135m", True), ("qwen3-0.6b", False)):
        seen.clear()
        cases = tune.model_cases(DUMMY_CONFIGS[name], torch.float32, torch.device("cpu"), [3], 16, 8)
        next(c for c in cases if c.kernel == "decode_attention").run({})
        ((args, kw),) = seen
        new_kv = kw["new_kv"]
        assert (new_kv is not None) == rope_inside, name
        if rope_inside:
            k_new, v_new, positions, cos_sin, slots = new_kv
            indptr, indices = args[4], args[5]
            assert (
                k_new.shape
                == v_new.shape
                == (3, DUMMY_CONFIGS[name].num_kv_heads, DUMMY_CONFIGS[name].head_dim)
            )
            assert positions.tolist() == [15] * 3 and cos_sin.shape[0] == 16
            assert slots.tolist() == [indices[int(indptr[b + 1]) - 1].item() for b in range(3)]
