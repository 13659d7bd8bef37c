"""Domains per request: a client's domain label reaches the scheduler's `Req` in `custom_params["tide_domain"]`,
through SGLang's own request path, and leaves the prefix cache as it was; the fields that do not qualify are shown
not to (docs/sglang.md, "Domains").

SGLang's own code runs at each step: the OpenAI-compatible request models build the sampling parameters, the
tokenized request crosses SGLang's msgpack IPC, the real `Scheduler.handle_generate_request` builds the `Req` and
hands it to `_add_request_to_queue` (TIDE's admission target), and the prefix match is SGLang's real `RadixCache`
(its simulated constructor: no KV pool behind it, the tree and the keys are the real ones) through
`Req.init_next_round_input`, as the scheduler matches a waiting request. Mocked, because the real ones load a model
onto a GPU: the scheduler object (`object.__new__`, carrying only what the handler reads; without a KV pool
`init_req_max_new_tokens` does nothing, and there is no grammar backend) and `_add_request_to_queue`, which records
the request.
"""

import dataclasses
import types
from array import array
from pathlib import Path

import msgspec
import pytest
import torch
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglang.srt.managers import io_struct
from sglang.srt.managers.io_struct import GenerateReqInput, TokenizedGenerateReqInput
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.mem_cache.base_prefix_cache import InsertParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.runtime_context import get_parallel
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import prepare_server_args
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from tests.contract.conftest import sglang_model_context
from tide_sglang.plugin.capture import DOMAIN_PARAM, request_domain

PROMPT = array("q", range(1, 9))
DOMAIN = {DOMAIN_PARAM: "code"}


@pytest.fixture(scope="module")
def server_args(target_dir: Path):
    return prepare_server_args(["--model-path", str(target_dir), "--device", "cpu"])


def scheduler(server_args, tree_cache: RadixCache) -> tuple[Scheduler, list[Req]]:
    admitted: list[Req] = []
    s = object.__new__(Scheduler)
    s.__dict__.update(
        _add_request_to_queue=lambda req, *args, **kwargs: admitted.append(req),
        init_req_max_new_tokens=lambda req: None, tree_cache=tree_cache, server_args=server_args,
        model_config=types.SimpleNamespace(hf_eos_token_id=None, vocab_size=100), tokenizer=None,
        enable_session_radix_cache=False, session_controller={}, disaggregation_mode=DisaggregationMode.NULL,
        metrics_reporter=types.SimpleNamespace(enable_metrics=False), metrics_collector=None, dllm_config=None,
        spec_algorithm=SpeculativeAlgorithm.from_string("EAGLE3"), enable_overlap=False,
        grammar_manager=types.SimpleNamespace(process_req_with_grammar=lambda req: False),
        max_req_input_len=1000, max_req_len=1000, max_total_num_tokens=10000, page_size=1,
        kv_events_publisher=types.SimpleNamespace(enable_kv_cache_events=False), enable_priority_scheduling=False)
    return s, admitted


def tokenized(sampling: dict, **fields) -> TokenizedGenerateReqInput:
    """What the tokenizer manager sends: `SamplingParams(**sampling_params)` (as `_create_tokenized_object` builds
    it), encoded and decoded by SGLang's own IPC codec."""
    req = TokenizedGenerateReqInput(
        rid="r", input_text="", input_ids=PROMPT, input_embeds=None, mm_inputs=None, token_type_ids=None,
        sampling_params=SamplingParams(**sampling), return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
        token_ids_logprob=None, stream=False, **fields)
    return io_struct.msgpack_decode(io_struct.msgpack_encode(req))


def admit(server_args, tree_cache: RadixCache, recv: TokenizedGenerateReqInput) -> Req:
    s, admitted = scheduler(server_args, tree_cache)
    # 0.5.23 asks the pipeline rank (for KV prefetch) before admission; 0.5.17 does not ask.
    with sglang_model_context(server_args), get_parallel().override(pp_rank=0):
        Scheduler.handle_generate_request(s, recv)
    [req] = admitted
    return req


def cached_prompt() -> RadixCache:
    """A prefix cache holding PROMPT as a request without any of the fields below leaves it (no extra key)."""
    cache = RadixCache.create_simulated()
    cache.insert(InsertParams(key=RadixKey(PROMPT, extra_key=None), value=torch.arange(len(PROMPT))))
    return cache


def prefix_hit(req: Req, cache: RadixCache) -> int:
    req.init_next_round_input(cache)
    # 0.5.23 records the match as a length; 0.5.17 keeps the matched KV indices.
    return req.prefix_len if hasattr(req, "prefix_len") else len(req.prefix_indices)


def sampling_from_clients() -> dict[str, dict]:
    """The sampling parameters each API builds from a request that sets the domain the documented way."""
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "custom_params": DOMAIN})
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_tokens": 8,
                                                   "custom_params": DOMAIN})
    native = GenerateReqInput(text="hi", sampling_params={"max_new_tokens": 8, "custom_params": DOMAIN})
    return {
        "/v1/chat/completions": chat.to_sampling_params(stop=[], model_generation_config={}),
        "/v1/completions": OpenAIServingCompletion._build_sampling_params(None, completion),  # reads no state
        "/generate": native.sampling_params,
    }


@pytest.mark.parametrize("api", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_each_api_carries_the_domain_to_the_admitted_request_and_the_cache_still_hits(server_args, api) -> None:
    cache = cached_prompt()
    req = admit(server_args, cache, tokenized(sampling_from_clients()[api]))
    assert request_domain(req) == "code"  # what TIDE's admission hook sends to the capture helper
    assert prefix_hit(req, cache) == len(PROMPT) - 1  # the whole cached prompt but the last token, as for any request


# field -> (what the tokenized request carries, where the admitted Req holds it, hit on PROMPT cached without it)
FIELDS = {
    "custom_params": ({"sampling": {"custom_params": DOMAIN}}, lambda r: r.sampling_params.custom_params[DOMAIN_PARAM],
                      True),
    # reaches Req unchanged and keeps the cache, but it is the gateway's sticky-routing key and SGLang's
    # --schedule-policy routing-key groups by it: using it for domains would pin a domain to one worker.
    "routing_key": ({"routing_key": "code"}, lambda r: r.routing_key, True),
    "extra_key": ({"extra_key": "code"}, lambda r: r.extra_key, False),  # namespaces the radix key
    "lora_id": ({"lora_id": "code"}, lambda r: r.lora_id, False),  # appended to extra_key, and selects an adapter
}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_which_request_fields_reach_the_scheduler_and_which_split_the_prefix_cache(server_args, field) -> None:
    carried, held, keeps_cache = FIELDS[field]
    sampling = {"max_new_tokens": 8, **carried.get("sampling", {})}
    fields = {k: v for k, v in carried.items() if k != "sampling"}
    cache = cached_prompt()
    req = admit(server_args, cache, tokenized(sampling, **fields))
    assert held(req) == "code"
    assert (prefix_hit(req, cache) == len(PROMPT) - 1) is keeps_cache
    assert request_domain(req) == ("code" if field == "custom_params" else "")  # TIDE reads custom_params only


def test_custom_labels_never_reach_the_scheduler() -> None:
    """`custom_labels` (metrics labels from a header) stay in the tokenizer manager: the tokenized request has no
    such field, so the scheduler cannot see them."""
    assert "custom_labels" in {f.name for f in dataclasses.fields(GenerateReqInput)}
    assert "custom_labels" not in {f.name for f in msgspec.structs.fields(TokenizedGenerateReqInput)}
