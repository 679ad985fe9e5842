"""TDPOTrainer / TIDPOTrainer as a TRL user meets them: mixed precision, config classes, DPOTrainer's
metrics, and training from precomputed reference hidden states.

Tiny random Llama + word-level tokenizer built in code (helpers of ``test_integrations_trainers``),
CPU. Each comparison is against ``DPOTrainer`` itself or against a run with the live reference.
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the trainer tests need transformers")
trl = pytest.importorskip("trl", reason="the trainer tests need trl (pip install tokpo_kernels[trl])")
pytest.importorskip("datasets", reason="the trainer tests need datasets")

from test_integrations_trainers import first_batch, make_dataset, make_tokenizer, perturb, tiny_llama  # noqa: E402
from tokpo_kernels.integrations.dpo_configs import TDPOConfig, TIDPOConfig  # noqa: E402
from tokpo_kernels.integrations.trainers import TDPOTrainer, TIDPOTrainer  # noqa: E402

BASE = dict(per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2, use_cpu=True, report_to="none",
            gradient_checkpointing=False, save_strategy="no", logging_steps=1, beta=0.1, dataset_num_proc=None)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


def make_config(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path), **{**BASE, "bf16": False, **kw})


def no_anchor(**kw):
    """TI-DPO fields for a deterministic batch: no sampled anchor (the triplet term needs generation)."""
    return dict(tidpo_use_anchor=False, **kw)


# ----------------------------------------------------------------------------- mixed precision


def _train_step_dtypes(trainer) -> tuple:
    """The output dtypes of layer 0's q_proj during one real training step (``train()``: the model is
    prepared by accelerate there, which is where DPOTrainer's autocast comes from) and the logged loss."""
    seen = []
    q_proj = trainer.accelerator.unwrap_model(trainer.model).model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        trainer.train()
    finally:
        handle.remove()
    return seen, next(log["loss"] for log in trainer.state.log_history if "loss" in log)


@pytest.mark.parametrize("method", ["dpo", "tdpo", "tidpo"])
def test_bf16_runs_the_policy_forward_in_bf16_like_dpo_trainer(tmp_path, tokenizer, dataset, method) -> None:
    """bf16=True: the attention projection computes in bf16 under every trainer (the issue: TDPOTrainer ran
    fp32 while DPOTrainer ran bf16), and the loss stays within bf16 rounding of the fp32 run."""
    cls, trainer_cls, extra = {
        "dpo": (trl.DPOConfig, trl.DPOTrainer, {}),
        "tdpo": (TDPOConfig, TDPOTrainer, {"loss_impl": "torch"}),
        "tidpo": (TIDPOConfig, TIDPOTrainer, no_anchor(loss_impl="torch", tidpo_use_importance=True)),
    }[method]
    losses = {}
    for bf16 in (False, True):
        model, ref = tiny_llama(0), tiny_llama(0)
        perturb(model)
        args = make_config(cls, tmp_path, bf16=bf16, **extra)
        trainer = trainer_cls(model, ref, args=args, train_dataset=dataset, processing_class=tokenizer)
        dtypes, losses[bf16] = _train_step_dtypes(trainer)
        want = torch.bfloat16 if bf16 else torch.float32
        assert dtypes and set(dtypes) == {want}, (bf16, dtypes)
    # bf16 keeps 8 significant bits: 2^-8 = 0.39 % is one rounding of the loss itself. The bf16 forward
    # rounds every activation, but the loss (~0.7) is a difference of sums of many such values whose
    # errors partly cancel; measured 3e-4 relative for all three trainers (DPOTrainer included).
    assert losses[True] == pytest.approx(losses[False], rel=2 ** -8)


# ----------------------------------------------------------------------------- config classes


