"""Two ranks under torch.distributed (gloo on CPU, as torchrun would start them) train one draft with DDP."""

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.test_trainer_redis import SMALL, _write
from tide_sglang import keys
from tide_sglang.capture import CaptureBatch
from tide_sglang.draft import DirectoryRegistry
from tide_sglang.settings import TideSettings
from tide_sglang.stream import StreamReader, connect
from tide_sglang.stream.server import free_port
from tide_sglang.trainer import state as ckpt


def _rank(rank: int, port: int, url: str, tmp: str) -> None:
    import threading

    from tide_sglang.draft.target import load_heads
    from tide_sglang.trainer import DraftTrainer
    from tide_sglang.trainer.distributed import from_env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = from_env()
    assert dist is not None and dist.rank == rank
    settings = TideSettings(redis_url=url, deployment="test", train_checkpoint_dir=Path(tmp) / "ckpt",
                            train_eval_interval_steps=4, **SMALL)
    reader = StreamReader(connect(settings), keys.hidden_states("default", "test"),
                          keys.dead_letter("default", "test"), f"pod-{rank}", count=4, block_ms=50)
    trainer = DraftTrainer(settings, DirectoryRegistry(Path(tmp) / "reg", create=True), reader, load_heads(), dist=dist)
    trainer.run(threading.Event(), max_steps=8)
    save_file({k: v.contiguous() for k, v in trainer.draft.state_dict().items() if k != "embed_tokens.weight"},
              str(Path(tmp) / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_two_ranks_train_one_draft_with_ddp(settings: TideSettings, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    # synthetic captured traffic of SmolLM2's shape (the real-model path is covered in test_trainer_redis.py)
    batches: list[CaptureBatch] = []
    for step in range(12):
        rids = [f"r{step // 4}-{i}" for i in range(8)]
        n = 8 * 8
        batches.append(CaptureBatch(rids=rids, req_index=torch.arange(n) // 8,
                                    positions=(torch.arange(n) % 8) + 8 * (step % 4),
                                    token_ids=torch.randint(0, 600, (n,), generator=g),
                                    is_prompt=torch.zeros(n, dtype=torch.bool),
                                    hidden=torch.randn(n, 3 * 576, generator=g).bfloat16(), vocab_size=49152))
    _write(settings, batches)
    mp.start_processes(_rank, args=(free_port(), settings.redis_url, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys()
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"{name} differs across ranks: gradients were not averaged"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rank-0", "rank-1"]
    for r in (0, 1):
        state, _ = ckpt.load_latest(tmp_path / "ckpt" / f"rank-{r}")
        assert state.steps == 8 and state.trained_rows > 0
    client = connect(settings)
    consumers = {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(keys.hidden_states("default", "test"),
                                                                                   keys.TRAINER_GROUP)}
    assert set(consumers) == {"pod-0", "pod-1"} and sum(consumers.values()) == 0
