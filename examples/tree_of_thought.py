"""Tree of thought: fork the conversation into several lines of reasoning, let the model judge them,
then answer from the best. The branches run concurrently and share the question's KV in the cache.

    python examples/tree_of_thought.py [--url http://127.0.0.1:30000 [--api-key KEY]]
"""

from __future__ import annotations

import argparse

from sgl_compile.lang import EngineBackend, RuntimeEndpoint, assistant, function, gen, select, system, user


@function
def tree_of_thought(s, question: str, num_branches: int = 3, max_tokens: int = 40):
    s += system("You are a careful problem solver.")
    s += user(f"{question}\nThink step by step.")
    branches = s.fork(num_branches)
    for i, branch in enumerate(branches):
        branch += assistant(gen("thought", max_tokens=max_tokens, temperature=0.8, seed=i))
    branches.join()  # s["thought"] is now the list of the branches' thoughts

    candidates = "\n".join(f"{i + 1}. {t.strip()}" for i, t in enumerate(s["thought"]))
    s += user(f"Candidate lines of reasoning:\n{candidates}\nWhich one is the most convincing? Its number:")
    s += assistant(select("best", [str(i + 1) for i in range(num_branches)]))
    best = s["thought"][int(s["best"]) - 1]
    s += user(f"Building on line {s['best']} ({best.strip()}), give the final answer in one sentence.")
    s += assistant(gen("answer", max_tokens=max_tokens, temperature=0))


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
    state = tree_of_thought.run(
        question="A farmer has 17 sheep and buys 5 more. How many now?", backend=backend
    )
    for i, thought in enumerate(state["thought"]):
        print(f"branch {i + 1}: {thought.strip()}")
    print(f"best: {state['best']}\nanswer: {state['answer'].strip()}")
    backend.close()


if __name__ == "__main__":
    main()