def test_config_from_yaml_equals_config_from_flags(tmp_path) -> None:
    parser = transformers.HfArgumentParser((TDPOConfig,))
    yaml_path = tmp_path / "tdpo.yaml"
    yaml_path.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\nbeta: 0.2\ntdpo_alpha: 0.3\ntdpo_variant: tdpo1\n"
        "loss_impl: torch\nprecompute_ref_hidden_states: true\n"
    )
    (from_yaml,) = parser.parse_yaml_file(str(yaml_path))
    (from_flags,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--beta", "0.2", "--tdpo_alpha", "0.3",
         "--tdpo_variant", "tdpo1", "--loss_impl", "torch", "--precompute_ref_hidden_states", "true"])
    assert from_yaml == from_flags
    assert (from_yaml.tdpo_alpha, from_yaml.tdpo_variant, from_yaml.loss_impl) == (0.3, "tdpo1", "torch")
    assert from_yaml.precompute_ref_hidden_states is True


def test_tidpo_config_from_yaml_equals_config_from_flags(tmp_path) -> None:
    parser = transformers.HfArgumentParser((TIDPOConfig,))
    yaml_path = tmp_path / "tidpo.yaml"
    yaml_path.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\ntidpo_gamma: 0.001\ntidpo_margin: 0.001\ntidpo_use_anchor: false\n"
        "tidpo_importance_span: response\ntidpo_anchor_generation_kwargs:\n  repetition_penalty: 1.1\n"
    )
    (from_yaml,) = parser.parse_yaml_file(str(yaml_path))
    (from_flags,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--tidpo_gamma", "0.001", "--tidpo_margin", "0.001",
         "--tidpo_use_anchor", "false", "--tidpo_importance_span", "response",
         "--tidpo_anchor_generation_kwargs", '{"repetition_penalty": 1.1}'])
    assert from_yaml == from_flags
    assert from_yaml.tidpo_anchor_generation_kwargs == {"repetition_penalty": 1.1}


