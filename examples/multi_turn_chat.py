"""A multi-turn chat: each answer is generated, then becomes part of the next turn's prompt.

python examples/multi_turn_chat.py                 # an in-process engine on SmolLM2-135M
python examples/multi_turn_chat.py --url http://127.0.0.1:30000 [--api-key KEY]
"""

from __future__ import annotations

import argparse

from sgl_compile.lang import EngineBackend, RuntimeEndpoint, assistant, function, gen, system, user


@function
def multi_turn_chat(s, questions: list[str], max_tokens: int = 48):
    s += system("You are a helpful assistant. Answer briefly.")
    for i, question in enumerate(questions):
        s += user(question)
        s += assistant(gen(f"answer_{i}", max_tokens=max_tokens, temperature=0))


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
    questions = ["What is the capital of France?", "And how many people live there?"]
    state = multi_turn_chat.run(questions=questions, backend=backend)
    for message in state.messages():
        print(f"{message['role']:>9}: {message['content']}")
    backend.close()


if __name__ == "__main__":
    main()
