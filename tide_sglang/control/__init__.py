"""Runtime control: how many draft steps to run (0 = off) and when to collect and train.

Pure functions over measurements (model.py, changepoint.py's threshold) and small stateful wrappers where state
is unavoidable (EWMAs, hysteresis, CUSUM, the trigger's state machine). Engines hold one
`SpeculationController`; docs/controller.md explains the model, the policy and the metrics. Imports nothing
from later stages.
"""

from tide_sglang.control.acceptance import AcceptanceEstimator, accepted_per_step
from tide_sglang.control.changepoint import DropDetector, average_run_length, cusum_threshold
from tide_sglang.control.controller import SpeculationController
from tide_sglang.control.correction import StepTimeCorrection
from tide_sglang.control.ewma import Ewma
from tide_sglang.control.metrics import ControlMetrics
from tide_sglang.control.model import (
    acceptance_from_accepted,
    acceptance_from_tokens,
    best_steps,
    binary_switch,
    expected_tokens,
    speedup,
    speedups,
    step_cost,
    step_seconds,
)
from tide_sglang.control.policy import BinarySwitch, Decision, StepPolicy, bucket
from tide_sglang.control.profile import (
    Point,
    Profile,
    StepTime,
    batch_grid,
    fit_profile,
    measure_profile,
    time_call,
    token_grid,
)
from tide_sglang.control.trigger import TrainingTrigger, TriggerState

__all__ = [
    "AcceptanceEstimator",
    "BinarySwitch",
    "ControlMetrics",
    "Decision",
    "DropDetector",
    "Ewma",
    "Point",
    "Profile",
    "SpeculationController",
    "StepPolicy",
    "StepTime",
    "StepTimeCorrection",
    "TrainingTrigger",
    "TriggerState",
    "acceptance_from_accepted",
    "acceptance_from_tokens",
    "accepted_per_step",
    "average_run_length",
    "batch_grid",
    "best_steps",
    "binary_switch",
    "bucket",
    "cusum_threshold",
    "expected_tokens",
    "fit_profile",
    "measure_profile",
    "speedup",
    "speedups",
    "step_cost",
    "step_seconds",
    "time_call",
    "token_grid",
]
