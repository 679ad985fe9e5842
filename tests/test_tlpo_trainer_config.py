"""TLPOTrainer as a user of transformers meets it: TLPOConfig, mixed precision, one metric namespace,
prompts tokenised as the model's generation sees them, and ASCII letters the checker skips reported.

Tiny random Llama and BPE tokenizer built in code (``test_integrations_tlpo.make_tiny``), CPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the TLPO trainer tests need transformers")
pytest.importorskip("accelerate", reason="the TLPO trainer tests need accelerate")

from test_integrations_tlpo import make_tiny  # noqa: E402
from tokpo_kernels.integrations.tlpo_config import TLPOConfig  # noqa: E402
from tokpo_kernels.integrations.tlpo_explore import build_groups, prompt_ids  # noqa: E402
from tokpo_kernels.integrations.tlpo_language import LanguageChecker  # noqa: E402
from tokpo_kernels.integrations.tlpo_trainer import TLPOTrainer, collate_groups, tlpo_group_loss  # noqa: E402

SMALL = dict(num_samples=4, sample_temperature=1.0, max_new_tokens=6, num_candidates=8, continue_tokens=2)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def tlpo_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-2,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                target="ko", ignore_ascii=False, loss_impl="torch", **SMALL)
    base.update(kw)
    return TLPOConfig(**base)


# ----------------------------------------------------------------------------- config


def test_tlpo_config_from_yaml_equals_config_from_flags(tmp_path) -> None:
    parser = transformers.HfArgumentParser((TLPOConfig,))
    path = tmp_path / "tlpo.yaml"
    path.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\ntarget: ru\nnum_candidates: 12\nkl_beta: 0.1\n"
                    "ignore_ascii: false\nprompt_format: plain\nadd_special_tokens: false\nloss_impl: torch\n")
    (from_yaml,) = parser.parse_yaml_file(str(path))
    (from_flags,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--target", "ru", "--num_candidates", "12",
         "--kl_beta", "0.1", "--ignore_ascii", "false", "--prompt_format", "plain", "--add_special_tokens", "false",
         "--loss_impl", "torch"])
    assert from_yaml == from_flags
    assert (from_yaml.target, from_yaml.num_candidates, from_yaml.kl_beta, from_yaml.ignore_ascii) == ("ru", 12, 0.1,
                                                                                                      False)
    assert from_yaml.remove_unused_columns is False  # the prompt column must reach the collator


@pytest.mark.parametrize("bad, message", [
    ({"target": "klingon"}, "target: expected a known language"),
    ({"num_samples": 0}, "num_samples: expected > 0"),
    ({"sample_temperature": 0.0}, "sample_temperature: expected > 0"),
    ({"kl_beta": -0.1}, "kl_beta: expected >= 0"),
    ({"prompt_format": "markdown"}, "prompt_format: expected one of"),
    ({"loss_impl": "tritn"}, "loss_impl: expected one of"),
    ({"ignore_ascii": "no"}, "ignore_ascii: expected a bool"),
])
def test_invalid_tlpo_config_values_raise_at_construction(tmp_path, bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        tlpo_config(tmp_path, **bad)


def test_tlpo_config_saved_and_keywords_still_fill_it(tiny, tmp_path) -> None:
    tok, model, prompts = tiny
    data = [{"input_ids": p} for p in prompts]
    trainer = TLPOTrainer(model=copy.deepcopy(model), args=tlpo_config(tmp_path, kl_beta=0.07), processing_class=tok,
                          train_dataset=data)
    trainer.save_model(str(tmp_path / "saved"))
    saved = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert isinstance(saved, TLPOConfig) and saved.kl_beta == 0.07 and saved.num_candidates == 8

    plain = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.warns(FutureWarning, match=r"TLPOTrainer\(num_candidates=\.\.\., impl=|num_candidates=\.\.\."):
        old = TLPOTrainer(model=copy.deepcopy(model), args=plain, processing_class=tok, train_dataset=data,
                          num_candidates=5, impl="torch")
    assert isinstance(old.args, TLPOConfig) and old.args.num_candidates == 5 and old.args.loss_impl == "torch"
    checker = LanguageChecker("ru", ignore_ascii=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a checker object is not deprecated
        kept = TLPOTrainer(model=copy.deepcopy(model), args=tlpo_config(tmp_path), processing_class=tok,
                           train_dataset=data, target=checker)
    assert kept.checker is checker


# ----------------------------------------------------------------------------- mixed precision, metrics


def test_tlpo_bf16_runs_the_forwards_in_bf16_and_metrics_share_one_namespace(tiny, tmp_path) -> None:
    tok, model, prompts = tiny
    for bf16, want in ((False, torch.float32), (True, torch.bfloat16)):
        policy = copy.deepcopy(model)
        seen = []
        q_proj = policy.model.layers[0].self_attn.q_proj
        q_proj.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out.dtype))
        trainer = TLPOTrainer(model=policy, args=tlpo_config(tmp_path, bf16=bf16, max_steps=2), processing_class=tok,
                              train_dataset=[{"input_ids": p} for p in prompts])
        trainer.train()
        assert seen and set(seen) == {want}, (bf16, set(seen))
    logged = {k for h in trainer.state.log_history for k in h}
    ours = logged - {"loss", "grad_norm", "learning_rate", "epoch", "step", "train_runtime", "train_samples_per_second",
                     "train_steps_per_second", "total_flos", "train_loss"}
    assert ours and all(k.startswith("tlpo/") for k in ours), sorted(ours)
    assert {"tlpo/confusion_rate", "tlpo/groups", "tlpo/ascii_skipped_share"} <= ours


def test_tlpo_group_loss_under_bf16_autocast_is_within_bf16_rounding(tiny) -> None:
    """Fixed groups: the bf16 loss's parts (candidate log-probs, KL) track the fp32 ones to bf16 rounding."""
    tok, model, prompts = tiny
    checker = LanguageChecker("ko", ignore_ascii=False)
    groups, _ = build_groups(model, tok, prompts, checker, seed=0, **{k: v for k, v in SMALL.items()
                                                                     if k != "sample_temperature"})
    assert groups, "the tiny model should confuse at least once"
    batch = collate_groups(groups, pad_id=tok.pad_token_id)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.98)  # a reference that differs, so the KL is not 0
    fp32 = tlpo_group_loss(model, ref, batch, impl="torch")
    bf16 = tlpo_group_loss(model, ref, batch, impl="torch", head_dtype=torch.bfloat16,
                           forward_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    a, b = fp32.metrics["logps/candidates"].item(), bf16.metrics["logps/candidates"].item()
    # bf16 keeps 8 bits: each logit is rounded by up to 2^-8 of its size; the lm-head weight was sharpened
    # ×25 (logits of tens), so log-probs move by up to ~2^-8·|z|. Bound: 2^-8 · (|logp| + max |z|).
    zmax = (model.lm_head.weight.abs().sum(-1).max() * 4).item()  # a crude bound on |z| (|h| <~ 4 after norm)
    assert abs(a - b) <= 2 ** -8 * (abs(a) + zmax)
    assert abs(a - b) > 0  # the bf16 path did run in bf16


# ----------------------------------------------------------------------------- prompts and ASCII


def test_string_prompts_are_tokenised_like_generation(tiny) -> None:
    tok, _, _ = tiny
    text = "질문 사과 바나나 답"
    plain = tok(text, add_special_tokens=True)["input_ids"]
    assert prompt_ids(text, tok) == plain  # no chat template: the tokenizer's own special tokens
    assert prompt_ids(text, tok, add_special_tokens=False) == tok(text, add_special_tokens=False)["input_ids"]
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                              "{% if add_generation_prompt %}<s>{% endif %}")
    want = chat_tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert prompt_ids(text, chat_tok) == want and want != plain  # "auto" picks the chat template
    assert prompt_ids(text, chat_tok, prompt_format="plain") == plain
    with pytest.raises(ValueError, match="no chat_template"):
        prompt_ids(text, tok, prompt_format="chat")
    assert prompt_ids([5, 6, 7], chat_tok) == [5, 6, 7]  # token ids are used as given


