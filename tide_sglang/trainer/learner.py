"""The draft being trained: its weights (wrapped in DistributedDataParallel under torchrun), AdamW, the counters
of its lineage, one optimizer step, and parking on the CPU while training is off."""

import json

import torch

from tide_sglang.draft import Eagle3Draft
from tide_sglang.settings import TideSettings
from tide_sglang.trainer import distributed
from tide_sglang.trainer import state as ckpt
from tide_sglang.trainer.objective import LossStats, new_optimizer, optimizer_step
from tide_sglang.trainer.replay import TrainBatch


class Learner:
    def __init__(self, settings: TideSettings, draft: Eagle3Draft, parent: int | None, device: torch.device,
                 dist: distributed.Dist | None, ingested_rows: int = 0) -> None:
        self.s, self.device = settings, device
        self.draft = self.model = draft.to(device).train()
        if dist is not None:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(draft, device_ids=ids)  # broadcasts rank 0's
        self.optimizer = new_optimizer(draft, settings.train_lr, settings.train_weight_decay)
        self.state = ckpt.TrainerState(parent=parent, config=draft.config, vocab_sha256=draft.vocab.sha256(),
                                       ingested_rows=ingested_rows)
        self.parked = False

    def step(self, batch: TrainBatch) -> LossStats:
        """One optimizer step, queued on the device without waiting for it (objective.optimizer_step)."""
        stats = optimizer_step(self.draft, self.optimizer, batch, self.s.train_ttt_steps, model=self.model)
        self.state.steps += 1
        self.state.trained_rows += stats.rows
        return stats

    def park(self) -> bool:
        """Give the GPU back (weights and optimizer moments wait on the CPU); True when it moved."""
        if self.parked or self.device.type != "cuda":
            return False
        self._move("cpu")
        self.parked = True
        return True

    def unpark(self) -> None:
        if self.parked:
            self._move(self.device)
            self.parked = False

    def _move(self, device: torch.device | str) -> None:
        self.draft.to(device)
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and k != "step":
                    st[k] = v.to(device)

    # -- checkpoint ---------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Draft weights (not the target's embedding) and AdamW moments; the groups go into the state."""
        opt = self.optimizer.state_dict()
        self.state.optimizer_groups = json.loads(json.dumps(opt["param_groups"]))
        out = {f"opt.{i}.{k}": torch.as_tensor(v) for i, st in opt["state"].items() for k, v in st.items()}
        out.update({f"draft.{k}": v for k, v in self.draft.state_dict().items() if k != "embed_tokens.weight"})
        return out

    def load_optimizer(self, state: ckpt.TrainerState, tensors: dict[str, torch.Tensor]) -> None:
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = v.to(self.device) if name != "step" else v
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state.optimizer_groups})
        self.state = state
