from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import pytest
import torch

from dspark.spec.proposer import Draft
from dspark.spec.sampling import SamplingParams, make_generator, probs_from_logits
from dspark.spec.verify import (
    _next_token_probs,
    rejection_sample,
    verify,
    verify_batch,
    verify_greedy,
    verify_sampling,
)

EOS = 9
V_SMALL = 10


def _argmax_logits(ids: list[int], vocab: int = V_SMALL) -> torch.Tensor:
    """(len(ids), V) logits whose argmax row by row is `ids`."""
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float() * 5.0


# -- greedy -----------------------------------------------------------------------------------

def test_greedy_all_accepted_adds_bonus() -> None:
    r = verify_greedy([1, 2, 3], _argmax_logits([1, 2, 3, 4]), {EOS})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (3, [1, 2, 3, 4], False)


def test_greedy_first_rejected_emits_target_token() -> None:
    r = verify_greedy([5, 2], _argmax_logits([1, 2, 3]), {EOS})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (0, [1], False)


def test_greedy_middle_rejection() -> None:
    r = verify_greedy([1, 2, 3], _argmax_logits([1, 2, 7, 4]))
    assert (r.num_accepted, r.tokens) == (2, [1, 2, 7])


def test_greedy_eos_inside_accepted_prefix_truncates_without_bonus() -> None:
    r = verify_greedy([1, EOS, 3], _argmax_logits([1, EOS, 3, 4]), {EOS})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (2, [1, EOS], True)


def test_greedy_eos_as_corrected_token() -> None:
    r = verify_greedy([1, 2], _argmax_logits([1, EOS, 3]), {EOS})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (1, [1, EOS], True)


def test_greedy_eos_as_bonus_and_extra_stop_ids() -> None:
    r = verify_greedy([1], _argmax_logits([1, EOS]), {EOS, 4})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (1, [1, EOS], True)
    r = verify_greedy([1, 4, 2], _argmax_logits([1, 4, 2, 3]), {EOS, 4})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (2, [1, 4], True)


def test_greedy_without_drafts_and_ties() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])  # tie: the lowest index wins
    assert verify_greedy([], logits).tokens == [1]


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        verify_greedy([1, 2], _argmax_logits([1, 2]))
    with pytest.raises(ValueError):
        verify_sampling([1], None, torch.full((3, 4), 0.25), None)


# -- sampling: deterministic cases -------------------------------------------------------------

def _one_hot(ids: list[int], vocab: int = V_SMALL) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()


def test_sampling_eos_inside_accepted_prefix_truncates_without_bonus() -> None:
    # q == p one-hot: every draft is accepted with probability 1.
    p_t = _one_hot([1, EOS, 3, 4])
    r = verify_sampling([1, EOS, 3], p_t[:3], p_t, make_generator(0), {EOS})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (2, [1, EOS], True)


def test_sampling_draft_with_zero_draft_prob_is_rejected() -> None:
    q = _one_hot([5])  # claims token 5, but token 2 was drafted: impossible under q
    r = verify_sampling([2], q, _one_hot([2, 3]), make_generator(0))
    assert (r.num_accepted, r.tokens) == (0, [2])  # residual max(0, p_t - q) is p_t here


def test_sampling_one_hot_draft_rejected_where_target_has_no_mass() -> None:
    r = verify_sampling([4, 1], None, _one_hot([3, 1, 2]), make_generator(0), {EOS})
    assert (r.num_accepted, r.tokens) == (0, [3])


def test_sampling_without_drafts_samples_from_target() -> None:
    r = verify_sampling([], None, _one_hot([3]), make_generator(0), {EOS})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (0, [3], False)


def test_zero_residual_falls_back_to_target() -> None:
    p = torch.tensor([[[0.25, 0.75, 0.0]]])  # (1, 1, V): q == p_t, so the residual is empty
    probs = _next_token_probs(torch.tensor([[1]]), p, torch.cat([p, p], 1), torch.tensor([0]))
    assert torch.allclose(probs, p[0])


