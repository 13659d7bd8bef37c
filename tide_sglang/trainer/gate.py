"""Publish-if-better: TIDE's gate, made stricter (same held-out rows, a margin, a minimum sample)."""

from pydantic import BaseModel, ConfigDict

from tide_sglang.trainer.objective import Acceptance


class GateDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    publish: bool
    reason: str


def publish_decision(candidate: Acceptance, deployed: Acceptance, margin: float, min_rows: int) -> GateDecision:
    """Publish only when the candidate's acceptance length beats the deployed draft's by `margin` on the same rows."""
    if candidate.rows != deployed.rows:
        return GateDecision(publish=False, reason=f"scored on different rows ({candidate.rows} vs {deployed.rows})")
    if candidate.rows < min_rows:
        return GateDecision(publish=False, reason=f"held-out set too small ({candidate.rows} < {min_rows} rows)")
    gain = candidate.accept_length - deployed.accept_length
    if gain < margin:
        return GateDecision(publish=False, reason=f"gain {gain:+.3f} below margin {margin:.3f}")
    return GateDecision(publish=True, reason=f"gain {gain:+.3f} >= margin {margin:.3f}")
