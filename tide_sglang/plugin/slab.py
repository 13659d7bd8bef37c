"""The capture slab: host memory shared by the scheduler process and its capture helper process.

The scheduler copies each batch's rows device-to-host into a slot of the slab (one copy per batch, asynchronous:
the slab is page-locked with `cudaHostRegister` when CUDA is present), and the helper process reads them from the
same pages. A slot is `FREE` (either side may look), `FILLING` (the scheduler owns it: a copy may be in flight)
or `POSTED` (the helper owns it until it sets it `FREE` again). Each flag has one writer per transition, so plain
byte stores suffice.

Layout: one page of slot flags, then per slot a data region (`slot_bytes`: what the GPU copies) and a side region
(`SIDE_BYTES`: what the scheduler writes from the host, e.g. request tags and commit flags).
"""

import logging
from multiprocessing import shared_memory

import numpy as np

log = logging.getLogger("tide.plugin.slab")

FREE, FILLING, POSTED = 0, 1, 2
PAGE = 4096
SIDE_BYTES = 256 << 10  # host-written per-slot arrays: 8-byte tags and 1-byte flags per request, or prefill rows


_created: set[str] = set()  # segments this process created


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


class Slab:
    """`create` in the scheduler process, `attach` (by name) in the helper."""

    def __init__(self, shm: shared_memory.SharedMemory, slots: int, slot_bytes: int, owner: bool) -> None:
        self.shm, self.slots, self.slot_bytes, self.owner = shm, slots, slot_bytes, owner
        self.stride = slot_bytes + SIDE_BYTES
        self.flags = np.frombuffer(shm.buf, dtype=np.uint8, count=slots)
        self.registered = False

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> "Slab":
        if not 1 <= slots <= PAGE:
            raise ValueError(f"slots must be in 1..{PAGE}, got {slots}")
        slot_bytes = _round_up(slot_bytes)
        shm = shared_memory.SharedMemory(create=True, size=PAGE + slots * (slot_bytes + SIDE_BYTES))
        _created.add(shm.name)
        return cls(shm, slots, slot_bytes, owner=True)

    @classmethod
    def attach(cls, name: str, slots: int, slot_bytes: int) -> "Slab":
        # track=False: the helper must not unlink the scheduler's segment when it exits (Python >= 3.13 has the
        # argument; on 3.11/3.12 the resource tracker is told to forget it instead).
        try:
            shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
        except TypeError:
            shm = shared_memory.SharedMemory(name=name)
            if shm.name not in _created:  # attached in its creator's process (tests): one registration to keep
                from multiprocessing import resource_tracker

                resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, slots, slot_bytes, owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    def data(self, slot: int) -> memoryview:
        start = PAGE + slot * self.stride
        return self.shm.buf[start:start + self.slot_bytes]

    def side(self, slot: int) -> memoryview:
        start = PAGE + slot * self.stride + self.slot_bytes
        return self.shm.buf[start:start + SIDE_BYTES]

    def acquire(self) -> int | None:
        """A free slot, now FILLING; None when every slot is busy (the caller drops and counts)."""
        i = bytes(self.flags).find(b"\x00")  # C-level scan of `slots` bytes
        if i < 0:
            return None
        self.flags[i] = FILLING
        return i

    def pin(self) -> bool:
        """Page-lock the whole slab for the CUDA driver, so device-to-host copies into it stay asynchronous
        (into pageable memory `copy_(non_blocking=True)` would wait for the GPU). False when CUDA is absent."""
        import torch

        if not torch.cuda.is_available():
            return False
        base = torch.frombuffer(self.shm.buf, dtype=torch.uint8)
        err = torch.cuda.cudart().cudaHostRegister(base.data_ptr(), base.numel(), 0)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister of the {base.numel() >> 20} MiB capture slab failed: {err}")
        self.registered = True
        return True

    def close(self) -> None:
        if self.registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(torch.frombuffer(self.shm.buf, dtype=torch.uint8).data_ptr())
            self.registered = False
        self.flags = None  # type: ignore[assignment]  # release the exported buffer before closing the mapping
        try:
            self.shm.close()
            if self.owner:
                self.shm.unlink()
        except (BufferError, FileNotFoundError) as e:  # a tensor still views it; the OS frees it at exit
            log.debug("capture slab not closed: %s", e)
