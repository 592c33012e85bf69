"""Structured outputs in the scheduler: each constrained request's grammar, the batch masks, jump-forward.

A constrained request owns a `Constraint` (runtime/grammar.py) from `Scheduler.add` until it finishes,
is aborted or fails. It follows the request's output: every sampled token is accepted when it is read
back, and the mask of the request's next draw is filled from that state, so a mask needs every earlier
token on the host. With overlapped scheduling the previous token may still be on the device when the
next step is launched: the scheduler then reads the previous step back between the new step's forward
and its sampling (`Scheduler.step`).

Jump-forward (SGLang's): where the grammar forces the next characters (`, "age": ` between two fields of
a JSON schema), they are appended without sampling them token by token. The last few output tokens and
the forced text are re-encoded together, so that the boundary is split as the tokenizer splits text
(`"` + `, "` becomes `",` + ` "`); the output's tail is replaced from the first changed token and the
new tokens are computed as an extend chunk in the request's next step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from sgl_compile.errors import SglcError
from sgl_compile.runtime.radix_cache import common_prefix
from sgl_compile.runtime.request import Req
from sgl_compile.tokenizer import Tokenizer

if TYPE_CHECKING:
    from sgl_compile.runtime.grammar import GrammarBackend

JUMP_WINDOW = 4  # output tokens before the forced text that are re-encoded with it


class GrammarError(SglcError):
    """The grammar refused a token the scheduler produced under its mask: a bug, fatal to the request."""


class Grammars:
    """The scheduler's structured-output state: one grammar backend (built on first use: xgrammar is
    imported and the vocabulary read only when a request asks for a constraint) and one batch bitmask."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_batch: int) -> None:
        self.tokenizer, self.vocab_size, self.max_batch = tokenizer, vocab_size, max_batch
        self._backend: GrammarBackend | None = None
        self._bitmask: Tensor | None = None
        self.live = 0  # constraints held by requests (0 when idle: see Scheduler.check_no_leaks)

    @property
    def backend(self) -> GrammarBackend:
        if self._backend is None:
            from sgl_compile.runtime.grammar import GrammarBackend, allocate_mask

            self._backend = GrammarBackend(self.tokenizer, self.vocab_size)
            self._bitmask = allocate_mask(self.max_batch, self.vocab_size)
        return self._backend

    # -- a request's constraint -------------------------------------------------------
    def attach(self, req: Req) -> None:
        """Compile the request's constraint (SglcError with the compiler's message if invalid) and give
        the request its own matcher; a request that samples nothing (max_new_tokens=0) needs none."""
        from sgl_compile.runtime.grammar import Constraint

        grammar = self.backend.compile(*req.params.constraint)
        if req.params.max_new_tokens > 0:
            stops = sorted(t for t in req.eos_ids if 0 <= t < self.vocab_size)
            req.constraint = Constraint(grammar, stops or None)
            self.live += 1

    def release(self, req: Req) -> None:
        if req.constraint is not None:
            req.constraint.release()
            req.constraint = None
            self.live -= 1

    def accept(self, req: Req, token: int) -> None:
        if not req.constraint.accept(token):
            raise GrammarError(f"the grammar refused token {token}, sampled under its own mask")

    # -- masks ------------------------------------------------------------------------
    def mask(self, logits: Tensor, rows: list[tuple[int, Req]]) -> None:
        """-inf on the tokens each constrained row (index in `logits`, request) may not draw, in place.
        The bitmask is filled on the host, after every earlier token of these requests was accepted."""
        from sgl_compile.runtime.grammar import apply_mask

        bitmask = self._bitmask
        for i, req in rows:
            req.constraint.fill_mask(bitmask, i)
        # (A CUDA copy of the pageable bitmask is staged before `apply_mask` returns, so refilling it for
        # the next step cannot race with this one.)
        apply_mask(logits, bitmask[: logits.shape[0]], [i for i, _ in rows])

    # -- jump-forward -----------------------------------------------------------------
    def jump(self, req: Req, max_output: int) -> tuple[int, list[int]] | None:
        """What the grammar forces next, as (start, tokens): output_ids[start:] becomes `tokens` (at most
        `max_output` output tokens in all). The constraint already follows. None if nothing is forced."""
        forced = req.constraint.jump_forward()
        if not forced:
            return None
        out = req.output_ids
        for k in dict.fromkeys((min(JUMP_WINDOW, len(out)), 0)):
            old = out[len(out) - k :]
            new = self._encode_as(self._bytes(old) + forced.encode())
            if new is not None:
                break
        else:
            return None  # the tokenizer does not spell the forced text back (e.g. a prefix space)
        common = common_prefix(old, new)
        start = len(out) - k + common
        tail = new[common : common + max_output - start]
        if not req.constraint.retokenize(old, old[:common] + tail):
            raise GrammarError(f"the grammar refused the tokens of its own forced text {forced!r}")
        return start, tail

    def _bytes(self, ids: list[int]) -> bytes:
        table = self.backend.token_bytes
        return b"".join(table[t] for t in ids)

    def _encode_as(self, target: bytes) -> list[int] | None:
        """Token ids spelling exactly `target` (as the grammar reads tokens), or None: a window that
        starts inside a character, or a tokenizer that adds to the text (a sentencepiece prefix space)."""
        try:
            text = target.decode()
        except UnicodeDecodeError:
            return None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return ids if self._bytes(ids) == target else None
