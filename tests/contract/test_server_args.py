"""`tide serve`'s command line is accepted by SGLang's real ServerArgs (EAGLE-3 + adaptive with 0 steps)."""

import json
from pathlib import Path

from sglang.srt.server_args import prepare_server_args
from sglang.srt.speculative.adaptive_spec_params import AdaptiveSpeculativeParams, adaptive_unsupported_reason

from tests.contract.drafts import draft, registry_with
from tide_sglang.plugin.cli import serve_argv


def test_server_args_accept_the_flags_tide_serve_passes(tmp_path: Path, target_dir: Path) -> None:
    registry = registry_with(tmp_path / "registry", draft(0))
    user = ["--model-path", str(target_dir), "--device", "cpu", "--speculative-num-steps", "3",
            "--speculative-num-draft-tokens", "4", "--port", "31000"]
    argv = serve_argv(user, candidates=[1, 3], config_path=tmp_path / "adaptive.json",
                      draft_path=registry.path(1))
    assert argv[: len(user)] == user  # SGLang's arguments pass unchanged, first
    args = prepare_server_args(argv)
    assert args.speculative_algorithm == "EAGLE3" and args.speculative_adaptive
    assert args.speculative_eagle_topk == 1 and args.port == 31000
    assert Path(args.speculative_draft_model_path) == registry.path(1)
    assert adaptive_unsupported_reason(args) is None
    params = AdaptiveSpeculativeParams(initial_steps=3, cfg_path=args.speculative_adaptive_config)
    assert params.candidate_steps == [0, 1, 3]  # 0 is always there: the controller may switch speculation off
    assert json.loads((tmp_path / "adaptive.json").read_text())["1"]["candidate_steps"] == [0, 1, 3]


def test_user_flags_win_over_tide_defaults(tmp_path: Path) -> None:
    user = ["--model-path", "m", "--speculative-algorithm=EAGLE", "--speculative-eagle-topk", "4"]
    argv = serve_argv(user, candidates=[2], config_path=tmp_path / "a.json", draft_path=None)
    assert argv.count("--speculative-eagle-topk") == 1 and "EAGLE3" not in argv
    assert "--speculative-draft-model-path" not in argv
