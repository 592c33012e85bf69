"""Extract structured data: the answer is constrained to a JSON schema, so it always parses.

python examples/json_extraction.py [--url http://127.0.0.1:30000 [--api-key KEY]]
"""

from __future__ import annotations

import argparse
import json

from sgl_compile.lang import EngineBackend, RuntimeEndpoint, assistant, function, gen, system, user

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@function
def extract_person(s, text: str, max_tokens: int = 64):
    s += system("Extract the person's name, age and city from the text as JSON.")
    s += user(text)
    s += assistant(gen("person", max_tokens=max_tokens, temperature=0, json_schema=PERSON))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running `sglc serve` (default: an in-process engine)")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    if args.url:
        backend = RuntimeEndpoint(args.url, api_key=args.api_key)
    else:
        from sgl_compile.runtime.engine import Engine

        backend = EngineBackend(Engine())
    text = "Maria Lopez, 34, moved to Lisbon last spring to open a bakery."
    state = extract_person.run(text=text, backend=backend)
    print(json.dumps(json.loads(state["person"]), indent=2))
    backend.close()


if __name__ == "__main__":
    main()
