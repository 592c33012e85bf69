"""Structured outputs with and without jump-forward: a JSON-extraction workload.

    python benchmarks/jump_forward.py [--model smollm2-135m] [--num-requests 50] [--temperature 0]
        [--device cuda --dtype bfloat16] [--enable-mixed-chunk] [--modes on,off]

Each request gives a short passage about a person and asks for the record as JSON under a schema of
eight required fields. Both runs send the same batch to an in-process Engine (jump-forward on, then
off) after a warm-up request; the table reports output tokens/s (jumped tokens count: they are
output), requests/s, forward steps, and how many outputs validate against the schema.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import jsonschema

from sgl_compile.runtime.engine import Engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "email": {"type": "string", "maxLength": 50},
        "occupation": {"type": "string", "maxLength": 30},
        "married": {"type": "boolean"},
        "children": {"type": "integer", "minimum": 0, "maximum": 20},
    },
    "required": ["name", "age", "city", "country", "email", "occupation", "married", "children"],
    "additionalProperties": False,
}
FIRST = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"]
LAST = ["Novak", "Okafor", "Silva", "Tanaka", "Berg", "Moreau", "Kowalski", "Haddad"]
PLACES = [("Lyon", "France"), ("Osaka", "Japan"), ("Porto", "Portugal"), ("Leeds", "England"),
          ("Graz", "Austria"), ("Cork", "Ireland"), ("Tartu", "Estonia")]  # fmt: skip
JOBS = ["teacher", "nurse", "carpenter", "software engineer", "baker", "pilot", "lawyer"]


def passages(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        city, country = rng.choice(PLACES)
        kids = rng.randrange(4)
        out.append(
            f"{first} {last} is {rng.randrange(22, 70)} years old and works as a {rng.choice(JOBS)} in "
            f"{city}, {country}. {'She' if rng.random() < 0.5 else 'He'} is "
            f"{'married' if rng.random() < 0.5 else 'single'} with {kids} "
            f"{'child' if kids == 1 else 'children'}; write to {first.lower()}.{last.lower()}@mail.com."
        )
    return out


def prompt(engine: Engine, passage: str) -> str:
    ask = f"{passage}\nExtract this person as a JSON object."
    tok = engine.tokenizer
    if tok.chat_template is None:  # random-weight models (dummy:...) have a byte tokenizer and no template
        return ask + "\n"
    return tok.apply_chat_template([{"role": "user", "content": ask}])


def run(engine: Engine, prompts: list[str], params: dict) -> dict[str, float]:
    engine.generate(prompts[0], params)  # warm-up: grammar compile, kernels
    before = engine.get_stats()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    after = engine.get_stats()
    valid = 0
    for o in outs:
        try:
            jsonschema.validate(json.loads(o["text"]), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    tokens = sum(len(o["output_ids"]) for o in outs)
    return {
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "req_s": len(outs) / wall,
        "output_tokens": tokens,
        "forward_steps": after["forward_steps"] - before["forward_steps"],
        "jumped_tokens": after["jump_forward_tokens"] - before["jump_forward_tokens"],
        "valid": valid,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-requests", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--output-file", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--enable-mixed-chunk", action="store_true")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=None)
    ap.add_argument("--modes", default="on,off", help="jump-forward on, off, or both")
    args = ap.parse_args()
    options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    options["enable_mixed_chunk"] = args.enable_mixed_chunk
    if args.cuda_graph_max_bs is not None:
        options["cuda_graph_max_bs"] = args.cuda_graph_max_bs
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": 0,
              "json_schema": json.dumps(SCHEMA)}  # fmt: skip
    results = {}
    for jump in [m == "on" for m in args.modes.split(",")]:
        engine = Engine(model=args.model, jump_forward="on" if jump else "off", **options)
        try:
            prompts = [prompt(engine, p) for p in passages(args.num_requests)]
            results["on" if jump else "off"] = run(engine, prompts, params)
        finally:
            engine.shutdown()
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    cols = list(next(iter(results.values())))
    print("| jump-forward | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        print(
            f"| {name} | "
            + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
            + " |"
        )


if __name__ == "__main__":
    main()
