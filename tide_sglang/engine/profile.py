"""Start-up profile of the live engine for the speculation policy: T(n) target forwards and D0(b) draft steps."""

import torch
from transformers import DynamicCache

from tide_sglang.control import Profile, batch_grid, measure_profile, token_grid
from tide_sglang.draft import Eagle3Draft
from tide_sglang.draft.target import Target

CONTEXT = 128  # tokens already in the KV cache while timing, like a request mid-generation


@torch.no_grad()
def profile_engine(target: Target, draft: Eagle3Draft, max_batch: int, max_steps: int, *, repeats: int = 3) -> Profile:
    """Median times on this machine: T(n) for the token counts the policy can ask for, D0(b) for batch sizes."""
    model, device = target.model, next(target.model.parameters()).device

    def context(batch: int) -> DynamicCache:
        cache = DynamicCache()
        model(input_ids=torch.zeros(batch, CONTEXT, dtype=torch.int64, device=device), past_key_values=cache,
              use_cache=True)
        return cache

    cache = context(1)

    def target_forward(n: int) -> None:
        model(input_ids=torch.zeros(1, n, dtype=torch.int64, device=device), past_key_values=cache, use_cache=True,
              output_hidden_states=True)
        cache.crop(-n)  # drop the n new tokens: the same context for the next repeat
        _sync(device)

    def draft_step(b: int) -> None:
        cache = draft.new_cache(b, CONTEXT + 8)
        hidden = torch.zeros(b, 1, draft.config.hidden_size, device=device, dtype=draft.fc.weight.dtype)
        draft.step(hidden, torch.zeros(b, 1, dtype=torch.int64, device=device),
                   torch.full((b, 1), CONTEXT, device=device), cache)
        _sync(device)

    return measure_profile(target_forward, draft_step, token_grid(max_batch, max_steps), batch_grid(max_batch),
                           repeats=repeats, device=str(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
