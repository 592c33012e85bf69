"""Test prompts: code, chat, non-English, digits/emoji, and a long (~500 token) document."""

CODE = (
    'def quicksort(xs):\n    """Sort a list."""\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n'
)
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in one word."},
]
NON_ENGLISH = (
    "Le renard brun rapide saute par-dessus le chien paresseux. 敏捷的棕色狐狸跳过了懒狗。Быстрая лиса."
)
MIXED = "Order #12345 shipped on 2024-03-07 🎉🚀 — total: $1,299.99 (incl. 20% VAT). naïve café ✓"
_SENTENCES = [
    "The history of computing is a story of abstraction layered upon abstraction.",
    "Early machines were programmed by rewiring panels, a slow and error-prone process.",
    "Stored-program computers changed that, treating instructions as data in memory.",
    "Compilers then let people write in languages closer to mathematics than to circuits.",
    "Operating systems shared one machine among many users and many programs at once.",
    "Networks connected those machines, and the web turned them into a global library.",
    "Today, accelerators run neural networks whose weights fill many gigabytes of memory.",
    "Serving such models quickly is a problem of memory bandwidth more than arithmetic.",
]
LONG = " ".join(_SENTENCES[i % len(_SENTENCES)] + f" (note {i})" for i in range(28))
CORPUS = [
    CODE,
    NON_ENGLISH,
    MIXED,
    LONG,
    "",
    " leading space and trailing  ",
    "\n\n\ttabs\tand\nnewlines\r\n",
    "日本語のテキストと한국어 텍스트, 中文标点。",
    "emoji sequences: 👩‍👩‍👧‍👦 👍🏽 🇫🇷",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "x = [i**2 for i in range(10)]  # list comprehension",
    "numbers 0 1 22 333 4444 55555 3.14159 1e-9",
]
