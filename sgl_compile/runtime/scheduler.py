"""Continuous-batching scheduler over the KV pool and radix cache.

Each step is one forward: an extend batch (new prompts and chunks of long ones,
under a token budget) when there is prefill work, else a decode step of every
running request. A step is three phases: `schedule` (CPU: pick requests,
allocate slots), `run` (the model and the sampler), `process` (CPU: append
tokens, finish, cache). They are kept apart so that the GPU runtime can
schedule step N+1 while step N runs.

Admission reserves KV for the output still to come: a request is admitted only
if the pool (free plus evictable) holds its uncached prompt and, for it and
every running request, the tokens they are expected to draw. A request that
only its length limit can end (ignore_eos, no stops) is expected to draw all of
them; any other a share of them, the new-token ratio, which starts at 0.7 and
decays to 0.1 over 600 decode steps (as SGLang estimates it). When decode runs
out of KV slots all the same, the newest requests are retracted: their computed
KV goes into the radix cache (unlocked, so it may be evicted), they wait at the
head of the queue with the tokens generated so far, and the ratio goes back to
1 (the estimate was too low).

A waiting request that shares more of its prompt with a request of the same extend batch than the cache
holds (the other is computing those tokens now) waits, then takes them from the cache: a system prompt
that arrives with its whole group is computed once, not once per member the batch has room for, and
not again in part where chunking cut it.

Cascade attention (--cascade-attention, on by default on a GPU): decode requests whose KV starts
with the same cached prefix (a radix-tree node that two of them lock, at least
CASCADE_MIN_SHARED tokens deep) are put next to each other in the batch and
named a group, so attention reads that prefix once per group instead of once
per request. A step uses the groups only where they pay: when they save at least
`cascade_min_saved` of the batch's KV reads; any other step runs plain decode
(its own CUDA graphs), so a batch that shares little pays nothing for cascade.

Structured outputs (runtime/structured.py): a constrained request's draws are
masked by its grammar, whose state must have seen every earlier token. A batch
that samples such a request (or a penalized one, whose penalties read the
output so far) therefore reads the previous step back after its own forward is
queued and before it samples. Jump-forward appends the text a grammar forces
without sampling it; those tokens are computed as an extend chunk next step.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from sgl_compile.driver import CompiledModel
from sgl_compile.errors import SglcError
from sgl_compile.runtime.kv_pool import KVPool, ReqToTokenPool, to_device
from sgl_compile.runtime.model_runner import ModelRunner, ScheduledReq
from sgl_compile.runtime.radix_cache import RadixCache
from sgl_compile.runtime.request import FinishReason, Req
from sgl_compile.runtime.sampler import DeviceSample, SampleOutput, sample
from sgl_compile.runtime.structured import GrammarError, Grammars

log = logging.getLogger(__name__)

POLICIES = ("lpm", "fcfs")
LPM_QUEUE_LIMIT = 128  # longest-prefix-match sorting walks the tree once per request up to this many
MAX_JUMPS = 8  # forced texts appended after one sampled token (each makes progress; a bound all the same)
INIT_NEW_TOKEN_RATIO = 0.7  # expected share of max_new_tokens a request that may stop early draws
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600  # per decode step
# An estimated need counts at most this many tokens to come: requests without max_tokens get the whole
# context as their limit, which would otherwise hold back admission for an output few of them reach.
ESTIMATE_CLIP = 4096
CASCADE_MIN_SHARED = 128  # shorter shared prefixes are not worth the extra kernel and merge
# Share of a decode batch's KV reads its groups must save for a cascade step. The H200 sweep
# (`benchmarks/attention_kernels.py cascade --sweep`, 256 requests, 2048 shared keys) measured cascade
# 2.0x faster than plain decode where the groups saved 83% of the reads (16 x 16), 1.45x at 78%
# (16 x 15 and 16 alone), even at 67% (64 x 4): plain decode's repeated reads of a group's slots are
# close in time and mostly hit L2, so what cascade saves is less than the bytes suggest.
CASCADE_MIN_SAVED = 0.75


@dataclass(frozen=True)
class SchedulerConfig:
    max_total_tokens: int  # KV pool slots
    context_length: int
    chunked_prefill_size: int = 2048  # token budget of one extend batch; <= 0: no chunking
    max_running_requests: int = 256
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    cuda_graph_max_bs: int = 256
    disable_cuda_graph: bool = False
    overlap: bool = True  # launch step N + 1 before reading step N's results
    jump_forward: bool = True  # append text a grammar forces without sampling it token by token
    # The running requests' decode joins a step that extends others (a new prompt's chunk, tokens a
    # jump-forward appended): one forward instead of an extend step that stalls decode and a decode
    # step. Such a step runs eagerly, never as a CUDA graph.
    enable_mixed_chunk: bool = False
    # Scales the KV reserved at admission for the running requests' output to come: 0 reserves only
    # their next token (more requests run at once, more are retracted), > 1 is more cautious.
    schedule_conservativeness: float = 1.0
    enable_cascade_attention: bool = False  # decode reads a prefix shared by several requests once
    cascade_min_saved: float = CASCADE_MIN_SAVED  # share of a step's KV reads its groups must save

    def __post_init__(self) -> None:
        if self.schedule_policy not in POLICIES:
            raise SglcError(
                f"unknown schedule policy {self.schedule_policy!r} (valid: {', '.join(POLICIES)})"
            )
        if self.max_running_requests < 1:
            raise SglcError("max_running_requests must be >= 1")
        if self.schedule_conservativeness < 0:
            raise SglcError("schedule_conservativeness must be >= 0")
        if not 0 <= self.cascade_min_saved <= 1:
            raise SglcError("cascade_min_saved must be in [0, 1]")


@dataclass
class _Forward:
    """A batch whose forward is queued: its logits, not yet sampled."""

    batch: list[ScheduledReq]
    logits: Tensor
    rows: list[int]  # per batch entry: its sampling row in logits, or -1
    prompt_rows: dict[int, Tensor]


@dataclass
class _Inflight:
    """A launched step: what it computed, and its draws on their way back to the host."""

    batch: list[ScheduledReq]
    drawn: list[Req]  # requests that drew a token, in the order of the sample's rows
    prompt_rows: dict[int, Tensor]  # batch index -> logits rows for prompt logprobs
    sample: tuple[DeviceSample, torch.cuda.Event | None] | None = None

    def wait(self) -> SampleOutput:
        if self.sample is None:
            return SampleOutput([])
        drawn, event = self.sample
        if event is not None:
            event.synchronize()
        return drawn.to_host(self.drawn)


@dataclass
class _CascadeGroups:
    """A decode batch's cascade grouping, valid while the tree's version and the batch stand."""

    version: int  # RadixCache.version it was derived at
    reqs: list[Req]  # the batch as scheduled
    ordered: list[Req]  # reordered: each group's members adjacent
    shared: list[tuple[object, int] | None]  # per ordered request: its group's (node, shared slots)
    saved: int  # KV reads (per layer) the grouping saves a step


def _to_host_async(drawn: DeviceSample) -> tuple[DeviceSample, torch.cuda.Event | None]:
    """Start copying the draws to (pinned) host memory; the event marks when they are there."""
    if drawn.tokens.device.type != "cuda":
        return drawn, None
    host = DeviceSample(
        *(None if t is None else t.to("cpu", non_blocking=True) for t in
          (drawn.tokens, drawn.logprobs, drawn.top_ids, drawn.top_values))
    )  # fmt: skip
    event = torch.cuda.Event()
    event.record()
    return host, event


def _needs_uncomputed(req: Req, other: Req) -> bool:
    """Whether `other`, computing its prompt, computes tokens that `req` would compute too: their common
    prefix (less req's last token, which is always computed) runs past what other has (all cached).
    Members of a group computing their own questions differ right there: one token tells, mostly."""
    k, a, b = other.kv_len, req.prompt_ids, other.prompt_ids
    return len(a) - 1 > k and len(b) > k and a[k] == b[k] and a[: k + 1] == b[: k + 1]


class Scheduler:
    def __init__(self, compiled: CompiledModel, cfg: SchedulerConfig) -> None:
        c = compiled.config
        self.cfg = cfg
        self.kv = KVPool(
            c.num_layers, cfg.max_total_tokens, c.num_kv_heads, c.head_dim, compiled.dtype, compiled.device
        )
        columns = min(cfg.context_length, cfg.max_total_tokens) + 1
        self.table = ReqToTokenPool(cfg.max_running_requests, columns, compiled.device)
        self.cache = RadixCache(self.kv.free, disabled=cfg.disable_radix_cache)
        self.runner = ModelRunner(
            compiled, self.kv, self.table, cfg.cuda_graph_max_bs, cfg.disable_cuda_graph,
            cascade=cfg.enable_cascade_attention,
        )  # fmt: skip
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted, in admission order
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0
        self.num_retractions = 0
        self.forward_steps = 0
        self.jump_forward_tokens = 0
        self.cascade_shared_tokens = 0  # KV reads (per layer) that cascade groups shared
        self.cascade_steps = 0  # decode steps that ran with groups
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self._reserved = 0  # during _schedule_extend: KV the running requests still need
        self.grammars = Grammars(compiled.tokenizer, c.vocab_size, cfg.max_running_requests)
        self._inflight: _Inflight | None = None
        self._cascade_memo: _CascadeGroups | None = None

    # -- requests in and out --------------------------------------------------------
    def add(self, req: Req) -> None:
        """Queue a request, or finish it at once with an error if it can never run."""
        need = len(req.prompt_ids) + req.params.max_new_tokens
        if not req.prompt_ids:
            req.finish = FinishReason("error", message="the prompt is empty")
        elif len(req.prompt_ids) >= self.cfg.context_length:
            req.finish = FinishReason(
                "error",
                message=f"prompt has {len(req.prompt_ids)} tokens; the context length is {self.cfg.context_length}",
            )
        elif min(need, self.cfg.context_length) > self.kv.size:
            req.finish = FinishReason(
                "error",
                message=f"request needs up to {need} KV slots but the pool holds {self.kv.size} "
                "(lower max_new_tokens or raise max_total_tokens)",
            )
        elif req.params.constraint is None or self._constrain(req):
            self.waiting.append(req)

    def _constrain(self, req: Req) -> bool:
        """Give a request its grammar; False if it is finished already (invalid grammar, or output the
        grammar forces entirely)."""
        try:
            self.grammars.attach(req)
        except SglcError as e:
            req.finish = FinishReason("error", message=str(e))
            return False
        self._follow_grammar(req)  # text forced before any token: jump over it too
        if req.finished:
            self.grammars.release(req)
        return not req.finished

    def abort(self, rid: str) -> Req | None:
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                return self._aborted(req)
        for req in self.running:
            if req.rid == rid:
                self._release(req)
                return self._aborted(req)
        return None

    def _aborted(self, req: Req) -> Req:
        req.finish = FinishReason("abort")
        req.drop_pending()
        self.grammars.release(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight)

    def flush_cache(self) -> bool:
        """Drop all cached prefixes; refused (False) while requests are in flight."""
        if self.has_work():
            return False
        self.cache.flush()
        return True

    # -- one step -------------------------------------------------------------------
    def step(self) -> list[Req]:
        """Schedule and launch one forward; return the requests that got a token or finished.

        With overlap, the results read back are those of the previous step: step N + 1 is built and
        launched while step N still runs on the device, and N's tokens are read (and detokenized,
        finished, cached) while N + 1 runs. A request that finishes at step N was also scheduled in
        step N + 1; that extra draw is dropped.
        """
        batch = self.schedule()
        previous, self._inflight = self._inflight, None
        reads_history = any(
            (s.req.constraint is not None or s.req.params.penalized) and s.samples for s in batch
        )
        queued = self._forward(batch) if batch else None
        if reads_history:
            # Masks and penalties need every earlier token: read the previous step back now. The new
            # forward is already queued, so this CPU work (and filling the masks) overlaps it.
            done = self._finish(previous) if previous is not None else []
            launched = self._sample(queued)
        else:
            launched = self._sample(queued) if queued is not None else None
            done = self._finish(previous) if previous is not None else []
        if launched is not None and not self.cfg.overlap:
            done += self._finish(launched)
        else:
            self._inflight = launched
        return done

    def schedule(self) -> list[ScheduledReq]:
        batch, decode = self._schedule_extend(), []
        if batch and self.cfg.enable_mixed_chunk:
            extending = {id(s.req) for s in batch}
            # (a mixed batch runs eagerly without cascade groups: none are formed for it)
            decode = self._schedule_decode([r for r in self.running if id(r) not in extending], grouped=False)
        elif not batch:
            decode = self._schedule_decode()
        batch += decode
        if decode:
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        while not batch and len(self.running) > 1 and self._inflight is None:
            # Every running request is stuck waiting for KV (e.g. two half-done chunked prefills):
            # retract the newest. One request alone always fits (checked in `add`).
            self._retract(self.running[-1])
            batch = self._schedule_extend() or self._schedule_decode()
        return batch

    def _free_slots(self, n: int) -> list[int] | None:
        """n slots, evicting unlocked cached prefixes if the pool is short."""
        if self.kv.available() < n:
            self.cache.evict(n - self.kv.available())
        return self.kv.alloc(n)

    def _logit_positions(self, req: Req, start: int, end: int) -> list[int]:
        rows = []
        if req.wants_prompt_logprobs:  # rows p predict prompt token p + 1
            next_token = req.params.logprob_start_len + len(req.input_logprobs)  # first not yet recorded
            rows = list(range(max(start, next_token - 1), min(end, len(req.prompt_ids) - 1)))
        if end == req.seq_len:
            rows.append(end - 1)
        return rows

    def _waiting_in_policy_order(self) -> list[Req]:
        """The queue in admission order. lpm: longest cached prefix first (stable: ties keep queue order),
        so that requests sharing a prefix someone just computed run together while it is cached, and in
        the same decode batches (where cascade attention reads it once for all of them)."""
        if self.cfg.schedule_policy == "fcfs" or self.cache.disabled or len(self.waiting) < 2:
            return list(self.waiting)
        if len(self.waiting) <= LPM_QUEUE_LIMIT:
            matched = {id(r): len(self.cache.match_prefix(r.all_ids[:-1])[0]) for r in self.waiting}
            return sorted(self.waiting, key=lambda r: -matched[id(r)])
        # A long queue: one tree walk per run of requests that agree on their first PROMPT_HEAD tokens
        # (a shared system prompt), ranked by the match of its oldest member.
        matched: dict[int, int] = {}
        for r in self.waiting:
            if r.prompt_head not in matched:
                matched[r.prompt_head] = len(self.cache.match_prefix(r.all_ids[:-1])[0])
        return sorted(self.waiting, key=lambda r: -matched[r.prompt_head])

    def _schedule_extend(self) -> list[ScheduledReq]:
        budget = self.cfg.chunked_prefill_size if self.cfg.chunked_prefill_size > 0 else 1 << 62
        batch: list[ScheduledReq] = []
        partial = [r for r in self.running if len(r.prompt_ids) + len(r.output_ids) - r.kv_len > 1]
        waiting = []
        if self.waiting and len(self.running) < self.cfg.max_running_requests and self.table.available():
            self._reserved = sum(self._kv_to_come(r) for r in self.running)
            waiting = self._waiting_in_policy_order()
        # Requests of this batch still computing their prompts, by the hash of their first tokens: a waiting
        # request that needs more of one's prompt than it has computed (a system prompt nothing caches yet,
        # or the rest of one cut by chunking) waits, then takes those tokens from the cache.
        computing: dict[int, list[Req]] = {}
        for req in partial + waiting:
            if budget <= 0:
                break
            if not req.admitted:
                if any(_needs_uncomputed(req, other) for other in computing.get(req.prompt_head, ())):
                    continue
                if not self._admit(req):
                    break
            # (one recomputing its prompt for prompt logprobs computes what the cache holds: not waited for)
            if (
                not self.cache.disabled
                and req.kv_len < len(req.prompt_ids) - 1
                and not req.wants_prompt_logprobs
            ):
                computing.setdefault(req.prompt_head, []).append(req)
            chunk = min(req.seq_len - req.kv_len, budget)
            slots = self._free_slots(chunk)
            if slots is None:
                if req not in partial:
                    self._requeue(req)  # admitted just now, but no room: back to the queue
                break
            self._reserved -= chunk  # allocated now
            start = req.kv_len
            batch.append(
                ScheduledReq(req, start, chunk, slots, self._logit_positions(req, start, start + chunk))
            )
            budget -= chunk
        return batch

    def _kv_to_come(self, req: Req, computed: int | None = None) -> int:
        """KV slots the request is expected to take beyond its `computed` (default: kv_len) tokens."""
        computed = req.kv_len if computed is None else computed
        out = req.tokens_to_come(self.cfg.context_length)
        expected = out if req.runs_to_its_limit else self.new_token_ratio * min(out, ESTIMATE_CLIP)
        return req.seq_len - computed + int(self.cfg.schedule_conservativeness * expected)

    def _admit(self, req: Req) -> bool:
        """Give a waiting request a table row and its cached prefix (locked), if the pool holds what it and
        the running requests are expected to need (one request alone is always admitted)."""
        if len(self.running) >= self.cfg.max_running_requests or self.table.available() == 0:
            return False
        limit = req.seq_len - 1  # the last token is always computed: its logits are sampled
        if req.wants_prompt_logprobs:  # positions whose prompt logprobs are still owed must be computed
            limit = min(limit, max(req.params.logprob_start_len + len(req.input_logprobs) - 1, 0))
        prefix, node = self.cache.match_prefix(req.all_ids[:limit])
        self.cache.lock(node)  # before measuring: a locked prefix is no longer evictable
        need = self._reserved + self._kv_to_come(req, len(prefix))
        if self.running and self.kv.available() + self.cache.evictable_size < need:
            self.cache.unlock(node)
            return False
        self._reserved = need
        row = self.table.alloc()
        self.table.write(row, 0, prefix)
        req.row, req.last_node, req.prefix_len, req.kv_len = row, node, len(prefix), len(prefix)
        if not req.ever_admitted:
            req.ever_admitted = True
            req.cached_tokens = min(len(prefix), len(req.prompt_ids))
            self.prompt_tokens += len(req.prompt_ids)
            self.cached_prompt_tokens += req.cached_tokens
        if req.wants_prompt_logprobs and req.params.logprob_start_len == 0 and not req.input_logprobs:
            req.input_logprobs.append((None, req.prompt_ids[0]))
            req.input_top_logprobs.append([])
        req.admitted = True
        self.waiting.remove(req)
        self.running.append(req)
        return True

    def _schedule_decode(self, running: list[Req] | None = None, grouped: bool = True) -> list[ScheduledReq]:
        ctx = self.cfg.context_length
        running = self.running if running is None else running
        reqs = [r for r in running if r.decodes_next(ctx)]
        while reqs and self.kv.available() < len(reqs):
            self.cache.evict(len(reqs) - self.kv.available())
            if self.kv.available() < len(reqs):
                victim = reqs.pop()  # the newest
                log.info("KV pool full: retracting request %s (%d tokens)", victim.rid, victim.seq_len)
                self._retract(victim)
        shared = None
        if self.cfg.enable_cascade_attention and grouped:
            reqs, shared = self._cascade_groups(reqs)
        slots = self.kv.alloc(len(reqs)) or []
        batch = [
            ScheduledReq(r, r.kv_len, 1, [slot], [r.kv_len]) for r, slot in zip(reqs, slots, strict=True)
        ]
        if shared is not None:
            for s, found in zip(batch, shared, strict=True):
                s.shared = found
        return batch

    def _cascade_groups(self, reqs: list[Req]) -> tuple[list[Req], list[tuple[object, int] | None] | None]:
        """A decode batch's requests reordered so that those sharing a cached prefix are adjacent, and
        per request its group's (node, shared slots), None for one alone; or the batch as it is and
        None where the groups would save less than cascade_min_saved of its KV reads. The grouping is
        reused while neither the batch nor the tree's locks change (most decode steps): the walk up
        each request's path is the costliest per-request work of a step."""
        memo = self._cascade_memo
        if memo is None or memo.version != self.cache.version or memo.reqs != reqs:
            memo = self._cascade_memo = self._group(reqs)
        # (the reads grow by a token a request each step: the test is redone every step)
        if not memo.saved or memo.saved < self.cfg.cascade_min_saved * sum(r.kv_len + 1 for r in reqs):
            return reqs, None
        self.cascade_shared_tokens += memo.saved
        self.cascade_steps += 1
        return memo.ordered, memo.shared

    def _group(self, reqs: list[Req]) -> _CascadeGroups:
        by_node: dict[int, list[tuple[Req, tuple[object, int] | None]]] = {}
        for r in reqs:
            found = self._shared_prefix(r)
            by_node.setdefault(id(found[0]) if found else id(r), []).append((r, found))
        ordered, shared, saved = [], [], 0
        for members in by_node.values():
            if len(members) == 1:
                members = [(members[0][0], None)]
            else:
                saved += members[0][1][1] * (len(members) - 1)
            ordered += [r for r, _ in members]
            shared += [found for _, found in members]
        return _CascadeGroups(self.cache.version, list(reqs), ordered, shared, saved)

    def _shared_prefix(self, req: Req) -> tuple[object, int] | None:
        """(node, depth) of the deepest node of the request's cached prefix that another admitted request
        also locks and that is at least CASCADE_MIN_SHARED tokens deep; its KV slots lead both rows."""
        path, node = [], req.last_node
        while node is not None and node is not self.cache.root:
            path.append(node)
            node = node.parent
        found, depth = None, 0
        for node in reversed(path):  # from the root down; lock_ref only falls with depth
            depth += len(node.key)
            if depth > req.prefix_len or node.lock_ref < 2:
                break
            if depth >= CASCADE_MIN_SHARED:
                found = (node, depth)
        return found

    # -- launch and finish -----------------------------------------------------------
    def _forward(self, batch: list[ScheduledReq]) -> _Forward:
        """Build the inputs and run the program: device work is queued, nothing read back."""
        logits = self.runner.run(batch)
        self.forward_steps += 1
        rows: list[int] = []  # (this loop and the sampler's run over every request every step: kept lean)
        prompt_rows: dict[int, Tensor] = {}  # rows for prompt logprobs, copied: graph outputs are reused
        row = 0
        for i, s in enumerate(batch):
            req, n, length = s.req, len(s.logit_positions), s.length
            if req.wants_prompt_logprobs and n:
                prompt_rows[i] = logits[row : row + n].clone()
            row += n
            req.kv_len += length
            if length > 1:
                self._cache_unfinished(req)
            # (s.samples, inlined: the KV now covers the whole sequence)
            rows.append(row - 1 if req.kv_len == len(req.prompt_ids) + len(req.output_ids) else -1)
        return _Forward(batch, logits, rows, prompt_rows)

    def _sample(self, queued: _Forward) -> _Inflight:
        """Run the sampler on a queued forward's logits (masked for constrained requests). An entry with a
        sampling row draws, unless its request finished or was rewritten by a jump-forward (its tokens
        changed or grew: its KV or its length is no longer the entry's end) after the forward was
        queued."""
        logits = queued.logits
        draws = [
            (s.req, r)
            for s, r in zip(queued.batch, queued.rows, strict=True)
            if r >= 0 and s.req.finish is None
            and s.req.kv_len == s.start + s.length == len(s.req.prompt_ids) + len(s.req.output_ids)
            and s.req.params.max_new_tokens > 0
        ]  # fmt: skip
        reqs = [r for r, _ in draws]
        inflight = _Inflight(queued.batch, reqs, queued.prompt_rows)
        if draws:
            rows = [i for _, i in draws]
            # A decode batch samples every row in order: no gather (a copy of batch x vocab) needed.
            picked = (
                logits if rows == list(range(logits.shape[0])) else logits[to_device(rows, logits.device)]
            )
            constrained = [(j, r) for j, r in enumerate(reqs) if r.constraint is not None]
            if constrained:  # masked in place: a float32 copy, never a CUDA graph's static output
                picked = picked.to(torch.float32, copy=picked is logits)
                self.grammars.mask(picked, constrained)
            drawn = sample(picked, reqs)  # (each request is its own sampler row)
            future = self.runner.alloc_future(len(reqs))
            self.runner.store_future(future, drawn.tokens)
            for req, f in zip(reqs, future, strict=True):
                req.add_pending(f)
            inflight.sample = _to_host_async(drawn)
        return inflight

    def _finish(self, step: _Inflight) -> list[Req]:
        """Read a launched step's results back and apply them to its requests."""
        out = step.wait()
        for i, s in enumerate(step.batch):
            if i in step.prompt_rows and not s.req.finished:
                self._record_prompt_logprobs(s.req, s, step.prompt_rows[i])
        ctx, updated, ended = self.cfg.context_length, [], []
        logprobs, rejected = out.logprobs, 0
        for i, (req, token) in enumerate(zip(step.drawn, out.tokens, strict=True)):
            if req.finish is not None:  # finished (or aborted) after the step was launched: dropped
                continue
            updated.append(req)
            if req.constraint is not None and not self._grammar_accepts(req, token):
                ended.append(req)
                rejected += 1
                continue
            if logprobs is not None and req.params.return_logprob:
                req.output_logprobs.append((logprobs[i], token))
                req.output_top_logprobs.append(out.top_logprobs[i])
            req.add_token(token, ctx)
            if req.constraint is not None:
                self._follow_grammar(req)
            if req.finish is not None:
                ended.append(req)
        self.generated_tokens += len(updated) - rejected
        for s in step.batch:
            req = s.req
            if req.params.max_new_tokens == 0 and s.samples and req.finish is None:
                req.finish = FinishReason("length")  # prefill only (e.g. to share a prompt among n samples)
                updated.append(req)
                ended.append(req)
        for req in ended:
            self.grammars.release(req)
            if req.admitted:
                self._release(req)
            elif req in self.waiting:  # retracted while its last draw was in flight
                self.waiting.remove(req)
        return updated

    # -- structured outputs -----------------------------------------------------------
    def _grammar_accepts(self, req: Req, token: int) -> bool:
        try:
            self.grammars.accept(req, token)
        except GrammarError as e:
            self._grammar_failed(req, e)
            return False
        return True

    def _grammar_failed(self, req: Req, e: GrammarError) -> None:
        log.error("request %s: %s", req.rid, e)
        req.end(FinishReason("error", message=f"structured output failed: {e}"))

    def _follow_grammar(self, req: Req) -> None:
        """After a token: end the request where its grammar has ended; else append what the grammar forces
        (jump-forward: the forced text, or the stop token when nothing else is allowed)."""
        ctx = self.cfg.context_length
        for _ in range(MAX_JUMPS):
            c = req.constraint
            if req.finished or c is None:
                return
            if c.is_terminated():  # a stop token was accepted (with ignore_eos, add_token did not finish)
                return req.end(FinishReason("stop", req.output_ids[-1]))
            if not self.cfg.jump_forward or req.params.return_logprob or req.pending:
                return  # (jumped tokens have no logprobs)
            stop = c.forced_stop()
            if stop is not None:
                c.accept(stop)
                req.add_token(stop, ctx)
                self.generated_tokens += 1
                continue
            try:
                jump = self.grammars.jump(req, min(req.params.max_new_tokens, ctx - len(req.prompt_ids)))
            except GrammarError as e:
                return self._grammar_failed(req, e)
            if jump is None:
                return
            before = len(req.output_ids)
            req.replace_output_tail(*jump, ctx)
            self._rollback_kv(req, len(req.prompt_ids) + jump[0])
            self.generated_tokens += len(req.output_ids) - before
            self.jump_forward_tokens += len(jump[1])

    def _rollback_kv(self, req: Req, pos: int) -> None:
        """Forget the KV of positions >= pos (their tokens were just rewritten). The request's own slots go
        back to the pool; cached ones stay in the tree (valid for the old tokens), and the request keeps
        its lock only on the part it still uses. Its next chunk overwrites the table row from pos."""
        if req.row is None or pos >= req.kv_len:
            return
        slots = self.table.slots(req.row, req.kv_len)
        self.kv.free(slots[max(pos, req.prefix_len) :])
        if pos < req.prefix_len:
            _, node = self.cache.match_prefix(req.ids_between(0, pos))
            self.cache.lock(node)
            self.cache.unlock(req.last_node)
            req.last_node, req.prefix_len = node, pos
        req.kv_len = pos

    def _record_prompt_logprobs(self, req: Req, s: ScheduledReq, rows: Tensor) -> None:
        if not req.wants_prompt_logprobs:
            return
        logprobs = None
        for i, p in enumerate(s.logit_positions):
            token_pos = p + 1
            if token_pos >= len(req.prompt_ids):
                continue
            if logprobs is None:
                logprobs = torch.log_softmax(rows.float(), dim=-1)
            token = req.prompt_ids[token_pos]
            req.input_logprobs.append((float(logprobs[i, token]), token))
            k = req.params.top_logprobs_num
            if k:
                values, ids = torch.topk(logprobs[i], k)
                req.input_top_logprobs.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
            else:
                req.input_top_logprobs.append([])

    # -- KV ownership ---------------------------------------------------------------
    def _cache_unfinished(self, req: Req) -> None:
        """Put the request's computed KV into the tree now, so others (and a retraction) can reuse it."""
        if self.cache.disabled:
            return
        tokens = req.all_ids[: req.kv_len]
        slots = self.table.slots(req.row, req.kv_len)
        cached = self.cache.insert(tokens, slots)
        tree_slots, node = self.cache.match_prefix(tokens)
        if cached > req.prefix_len:  # the tree had these already (another request computed them too)
            self.kv.free(slots[req.prefix_len : cached])
            self.table.write(req.row, req.prefix_len, tree_slots[req.prefix_len : cached])
        self.cache.lock(node)
        self.cache.unlock(req.last_node)
        req.last_node, req.prefix_len = node, req.kv_len

    def _release(self, req: Req) -> None:
        """Hand the request's KV to the cache (or free it) and give back its table row."""
        if req.row is None:
            return
        slots = self.table.slots(req.row, req.kv_len)
        # KV may run one past the tokens: the step after a draw the grammar refused computed it from that
        # draw, which the request dropped. Those slots hold nothing a later request could match.
        valid = min(req.kv_len, req.seq_len)
        self.kv.free(slots[max(valid, req.prefix_len) :])
        if self.cache.disabled:
            self.kv.free(slots[req.prefix_len : valid])
        else:
            cached = self.cache.insert(req.all_ids[:valid], slots[:valid])
            self.kv.free(slots[req.prefix_len : cached])
            self.cache.unlock(req.last_node)
        self.table.free(req.row)
        req.row, req.last_node, req.kv_len, req.prefix_len = None, None, 0, 0
        if req in self.running:
            self.running.remove(req)

    def _requeue(self, req: Req) -> None:
        self._release(req)
        req.admitted = False
        self.waiting.appendleft(req)

    def _retract(self, req: Req) -> None:
        self.num_retractions += 1
        self.new_token_ratio = 1.0
        self._requeue(req)

    # -- introspection --------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        used = self.kv.size - self.kv.available()
        return {
            "num_running_reqs": len(self.running),
            "num_queued_reqs": len(self.waiting),
            "kv_used_tokens": used,
            "kv_usage": used / self.kv.size,
            "kv_cached_tokens": self.cache.total_size(),
            "cache_hit_rate": self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "generated_tokens": self.generated_tokens,
            "num_retractions": self.num_retractions,
            "forward_steps": self.forward_steps,
            "jump_forward_tokens": self.jump_forward_tokens,
            "cascade_shared_tokens": self.cascade_shared_tokens,
            "cascade_steps": self.cascade_steps,
            "new_token_ratio": self.new_token_ratio,
            "num_grammar_reqs": self.grammars.live,
        }

    def check_no_leaks(self) -> None:
        """With nothing in flight: every slot is free or owned by the cache, exactly once."""
        self.cache.check_integrity()
        assert self.kv.available() + self.cache.total_size() == self.kv.size, "KV slots leaked"
        assert self.table.available() == self.cfg.max_running_requests, "table rows leaked"
        assert self.grammars.live == 0, "grammar constraints leaked"
