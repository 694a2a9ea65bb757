"""The API's generation pieces that need no swarm: stop sequences over streamed text, and seeded sampling."""
from __future__ import annotations

import pytest
import torch

from corolla.api.generation import Sampler, StopMatcher


def feed_all(stops: tuple[str, ...], deltas: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    shown = ""
    for delta in deltas:
        shown += matcher.feed(delta)
        if matcher.stopped:
            return shown, True
    return shown + matcher.flush(), False


@pytest.mark.parametrize("deltas", [["The capital is Paris."], ["The cap", "ital is Pa", "ris."],
                                    list("The capital is Paris.")], ids=["whole", "pieces", "characters"])
def test_stop_sequence_cuts_the_text_however_it_is_split(deltas):
    assert feed_all(("Paris", "\n\n"), deltas) == ("The capital is ", True)


def test_text_that_only_looks_like_a_stop_start_is_shown_in_the_end():
    matcher = StopMatcher(("Paris",))
    assert matcher.feed("I like Par") == "I like "  # "Par" could still become "Paris"
    assert matcher.feed("k") == "Park"
    assert matcher.feed("s Pa") == "s "
    assert matcher.flush() == "Pa" and not matcher.stopped


def test_no_stop_sequences_pass_everything_through():
    assert feed_all((), ["a", "b"]) == ("ab", False)


def test_sampler_is_reproducible_per_seed_and_independent_of_the_global_rng():
    scores = torch.randn(1, 50)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(temperature=1.0, top_p=1.0, seed=seed)
        torch.manual_seed(torch.seed())  # whatever other threads do to torch's global generator
        out = []
        for _ in range(20):
            picked = sampler(torch.zeros(1, 1, dtype=torch.long), scores)
            assert torch.isfinite(picked).sum() == 1  # exactly one token left for generate's argmax
            out.append(int(picked.argmax()))
        return out

    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_top_p_keeps_only_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(temperature=1.0, top_p=0.7, seed=0)
    seen = {int(sampler(torch.zeros(1, 1, dtype=torch.long), scores).argmax()) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reach 0.7; the tail never comes up
    greedy_like = Sampler(temperature=1.0, top_p=0.01, seed=0)
    assert {int(greedy_like(torch.zeros(1, 1, dtype=torch.long), scores).argmax()) for _ in range(50)} == {0}
