"""The SGLang plugin's pure logic, without SGLang: row selection, swap checks, agreement, step choice, serve argv.
(The same code against the real SGLang modules: tests/contract, in .venv-sglang.)"""

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tide_sglang.cli import main
from tide_sglang.plugin import rows
from tide_sglang.plugin.cli import serve_argv
from tide_sglang.plugin.speculation import choose_steps
from tide_sglang.plugin.swap import Baseline, SwapRefused, agreed_version, desired_version, plan_swap, sglang_name


def test_decode_rows_take_the_accepted_prefix_of_each_kept_request() -> None:
    row, req, pos = rows.decode_rows([1, 3, 4, 2], [10, 20, 30, 40], nd=4, keep=[0, 1, 3])
    assert row.tolist() == [0, 4, 5, 6, 12, 13]
    assert req.tolist() == [0, 1, 1, 1, 2, 2]
    assert pos.tolist() == [10, 20, 21, 22, 40, 41]
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        rows.decode_rows([0], [5], nd=4, keep=[0])


def test_hard_example_filter_and_commit_mask() -> None:
    accept = [1, 4, 3, 2]  # acceptance 0, 1, 2/3, 1/3 at nd=4
    keep = rows.keep_requests(accept, 4, [True, True, True, False], [True] * 4, max_acceptance=0.5)
    assert keep == [0]  # 1 and 2 too easy, 3 not committed
    assert rows.keep_requests(accept, 4, [True] * 4, [True, False, True, True], 1.0) == [0, 2, 3]


def test_prefill_rows_chain_prompt_tokens_then_the_sampled_one() -> None:
    row, req, pos, src = rows.prefill_rows([3, 2], [0, 5], complete=[True, False], keep=[0, 1])
    assert (row.tolist(), req.tolist(), pos.tolist()) == ([0, 1, 2, 3], [0, 0, 0, 1], [0, 1, 2, 5])
    assert src.tolist() == [1, 2, 5, 4]  # 5 = len(input_ids) + 0: request 0's sampled token


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
    assert desired_version({b"stable": b"3", b"canary": b"4"}, "canary") == 4
    assert desired_version({"stable": "x"}, "stable") is None and desired_version({}, "canary") is None
    assert desired_version({b"stable": b"3"}, "canary") == 3  # no canary running: canary pods serve stable
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
