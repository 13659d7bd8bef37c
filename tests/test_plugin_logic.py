"""The SGLang plugin's pure logic, without SGLang: row selection, swap checks, agreement, step choice, serve argv.
(The same code against the real SGLang modules: tests/contract, in .venv-sglang.)"""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from tide_sglang.capture import is_domain_label
from tide_sglang.cli import main
from tide_sglang.control import Profile, SpeculationController
from tide_sglang.plugin import rows, wire
from tide_sglang.plugin.capture import NOT_TEXT, request_domain
from tide_sglang.plugin.cli import serve_argv
from tide_sglang.plugin.helper import Assembler, HelperConfig
from tide_sglang.plugin.metrics import PluginMetrics
from tide_sglang.plugin.runtime import Runtime
from tide_sglang.plugin.slab import FREE, Slab
from tide_sglang.plugin.speculation import (
    ProfileError,
    acceptance_sample,
    candidate_steps,
    choose_steps,
    load_profile,
)
from tide_sglang.plugin.swap import Baseline, SwapRefused, agreed_version, desired_version, plan_swap, sglang_name
from tide_sglang.rollout import ControlState
from tide_sglang.settings import TideSettings


def test_decode_rows_take_the_accepted_prefix_of_each_kept_request() -> None:
    row, req, pos = rows.decode_rows(np.array([1, 3, 4, 2]), np.array([10, 20, 30, 40]), nd=4,
                                     keep=np.array([0, 1, 3]))
    assert row.tolist() == [0, 4, 5, 6, 12, 13]
    assert req.tolist() == [0, 1, 1, 1, 2, 2]
    assert pos.tolist() == [10, 20, 21, 22, 40, 41]
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        rows.decode_rows(np.array([0]), np.array([5]), nd=4, keep=np.array([0]))


def test_hard_example_filter() -> None:
    accept = np.array([1, 4, 3, 2])  # acceptance 0, 1, 2/3, 1/3 at nd=4
    assert rows.hard_enough(accept, 4, max_acceptance=0.5).tolist() == [True, False, False, True]
    assert rows.hard_enough(accept, 1, max_acceptance=0.0).all()  # no drafts: nothing is easy


def test_prefill_rows_chain_prompt_tokens_then_the_sampled_one() -> None:
    row, req, pos, src = rows.prefill_rows([3, 2], [0, 5], complete=[True, False])
    assert (row.tolist(), req.tolist(), pos.tolist()) == ([0, 1, 2, 3], [0, 0, 0, 1], [0, 1, 2, 5])
    assert src.tolist() == [1, 2, 5, 4]  # 5 = len(input_ids) + 0: request 0's sampled token
    row, req, pos, src = rows.prefill_rows([1, 2], [4, 0], complete=[False, True])  # a one-row chunk: no row
    assert (row.tolist(), req.tolist(), pos.tolist(), src.tolist()) == ([1, 2], [1, 1], [0, 1], [2, 4])


def test_capture_frames_round_trip_through_any_split_of_the_byte_stream() -> None:
    slot = wire.SlotReady(3, "decode", 7, 64, 4, 256, 1728, torch.bfloat16, 4, 4, 8)
    frames = [wire.reg(5, "rid-ü", "code"), wire.tick(7, 9, 3, 3, 2, 12345, 1, 4), wire.slot_ready(slot), wire.fin(5)]
    data = b"".join(frames)
    assert all(len(f) <= wire.MAX_FRAME for f in frames)
    for cut in range(len(data)):
        decoder = wire.Decoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == [wire.Reg(5, "rid-ü", "code"), wire.Tick(7, 9, 3, 3, 2, 12345, 1, 4), slot, wire.Fin(5)]
    with pytest.raises(ValueError, match="kind 9"):
        wire.Decoder().feed(b"\x00\x00\x09")


@pytest.mark.parametrize(("text", "ok"), [
    ("code", True), ("fr-FR", True), ("team_a.v2", True), ("7", True), ("x" * 64, True),
    ("", False), ("x" * 65, False), ("two words", False), ("-code", False), (".hidden", False), ("ünï", False),
    ("a/b", False), ("code\n", False), (NOT_TEXT, False),
])
def test_a_domain_is_a_short_label(text: str, ok: bool) -> None:
    assert is_domain_label(text) is ok


