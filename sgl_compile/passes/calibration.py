"""Calibration data for compile-time quantization: a small built-in text, and the program run over it.

Error-compensating quantizers (GPTQ) need the activations that reach each linear. A few thousand
tokens of varied text written for this purpose (essays, stories, dialogue, code, instructions,
letters, notes) live here, so compiling needs no data set or download; each text is one sequence
of a single prefill batch. The perplexity test's text is deliberately not among them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, fx

from sgl_compile.errors import SglcError
from sgl_compile.passes.lower_attention import prefill_inputs
from sgl_compile.tokenizer import Tokenizer

CALIBRATION_TEXTS: tuple[str, ...] = (
    # An explanatory essay.
    "Glass is an odd material. It behaves like a solid, yet its atoms sit in the disordered pattern of a "
    "liquid, frozen before they had time to line up into crystals. Windowmakers in the Middle Ages did not "
    "know this, but they knew the recipe: sand, ash from burnt plants, and a furnace hot enough to make the "
    "mixture flow. The ash lowered the melting point; lime, added later, kept the finished pane from slowly "
    "dissolving in the rain. Modern float glass is made by pouring the melt onto a bath of molten tin, where "
    "it spreads into a sheet so flat that it needs no polishing. A single line can produce several hundred "
    "tonnes a day, and it runs for years without stopping, because letting the furnace cool would crack it.",
    # A short story.
    "The lighthouse keeper's daughter had never seen snow until the winter her father fell ill. It came in "
    "the night, quietly, and by morning the path to the lamp room was buried to her knees. She climbed the "
    "spiral stairs one hundred and twelve of them, she counted, with the oil can knocking against her leg. "
    "At the top the glass was rimed with frost. She scraped it clear with her sleeve, trimmed the wick the "
    "way he had shown her, and struck a match. Far out on the grey water a fishing boat was feeling its way "
    "home. When the beam swung across it, someone on deck lifted an arm and waved.",
    # A dialogue.
    "Customer: Hi, I ordered a pair of running shoes last Tuesday and they still haven't arrived.\n"
    "Agent: I'm sorry to hear that. Could you give me the order number?\n"
    "Customer: Sure, it's 58-2093-K.\n"
    "Agent: Thanks. It looks like the parcel was sent to the old address on your account, on Maple Street.\n"
    "Customer: Oh no, I moved in March. I thought I had updated it.\n"
    "Agent: The new address was saved after the order was placed. I can ask the courier to redirect it, "
    "which usually takes two working days, or send a replacement today at no cost. Which would you prefer?\n"
    "Customer: The replacement, please. And could you make sure the new address is the default?\n"
    "Agent: Done. You'll get a tracking link by email within the hour.",
    # Code.
    "import csv\nfrom collections import defaultdict\n\n\n"
    "def monthly_totals(path: str) -> dict[str, float]:\n"
    '    """Sum the amount column of a CSV export per month (YYYY-MM)."""\n'
    "    totals: dict[str, float] = defaultdict(float)\n"
    "    with open(path, newline='') as f:\n"
    "        for row in csv.DictReader(f):\n"
    "            month = row['date'][:7]\n"
    "            try:\n"
    "                totals[month] += float(row['amount'])\n"
    "            except ValueError:\n"
    "                continue  # skip malformed rows instead of failing the whole report\n"
    "    return dict(sorted(totals.items()))\n\n\n"
    "if __name__ == '__main__':\n"
    "    for month, total in monthly_totals('payments.csv').items():\n"
    "        print(f'{month}: {total:10.2f}')\n",
    # Instructions.
    "To repot a houseplant, first water it the day before so the roots hold together. Choose a new pot "
    "only one size larger than the old one; too much soil stays wet and the roots rot. Tip the plant out "
    "while supporting the base of the stems, and gently loosen any roots that circle the bottom. Put a "
    "layer of fresh compost in the new pot, set the plant at the same depth as before, and fill around it, "
    "pressing lightly. Water thoroughly, let it drain, and keep it out of direct sun for a week.",
    # A letter.
    "Dear Ms. Okafor,\n\nThank you for your application for the position of laboratory technician. We were "
    "impressed by your experience with spectrometers and by the report you attached on calibration drift. "
    "We would like to invite you to an interview on Thursday, 14 November, at 10:30, at our site in the "
    "north building. The interview will last about an hour and will include a short practical exercise. "
    "Please let us know by Monday whether this time suits you.\n\nKind regards,\nDaniel Ferreira\nHead of "
    "Analytical Services",
    # An encyclopedic entry.
    "The common octopus has three hearts and blue blood. Two of the hearts pump blood through the gills; "
    "the third sends it around the rest of the body, and it stops beating while the animal swims, which may "
    "be why octopuses prefer to crawl. Their blood uses copper rather than iron to carry oxygen, which works "
    "better in cold water with little oxygen in it. About two thirds of an octopus's neurons are not in its "
    "brain but in its arms, so each arm can taste, touch and react on its own. Most species live only a year "
    "or two. A female lays tens of thousands of eggs in a den, guards them without eating for weeks, and "
    "dies soon after they hatch.",
    # A news report.
    "The city council voted on Wednesday evening to convert two lanes of Harbour Road into a protected "
    "cycle path, ending a debate that had lasted more than a year. The plan passed by seven votes to four. "
    "Supporters pointed to a survey in which six in ten residents said they would cycle to work if they felt "
    "safe doing so. Several shop owners objected that removing parking would cost them customers, and the "
    "council agreed to add a loading bay at each end of the street and to review the scheme after eighteen "
    "months. Construction is expected to begin in the spring and will cost an estimated 3.2 million.",
    # A recipe.
    "Simple white bread. Mix 500 g of strong flour, 10 g of salt and 7 g of dried yeast in a large bowl. "
    "Add 320 ml of warm water and stir until no dry flour remains. Knead on a lightly floured surface for "
    "ten minutes, until the dough is smooth and springs back when pressed. Cover and leave it somewhere warm "
    "for about an hour, or until doubled in size. Knock it back, shape it into a loaf, and place it in an "
    "oiled tin. Let it rise again for forty minutes, then bake at 220 C for thirty minutes. The loaf is done "
    "when it sounds hollow when tapped underneath.",
    # A personal essay.
    "I started learning the cello at forty-three, which everyone told me was too late. They were partly "
    "right. My fingers do not move as quickly as a child's, and I will never play in an orchestra. But the "
    "point was never to become good; it was to become slightly better every week, and that has turned out "
    "to be a rare pleasure for an adult. At work, progress is measured in projects and promotions, and most "
    "of it is invisible. With an instrument, the evidence is right there: in March I could not play a "
    "scale in tune, and in June I could. There is something honest about a skill that cannot be faked.",
    # A technical explanation.
    "When you type a web address, your computer first needs the server's numeric address. It asks a DNS "
    "resolver, usually run by your internet provider. If the resolver has the answer cached, it replies at "
    "once; otherwise it asks a root server which servers handle the top-level domain, such as .org, then "
    "asks one of those which server is responsible for the name itself, and finally asks that server. Each "
    "answer carries a time to live, in seconds, telling the resolver how long it may keep the record. This "
    "is why a changed address can take hours to reach everyone.",
    # More code, in another language.
    "SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\nFROM customers AS c\n"
    "JOIN orders AS o ON o.customer_id = c.id\nWHERE o.created_at >= DATE '2023-01-01'\n"
    "GROUP BY c.name\nHAVING COUNT(o.id) > 5\nORDER BY revenue DESC\nLIMIT 20;\n\n"
    "function debounce(fn, delay) {\n  let timer = null;\n  return (...args) => {\n"
    "    clearTimeout(timer);\n    timer = setTimeout(() => fn(...args), delay);\n  };\n}\n",
    # An exchange with an assistant.
    "User: Can you explain the difference between weather and climate?\n"
    "Assistant: Weather is what the atmosphere is doing at a particular place and time: today's rain, "
    "tomorrow's wind, this afternoon's temperature. Climate is the pattern of weather over a long period, "
    "usually thirty years or more. A cold week in July is weather; the fact that July is usually warm is "
    "climate.\nUser: So one cold winter doesn't disprove global warming?\n"
    "Assistant: Right. A single season is a sample of weather. Climate change shows up in the long-term "
    "averages and in how often extremes occur, which is why scientists look at decades of records.",
    # Popular science.
    "On a clear night far from city lights you can see about four thousand stars, almost all of them within "
    "a few hundred light years of us. The faint band of the Milky Way is the light of billions more, too "
    "distant to pick out one by one. Astronomers measure the distance to nearby stars by parallax: as the "
    "Earth moves around the Sun, a close star seems to shift slightly against the background, and the size "
    "of that shift gives its distance. For farther objects they rely on standard candles, such as a kind "
    "of exploding star whose true brightness is known, so that how dim it looks reveals how far away it is.",
    # A fable.
    "A crow found a piece of cheese and flew with it to the top of a pine tree. A fox, passing below, "
    "wanted the cheese for himself. 'What a fine bird,' he called up. 'Such glossy feathers, such bright "
    "eyes. Surely a bird so handsome must have a voice to match. Won't you sing for me?' The crow, pleased "
    "by the praise, opened her beak to caw, and the cheese fell straight into the fox's mouth. 'Your voice "
    "is fine,' said the fox as he trotted away, 'but your judgement could use some work.'",
    # Meeting notes.
    "Minutes of the project meeting, 3 October.\nPresent: Aisha, Tom, Priya, Marek.\n1. Release date. "
    "Testing found two crashes on older phones. Tom thinks both come from the image cache. Agreed to delay "
    "the release by one week rather than ship with a known crash.\n2. Budget. Priya reported that cloud "
    "costs rose 18% last month, mostly from logs that are never read. Marek will shorten log retention "
    "from ninety days to thirty.\n3. Hiring. Two candidates for the designer role reach the final round "
    "next week.\nAction items: Tom to fix the cache bug by Friday; Marek to change the retention policy; "
    "Aisha to tell the support team about the new date.",
    # A review.
    "I bought this kettle to replace one that lasted eight years, and I have mixed feelings. It boils a "
    "full litre in just under three minutes, which is quick, and the temperature settings are genuinely "
    "useful for green tea. The lid, however, is stiff and needs two hands to open, and the blue light that "
    "glows while it heats is bright enough to read by in a dark kitchen. After two months there is already "
    "a small scratch on the base. Three stars: it does the job, but I expected better for the price.",
    # Shell and Rust.
    "#!/usr/bin/env bash\nset -euo pipefail\n# Back up every database listed in dbs.txt, keeping a week.\n"
    'backup_dir="/var/backups/db/$(date +%F)"\nmkdir -p "$backup_dir"\n'
    'while read -r db; do\n  pg_dump --format=custom "$db" > "$backup_dir/$db.dump"\ndone < dbs.txt\n'
    "find /var/backups/db -mindepth 1 -maxdepth 1 -mtime +7 -exec rm -rf {} +\n\n"
    "fn mean(values: &[f64]) -> Option<f64> {\n    if values.is_empty() {\n        return None;\n    }\n"
    "    Some(values.iter().sum::<f64>() / values.len() as f64)\n}\n",
    # Arithmetic in words.
    "Suppose a savings account pays 4% interest a year, added once a year. If you deposit 1,000, after one "
    "year you have 1,040. In the second year interest is paid on the whole 1,040, so you earn 41.60 rather "
    "than 40, and end with 1,081.60. After ten years the balance is about 1,480, and after eighteen years it "
    "has roughly doubled. A handy rule of thumb is to divide 72 by the interest rate: at 4%, money doubles "
    "in about 18 years; at 6%, in about 12; at 9%, in about 8.",
)


def calibration_batch(tokenizer: Tokenizer) -> list[list[int]]:
    """The calibration texts as token ids, one sequence each."""
    return [ids for ids in (tokenizer.encode(text) for text in CALIBRATION_TEXTS) if ids]


def _kv_shape(gm: fx.GraphModule, k_cache: fx.Node) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the KV pool, read off the lowered attention ops."""
    layers = sum(1 for n in gm.graph.nodes if n.target is torch.ops.sglc.paged_attention.default)
    for user in k_cache.users:  # paged_attention / rope_store_kv (q, k, v, ...): k [T, Hkv, D] is argument 1
        k = user.args[1] if len(user.args) > 1 else None
        val = k.meta.get("val") if isinstance(k, fx.Node) else None
        if val is not None:
            return layers, int(val.shape[-2]), int(val.shape[-1])
    raise SglcError("calibration: cannot infer the KV cache shape from the program")


