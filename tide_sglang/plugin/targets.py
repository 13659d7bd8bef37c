"""The SGLang functions the plugin hooks: dotted path, hook type, and the leading parameters each hook reads.

The contract tests check every path resolves and its signature starts with these parameters; `register()`
checks each was patched after `HookRegistry.apply_hooks()` (which only logs failures).
"""

from dataclasses import dataclass

_EAGLE = "sglang.srt.speculative.eagle_worker_v2"


@dataclass(frozen=True)
class Target:
    path: str
    hook_type: str  # a HookType member name
    params: tuple[str, ...]  # leading parameters, in order, that the hook reads positionally or by name
    why: str


VERIFY = Target(f"{_EAGLE}.EAGLEWorkerV2.verify", "AFTER", ("self", "batch"),
                "capture: the verify result holds hidden states, next tokens and accept lengths")
PREFILL = Target(f"{_EAGLE}.EagleDraftWorker._draft_extend_for_prefill", "BEFORE",
                 ("self", "batch", "target_hidden_states", "next_token_ids"),
                 "capture: prompt rows, from the target's full hidden states of an extend")
_DECODE_RESULT = ("sglang.srt.managers.scheduler_components.batch_result_processor."
                  "SchedulerBatchResultProcessor.process_batch_result_decode")
COMMIT = Target(_DECODE_RESULT, "BEFORE", ("self", "batch", "result"),
                "capture and control: which requests commit this result (overlap scheduling re-runs finished ones)")
COMMITTED = Target(_DECODE_RESULT, "AFTER", ("self", "batch", "result"),
                   "control: the committed requests' acceptance, once SGLang waited for the accept lengths' copy")
FORWARD = Target(f"{_EAGLE}.EAGLEWorkerV2.forward_batch_generation", "BEFORE", ("self", "batch"),
                 "between batches: ranks agree on a staged draft version and on the step table")
STEPS = Target("sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams.get_steps_for_batch",
               "AROUND", ("self", "batch_size"), "speculation control: the agreed TIDE decision overrides steps")
ADAPTIVE_UPDATE = Target(
    "sglang.srt.speculative.adaptive_spec_params.AdaptiveSpeculativeParams.on_verify_complete", "AROUND",
    ("self", "num_correct_drafts_per_req", "batch_size"),
    "speculation control: SGLang's own acceptance EMA stops switching a slot that TIDE decides")

ADMIT = Target("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", "BEFORE", ("self", "req"),
               "capture: a request is registered with the capture helper once, when it enters the waiting queue "
               "(again, under a new tag, after a retraction)")

IDLE = Target("sglang.srt.managers.scheduler.Scheduler.on_idle", "AFTER", ("self",),
              "capture: with no batch to run, slots whose copy finished are still posted (the last batch's rows)")

ALL = (ADMIT, IDLE, VERIFY, PREFILL, COMMIT, COMMITTED, FORWARD, STEPS, ADAPTIVE_UPDATE)