def _req(custom_params: object) -> object:
    import types

    return types.SimpleNamespace(sampling_params=types.SimpleNamespace(custom_params=custom_params))


@pytest.mark.parametrize(("params", "domain"), [
    (None, ""), ({}, ""), ({"thinking_budget": 5}, ""), ({"tide_domain": None}, ""), ({"tide_domain": ""}, ""),
    ({"tide_domain": "code"}, "code"), ({"tide_domain": "two words"}, "two words"),
    ({"tide_domain": 7}, NOT_TEXT), ({"tide_domain": ["code"]}, NOT_TEXT), ({"tide_domain": {"a": 1}}, NOT_TEXT),
])
def test_admission_reads_the_domain_from_custom_params_without_judging_it(params: object, domain: str) -> None:
    """SGLang's custom_params may hold any JSON value: the scheduler thread only looks the key up."""
    assert request_domain(_req(params)) == domain


def test_the_helper_keeps_label_domains_and_puts_anything_else_in_the_default_one() -> None:
    config = HelperConfig(slab="unused", slots=1, slot_bytes=1, aux_layers=1, vocab_size=16)
    assembler = Assembler(config, sample_rate=1.0, max_acceptance=1.0)
    sent = {0: "code", 1: "", 2: "two words", 3: "x" * 65, 4: "x" * 1000, 5: NOT_TEXT, 6: "ü" * 40, 7: "x" * 64}
    regs = wire.Decoder().feed(b"".join(wire.reg(tag, f"r{tag}", domain) for tag, domain in sent.items()))
    valid = [assembler.register(msg) for msg in regs]
    assert valid == [True, True, False, False, False, False, False, True]  # "" is no domain, not a bad one
    assert [assembler.requests[t][1] for t in sent] == ["code", "", "", "", "", "", "", "x" * 64]
    # A prefill slot of two rows per request: each request's rows carry its domain, "default" when it has none.
    hidden = torch.arange(16, dtype=torch.float32)
    data = memoryview(bytearray(hidden.numpy().tobytes() + np.arange(16, dtype=np.int64).tobytes()))
    side = memoryview(np.arange(8, dtype=np.int64).tobytes() + np.repeat(np.arange(8, dtype=np.int32), 2).tobytes()
                      + np.tile(np.arange(2, dtype=np.int32), 8).tobytes())
    batch = assembler.prefill(data, side, wire.SlotReady(0, "prefill", 0, 8, 1, 16, 1, torch.float32))
    assert batch.domains == ["code"] + ["default"] * 6 + ["x" * 64]
    assert [batch.domain_of(int(i)) for i in batch.req_index[:4]] == ["code", "code", "default", "default"]


def test_slab_slots_are_shared_between_mappings_and_acquire_never_waits() -> None:
    owner = Slab.create(slots=2, slot_bytes=100)
    other = Slab.attach(owner.name, owner.slots, owner.slot_bytes)
    try:
        assert owner.slot_bytes == 4096  # whole pages
        a, b = owner.acquire(), owner.acquire()
        assert (a, b) == (0, 1) and owner.acquire() is None
        owner.data(1)[:3] = b"abc"
        owner.side(1)[:2] = b"xy"
        assert bytes(other.data(1)[:3]) == b"abc" and bytes(other.side(1)[:2]) == b"xy"
        other.flags[0] = FREE  # the helper frees a slot: the scheduler sees it
        assert owner.acquire() == 0
    finally:
        other.close()
        owner.close()


def _baseline() -> Baseline:
    d2t = torch.tensor([0, 1, 1])
    return Baseline(specs={"fc.weight": ((4, 6), torch.float32), "d2t": ((3,), torch.int64),
                           "t2d": ((5,), torch.bool)}, d2t=d2t)


def _staged(**over: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.ones(4, 6), "d2t": torch.tensor([0, 1, 1]), "t2d": torch.zeros(5, dtype=torch.bool),
            **over}