def program_inputs(
    gm: fx.GraphModule, batch: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    """The lowered program's positional inputs for one prefill of `batch` (last logits of each sequence)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    k_cache = next((n for n in placeholders if n.target == "k_cache"), None)
    if k_cache is None:
        raise SglcError("calibration: the program has no KV cache input (run after lower_attention)")
    inputs = prefill_inputs([list(ids) for ids in batch], _kv_shape(gm, k_cache), dtype, device)
    unknown = [n.target for n in placeholders if n.target not in inputs]
    if unknown:
        raise SglcError(f"calibration: unexpected program inputs {unknown}")
    return [inputs[n.target] for n in placeholders]


class _Substitute(fx.Interpreter):
    """Runs the program with `replace(node, input) -> output` computing the selected linears."""

    def __init__(
        self, gm: fx.GraphModule, nodes: set[fx.Node], replace: Callable[[fx.Node, Tensor], Tensor]
    ) -> None:
        super().__init__(gm)
        self.nodes, self.replace = nodes, replace

    def run_node(self, n: fx.Node) -> object:
        if n in self.nodes:
            return self.replace(n, self.env[n.args[0]])
        return super().run_node(n)


def run_calibration(
    gm: fx.GraphModule,
    linears: Sequence[fx.Node],
    replace: Callable[[fx.Node, Tensor], Tensor],
    batch: Sequence[Sequence[int]],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """One prefill of `batch` through `gm`; each node of `linears` (x, weight, ...) is computed by
    `replace(node, x)` instead, in graph order. `replace` may quantize the weight there and return the
    quantized layer's output, so every later layer is calibrated on the quantized model's activations.
    The graph and its tensors are left as they were."""
    with torch.no_grad():
        _Substitute(gm, set(linears), replace).run(*program_inputs(gm, batch, device, dtype))