@pytest.mark.parametrize("cls, bad, message", [
    (TDPOConfig, {"loss_impl": "tritn"}, "loss_impl: expected one of"),
    (TDPOConfig, {"tdpo_alpha": -0.1}, "tdpo_alpha: expected >= 0.0"),
    (TDPOConfig, {"tdpo_variant": "tdpo3"}, "tdpo_variant: expected one of"),
    (TDPOConfig, {"precompute_ref_hidden_states": True, "precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
    (TIDPOConfig, {"tidpo_importance_lam": 1.5}, "tidpo_importance_lam: expected <= 1.0"),
    (TIDPOConfig, {"tidpo_preference": "ipo"}, "tidpo_preference: expected one of"),
    (TIDPOConfig, {"tidpo_anchor_top_p": 0.0}, "tidpo_anchor_top_p: expected > 0.0"),
    (TIDPOConfig, {"tidpo_anchor_max_new_tokens": 2.5}, "tidpo_anchor_max_new_tokens: expected an integer"),
    (TIDPOConfig, {"tidpo_anchor_generation_kwargs": "{not json"}, "tidpo_anchor_generation_kwargs"),
    (TIDPOConfig, {"tidpo_use_anchor": "yes"}, "tidpo_use_anchor: expected a bool"),
])
def test_invalid_config_values_raise_at_construction(tmp_path, cls, bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_config(cls, tmp_path, **bad)


def test_config_is_saved_with_the_training_arguments(tmp_path, tokenizer, dataset) -> None:
    args = make_config(TDPOConfig, tmp_path, tdpo_alpha=0.25, tdpo_variant="tdpo1", loss_impl="torch")
    trainer = TDPOTrainer(tiny_llama(0), args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.save_model(str(tmp_path / "saved"))
    saved = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert isinstance(saved, TDPOConfig)
    assert (saved.tdpo_alpha, saved.tdpo_variant, saved.loss_impl) == (0.25, "tdpo1", "torch")


def test_trainer_keywords_still_work_and_fill_the_config(tmp_path, tokenizer, dataset) -> None:
    plain = trl.DPOConfig(output_dir=str(tmp_path), **{**BASE, "bf16": False})
    with pytest.warns(FutureWarning, match=r"tdpo_alpha=\.\.\., loss_impl=\.\.\.\) is deprecated"):
        trainer = TDPOTrainer(tiny_llama(0), args=plain, tdpo_alpha=0.25, loss_impl="torch",
                              train_dataset=dataset, processing_class=tokenizer)
    assert isinstance(trainer.args, TDPOConfig) and not isinstance(plain, TDPOConfig)
    assert (trainer.args.tdpo_alpha, trainer.args.loss_impl, trainer.tdpo_alpha) == (0.25, "torch", 0.25)
    assert trainer.args.beta == plain.beta and trainer.args.output_dir == plain.output_dir
    with pytest.raises(ValueError, match="loss_impl: expected one of"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        TDPOTrainer(tiny_llama(0), args=plain, loss_impl="tritn", train_dataset=dataset, processing_class=tokenizer)
    with pytest.warns(FutureWarning, match="tidpo_gamma"):
        tidpo = TIDPOTrainer(tiny_llama(0), args=make_config(TIDPOConfig, tmp_path), tidpo_gamma=0.5,
                             train_dataset=dataset, processing_class=tokenizer)
    assert tidpo.args.tidpo_gamma == 0.5 and tidpo.tidpo_gamma == 0.5


# ----------------------------------------------------------------------------- DPOTrainer's metrics


def fitted_llama(tokenizer, dataset, seed: int = 0, steps: int = 60):
    """A tiny Llama fitted to the chosen answers (cross-entropy, Adam), so that the label is the argmax at
    a good share of tokens and ``mean_token_accuracy`` is neither 0 nor 1 (a random model scores 0)."""
    model = tiny_llama(seed)
    texts = [row["prompt"] + row["chosen"] for row in dataset]
    ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=-100)
    inputs = batch.clamp_min(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=inputs, attention_mask=(batch >= 0).long(), labels=batch).loss.backward()
        opt.step()
    return model


def _one_batch_metrics(trainer) -> dict:
    trainer.compute_loss(trainer.model, first_batch(trainer))
    return {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("method", ["tdpo", "tidpo"])
def test_metric_names_cover_dpo_trainers_and_shared_values_match(tmp_path, tokenizer, dataset, method) -> None:
    fitted = fitted_llama(tokenizer, dataset).state_dict()

    def models():
        model, ref = tiny_llama(0), tiny_llama(0)
        model.load_state_dict(fitted)
        return model, ref

    dpo = trl.DPOTrainer(*models(), args=make_config(trl.DPOConfig, tmp_path),
                         train_dataset=dataset, processing_class=tokenizer)
    want = _one_batch_metrics(dpo)
    if method == "tdpo":
        ours = TDPOTrainer(*models(), args=make_config(TDPOConfig, tmp_path, loss_impl="torch"),
                           train_dataset=dataset, processing_class=tokenizer)
    else:
        ours = TIDPOTrainer(*models(), args=make_config(TIDPOConfig, tmp_path, **no_anchor(loss_impl="torch")),
                            train_dataset=dataset, processing_class=tokenizer)
    got = _one_batch_metrics(ours)

    assert set(want) <= set(got), f"missing: {sorted(set(want) - set(got))}"
    assert {"kl/chosen", "kl/rejected", "kl/margin"} <= set(got)
    # Same meaning, so same value: token metrics and log-likelihoods. rewards/* differ by design (β(M + K)).
    for name in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "logps/chosen",
                 "logps/rejected", "num_tokens"):
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-5), name
    assert want["entropy"] > 0 and want["logits/chosen"] != 0 and 0 < want["mean_token_accuracy"] < 1


# ----------------------------------------------------------------------------- precomputed reference


def _pair(tmp_path, tokenizer, dataset, cls, trainer_cls, precompute: bool, **kw):
    model, ref = tiny_llama(0), tiny_llama(0)
    perturb(model)
    args = make_config(cls, tmp_path / ("cached" if precompute else "live"), loss_impl="torch",
                       precompute_ref_hidden_states=precompute, **kw)
    return trainer_cls(model, ref, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(3)),
                       processing_class=tokenizer)


@pytest.mark.parametrize("method", ["tdpo", "tidpo"])
def test_precomputed_reference_gives_the_live_loss_and_metrics(tmp_path, tokenizer, dataset, method) -> None:
    cls, trainer_cls, kw = ((TDPOConfig, TDPOTrainer, {}) if method == "tdpo"
                            else (TIDPOConfig, TIDPOTrainer, no_anchor(tidpo_use_importance=False)))
    live = _pair(tmp_path, tokenizer, dataset, cls, trainer_cls, False, **kw)
    cached = _pair(tmp_path, tokenizer, dataset, cls, trainer_cls, True, **kw)
    assert cached.ref_model is None and cached.ref_cache is not None
    # Batches of the shuffled order the training uses: cached rows are found by each example's index.
    order = [5, 2, 7, 0]
    live_batch = live.data_collator([live.train_dataset[i] for i in order])
    cached_batch = cached.data_collator([cached.train_dataset[i] for i in order])
    assert torch.equal(cached_batch["ref_hidden_index"], torch.tensor(order))
    loss_live = live.compute_loss(live.model, live_batch)
    loss_cached = cached.compute_loss(cached.model, cached_batch)
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-5)
    m_live = {k: v[-1] for k, v in live._metrics["train"].items()}
    m_cached = {k: v[-1] for k, v in cached._metrics["train"].items()}
    assert set(m_live) == set(m_cached)
    for name in m_live:
        assert m_cached[name] == pytest.approx(m_live[name], rel=1e-5, abs=1e-5), name
    # Evaluation reads the eval split of the cache (its own indices, after the train examples').
    ev = cached.evaluate()
    ev_live = live.evaluate()
    assert ev["eval_loss"] == pytest.approx(ev_live["eval_loss"], rel=1e-5, abs=1e-5)


def test_precompute_drops_the_reference_and_reuses_the_cache(tmp_path, tokenizer, dataset) -> None:
    model, ref = tiny_llama(0), tiny_llama(0)
    args = make_config(TDPOConfig, tmp_path, loss_impl="torch", precompute_ref_hidden_states=True)
    trainer = TDPOTrainer(model, ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    watch = weakref.ref(ref)
    del ref
    gc.collect()  # modules hold reference cycles (parent <-> hooks); only the collector frees them
    assert watch() is None, "the reference model is still referenced after precomputing"
    cache_dir = tmp_path / "ref_hidden_states"
    manifest = cache_dir / "manifest.json"
    assert manifest.is_file() and (cache_dir / "hidden.bin").stat().st_size > 0
    stamp = os.stat(manifest).st_mtime_ns
    trainer.train()  # one step from the cache

    # Same data and reference (a resumed run builds the trainer again): the cache is read, not rewritten.
    again = TDPOTrainer(tiny_llama(0), tiny_llama(0), args=args, train_dataset=dataset, processing_class=tokenizer)
    assert os.stat(manifest).st_mtime_ns == stamp and again.ref_cache is not None
    # Another reference: the fingerprint differs and the cache is rebuilt.
    other = tiny_llama(3)
    TDPOTrainer(tiny_llama(0), other, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert os.stat(manifest).st_mtime_ns != stamp


def test_precompute_with_sampled_anchors_is_refused(tmp_path, tokenizer, dataset) -> None:
    trainer = _pair(tmp_path, tokenizer, dataset, TIDPOConfig, TIDPOTrainer, True, tidpo_use_importance=False,
                    tidpo_anchor_max_new_tokens=2)
    with pytest.raises(ValueError, match="anchors are sampled during training"):
        trainer.compute_loss(trainer.model, first_batch(trainer))


# ----------------------------------------------------------------------------- model card


@pytest.mark.parametrize("trainer_cls, cls, paper", [(TDPOTrainer, TDPOConfig, "2404.11999"),
                                                     (TIDPOTrainer, TIDPOConfig, "2505.19653")])
def test_model_card_cites_the_methods_own_paper(tmp_path, tokenizer, dataset, trainer_cls, cls, paper) -> None:
    trainer = trainer_cls(tiny_llama(0), args=make_config(cls, tmp_path), train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "a method introduced in [" in card and f"papers/{paper})" in card
    assert "2305.18290" not in card  # the DPO paper is not presented as the method's origin


def test_precomputed_reference_of_a_peft_policy_is_the_adapter_free_model(tmp_path, tokenizer, dataset) -> None:
    """LoRA policy without ref_model: the cache holds the adapter-disabled model's hidden states, so the
    loss and metrics equal the live run (which disables the adapter at every step)."""
    peft = pytest.importorskip("peft", reason="the PEFT case needs peft")
    results = []
    for precompute in (False, True):
        torch.manual_seed(0)
        args = make_config(TDPOConfig, tmp_path / str(precompute), loss_impl="torch",
                           precompute_ref_hidden_states=precompute)
        trainer = TDPOTrainer(tiny_llama(0), None, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        gen = torch.Generator().manual_seed(1)  # the adapter moves away from 0: policy != reference
        with torch.no_grad():
            for name, p in sorted(trainer.model.named_parameters()):
                if "lora_B" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in (3, 1, 6, 0)])
        loss = trainer.compute_loss(trainer.model, batch)
        results.append((loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}))
    (live_loss, live), (cached_loss, cached) = results
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-5, atol=1e-5)
    assert live["kl/chosen"] > 0
    for name in live:
        assert cached[name] == pytest.approx(live[name], rel=1e-5, abs=1e-5), name


def test_precomputed_reference_under_bf16_is_stored_in_bf16_and_gives_the_live_loss(tmp_path, tokenizer,
                                                                                    dataset) -> None:
    """bf16=True: the cache holds what the live reference feeds the loss (bf16 rows), and the loss is the
    live one (the reference forward of each row does not depend on the batch it was computed in)."""
    import json

    live = _pair(tmp_path, tokenizer, dataset, TDPOConfig, TDPOTrainer, False, bf16=True)
    cached = _pair(tmp_path, tokenizer, dataset, TDPOConfig, TDPOTrainer, True, bf16=True)
    manifest = json.loads((tmp_path / "cached" / "ref_hidden_states" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and cached.ref_cache.dtype == torch.bfloat16
    order = [5, 2, 7, 0]
    loss_live = live.compute_loss(live.model, live.data_collator([live.train_dataset[i] for i in order]))
    loss_cached = cached.compute_loss(cached.model, cached.data_collator([cached.train_dataset[i] for i in order]))
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-5, atol=1e-5)


def test_resume_and_later_epochs_read_the_cache_without_rebuilding_it(tmp_path, tokenizer, dataset) -> None:
    """A run saved at step 2 and resumed (a new trainer, here with a longer max_steps: the datasets'
    own fingerprints change with such arguments, the token ids do not) reads the same cache through
    three epochs; changing the data rebuilds it."""

    def trainer(max_steps, data=dataset):
        args = make_config(TDPOConfig, tmp_path, loss_impl="torch", precompute_ref_hidden_states=True,
                           max_steps=max_steps, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
        return TDPOTrainer(tiny_llama(0), tiny_llama(0), args=args, train_dataset=data, processing_class=tokenizer)

    trainer(2).train()
    manifest = tmp_path / "ref_hidden_states" / "manifest.json"
    stamp = os.stat(manifest).st_mtime_ns
    resumed = trainer(12)  # 8 pairs / 2 per step: 3 epochs
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 12 and resumed.state.epoch == pytest.approx(3.0)
    assert os.stat(manifest).st_mtime_ns == stamp
    trainer(2, dataset.select(range(6)))
    assert os.stat(manifest).st_mtime_ns != stamp