def test_plan_swap_accepts_a_fitting_version_without_maps_or_embedding() -> None:
    plan = plan_swap(2, {**_staged(), "embed_tokens.weight": torch.zeros(5, 4)}, _baseline(),
                     allow_vocab_change=False)
    assert set(plan.weights) == {"fc.weight"} and plan.hot_token_id is None


@pytest.mark.parametrize(("staged", "message"), [
    (_staged(**{"fc.weight": torch.ones(4, 7)}), "wrong shape/dtype fc.weight"),
    (_staged(**{"fc.weight": torch.ones(4, 6, dtype=torch.bfloat16)}), "wrong shape/dtype fc.weight"),
    ({k: v for k, v in _staged().items() if k != "fc.weight"}, r"missing \['fc.weight'\]"),
    (_staged(**{"extra.weight": torch.ones(1)}), r"unexpected \['extra.weight'\]"),
    (_staged(d2t=torch.tensor([0, 2, 2])), "another draft vocabulary"),
])
def test_plan_swap_refuses_what_does_not_fit(staged: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(SwapRefused, match=message):
        plan_swap(2, staged, _baseline(), allow_vocab_change=False)


def test_the_users_own_served_draft_is_a_baseline_too() -> None:
    """Served from the user's checkpoint (imported as v0): `layers.0.*` names, and no d2t (the whole vocabulary,
    which v0 stores as an identity d2t)."""
    served = Baseline(specs={"layers.0.mlp.down_proj.weight": ((4, 2), torch.float32)}, d2t=None)
    identity = {"midlayer.mlp.down_proj.weight": torch.ones(4, 2), "d2t": torch.zeros(3, dtype=torch.int64),
                "t2d": torch.ones(3, dtype=torch.bool)}
    assert set(plan_swap(1, identity, served, allow_vocab_change=False).weights) == {"midlayer.mlp.down_proj.weight"}
    with pytest.raises(SwapRefused, match="another draft vocabulary"):  # no hot_token_id to copy a new one into
        plan_swap(1, {**identity, "d2t": torch.tensor([0, 1, 1])}, served, allow_vocab_change=True)


def test_vocabulary_change_updates_hot_token_id_when_allowed() -> None:
    plan = plan_swap(2, _staged(d2t=torch.tensor([0, 2, 2])), _baseline(), allow_vocab_change=True)
    assert plan.hot_token_id.tolist() == [0, 3, 4]


@pytest.mark.parametrize(("name", "param"), [
    ("midlayer.self_attn.k_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"),
    ("midlayer.mlp.up_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"),
    ("fc.weight", "model.fc.weight"), ("lm_head.weight", "lm_head.weight"), ("norm.weight", "model.norm.weight"),
])
def test_sglang_name_mapping(name: str, param: str) -> None:
    assert sglang_name(name) == param


def test_agreement_and_control_hash() -> None:
    assert agreed_version(torch.tensor([7, -7])) == 7
    assert agreed_version(torch.tensor([6, -7])) is None  # ranks at 6 and 7: nobody copies
    state = ControlState(stable=3, canary=4, canary_pods=("pod-a",))
    assert desired_version(state, "pod-a") == 4 and desired_version(state, "pod-b") == 3
    assert desired_version(None, "pod-a") is None  # no control state yet: keep serving
    assert choose_steps(4, [0, 1, 3]) == 3 and choose_steps(0, [1, 2]) == 1


def test_serve_argv_keeps_user_arguments_and_adds_missing_defaults(tmp_path: Path) -> None:
    user = ["--model-path", "m", "--tp", "4", "--enable-metrics"]
    argv = serve_argv(user, candidates=[3, 1], config_path=tmp_path / "a.json", draft_path=Path("/d/v000002"))
    assert argv[: len(user)] == user and argv.count("--enable-metrics") == 1
    assert argv[len(user):] == ["--speculative-algorithm", "EAGLE3", "--speculative-eagle-topk", "1",
                                "--speculative-adaptive-config", str(tmp_path / "a.json"),
                                "--speculative-draft-model-path", "/d/v000002", "--speculative-adaptive"]


def test_tide_serve_without_sglang_says_so(monkeypatch) -> None:
    monkeypatch.setattr("tide_sglang.plugin.versions.installed", lambda: None)
    result = CliRunner().invoke(main, ["serve", "--model-path", "m"])
    assert result.exit_code == 1 and "SGLang is not installed" in result.output
    monkeypatch.setattr("tide_sglang.plugin.versions.installed", lambda: "0.5.30")
    result = CliRunner().invoke(main, ["serve", "--model-path", "m"])
    assert result.exit_code == 1 and "0.5.30 is not supported" in result.output


def test_tide_serve_starts_with_the_registrys_profile_or_measures_one(tmp_path: Path, monkeypatch) -> None:
    """Without TIDE_CONTROL_PROFILE: the registry's profile for this target, GPU and SGLang version; none stored,
    a pending profile and the `tide profile` command that measures the starting server once and stores it
    (the command itself is tested against `tide engine` in tests/test_profiler.py)."""
    from tide_sglang.draft import DirectoryRegistry, ProfileKey

    registry = DirectoryRegistry(tmp_path / "registry", create=True)
    monkeypatch.setattr("tide_sglang.plugin.versions.installed", lambda: "0.5.17")
    monkeypatch.setattr("tide_sglang.plugin.cli.gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setenv("TIDE_REGISTRY_DIR", str(registry.root))
    monkeypatch.setenv("TIDE_POD_NAME", "pod-a")
    argv = ["serve", "--tide-dry-run", "--tide-candidate-steps", "1,3", "--model-path", "org/m", "--host", "0.0.0.0",
            "--port", "31000"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    _, env, child = result.output.strip().splitlines()
    assert "TIDE_CONTROL_PROFILE_PENDING=1" in env.split()
    path = Path(dict(kv.split("=", 1) for kv in env.split())["TIDE_CONTROL_PROFILE"])
    assert child.split()[1:] == [
        "-m", "tide_sglang.cli", "profile", "--url", "http://127.0.0.1:31000", "--metrics-url",
        "http://127.0.0.1:31000/metrics", "--pod", "pod-a", "--steps", "1,3", "--out", str(path), "--store",
        "--target", "org/m", "--gpu", "NVIDIA", "H200", "--sglang-version", "0.5.17", "--wait-s", "1800",
        "--server-pid", str(os.getpid())]
    stored = Profile.roofline(0.01, 1e-4, 0.001)
    registry.put_profile(ProfileKey(target="org/m", gpu="NVIDIA H200", sglang="0.5.17"), stored.model_dump_json())
    result = CliRunner().invoke(main, argv)
    _, env = result.output.strip().splitlines()  # no command: nothing to measure
    path = Path(env.removeprefix("TIDE_CONTROL_PROFILE="))
    assert Profile.load(path) == stored
    monkeypatch.setattr("tide_sglang.plugin.versions.installed", lambda: "0.5.23")  # another key: measured
    assert "PENDING" in CliRunner().invoke(main, argv).output


def test_tide_serve_with_pinned_steps_needs_no_profile(tmp_path: Path, monkeypatch) -> None:
    """A user's adaptive config with one candidate per slot leaves the controller nothing to choose: no profile is
    looked up or measured (a start-up profile would force other step counts on the server while it serves)."""
    monkeypatch.setattr("tide_sglang.plugin.versions.installed", lambda: "0.5.17")
    monkeypatch.setattr("tide_sglang.plugin.cli.gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setenv("TIDE_REGISTRY_DIR", str(tmp_path / "registry"))
    (tmp_path / "registry").mkdir()
    config = tmp_path / "adaptive.json"
    argv = ["serve", "--tide-dry-run", "--model-path", "org/m", "--speculative-adaptive-config", str(config)]
    config.write_text('{"1": {"candidate_steps": [3]}, "64": {"candidate_steps": [3, 3]}}')
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 1  # SGLang's command only: no profile, no `tide profile`
    config.write_text('{"1": {"candidate_steps": [3]}, "64": {"candidate_steps": [1, 3]}}')
    assert "PENDING" in CliRunner().invoke(main, argv).output  # a choice left: measured
    config.write_text('{"1": [3]}')
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1 and "not SGLang's adaptive config" in result.output


def test_tide_profile_stops_when_its_server_exits(tmp_path: Path) -> None:
    """`tide serve`'s start-up profile outlives the exec into SGLang (its own session): once that server is gone it
    must stop, not wait on and profile whatever next answers on the port (seen on the GPU, 2026-12-02)."""
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    threading.Thread(target=server.wait, daemon=True).start()  # reaped as its parent would: no zombie stays "alive"
    env = {**os.environ, "TIDE_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "tide_sglang.cli", "profile", "--metrics-url",
                           "http://127.0.0.1:1/metrics", "--wait-s", "120", "--server-pid", str(server.pid)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert f"the server (pid {server.pid}) exited" in done.stderr


def test_a_pending_profile_starts_the_controller_once_it_exists(tmp_path: Path) -> None:
    """TIDE_CONTROL_PROFILE_PENDING: the factory has no controller until the file appears; the runtime asks again
    at each sync point, and SGLang's own steps stand meanwhile."""
    path = tmp_path / "profile.json"
    settings = TideSettings(sync_interval_batches=4, control_prior_acceptance=0.95)

    def make(candidates: list[int]) -> SpeculationController | None:
        return SpeculationController(Profile.load(path), settings, candidates=candidates,
                                     registry=CollectorRegistry()) if path.exists() else None

    rt = Runtime(settings, PluginMetrics("unit", registry=CollectorRegistry()), None, None, None, lambda t: None, make)
    slots = {1: [0, 1, 3], 128: [0, 1, 3]}
    for _ in range(8):
        rt.sync(slots)
    assert rt.controller is None and rt.steps.table is None
    EXPENSIVE_DRAFT.save(path)
    for _ in range(3):
        rt.sync(slots)
    assert rt.controller is None  # between sync points the file is not looked at
    rt.sync(slots)
    assert rt.controller is not None and rt.steps.table == {1: 3, 128: 0}


def test_controller_candidates_and_acceptance_of_committed_requests() -> None:
    assert candidate_steps({1: [1, 3], 64: [0, 1], 128: [0]}) == [0, 1, 3]  # every slot's steps, and 0
    # correct drafts per request (accept_len - 1); the third request finished in the previous batch
    assert acceptance_sample([0, 2, 3, 1], [True, True, False, True]) == (3, 3)
    assert acceptance_sample([], []) == (0, 0)


def test_a_bad_cost_profile_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "profile.json"
    bad.write_text('{"target": []}')
    for path in (tmp_path / "missing.json", bad):
        with pytest.raises(ProfileError, match=f"TIDE_CONTROL_PROFILE={path}"):
            load_profile(path)
    monkeypatch.setattr("tide_sglang.plugin.versions.installed", lambda: "0.5.23")
    monkeypatch.setenv("TIDE_CONTROL_PROFILE", str(bad))
    result = CliRunner().invoke(main, ["serve", "--tide-dry-run", "--model-path", "m"])  # before SGLang starts
    assert result.exit_code == 1 and f"TIDE_CONTROL_PROFILE={bad} is not a usable cost profile" in result.output


# A draft step costs 0.8 target decode steps at batch 1: speculation pays only at high acceptance.
EXPENSIVE_DRAFT = Profile.roofline(0.010, 1e-4, 0.008)


def test_runtime_builds_the_controller_at_the_first_sync_and_low_acceptance_turns_speculation_off() -> None:
    settings = TideSettings(sync_interval_batches=2, control_prior_acceptance=0.95)
    built: list[list[int]] = []

    def make(candidates: list[int]) -> SpeculationController:
        built.append(candidates)
        return SpeculationController(EXPENSIVE_DRAFT, settings, candidates=candidates, registry=CollectorRegistry())

    rt = Runtime(settings, PluginMetrics("unit", registry=CollectorRegistry()), None, None, None, lambda t: None, make)
    slots = {1: [0, 1, 3], 128: [0, 1, 3]}
    rt.sync(slots)  # batch 1: no agreement yet, but the controller exists (observations may start)
    assert built == [[0, 1, 3]] and rt.controller is not None and rt.steps is not None and rt.steps.table is None
    rt.sync(slots)
    assert rt.steps.table == {1: 3, 128: 0}  # the prior 0.95 pays at batch 1 only
    # one verify at 3 steps, 4 committed requests accept 1 draft token in all (the 5th finished before)
    rt.observe([0, 1, 0, 0, 3], [True, True, True, True, False], draft_steps=3)
    for _ in range(2):
        rt.sync(slots)
    assert rt.steps.table == {1: 0, 128: 0} and built == [[0, 1, 3]]
    assert rt.controller.acceptance() < 0.3


def test_without_adaptive_slots_the_controller_stays_off() -> None:
    rt = Runtime(TideSettings(), PluginMetrics("unit", registry=CollectorRegistry()), None, None, None,
                 lambda t: None, lambda c: pytest.fail("built without candidates"))
    rt.sync(None)
    rt.observe([1], [True], draft_steps=3)
    assert rt.controller is None and rt.steps.decider is None and rt.make_controller is None


def test_the_control_states_collect_switches_row_copies_at_the_sync_point() -> None:
    """The swapper reads `collect` with the control state; the scheduler thread takes it at the next sync point
    (stand-ins: Runtime only reads these attributes of its capturer and swapper)."""
    import types

    swapper = types.SimpleNamespace(collect=False, forced=None, local_version=lambda: 3, apply_agreed=lambda v: False,
                                    current=3)
    capturer = types.SimpleNamespace(sampling=True, collect=True, version=3)
    rt = Runtime(TideSettings(sync_interval_batches=1), PluginMetrics("unit", registry=CollectorRegistry()),
                 capturer, swapper, None, lambda t: None)
    rt.sync(None)
    assert capturer.collect is False
    swapper.collect = True
    rt.sync(None)
    assert capturer.collect is True
    capturer.sampling = False  # TIDE_CAPTURE_SAMPLE_RATE=0 wins over the control state
    rt.sync(None)
    assert capturer.collect is False


def test_helper_counts_each_versions_verify_steps_in_redis_and_in_prometheus(settings) -> None:
    """The serving dashboard's accept length per version reads these counters; the operator reads the hash."""
    from prometheus_client import CollectorRegistry

    from tide_sglang.plugin.helper import Helper, HelperConfig
    from tide_sglang.plugin.metrics import PluginMetrics
    from tide_sglang.rollout.stats import read_stats
    from tide_sglang.stream import connect

    reg = CollectorRegistry()
    slab = Slab.create(slots=1, slot_bytes=4096)
    helper = Helper(HelperConfig(slab=slab.name, slots=1, slot_bytes=slab.slot_bytes, aux_layers=3, vocab_size=100),
                    settings, PluginMetrics(settings.deployment, registry=reg))
    try:
        for tick in (wire.Tick(7, 9, 3, 3, 2, 1000, 0), wire.Tick(7, 6, 2, 2, 1, 1000, 0),
                     wire.Tick(8, 3, 3, 1, 1, 1000, 0)):
            helper.handle(tick)
        helper.stats.flush()
        labels = {"deployment": settings.deployment, "draft_version": "7"}
        got = {name: reg.get_sample_value(name, labels) for name in
               ("tide_draft_tokens_total", "tide_draft_accepted_tokens_total", "tide_verify_steps_total")}
        assert got == {"tide_draft_tokens_total": 15, "tide_draft_accepted_tokens_total": 5,
                       "tide_verify_steps_total": 5}
        stats = read_stats(connect(settings), settings.namespace, settings.deployment, 7)
        assert (stats.tokens, stats.accepted, stats.verify_steps) == (15, 5, 5)
        # a tick covers several batches: one observation per batch, the tick's mean
        assert reg.get_sample_value("tide_plugin_scheduler_seconds_count", labels) == 3
        assert reg.get_sample_value("tide_plugin_scheduler_seconds_sum", labels) == pytest.approx(2e-6)
    finally:
        helper.close()
        slab.close()


def test_the_stream_writers_own_drops_are_exported_once_each_by_reason() -> None:
    from tide_sglang.plugin.metrics import writer_drops
    from tide_sglang.stream import WriterStats

    reported: dict[str, int] = {}
    assert writer_drops(WriterStats(dropped_redis_error=3, dropped_backlog=2), reported) == {
        "redis_error": 3, "backlog": 2}
    assert writer_drops(WriterStats(dropped_redis_error=3, dropped_backlog=5, dropped_oversized=1), reported) == {
        "backlog": 3, "oversized": 1}
    assert writer_drops(WriterStats(dropped_redis_error=3, dropped_backlog=5, dropped_oversized=1), reported) == {}


def test_a_served_versions_counters_start_at_zero_once() -> None:
    """A dashboard plots 0 for a drop or a swap failure that has not happened, not "No data"."""
    from tide_sglang.plugin.helper import DROP_REASONS
    from tide_sglang.plugin.metrics import PluginMetrics
    from tide_sglang.stream import WriterStats

    reg = CollectorRegistry()
    metrics = PluginMetrics("d", registry=reg)
    metrics.serving(3, DROP_REASONS)
    metrics.writer_dropped(3, WriterStats(dropped_backlog=2))
    metrics.serving(3, DROP_REASONS)  # a second call changes nothing
    drops = {s.labels["reason"]: s.value for m in reg.collect() if m.name == "tide_capture_drops"
             for s in m.samples if s.name.endswith("_total")}
    assert drops == {"scheduler": 0, "ring_full": 0, "writer_full": 0, "redis_error": 0, "backlog": 2,
                     "oversized": 0, "invalid": 0}
    zero = {m.name for m in reg.collect() for s in m.samples if s.name.endswith("_total") and s.value == 0
            and s.labels["draft_version"] == "3"}
    assert {"tide_draft_swap_failures", "tide_draft_tokens", "tide_captured_tokens"} <= zero


def test_helper_counts_every_invalid_domain_and_logs_only_the_first(settings, caplog) -> None:
    from tide_sglang.plugin.helper import Helper

    reg = CollectorRegistry()
    slab = Slab.create(slots=1, slot_bytes=4096)
    helper = Helper(HelperConfig(slab=slab.name, slots=1, slot_bytes=slab.slot_bytes, aux_layers=3, vocab_size=100),
                    settings, PluginMetrics(settings.deployment, registry=reg))
    try:
        with caplog.at_level("WARNING", logger="tide.plugin.helper"):
            for msg in wire.Decoder().feed(b"".join(wire.reg(t, f"r{t}", d) for t, d in
                                                    enumerate(["code", "a b", "", "x" * 99, NOT_TEXT]))):
                helper.handle(msg)
        labels = {"deployment": settings.deployment, "draft_version": "0"}
        assert reg.get_sample_value("tide_capture_invalid_domains_total", labels) == 3
        assert [r.getMessage() for r in caplog.records] == [
            "request r1: domain 'a b' is not a label (1-64 of A-Z a-z 0-9 _ . -); its rows go to the 'default' "
            "domain. Counted in tide_capture_invalid_domains_total, logged only this once"]
    finally:
        helper.close()
        slab.close()


def test_decode_step_times_land_in_their_version_bucket_and_steps() -> None:
    """The scheduler observes one decode step per batch through a cached histogram child: each version, batch-size
    bucket and step count still gets its own series (a stale child would put a new version's times in the old)."""
    registry = CollectorRegistry()
    metrics = PluginMetrics("unit", registry=registry)
    steps = [(1, 3, 2, 0.5), (1, 4, 2, 0.25), (1, 5, 2, 1.0), (2, 3, 2, 2.0), (1, 3, 3, 4.0)]
    for version, bs, draft_steps, seconds in steps:
        metrics.decode_step(version, bs, draft_steps, seconds)

    def total(version: int, bs: int, steps: int) -> float | None:
        return registry.get_sample_value("tide_decode_step_seconds_sum", {
            "deployment": "unit", "draft_version": str(version), "batch_size": str(bs), "draft_steps": str(steps)})

    assert (total(1, 4, 2), total(1, 8, 2), total(2, 4, 2), total(1, 4, 3)) == (0.75, 1.0, 2.0, 4.0)