def test_skipped_ascii_letters_are_reported_and_warned_once() -> None:
    checker = LanguageChecker("ru")  # ignore_ascii=True by default
    text = "кошка собака cat dog"
    assert checker(text) is None  # not a confusion under ignore_ascii ...
    assert checker.skipped_ascii(text) == (6, 17)  # ... but reported: 6 skipped of 17 letters
    with pytest.warns(UserWarning, match="6 of the 17 letters"):
        checker.note_skipped_ascii(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checker.note_skipped_ascii(text)  # once per checker
        assert LanguageChecker("ru").note_skipped_ascii("кошка собака и co") == (2, 14)  # below 25 %: quiet
    assert LanguageChecker("ru", ignore_ascii=False).skipped_ascii(text) == (0, 17)
    assert LanguageChecker("en").skipped_ascii("cat dog") == (0, 6)  # Latin target: nothing is skipped


def test_build_groups_reports_the_skipped_ascii_share(tiny) -> None:
    tok, model, prompts = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, ignoring = build_groups(model, tok, prompts, LanguageChecker("ko", ignore_ascii=True), seed=0, **{
            k: v for k, v in SMALL.items() if k != "sample_temperature"})
    _, counting = build_groups(model, tok, prompts, LanguageChecker("ko", ignore_ascii=False), seed=0, **{
        k: v for k, v in SMALL.items() if k != "sample_temperature"})
    assert counting["ascii_skipped_share"] == 0.0
    # The tiny vocabulary has Latin words and the same seed draws the same samples: the confusion the
    # ignoring checker misses shows up as skipped letters.
    assert counting["confusion_rate"] > ignoring["confusion_rate"]
    assert ignoring["ascii_skipped_share"] > 0
