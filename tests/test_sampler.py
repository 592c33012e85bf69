"""The sampler against independent computations on small vocabularies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile.errors import SglcError
from sgl_compile.runtime.sampler import SampleInput, apply_penalties, sample, uniform_noise, unit_interval
from sgl_compile.runtime.sampling_params import SamplingParams

V = 8


def _row(params: SamplingParams, seed: int = 0, step: int = 0, prompt=(), output=()) -> SampleInput:
    return SampleInput(params, seed, step, list(prompt), list(output))


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """n draws of one request: its output indices 0..n-1, in one batch."""
    rows = [_row(params, seed, step) for step in range(n)]
    return sample(logits[None].expand(n, -1), rows).tokens.tolist()


def test_frequencies_match_softmax_chi_square() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 6000
    counts = torch.bincount(torch.tensor(_draw(logits, SamplingParams(temperature=1.0), n)), minlength=V)
    expected = torch.softmax(logits, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, chi2  # chi-square, 7 degrees of freedom, p = 0.001


def test_temperature_sharpens() -> None:
    logits = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    n = 3000
    counts = torch.bincount(torch.tensor(_draw(logits, SamplingParams(temperature=0.5), n)), minlength=V)
    p0 = math.exp(2) / (math.exp(2) + 7)
    assert abs(counts[0].item() / n - p0) < 4 * math.sqrt(p0 * (1 - p0) / n)


def _allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Independent: sort by probability, walk down the list applying each rule."""
    probs = torch.softmax(logits / p.temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[: p.top_k] if p.top_k > 0 else order
    if p.top_p < 1:  # the smallest head of the (top-k renormalised) list reaching top_p
        total, mass, nucleus = sum(probs[j] for j in kept), 0.0, []
        for i in kept:
            if mass >= p.top_p:
                break
            nucleus.append(i)
            mass += probs[i] / total
        kept = nucleus
    top = max(probs)
    return {i for i in kept if probs[i] >= p.min_p * top}


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-4, 4), min_size=V, max_size=V),
    top_k=st.sampled_from([-1, 1, 2, 5]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.2]),
    min_p=st.sampled_from([0.0, 0.1, 0.5]),
    seed=st.integers(0, 1000),
)
def test_filters_never_emit_excluded_tokens(values, top_k, top_p, min_p, seed) -> None:
    logits = torch.tensor(values) + torch.arange(V) * 1e-3  # no exact ties
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    drawn = set(_draw(logits, params, 60, seed))
    assert drawn <= _allowed(logits, params)


def test_penalties_change_logits_as_specified() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0, -0.5])
    p = SamplingParams(repetition_penalty=2.0)
    got = apply_penalties(logits.clone(), [0, 1, 1], [], p)
    expected = logits.clone()
    expected[0], expected[1] = 2.0 / 2.0, -1.0 * 2.0
    assert torch.equal(got, expected)

    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits.clone(), [3, 3, 4, 2, 2, 2], [2, 2, 2, 4], p)
    expected = logits.clone()
    expected[2] -= 0.5 * 3 + 0.25
    expected[4] -= 0.5 * 1 + 0.25
    assert torch.allclose(got, expected)


def test_penalty_affects_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.9, 0, 0, 0, 0, 0, 0])
    row = _row(SamplingParams(temperature=0, presence_penalty=0.5), output=[0])
    assert sample(logits[None], [row]).tokens.tolist() == [1]


def test_seeds_reproduce_per_request() -> None:
    logits = torch.randn(V)
    params = SamplingParams(temperature=1.0)
    assert _draw(logits, params, 50, seed=3) == _draw(logits, params, 50, seed=3)
    assert _draw(logits, params, 50, seed=3) != _draw(logits, params, 50, seed=4)


def test_draws_do_not_depend_on_the_batch() -> None:
    """A request's token depends on its seed and output index only: not on its row, its neighbours,
    or whether the batch mixes greedy and sampled rows."""
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in
              [(1.0, -1, 1.0), (0.0, -1, 1.0), (0.8, 5, 1.0), (1.3, -1, 0.7), (0.5, 10, 0.9), (0.0, -1, 1.0)]]  # fmt: skip
    rows = [_row(p, seed=100 + i, step=7) for i, p in enumerate(params)]
    together = sample(logits, rows).tokens.tolist()
    alone = [sample(logits[i : i + 1], [rows[i]]).tokens.item() for i in range(6)]
    assert together == alone
    order = [5, 3, 0, 4, 1, 2]
    shuffled = sample(logits[order], [rows[i] for i in order]).tokens.tolist()
    assert shuffled == [together[i] for i in order]


def test_noise_is_uniform_and_independent() -> None:
    rows = [_row(SamplingParams(), seed=s, step=t) for s in range(4) for t in range(4)]
    u = uniform_noise(rows, 4096, torch.device("cpu"))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    flat = u.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.02  # neighbours
    assert len({tuple(r[:8].tolist()) for r in u}) == len(rows)  # every (seed, step) its own stream


def test_noise_never_reaches_0_or_1() -> None:
    """At the extreme hashes too: a uniform of exactly 1 makes -log(u) = 0, and the race picks a token of
    probability 0 (0 / 0 = nan wins argmax)."""
    x = torch.tensor([0, 1, 511, 512, 2**31, 2**32 - 513, 2**32 - 512, 2**32 - 1], dtype=torch.int64)
    u = unit_interval(x)
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    assert bool((-torch.log(u) > 0).all())
    assert u[0] == u[1] == u[2] and u[2] < u[3]  # 23 bits kept: neighbours differ by 2^-23
    assert u[-1] - u[-3] == 2**-23


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(2, V)
    rows = [
        _row(SamplingParams(temperature=0, return_logprob=True, top_logprobs_num=3)),
        _row(SamplingParams(temperature=0.7, return_logprob=True)),
    ]
    out = sample(logits, rows).to_host(rows)
    ref = torch.log_softmax(logits, -1)
    for i, t in enumerate(out.tokens):
        assert abs(out.logprobs[i] - ref[i, t].item()) < 1e-6
    assert [t for t, _ in out.top_logprobs[0]] == torch.topk(ref[0], 3).indices.tolist()


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": 0},
        {"max_new_tokens": -1},
        {"n": 0},
        {"bogus": 1},
    ],
)
def test_invalid_params_are_rejected(bad) -> None:
    with pytest.raises(SglcError):
        SamplingParams.from_dict(bad)
