from __future__ import annotations

import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable, Iterator

import pytest
import torch

import dspark.spec.verify as verify_mod
from dspark.spec.sampling import SamplingParams, make_generator, probs_from_logits
from dspark.spec.verify import (
    _next_token_probs,
    verify,
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


def test_sampling_all_accepted_adds_bonus_from_the_last_row() -> None:
    # q == p one-hot: all three drafts are accepted; the bonus comes from row l (token 7),
    # not from row l-1 (token 3), and is always emitted.
    p_t = _one_hot([1, 2, 3, 7])
    r = verify_sampling([1, 2, 3], p_t[:3], p_t, make_generator(0), {EOS})
    assert (r.num_accepted, r.tokens, r.finished_by_stop) == (3, [1, 2, 3, 7], False)
    r = verify_sampling([1, 2, 3], None, p_t, make_generator(0), {EOS})  # one-hot q
    assert (r.num_accepted, r.tokens) == (3, [1, 2, 3, 7])


# -- sampling: every emitted token follows the target's law -----------------------------------
# A toy first-order Markov target p(. | prev) and drafter q(. | prev) over V tokens. Each
# trial runs ROUNDS rounds of l drafts, the first from anchor 0 and each later one from the
# last token the previous round emitted. Speculative sampling is lossless iff, given the
# tokens before it, every emitted token (accepted drafts, the correction after a rejection,
# the bonus after full acceptance) is distributed as p(. | previous token). So the test
# counts transitions (previous token -> emitted token) separately for each position in the
# round (0 .. l, where l is the bonus) and compares each table with p by a chi-square test:
# a bug that touches only one position (say the bonus row) shows in that position's table.

V = 8
NUM_SAMPLES = 20_000
ROUNDS = 2
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
    if kind == "close":  # mostly right: many rounds accept every draft, so bonuses are common
        return Toy(target, 0.8 * target + 0.2 * probs_from_logits(d_logits, params))
    if kind == "always_right":
        return Toy(target, target.clone())
    if kind == "always_wrong":  # all draft mass where the target has none
        return Toy(target, probs_from_logits(_masked(d_logits, list(range(V - 2))), params))
    if kind == "partial_overlap":  # draft mass where the target has none, and the reverse
        return Toy(target, probs_from_logits(_masked(d_logits, [0, 1]), params))
    if kind == "one_hot":
        return Toy(target, None, d_logits.argmax(-1))
    if kind == "one_hot_likely":  # the target's own argmax: mostly accepted
        return Toy(target, None, t_logits.argmax(-1))
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


def real_verifier(tokens: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The library's `rejection_sample`, looked up at call time (so a monkeypatched
    mutant of it, or of a helper it calls, is what runs)."""
    return verify_mod.rejection_sample(tokens, q, p, g)


def transition_counts(verifier: Verifier, toy: Toy, num_drafts: int, seed: int = 0,
                      n: int = NUM_SAMPLES) -> torch.Tensor:
    """(l+1, V, V) counts of (previous token -> emitted token) by position in the round,
    over ROUNDS chained rounds of n trials."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(num_drafts + 1, V, V)
    anchors, rows = torch.zeros(n, dtype=torch.long), torch.arange(n)
    for _ in range(ROUNDS):
        tokens, q = _draft_round(toy, anchors, num_drafts, g)
        p = toy.target[torch.cat([anchors.unsqueeze(1), tokens], 1)]  # (N, l+1, V)
        num_accepted, next_token = verifier(tokens, q, p, g)
        assert ((0 <= num_accepted) & (num_accepted <= num_drafts)).all()
        emitted = torch.cat([tokens, torch.zeros(n, 1, dtype=torch.long)], 1)  # (N, l+1)
        emitted[rows, num_accepted] = next_token  # accepted drafts, then correction / bonus
        prev = torch.cat([anchors.unsqueeze(1), emitted[:, :-1]], 1)
        for j in range(num_drafts + 1):
            live = num_accepted >= j  # position j was emitted
            counts[j] += torch.bincount(prev[live, j] * V + emitted[live, j], minlength=V * V).view(V, V).float()
        anchors = next_token  # the next round starts from the last emitted token
    return counts


def chi_square_excess(counts: torch.Tensor, target: torch.Tensor) -> float:
    """Worst position's chi-square statistic over its critical value at p ~ 1e-6 (> 0 means
    reject); +inf when a transition with zero target probability was emitted. Row a of a
    table is compared with counts[a].sum() * target[a]; cells expecting < 5 are pooled."""
    worst = -math.inf
    for table in counts:  # (V, V) per position
        if (table[target == 0] > 0).any():
            return math.inf
        stat, dof = 0.0, 0
        for row, p in zip(table, target):
            expected = p * row.sum()
            small = expected < 5
            obs = torch.cat([row[~small], row[small].sum().view(1)])
            exp = torch.cat([expected[~small], expected[small].sum().view(1)])
            keep = exp > 0
            if int(keep.sum()) < 2:
                continue
            stat += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
            dof += int(keep.sum()) - 1
        if dof:
            # Wilson-Hilferty: chi2_dof quantile ~ dof (1 - 2/(9 dof) + z sqrt(2/(9 dof)))^3, z = 4.75.
            critical = dof * (1 - 2 / (9 * dof) + 4.75 * math.sqrt(2 / (9 * dof))) ** 3
            worst = max(worst, stat - critical)
    return worst


KINDS = ["random", "close", "always_right", "always_wrong", "partial_overlap", "one_hot", "one_hot_likely",
         "one_hot_wrong"]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("top_p", [0.7, 1.0])
def test_speculative_sampling_reproduces_target(temperature: float, top_p: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p)
    for kind in KINDS:
        toy = make_toy(kind, params)
        for num_drafts in (1, 3):
            counts = transition_counts(real_verifier, toy, num_drafts)
            excess = chi_square_excess(counts, toy.target)
            assert excess < 0, (kind, num_drafts, excess)
            # Every position is exercised, the bonus row too (l > 1 needs full acceptance).
            if kind in ("close", "always_right", "one_hot_likely"):
                assert counts[num_drafts].sum() > NUM_SAMPLES // 10, (kind, counts.sum((1, 2)))


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


# -- the checks catch the classic mistakes, made in the library's own code -------------------
# Each mutant is the real function's source with one small edit, compiled in the module's
# namespace and monkeypatched in; if the code moves on and an edit no longer applies, the
# test fails instead of silently checking nothing.

MUTANTS: dict[str, tuple[str, str, str]] = {  # name: (function, original text, broken text)
    "accept_q_over_p": ("rejection_sample", "p_t_x / p_d_x.clamp_min(", "p_d_x / p_t_x.clamp_min("),
    "accept_ignores_draft_prob": (
        "rejection_sample",
        "ratio = torch.where(p_d_x > 0, p_t_x / p_d_x.clamp_min(torch.finfo(torch.float32).tiny), 0.0)",
        "ratio = p_t_x"),
    "accept_off_by_one": ("rejection_sample", "num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)",
                          "num_accepted = (accepted.long().cumprod(dim=-1).sum(dim=-1) + 1).clamp(max=num_drafts)"),
    "residual_q_minus_p": ("_next_token_probs", "(p_t_n - q_n).clamp_min(0.0)", "(q_n - p_t_n).clamp_min(0.0)"),
    "residual_is_target": ("_next_token_probs", "residual = (p_t_n - q_n).clamp_min(0.0)", "residual = p_t_n"),
    "residual_wrong_draft_row": ("_next_token_probs", "k = num_accepted.clamp(max=num_drafts - 1)",
                                 "k = (num_accepted + 1).clamp(max=num_drafts - 1)"),
    "residual_wrong_target_row": ("_next_token_probs", "p_t_n = p_t[rows, num_accepted]",
                                  "p_t_n = p_t[rows, (num_accepted + 1).clamp(max=num_drafts)]"),
    "bonus_wrong_row": ("_next_token_probs", "p_t_n = p_t[rows, num_accepted]",
                        "p_t_n = p_t[rows, num_accepted.clamp(max=num_drafts - 1)]"),
    "missing_bonus": ("_finish", "tokens = [*draft_tokens[:num_accepted], next_token]",
                      "tokens = [*draft_tokens[:num_accepted], "
                      "*([next_token] if num_accepted < len(draft_tokens) else [])]"),
}


def mutant(name: str) -> tuple[str, Callable[..., object]]:
    """(function name, the library function with the mutant's edit applied)."""
    fn_name, old, new = MUTANTS[name]
    source = textwrap.dedent(inspect.getsource(getattr(verify_mod, fn_name)))
    assert source.count(old) == 1, f"mutant {name}: {old!r} is no longer in {fn_name}"
    namespace = dict(vars(verify_mod))
    exec(compile(source.replace(old, new), f"<mutant {name}>", "exec"), namespace)  # noqa: S102
    return fn_name, namespace[fn_name]


def verifier_flaws() -> list[str]:
    """What the checks above find wrong with the library's verifier as it is now."""
    flaws = []
    params = SamplingParams(temperature=1.0)
    for kind in ("random", "close", "one_hot", "one_hot_likely"):
        toy = make_toy(kind, params)
        excess = chi_square_excess(transition_counts(real_verifier, toy, 3), toy.target)
        if not excess < 0:
            flaws.append(f"{kind}: chi-square excess {excess:.1f}")
    p_t = _one_hot([1, 2, 3, 7])
    for q in (p_t[:3], None):
        r = verify_sampling([1, 2, 3], q, p_t, make_generator(0))
        if (r.num_accepted, r.tokens) != (3, [1, 2, 3, 7]):
            flaws.append(f"full acceptance emitted {r.tokens}")
    return flaws


def test_the_library_verifier_has_no_flaw() -> None:
    assert verifier_flaws() == []


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_each_broken_verifier_is_caught(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fn_name, broken = mutant(name)
    monkeypatch.setattr(verify_mod, fn_name, broken)
    assert verifier_flaws(), f"mutant {name} went unnoticed"
