"""Trainer: the online EAGLE-3 trainer service (`tide train`) over the hidden-state stream."""

from tide_sglang.trainer.gate import GateDecision, publish_decision
from tide_sglang.trainer.lineage import TrainerError
from tide_sglang.trainer.objective import (
    Acceptance,
    LossReport,
    LossStats,
    acceptance,
    new_optimizer,
    optimizer_step,
    ttt_loss,
)
from tide_sglang.trainer.publisher import EvalReport
from tide_sglang.trainer.replay import Chunk, ReplayBuffer, SequenceAssembler, TrainBatch, collate
from tide_sglang.trainer.service import DraftTrainer

__all__ = [
    "Acceptance",
    "Chunk",
    "DraftTrainer",
    "EvalReport",
    "GateDecision",
    "LossReport",
    "LossStats",
    "ReplayBuffer",
    "SequenceAssembler",
    "TrainBatch",
    "TrainerError",
    "acceptance",
    "collate",
    "new_optimizer",
    "optimizer_step",
    "publish_decision",
    "ttt_loss",
]
