"""TIDE's analytical speedup model and the conversions between what engines measure and what it needs.

    S(a, g, b) = (1 - a^(g+1)) / ((1 - a) · (c(b)·g + beta(b))),  c(b) = D0(b) / T(b),  beta(b) = T(b(g+1)) / T(b)

a: per-token acceptance probability (each drafted token accepted independently with probability a, and a
chain stops at the first rejection); g: draft steps per verify; b: batch size. The numerator over (1 - a) is
E[tokens emitted per verify step] = 1 + a + ... + a^g (the bonus token always counts); the denominator is
the cost of one speculative step (g draft steps plus one verify of b·(g+1) tokens) in units of one plain
decode step T(b). S(a, 0, b) = 1: no speculation is the reference.
"""

from tide_sglang.control.profile import Profile


def expected_tokens(a: float, g: int) -> float:
    """E[tokens per verify step] = (1 - a^(g+1)) / (1 - a), summed directly so a = 1 needs no limit."""
    return sum(a**i for i in range(g + 1))


def step_cost(profile: Profile, g: int, batch: int) -> float:
    """c(b)·g + beta(b): one speculative step's time over one plain decode step's, T(b); t(b, g) / t(b, 0) where
    the profile timed whole decode steps at g and at 0 (what the formula approximates, measured)."""
    timed, plain = profile.step_seconds(g, batch), profile.step_seconds(0, batch)
    if timed is not None and plain is not None:
        return timed / plain
    t = profile.target_seconds(batch)
    c = profile.draft_seconds(batch) / t
    beta = profile.target_seconds(batch * (g + 1)) / t
    return c * g + beta


def step_seconds(profile: Profile, g: int, batch: int) -> float:
    """Predicted seconds of one decode step of `batch` requests at g draft steps: T(b)·step_cost."""
    plain = profile.step_seconds(0, batch)
    return (profile.target_seconds(batch) if plain is None else plain) * step_cost(profile, g, batch)


def speedup(profile: Profile, a: float, g: int, batch: int) -> float:
    """S(a, g, b); 1.0 at g = 0. Nondecreasing in a, since every term of expected_tokens is."""
    if g == 0:
        return 1.0
    return expected_tokens(a, g) / step_cost(profile, g, batch)


def speedups(profile: Profile, a: float, batch: int, max_steps: int) -> list[float]:
    """[S(a, g, b) for g in 0..max_steps]."""
    return [speedup(profile, a, g, batch) for g in range(max_steps + 1)]


def best_steps(profile: Profile, a: float, batch: int, max_steps: int) -> int:
    """argmax_g S(a, g, b) over 0..max_steps; ties go to fewer steps (cheaper, less variance)."""
    s = speedups(profile, a, batch, max_steps)
    return max(range(len(s)), key=lambda g: (s[g], -g))


def binary_switch(profile: Profile, a: float, batch: int, steps: int) -> int:
    """TIDE's policy: speculate with a fixed number of steps whenever the model predicts a gain (S > 1)."""
    return steps if speedup(profile, a, steps, batch) > 1.0 else 0


def acceptance_from_tokens(tokens_per_step: float, g: int) -> float:
    """Invert expected_tokens: the per-token acceptance a whose E[tokens per verify step] at g steps matches.

    `tokens_per_step` counts the bonus token, so it lies in [1, g+1] (SGLang's accept length and
    `sglang:spec_accept_length` are this quantity). Values outside are clipped. This is a moment estimate:
    it assumes positions are accepted independently with one probability, which real drafts only
    approximate (later positions are usually accepted less often), so estimates at different g can differ.
    """
    if g <= 0:
        raise ValueError("acceptance is not observable without draft steps (g = 0)")
    target = min(max(tokens_per_step, 1.0), g + 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(50):  # expected_tokens is increasing in a on [0, 1]: bisection, 2^-50 precision
        mid = (lo + hi) / 2
        if expected_tokens(mid, g) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def acceptance_from_accepted(accepted_tokens: float, steps: float, g: int) -> float:
    """a from draft tokens accepted over `steps` request verify steps, excluding the bonus token.

    With SGLang's per-request `accept_lens` (which include the bonus token): accepted = sum(accept_lens) - bs.
    """
    if steps <= 0:
        raise ValueError("steps must be positive")
    return acceptance_from_tokens(1.0 + accepted_tokens / steps, g)
