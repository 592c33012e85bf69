"""The sampler against independent computations on small vocabularies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgl_compile.errors import SglcError
from sgl_compile.runtime.sampler import SampleInput, apply_penalties, sample
from sgl_compile.runtime.sampling_params import SamplingParams

V = 8


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    row = SampleInput(params, gen, [], [])
    return [sample(logits[None], [row]).tokens[0] for _ in range(n)]


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
    row = SampleInput(SamplingParams(temperature=0, presence_penalty=0.5), torch.Generator(), [], [0])
    assert sample(logits[None], [row]).tokens == [1]


def test_seeds_reproduce_per_request() -> None:
    logits = torch.randn(V)
    params = SamplingParams(temperature=1.0)
    assert _draw(logits, params, 50, seed=3) == _draw(logits, params, 50, seed=3)
    assert _draw(logits, params, 50, seed=3) != _draw(logits, params, 50, seed=4)


def test_logprobs_are_raw_log_softmax() -> None:
    logits = torch.randn(2, V)
    rows = [
        SampleInput(
            SamplingParams(temperature=0, return_logprob=True, top_logprobs_num=3), torch.Generator(), [], []
        ),
        SampleInput(
            SamplingParams(temperature=0.7, return_logprob=True), torch.Generator().manual_seed(0), [], []
        ),
    ]
    out = sample(logits, rows)
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
