"""A ring of host buffers (pinned when CUDA is present) that device-to-host copies of captured rows land in.

`acquire()` never waits: with every slot still in flight it returns None and the caller drops the batch. A slot
is released once its rows were copied out into the `CaptureBatch` handed to the stream writer.
"""

import threading

import torch
from pydantic import BaseModel, ConfigDict


class Slot(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    index: int
    hidden: torch.Tensor  # [rows, K*H] model dtype
    ints: torch.Tensor  # [3, rows] int64: next token ids | accept lengths | seq lens (or prompt token sources)


class PinnedRing:
    def __init__(self, slots: int, rows: int, pin: bool) -> None:
        self.slots, self.rows, self.pin = slots, rows, pin
        self._free = list(range(slots))
        self._buffers: list[Slot] | None = None
        self._shape: tuple[int, torch.dtype] | None = None
        self._lock = threading.Lock()

    def acquire(self, rows: int, width: int, dtype: torch.dtype) -> Slot | None:
        """A free slot for `rows` rows of `width` (buffers are allocated on first use, then fixed), else None."""
        if rows > self.rows:
            return None
        with self._lock:
            if self._buffers is None:
                self._allocate(width, dtype)
            if self._shape != (width, dtype) or not self._free:
                return None
            return self._buffers[self._free.pop()]

    def release(self, slot: Slot) -> None:
        with self._lock:
            self._free.append(slot.index)

    @property
    def in_flight(self) -> int:
        return self.slots - len(self._free)

    def _allocate(self, width: int, dtype: torch.dtype) -> None:
        def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

        self._shape = (width, dtype)
        self._buffers = [Slot(index=i, hidden=empty(self.rows, width, dtype=dtype),
                              ints=empty(3, self.rows, dtype=torch.int64)) for i in range(self.slots)]
