"""The trainer examples run end to end (few steps; the figures of a full ``--quick`` run are logged in
``examples/results/``, not asserted here): each returns its JSON summary with the steps asked for."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the trainer examples need trl (pip install tokpo_kernels[trl])")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags", [[], ["--bf16"], ["--precompute-ref"]], ids=["fp32", "bf16", "precompute_ref"])
def test_tdpo_tiny_runs(tmp_path, flags) -> None:
    args = ["--quick", "--steps", "3", "--batch-size", "8", "--output-dir", str(tmp_path), *flags]
    out = load("tdpo_tiny").main(args)
    assert out["steps"] == 3 and math.isfinite(out["eval_loss_after"])
    assert out["reward_accuracy_before"] == 0.0  # reference == initial policy: every reward is exactly 0
    assert {"entropy", "mean_token_accuracy", "kl/chosen"} <= set(out["logged_metrics"])
    assert out["bf16"] == ("--bf16" in flags) and out["precompute_ref"] == ("--precompute-ref" in flags)
    if "--precompute-ref" in flags:
        assert (tmp_path / "ref_hidden_states" / "manifest.json").is_file()


def test_tidpo_tiny_runs(tmp_path) -> None:
    out = load("tidpo_tiny").main(["--quick", "--steps", "2", "--batch-size", "8", "--output-dir", str(tmp_path)])
    assert out["steps"] == 2 and math.isfinite(out["train_triplet_loss_mean"])
