"""TRL trainer wrappers (``TDPOTrainer``, ``TIDPOTrainer``), the TI-DPO attribution pass and anchors.

Tiny random Llama + a word-level tokenizer built in code (nothing downloaded), CPU, ``impl="torch"``.
Written against TRL 1.16 (batch keys ``input_ids`` / ``attention_mask`` / ``completion_mask``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the trainer tests need transformers")
trl = pytest.importorskip("trl", reason="the trainer tests need trl (pip install tokpo_kernels[trl])")
pytest.importorskip("datasets", reason="the trainer tests need datasets")

import tokpo_kernels as tk  # noqa: E402
from tokpo_kernels.integrations.anchors import (  # noqa: E402
    AnchorBatch,
    generate_anchors,
    prompts_from_preference_batch,
)
from tokpo_kernels.integrations.attribution import importance_scores, importance_token_weights  # noqa: E402
from tokpo_kernels.integrations.trainers import TDPOTrainer, TIDPOTrainer  # noqa: E402

# These tests pass the method options as trainer keywords, the deprecated spelling that must keep working
# (tests/test_trainer_configs_and_metrics.py checks its FutureWarning and covers the config classes).
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated. set these fields:FutureWarning")

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
PAD, EOS = 0, 1


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def make_dataset():
    from datasets import Dataset

    rows = [
        {"prompt": "w3 w4 w5", "chosen": " w6 w7", "rejected": " w8"},
        {"prompt": "w9 w10", "chosen": " w11", "rejected": " w12 w13 w14"},
        {"prompt": "w15", "chosen": " w16 w17 w18", "rejected": " w19 w20"},
        {"prompt": "w21 w22 w23 w24", "chosen": " w25", "rejected": " w26"},
    ]
    return Dataset.from_list(rows * 2)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                bf16=False, use_cpu=True, report_to="none", gradient_checkpointing=False, save_strategy="no",
                logging_steps=1, beta=0.1, dataset_num_proc=None)
    base.update(kw)
    return trl.DPOConfig(**base)


def first_batch(trainer, n: int = 4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def targets_of(batch):
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]


def base_hidden(model, ids, mask):
    """Independent of hf_hidden: the decoder's last_hidden_state, shifted."""
    return model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]


def perturb(model, seed: int = 5, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- TDPO


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_trainer_loss_equals_functional(tmp_path, tokenizer, dataset, variant) -> None:
    model, ref = tiny_llama(0), tiny_llama(0)
    perturb(model)  # policy != reference, so KL and margins are nonzero
    trainer = TDPOTrainer(model, ref, args=config(tmp_path, beta=0.2), tdpo_alpha=0.3, tdpo_variant=variant,
                          loss_impl="torch", train_dataset=dataset, processing_class=tokenizer)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_hidden = base_hidden(trainer.ref_model, ids, mask)
    want = tk.tdpo_loss(base_hidden(model, ids, mask), model.lm_head.weight, targets_of(batch), ref_hidden,
                        trainer.ref_model.lm_head.weight, beta=0.2, alpha=0.3, variant=variant, impl="torch")
    torch.testing.assert_close(loss, want.loss, atol=1e-6, rtol=1e-5)
    logged = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/accuracies", "kl/chosen", "kl/margin", "logps/rejected"):
        assert logged[key][-1] == pytest.approx(want.metrics[key].mean().item(), rel=1e-5, abs=1e-6), key
    assert want.metrics["kl/chosen"].abs().sum() > 0


def test_tdpo_training_step_decreases_loss(tmp_path, tokenizer, dataset) -> None:
    model = tiny_llama(1)
    trainer = TDPOTrainer(model, args=config(tmp_path, learning_rate=5e-3, gradient_checkpointing=True),
                          loss_impl="torch", train_dataset=dataset, processing_class=tokenizer)
    assert trainer.ref_model is not None and trainer.ref_model is not model  # a frozen copy of the policy
    batch = first_batch(trainer)
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, batch).item()
    assert before == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; we drive training_step directly
    model.gradient_checkpointing_enable()  # likewise (DPOConfig defaults to gradient checkpointing)
    model.train()
    for _ in range(3):
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, batch).item()
    assert after < before - 1e-3
    assert all(not p.requires_grad or p.grad is None for p in trainer.ref_model.parameters())


