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

# Plain prose (~300 tokens) whose perplexity measures how much quantization hurts the model.
PROSE = (
    "Rivers have shaped human settlement for as long as people have farmed. A river brings water for crops "
    "and animals, a road for boats, and, in its floods, a fresh layer of fertile soil. The first cities of "
    "Mesopotamia grew between the Tigris and the Euphrates, and Egypt depended on the yearly rise of the Nile "
    "so completely that its calendar was built around it. Farmers learned to read the river: when the water "
    "turned green, the flood was near; when it fell, it was time to sow. Over centuries they dug canals to "
    "carry water farther from the banks, and the work of keeping those canals clean required cooperation "
    "between villages. Some historians argue that this need for organised labour helped create the first "
    "governments, with officials who measured fields, recorded harvests and collected taxes. Rivers also "
    "divided people. A wide river was a natural border, difficult for an army to cross, and many of the "
    "frontiers on a modern map still follow a river's course. Bridges were expensive and easy to defend, so "
    "towns grew up where a river could be forded or crossed by ferry, and the names of many of them still "
    "recall it. In the industrial age, rivers turned water wheels and then carried the waste of the "
    "factories they powered. Cleaning them has taken decades, but in many places fish have returned to "
    "waters that were once declared dead, and people walk along banks that were closed to them for a "
    "century."
)
