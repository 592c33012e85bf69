"""Few-shot classification: show labelled examples, then let `select` pick the likeliest label.
One batched prefill scores every label; nothing is sampled, so the answer is always a valid label.

    python examples/few_shot_classification.py [--url http://127.0.0.1:30000 [--api-key KEY]]
"""

from __future__ import annotations

import argparse

from sgl_compile.lang import EngineBackend, RuntimeEndpoint, function, select

LABELS = ["positive", "negative"]
SHOTS = [
    ("An absolute joy from start to finish.", "positive"),
    ("I want those two hours of my life back.", "negative"),
    ("The cast is brilliant and the music unforgettable.", "positive"),
    ("Dull, predictable and far too long.", "negative"),
]


@function
def classify(s, review: str):
    for text, label in SHOTS:
        s += f"Review: {text}\nSentiment: {label}\n\n"
    s += f"Review: {review}\nSentiment: " + select("label", LABELS)


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
    reviews = ["What a wonderful film, I loved every minute.", "Boring plot and terrible acting."]
    states = classify.run_batch([{"review": r} for r in reviews], backend=backend)
    for review, state in zip(reviews, states, strict=True):
        print(f"{state['label']:>8}: {review}")
    backend.close()


if __name__ == "__main__":
    main()