def test_verify_dispatches_on_params_and_is_reproducible() -> None:
    logits = torch.randn(4, V_SMALL, generator=torch.Generator().manual_seed(1))
    draft = logits.argmax(-1)[:3].tolist()
    greedy = verify(draft, None, logits, SamplingParams(), None)
    assert greedy.tokens == logits.argmax(-1).tolist()
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    q = probs_from_logits(logits[:3], params)
    runs = [verify(draft, q, logits, params, make_generator(3)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_verify_batch_truncates_drafts_to_scheduled_length() -> None:
    drafts = [Draft([1, 2, 3]), Draft([4, 5], probs=_one_hot([4, 5]))]
    logits = [_argmax_logits([1, 2]), _argmax_logits([4, 6])]  # l = 1 for both
    results = verify_batch(drafts, logits, [SamplingParams()] * 2, [None, None], [(), ()])
    assert [r.tokens for r in results] == [[1, 2], [4, 6]]


# -- sampling: the output distribution equals the target's ------------------------------------
# A toy first-order Markov target p(. | prev) and drafter q(. | prev) over V tokens. Each
# trial runs rounds of l drafts from anchor 0 until two tokens are emitted, and the joint of
# (y1, y2) is compared with p(y1 | 0) p(y2 | y1) by a chi-square test.

V = 8
NUM_SAMPLES = 20_000
Verifier = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Generator],
                    tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny (N, 8) ops: extra intra-op threads only contend on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclasses.dataclass
class Toy:
    target: torch.Tensor  # (V, V): row = previous token
    draft: torch.Tensor | None  # (V, V) q rows, or None: deterministic drafts
    draft_ids: torch.Tensor | None = None  # (V,) the deterministic draft after each token


def _masked(logits: torch.Tensor, zero: list[int]) -> torch.Tensor:
    out = logits.clone()
    out[:, zero] = -math.inf
    return out


def make_toy(kind: str, params: SamplingParams) -> Toy:
    g = torch.Generator().manual_seed(123)
    t_logits, d_logits = torch.randn(V, V, generator=g) * 1.5, torch.randn(V, V, generator=g) * 1.5
    t_logits = _masked(t_logits, [V - 2, V - 1])  # the target never emits the last two tokens
    target = probs_from_logits(t_logits, params)
    if kind == "random":
        return Toy(target, probs_from_logits(d_logits, params))
    if kind == "always_right":
        return Toy(target, target.clone())
    if kind == "always_wrong":  # all draft mass where the target has none
        return Toy(target, probs_from_logits(_masked(d_logits, list(range(V - 2))), params))
    if kind == "partial_overlap":  # draft mass where the target has none, and the reverse
        return Toy(target, probs_from_logits(_masked(d_logits, [0, 1]), params))
    if kind == "one_hot":
        return Toy(target, None, d_logits.argmax(-1))
    if kind == "one_hot_wrong":
        return Toy(target, None, torch.full((V,), V - 1))
    raise ValueError(kind)


def _draft_round(toy: Toy, anchors: torch.Tensor, num_drafts: int, g: torch.Generator,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    prev, xs, qs = anchors, [], []
    for _ in range(num_drafts):
        if toy.draft is None:
            x = toy.draft_ids[prev]
        else:
            qs.append(toy.draft[prev])  # (N, V)
            x = torch.multinomial(qs[-1], 1, generator=g).squeeze(-1)
        xs.append(x)
        prev = x
    return torch.stack(xs, 1), (torch.stack(qs, 1) if qs else None)  # (N, l), (N, l, V)


def _round(verifier: Verifier, toy: Toy, anchors: torch.Tensor, num_drafts: int, g: torch.Generator,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, q = _draft_round(toy, anchors, num_drafts, g)
    p = toy.target[torch.cat([anchors.unsqueeze(1), tokens], 1)]  # (N, l+1, V)
    num_accepted, next_token = verifier(tokens, q, p, g)
    return tokens, num_accepted, next_token


def first_two_tokens(verifier: Verifier, toy: Toy, num_drafts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens, n, nxt = _round(verifier, toy, torch.zeros(NUM_SAMPLES, dtype=torch.long), num_drafts, g)
    y1 = torch.where(n >= 1, tokens[:, 0], nxt)
    y2 = torch.where(n == 1, nxt, tokens[:, min(1, num_drafts - 1)])  # valid where n >= 1
    pending = n == 0  # only one token so far: its successor comes from the next round
    t2, n2, nxt2 = _round(verifier, toy, nxt[pending], num_drafts, g)
    y2[pending] = torch.where(n2 >= 1, t2[:, 0], nxt2)
    return torch.stack([y1, y2], 1)  # (N, 2)


def chi_square_excess(samples: torch.Tensor, target: torch.Tensor, anchor: int = 0) -> float:
    """Chi-square statistic over its critical value at p ~ 1e-6 (> 0 means reject); +inf
    when a pair with zero target probability was emitted. Cells expecting < 5 are pooled."""
    joint = (target[anchor].unsqueeze(1) * target).double().flatten()  # (V*V,) p(y1) p(y2 | y1)
    observed = torch.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V).double()
    if observed[joint == 0].sum() > 0:
        return math.inf
    expected = joint * samples.shape[0]
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty: chi2_dof quantile ~ dof (1 - 2/(9 dof) + z sqrt(2/(9 dof)))^3, z = 4.75.
    critical = dof * (1 - 2 / (9 * dof) + 4.75 * math.sqrt(2 / (9 * dof))) ** 3
    return stat - critical


KINDS = ["random", "always_right", "always_wrong", "partial_overlap", "one_hot", "one_hot_wrong"]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("top_p", [0.7, 1.0])
def test_speculative_sampling_reproduces_target(temperature: float, top_p: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p)
    for kind in KINDS:
        toy = make_toy(kind, params)
        for num_drafts in (1, 3):
            excess = chi_square_excess(first_two_tokens(rejection_sample, toy, num_drafts), toy.target)
            assert excess < 0, (kind, num_drafts, excess)


def test_single_sequence_verifier_matches_target() -> None:
    # The per-sequence entry point on a one-hot drafter (tokens from a fixed Markov table).
    params = SamplingParams(temperature=1.0)
    toy = make_toy("one_hot", params)
    g = make_generator(5)
    counts = torch.zeros(V)
    draft = toy.draft_ids[0].item()
    for _ in range(2000):
        r = verify_sampling([draft], None, toy.target[torch.tensor([0, draft])], g)
        counts[r.tokens[0]] += 1
    assert (counts / 2000 - toy.target[0]).abs().sum() / 2 < 0.05  # TV; std ~ 0.01


# -- the test catches the classic mistakes ----------------------------------------------------

def _textbook(mistake: str) -> Verifier:
    """A plain speculative sampler with one deliberate mistake."""
    def verifier(tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, g: torch.Generator,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        n_rounds, last = tokens.shape  # last = l: the bonus row
        q = torch.nn.functional.one_hot(tokens, V).float() if q is None else q  # (N, l, V)
        p_t_x = p[:, :last].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        p_d_x = q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        accept_prob = p_t_x if mistake == "ignore_draft_prob" else (p_t_x / p_d_x).clamp(max=1)
        n = (torch.rand((n_rounds, last), generator=g) < accept_prob).long().cumprod(-1).sum(-1)
        rows, k = torch.arange(n_rounds), n.clamp(max=last - 1)
        residual = (p[rows, k] - q[rows, k]).clamp_min(0)
        if mistake == "resample_from_target":
            residual = p[rows, k]
        if mistake == "bonus_after_rejection":  # draw the correction from the bonus row
            residual = p[rows, last]
        dist = torch.where((n < last).unsqueeze(-1), residual, p[rows, last])  # (N, V)
        dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p[rows, k])  # q == p_t
        if mistake == "unnormalised_residual":  # inverse CDF of a residual that sums to < 1
            u = torch.rand((n_rounds, 1), generator=g)
            return n, torch.searchsorted(dist.cumsum(-1), u, right=True).squeeze(-1).clamp(max=V - 1)
        return n, torch.multinomial(dist, 1, generator=g).squeeze(-1)
    return verifier


@pytest.mark.parametrize("mistake", ["ignore_draft_prob", "resample_from_target",
                                     "bonus_after_rejection", "unnormalised_residual"])
def test_broken_verifiers_fail_the_check(mistake: str) -> None:
    toy = make_toy("random", SamplingParams(temperature=1.0))
    assert chi_square_excess(first_two_tokens(_textbook("none"), toy, 3), toy.target) < 0
    assert chi_square_excess(first_two_tokens(_textbook(mistake), toy, 3), toy.target) > 0
