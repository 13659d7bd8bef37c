"""What the GPU machine cannot make for itself (it has no package registry), written on the CPU machine in about a
minute from a fresh clone: workload snapshots and a small two-version draft registry.

    python scripts/gpu/payload.py snapshots            # .cache/workloads/<name>-<seed>.json
    python scripts/gpu/payload.py registry OUT_DIR     # two consecutive versions of a SmolLM2-135M draft

The registry's drafts start from the target's own heads (embedding, LM head, final norm) over a vocabulary counted
on the workloads' prompts; the second version differs from the first in every trained tensor, so the swap phase of
scripts/gpu/sglang_run.py can check that SGLang's weights moved. They are not trained: acceptance is low, which the
capture-cost, truth and swap phases do not depend on (the trained static draft comes from `tide bench train`).
"""

import sys
from pathlib import Path

import torch

from tide_sglang.bench import static
from tide_sglang.workloads.registry import load_workload, snapshot_workload
from tide_sglang.workloads.schedule import RECUR_SEED_STRIDE

WORKLOADS = ("writing", "code", "math", "french", "chat")
SEEDS = (0, 1000, RECUR_SEED_STRIDE)
SNAPSHOT_PROMPTS = 256
DRAFT_VOCAB = 8192


def snapshots() -> list[Path]:
    """Every workload at every seed the GPU scripts load, each as large as its largest reader needs (a larger
    snapshot holds the smaller one's prompts as its prefix); bench.static trains on thousands of chat prompts."""
    limits = {(name, seed): SNAPSHOT_PROMPTS for name in WORKLOADS for seed in SEEDS}
    for name, limit, seed in static.SNAPSHOTS:
        limits[name, seed] = max(limits.get((name, seed), 0), limit)
    return [snapshot_workload(name, limit, seed) for (name, seed), limit in limits.items()]


def _token_counts(tokenizer, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for name in WORKLOADS:
        for prompt in load_workload(name, 64, 0):
            ids = torch.tensor(tokenizer(prompt.text)["input_ids"], dtype=torch.long)
            counts += torch.bincount(ids[ids < vocab_size], minlength=vocab_size)
    return counts


def registry(out: Path, target: str = "smollm2-135m") -> list[int]:
    """Publish two versions into a new registry at `out`; returns their numbers."""
    from transformers import AutoTokenizer

    from tide_sglang.draft.config import DraftConfig
    from tide_sglang.draft.model import init_draft
    from tide_sglang.draft.registry import DirectoryRegistry
    from tide_sglang.draft.target import default_aux_layer_ids, load_heads, resolve
    from tide_sglang.draft.vocab import select_vocab

    heads = load_heads(target)
    cfg = heads.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    counts = _token_counts(AutoTokenizer.from_pretrained(resolve(target)), cfg.vocab_size)
    vocab = select_vocab(counts, min(DRAFT_VOCAB, cfg.vocab_size), always=[t for t in eos if t is not None])
    config = DraftConfig.from_target(cfg, vocab.size, default_aux_layer_ids(cfg.num_hidden_layers),
                                     torch_dtype="bfloat16")
    torch.manual_seed(0)
    draft = init_draft(config, vocab, heads.embed, heads.lm_head, heads.norm)
    reg = DirectoryRegistry(out, create=True)
    first = reg.publish(draft)
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    second = reg.publish(draft, parent=first.version)
    return [first.version, second.version]


def main(argv: list[str]) -> None:
    if argv[1:2] == ["snapshots"]:
        print(f"{len(snapshots())} workload snapshots in .cache/workloads")
    elif argv[1:2] == ["registry"] and len(argv) == 3:
        print(f"draft versions {registry(Path(argv[2]))} in {argv[2]}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