def test_tdpo_trainer_peft_uses_disabled_adapter_as_reference(tmp_path, tokenizer, dataset) -> None:
    peft = pytest.importorskip("peft", reason="needs peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = TDPOTrainer(tiny_llama(2), args=config(tmp_path), loss_impl="torch", train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)
    assert trainer.ref_model is None
    batch = first_batch(trainer)
    model = trainer.model
    with torch.no_grad():
        assert trainer.compute_loss(model, batch).item() == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    loss = trainer.compute_loss(model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    base = model.get_base_model()
    with torch.no_grad(), model.disable_adapter():
        ref_hidden = base_hidden(base, ids, mask)
    want = tk.tdpo_loss(base_hidden(base, ids, mask), base.lm_head.weight, targets_of(batch), ref_hidden,
                        base.lm_head.weight.detach(), beta=0.1, impl="torch")
    torch.testing.assert_close(loss, want.loss, atol=1e-6, rtol=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-5


def test_trainer_rejects_precomputed_reference_and_warns_on_ignored_fields(tmp_path, tokenizer, dataset) -> None:
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        TDPOTrainer(tiny_llama(), args=config(tmp_path, precompute_ref_log_probs=True), train_dataset=dataset,
                    processing_class=tokenizer)
    with pytest.raises(ValueError, match="tdpo_variant"):
        TDPOTrainer(tiny_llama(), args=config(tmp_path), tdpo_variant="tdpo3", train_dataset=dataset,
                    processing_class=tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TDPOTrainer(tiny_llama(), args=config(tmp_path, loss_type=["ipo"]), train_dataset=dataset,
                    processing_class=tokenizer)
    assert any("ignored" in str(w.message) and "loss_type" in str(w.message) for w in caught)


def test_missing_trl_gives_install_hint() -> None:
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import tokpo_kernels.integrations.trainers\nexcept ImportError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=120)
    assert "pip install tokpo_kernels[trl]" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- TI-DPO


def test_tidpo_trainer_loss_equals_functional(tmp_path, tokenizer, dataset) -> None:
    model, ref = tiny_llama(3), tiny_llama(3)
    perturb(model, seed=7)
    trainer = TIDPOTrainer(model, ref, args=config(tmp_path), tidpo_gamma=0.5, tidpo_margin=0.05,
                           tidpo_importance_lam=0.2, tidpo_importance_sigma_div=8.0, tidpo_anchor_max_new_tokens=4,
                           loss_impl="torch", train_dataset=dataset, processing_class=tokenizer)
    batch = first_batch(trainer)
    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    torch.manual_seed(0)
    anchors = trainer.generate_anchor_batch(trainer.model, batch)
    assert isinstance(anchors, AnchorBatch) and anchors.input_ids.shape[0] == ids.shape[0] // 2
    trainer.generate_anchor_batch = lambda model, inputs: anchors  # fix the sample for the comparison
    loss = trainer.compute_loss(trainer.model, batch)

    weights = importance_token_weights(importance_scores(model, ids, mask), mask, comp, lam=0.2, sigma_div=8.0)
    with torch.no_grad():
        ref_hidden = base_hidden(ref, ids, mask)
        a_ref_hidden = base_hidden(ref, anchors.input_ids, anchors.attention_mask)
    want = tk.tidpo_loss(
        base_hidden(model, ids, mask), model.lm_head.weight, targets_of(batch), ref_hidden, ref.lm_head.weight,
        token_weights=weights, anchor_hidden=base_hidden(model, anchors.input_ids, anchors.attention_mask),
        anchor_ref_hidden=a_ref_hidden, anchor_targets=anchors.labels[:, 1:], beta=0.1, alpha=0.5, gamma=0.5,
        margin=0.05, impl="torch",
    )
    torch.testing.assert_close(loss, want.loss, atol=1e-5, rtol=1e-5)
    assert trainer._metrics["train"]["triplet_loss"][-1] == pytest.approx(want.metrics["triplet_loss"].item(),
                                                                          rel=1e-4, abs=1e-6)
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_tidpo_trainer_without_anchor_or_importance_is_tdpo2(tmp_path, tokenizer, dataset) -> None:
    model, ref = tiny_llama(4), tiny_llama(4)
    perturb(model, seed=9)
    trainer = TIDPOTrainer(model, ref, args=config(tmp_path), tidpo_use_anchor=False, tidpo_use_importance=False,
                           loss_impl="torch", train_dataset=dataset, processing_class=tokenizer)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_hidden = base_hidden(ref, ids, mask)
    want = tk.tdpo_loss(base_hidden(model, ids, mask), model.lm_head.weight, targets_of(batch), ref_hidden,
                        ref.lm_head.weight, beta=0.1, alpha=0.5, variant="tdpo2", impl="torch")
    torch.testing.assert_close(loss, want.loss, atol=1e-6, rtol=1e-5)


def test_tidpo_trainer_train_logs_metrics(tmp_path, tokenizer, dataset) -> None:
    trainer = TIDPOTrainer(tiny_llama(8), args=config(tmp_path, max_steps=2, per_device_train_batch_size=2),
                           tidpo_anchor_max_new_tokens=3, loss_impl="torch", train_dataset=dataset,
                           processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for key in ("rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/chosen", "kl/chosen",
                "kl/rejected", "kl/margin", "triplet_loss"):
        assert key in logged[-1] and math.isfinite(logged[-1][key]), key
    assert logged[0]["loss"] == pytest.approx(math.log(2) + 0.1 * 0.01, abs=1e-5)  # policy == ref: D+ = D- = 0


# ----------------------------------------------------------------------------- attribution


def brute_force_scores(model, ids, mask):
    model.eval()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=mask).logits
    last = torch.tensor([int(m.nonzero().max()) for m in mask])
    target = logits[torch.arange(ids.shape[0]), last].max(-1).values.sum()
    (g,) = torch.autograd.grad(target, emb)
    return g.abs().sum(-1) * mask


@pytest.mark.parametrize("start_training", [True, False])
def test_importance_scores(start_training: bool) -> None:
    model = tiny_llama(5)
    model.train(start_training)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(WORDS), (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    scores = importance_scores(model, ids, mask)
    assert scores.shape == (3, 8) and scores.dtype == torch.float32 and not scores.requires_grad
    assert model.training is start_training
    assert all(p.grad is None for p in model.parameters())
    assert torch.all(scores[mask == 0] == 0) and torch.all(scores[mask == 1] > 0)
    torch.testing.assert_close(scores, brute_force_scores(tiny_llama(5), ids, mask), atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # works inside an outer no_grad (evaluation)
        torch.testing.assert_close(importance_scores(model, ids, mask), scores)


def test_importance_token_weights_alignment() -> None:
    scores = torch.rand(2, 6) + 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    comp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    w = importance_token_weights(scores, mask, comp, lam=0.7, sigma_div=4.0)
    assert w.shape == (2, 5)
    # the weight of label y_t (hidden position t) is the weight of input position t + 1
    torch.testing.assert_close(w, tk.token_importance_weights(scores, mask.bool())[:, 1:])
    w_resp = importance_token_weights(scores, mask, comp, span="response")
    torch.testing.assert_close(w_resp, tk.token_importance_weights(scores, (mask & comp).bool())[:, 1:])
    assert torch.all(w_resp[comp[:, 1:] == 0] == 0)
    with pytest.raises(ValueError):
        importance_token_weights(scores, mask, span="response")


# ----------------------------------------------------------------------------- anchors


def test_prompts_from_preference_batch(tokenizer, dataset, tmp_path) -> None:
    collate = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=PAD)
    batch = collate([{"prompt_ids": [3, 4, 5], "chosen_ids": [6, 1], "rejected_ids": [8, 9, 1]},
                     {"prompt_ids": [10], "chosen_ids": [11, 12, 1], "rejected_ids": [1]}])
    prompts = prompts_from_preference_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert [p.tolist() for p in prompts] == [[3, 4, 5], [10]]


def test_generate_anchors_with_tiny_model() -> None:
    model = tiny_llama(6)
    model.train()
    prompts = [torch.tensor([3, 4, 5]), torch.tensor([7]), torch.tensor([8, 9])]
    torch.manual_seed(0)
    a = generate_anchors(model, prompts, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=5)
    assert model.training
    assert a.input_ids.shape == a.labels.shape == a.attention_mask.shape == a.completion_mask.shape
    assert a.input_ids.shape[0] == 3 and a.input_ids.shape[1] <= 3 + 5
    for b, p in enumerate(prompts):
        n = len(p)
        assert a.input_ids[b, :n].tolist() == p.tolist()
        assert torch.all(a.labels[b, :n] == -100)
        comp = a.completion_mask[b].bool()
        assert 1 <= int(comp.sum()) <= 5
        assert torch.equal(a.labels[b][comp], a.input_ids[b][comp])
        assert torch.all(a.labels[b][~comp] == -100)
        length = int(a.attention_mask[b].sum())  # right-padded: ones, then zeros
        assert torch.equal(a.attention_mask[b].bool(), torch.arange(a.input_ids.shape[1]) < length)


class _FakeGenerator(torch.nn.Module):
    """``generate`` returns fixed continuations, to test the repacking deterministically."""

    def __init__(self, continuation):
        super().__init__()
        self.continuation = torch.tensor(continuation)
        self.seen = {}

    def generate(self, input_ids, attention_mask, **kwargs):
        self.seen = dict(kwargs, input_ids=input_ids.clone(), attention_mask=attention_mask.clone())
        return torch.cat([input_ids, self.continuation], dim=1)


def test_generate_anchors_repacks_and_stops_at_eos() -> None:
    fake = _FakeGenerator([[20, 1, 21, 22], [23, 24, 25, 26]])
    a = generate_anchors(fake, [torch.tensor([3, 4, 5]), torch.tensor([7])], pad_token_id=PAD, eos_token_id=EOS,
                         max_new_tokens=4)
    # left-padded prompts for generate, docs/methods.md defaults passed through
    assert fake.seen["input_ids"].tolist() == [[3, 4, 5], [0, 0, 7]]
    assert fake.seen["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert (fake.seen["top_k"], fake.seen["top_p"], fake.seen["temperature"]) == (50, 0.95, 0.8)
    assert fake.seen["do_sample"] is True and fake.seen["max_new_tokens"] == 4
    # right-padded [prompt | response up to and including the first EOS]
    assert a.input_ids.tolist() == [[3, 4, 5, 20, 1], [7, 23, 24, 25, 26]]
    assert a.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert a.labels.tolist() == [[-100, -100, -100, 20, 1], [-100, 23, 24, 25, 26]]
    fake = _FakeGenerator([[1, 9, 9], [9, 9, 9]])
    a = generate_anchors(fake, [torch.tensor([3]), torch.tensor([4, 5])], pad_token_id=PAD, eos_token_id=EOS)
    assert a.input_ids.tolist() == [[3, 1, 0, 0, 0], [4, 5, 9, 9, 9]]
    assert a.labels.tolist() == [[-100, 1, -100, -100, -100], [-100, -100, 9, 9, 9]]
    assert a.completion_mask.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
