"""Disjoint data: no draft is graded on prompts it trained on, in any bench, the demo or the GPU static draft.

Workloads are split by a stable hash of the prompt text (`split_of`): static drafts train on the "train" side
and are served "eval" prompts; `tide bench train-gate` serves (captures, trains on) "train" prompts and measures
each phase end on "eval" ones. Online training (the demo, `tide bench train`, the TIDE arms) holds out whole
prompts by a hash of their tokens in the trainer (tests/test_trainer.py checks that requests sending the same
prompt stay on one side).
"""

import pytest

from tide_sglang.bench import adapt, control, static, train_gate
from tide_sglang.demo import run as demo
from tide_sglang.workloads import DEFAULT_SPEC, WORKLOADS, Prompt, WorkloadUnavailable, load_workload, split_of


def _texts(prompts) -> set[str]:
    return {p.text for p in prompts}


def test_the_writing_seeds_that_overlapped_30_of_30_are_disjoint_once_split() -> None:
    assert _texts(load_workload("writing", 64, 7)) == _texts(load_workload("writing", 96, 1000))  # why a split
    evals, trains = load_workload("writing", 64, 7, split="eval"), load_workload("writing", 96, 1000, split="train")
    assert evals and trains and not _texts(evals) & _texts(trains)
    assert len(evals) + len(trains) == 30 and {split_of(p) for p in evals} == {"eval"}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_splits_into_disjoint_sides_whatever_the_seed(name: str) -> None:
    try:
        evals = load_workload(name, 40, 3, split="eval")
        trains = load_workload(name, 40, 11, split="train")
    except WorkloadUnavailable as e:
        pytest.skip(str(e))
    assert len(evals) == len(trains) == 40 or name in ("writing", "mtbench")  # small sources give all they have
    assert not _texts(evals) & _texts(trains)
    assert load_workload(name, 10, 3, split="eval") == evals[:10]  # a smaller limit is a prefix, as unsplit


def test_split_is_a_property_of_the_text_alone() -> None:
    a = Prompt(domain="writing", text="Write a haiku about tea.", id="x:1")
    assert split_of(a) == split_of(a.model_copy(update={"domain": "chat", "id": "y:2"}))


@pytest.mark.parametrize("size", sorted(adapt.SIZES))
def test_bench_adapt_serves_no_prompt_its_static_draft_trained_on(size: str) -> None:
    s = adapt.SIZES[size]
    trained = _texts(p for plan in adapt.static_plans(s) for p in plan.prompts)
    for batch in s.batches:
        served = _texts(p for plan in adapt.served_plans(s, batch) for p in plan.prompts)
        assert served and not trained & served


@pytest.mark.parametrize("size", sorted(control.SIZES))
def test_bench_control_serves_no_prompt_its_static_draft_trained_on(size: str) -> None:
    s, _ = control.SIZES[size]
    trained = _texts(p for plan in adapt.static_plans(s) for p in plan.prompts)
    assert trained and not trained & _texts(control.eval_prompts())


@pytest.mark.parametrize("size", sorted(train_gate.SIZES))
def test_bench_train_gate_measures_phase_ends_on_prompts_never_served_or_trained_on(size: str) -> None:
    s = train_gate.SIZES[size]
    trained = _texts(p for plan in [*adapt.static_plans(s.static()), *train_gate.served_plans(s)] for p in plan.prompts)
    evals = train_gate.eval_plans(s)
    assert set(evals) == {"writing", "code"}
    measured = _texts(p for plan in evals.values() for p in plan.prompts)
    assert trained and measured and not trained & measured


@pytest.mark.parametrize("schedule", [DEFAULT_SPEC, "writing:24"])  # `make demo`'s and tests/test_e2e_demo.py's
def test_demo_serves_no_prompt_its_static_draft_trained_on(schedule: str) -> None:
    options = demo.DemoOptions(schedule=schedule, batch_size=2, max_new_tokens=32, seed=0, target="t", out=".")
    trained = _texts(p for plan in adapt.static_plans(demo.static_size(options)) for p in plan.prompts)
    served = _texts(p for plan in demo.served_plans(options) for p in plan.prompts)
    assert trained and served and not trained & served


@pytest.mark.parametrize("requests", [256, 6000])  # 6,000: past the opening turns, into the follow-ups
def test_gpu_static_draft_is_evaluated_on_prompts_it_never_trained_on(requests: int) -> None:
    trained, evaluated = static.train_prompts(requests), static.eval_prompts()
    assert len(trained) == requests == len(_texts(trained)) and evaluated
    assert not _texts(trained) & _texts(evaluated)
    assert {p.domain for p in evaluated} == {"writing"} and all(static.english(p) for p in trained)
