"""TLPO pipeline (integrations): language checker, offset mapping, candidate groups, one training step."""

from __future__ import annotations

import pytest
import torch

from tokpo_kernels.integrations.tlpo_language import (
    LanguageChecker,
    char_script,
    confusion_token_index,
    first_confusion,
    target_scripts,
    update_position,
)

# -------------------------------------------------------------------------------------------------
# language checker (pure Python)

# (target, clean text, confused text, offset of the first confusion letter in the confused text)
SCRIPT_CASES = [
    ("ko", "안녕하세요, 저는 학생입니다! 2024년 🎉", "안녕하세요, 저는 студент 입니다", 10),
    ("zh", "你好，世界！我今年25岁。😀", "你好，世界！我是 студент", 9),
    ("ja", "こんにちは、世界。カタカナと漢字です！", "こんにちは、세계です", 6),
    ("ar", "مرحبا بالعالم! ١٢٣ 😀", "مرحبا بالعالم привет", 14),
    ("ru", "Привет, мир! Как дела? 42", "Привет, мир! 你好", 13),
    ("hi", "नमस्ते दुनिया। आप कैसे हैं? १२३", "नमस्ते дуня", 7),
    ("th", "สวัสดีครับ! ๑๒๓ 🙂", "สวัสดีครับ мир", 11),
    ("el", "Γειά σου κόσμε; 2024", "Γειά σου мир", 9),
    ("he", "שָׁלוֹם עוֹלָם! 123", "שָׁלוֹם мир", 8),
]


@pytest.mark.parametrize("target,clean,confused,offset", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_checker_each_script(target, clean, confused, offset):
    assert first_confusion(clean, target) is None
    assert first_confusion(confused, target) == offset
    checker = LanguageChecker(target)
    assert checker(confused) == offset and not checker.is_clean(confused) and checker.is_clean(clean)
    # the reported character is a letter of another script
    assert char_script(confused[offset]) not in target_scripts(target)


def test_checker_ignores_punctuation_digits_symbols_emoji_whitespace():
    noise = " \t\n.,;:!?()[]{}\"'«»、。「」・…—–-+=*/\\%$€₩¥#@&^~`|<>0123456789٠١٢३४५๑๒" \
            "①②③½²™©®°±→✓★♥😀🎉👍🏽🇰🇷\u200b\u00a0"
    assert first_confusion(noise, "ko") is None
    assert first_confusion("밥" + noise + "밥", "ko") is None
    assert first_confusion(noise + "x", "ko", ignore_ascii=False) == len(noise)
    # combining marks are not letters (they belong to their base letter)
    assert char_script("\u0301") is None and char_script("\u093f") is None


def test_checker_ascii_option():
    text = "저는 Python과 API를 씁니다"
    assert first_confusion(text, "ko") is None  # ASCII letters ignored by default
    assert first_confusion(text, "ko", ignore_ascii=False) == 3
    # non-ASCII Latin is still confusion with ignore_ascii=True
    assert first_confusion("저는 café를 좋아해요", "ko") == 6
    # Latin targets: ASCII is in-language whatever the flag, other scripts are not
    for flag in (True, False):
        assert first_confusion("Hello, café world!", "en", ignore_ascii=flag) is None
        assert first_confusion("Hello мир", "English", ignore_ascii=flag) == 6


def test_targets_by_name_code_and_sets():
    assert target_scripts("ko") == target_scripts("Hangul") == target_scripts("korean") == {"Hangul"}
    assert target_scripts("ja") == target_scripts("Japanese") == {"Han", "Hiragana", "Katakana"}
    assert target_scripts("Hiragana") == {"Hiragana"} and target_scripts("katakana") == {"Katakana"}
    assert target_scripts("zh-CN") == target_scripts("zh_TW") == target_scripts("Han") == {"Han"}
    for code, script in [("ar", "Arabic"), ("ru", "Cyrillic"), ("hi", "Devanagari"), ("th", "Thai"),
                         ("el", "Greek"), ("he", "Hebrew"), ("en", "Latin")]:
        assert target_scripts(code) == target_scripts(script) == {script}
    assert target_scripts(["Hangul", "Han"]) == {"Hangul", "Han"}
    assert first_confusion("한국어 漢字", {"Hangul", "Han"}) is None
    assert first_confusion("한국어 漢字", "ko") == 4
    assert first_confusion("日本語ですカタカナ", "Hiragana") == 0
    with pytest.raises(ValueError, match="unknown target"):
        target_scripts("klingon")


def test_char_script_basics():
    cases = {"A": "Latin", "é": "Latin", "Ж": "Cyrillic", "Ω": "Greek", "한": "Hangul", "ㅎ": "Hangul",
             "漢": "Han", "あ": "Hiragana", "ア": "Katakana", "ｱ": "Katakana", "ب": "Arabic", "ש": "Hebrew",
             "क": "Devanagari", "ก": "Thai", "1": None, "!": None, " ": None, "😀": None, "€": None}
    for ch, script in cases.items():
        assert char_script(ch) == script, ch


# -------------------------------------------------------------------------------------------------
# offsets -> token index


def test_confusion_token_index_plain_offsets():
    offsets = [(0, 0), (0, 2), (2, 5), (5, 5), (6, 9), (9, 12)]  # a special token and a trimmed space
    assert confusion_token_index(offsets, 0) == 1
    assert confusion_token_index(offsets, 3) == 2
    assert confusion_token_index(offsets, 5) == 4  # inside the trimmed whitespace -> next token
    assert confusion_token_index(offsets, 11) == 5
    assert confusion_token_index(offsets, 12) is None
    assert confusion_token_index(offsets, None) is None
    assert confusion_token_index(torch.tensor(offsets), 7) == 4
    assert update_position(4) == 3 and update_position(None) is None


CORPUS = [
    "질문 사과 바나나 답 사과 바나나 김치 우유",
    "질문 하늘 바다 답 하늘 바다 나무 구름",
    "질문 학교 학생 답 학교 학생 school exam",
    "질문 도시 버스 답 도시 버스 метро парк",
    "질문 음악 노래 답 음악 노래 piano звук",
] * 4


def _fast_tokenizer(byte_level: bool = False, vocab_size: int = 120):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("byte_level", [False, True], ids=["metaspace", "bytelevel"])
def test_offset_mapping_to_token(byte_level):
    from tokpo_kernels.integrations.tlpo_language import decoded_token_offsets

    tok = _fast_tokenizer(byte_level=byte_level, vocab_size=60 if byte_level else 120)
    text = "사과 바나나 school 김치"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    char = first_confusion(text, "ko", ignore_ascii=False)
    assert char == text.index("school")
    c = confusion_token_index(enc["offset_mapping"], char)
    ids = enc["input_ids"]
    # token c is the first token whose text reaches the confusion letter: the decoded prefix before it
    # is clean, the prefix including it is confused.
    assert first_confusion(tok.decode(ids[:c]), "ko", ignore_ascii=False) is None
    assert first_confusion(tok.decode(ids[: c + 1]), "ko", ignore_ascii=False) is not None
    # the same index from the decoded ids themselves (what the pipeline uses for sampled responses)
    dtext, doffsets = decoded_token_offsets(tok, ids)
    assert dtext == text
    assert confusion_token_index(doffsets, first_confusion(dtext, "ko", ignore_ascii=False)) == c
    # a multi-byte character split over byte tokens maps to the first of them
    if byte_level:
        text2 = "사과 밥"  # "밥" is absent from the corpus: several byte tokens
        ids2 = tok(text2, add_special_tokens=False)["input_ids"]
        _, off2 = decoded_token_offsets(tok, ids2)
        c2 = confusion_token_index(off2, text2.index("밥"))
        assert "밥" not in tok.decode(ids2[:c2]) and tok.decode(ids2[:c2]).strip() == "사과"


# -------------------------------------------------------------------------------------------------
# candidate groups on a tiny random model


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def make_tiny():
    """``(tokenizer, model, prompts)``: the metaspace BPE tokenizer (adds no BOS of its own), a 1-layer
    random Llama with a sharpened lm-head, four Korean prompts as token ids with a leading BOS."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _fast_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a sharper random distribution than the default init
        model.lm_head.weight.mul_(25.0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    prompts = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]
               for p in ["질문 사과 바나나 답", "질문 학교 학생 답", "질문 도시 버스 답", "질문 음악 노래 답"]]
    return tok, model, prompts


def test_explore_candidates_shapes_rewards_advantages(tiny):
    import tokpo_kernels as tk
    from tokpo_kernels.integrations.tlpo_explore import explore_candidates, next_token_probs

    tok, model, prompts = tiny
    checker = LanguageChecker("ko", ignore_ascii=False)
    prefixes = [prompts[0] + tok("사과 바나나", add_special_tokens=False)["input_ids"], prompts[1]]
    out = explore_candidates(model, tok, prefixes, [len(prompts[0]), len(prompts[1])], checker,
                             num_candidates=8, continue_tokens=3)
    assert len(out) == 2
    probs = next_token_probs(model, prefixes, pad_id=tok.pad_token_id)
    for g, ex in enumerate(out):
        assert ex["candidates"].shape == ex["probs"].shape == ex["rewards"].shape == ex["advantages"].shape == (8,)
        assert ex["candidates"].unique().numel() == 8
        # top-K by temperature-1 probability, in order, detached
        top_p, top_i = probs[g].topk(8)
        assert torch.equal(ex["candidates"], top_i) and torch.allclose(ex["probs"], top_p)
        assert not ex["probs"].requires_grad
        assert set(ex["rewards"].tolist()) <= {-1.0, 1.0}
        for r, snippet in zip(ex["rewards"].tolist(), ex["snippets"], strict=True):
            assert (r < 0) == (checker(snippet) is not None)
        assert torch.allclose(ex["advantages"], tk.tlpo_advantages(ex["probs"], ex["rewards"]))
        adv = ex["advantages"]
        assert abs(float(adv.sum())) < 1e-5
        if ex["rewards"].unique().numel() > 1:
            assert abs(float(adv.abs().sum()) - 1.0) < 1e-5
            assert ((adv > 0) == (ex["rewards"] > 0)).all()
        else:
            assert (adv == 0).all()


def test_explore_continuations_match_single_group(tiny):
    """Batched (left-padded, several groups) continuations equal a group run alone."""
    from tokpo_kernels.integrations.tlpo_explore import explore_candidates

    tok, model, prompts = tiny
    checker = LanguageChecker("ko", ignore_ascii=False)
    prefixes = [prompts[0] + tok("사과", add_special_tokens=False)["input_ids"], prompts[2]]
    lens = [len(prompts[0]), len(prompts[2])]
    both = explore_candidates(model, tok, prefixes, lens, checker, num_candidates=6)
    alone = explore_candidates(model, tok, prefixes[1:], lens[1:], checker, num_candidates=6)
    assert both[1]["snippets"] == alone[0]["snippets"]
    assert torch.equal(both[1]["rewards"], alone[0]["rewards"])


def test_build_groups_from_samples(tiny):
    from tokpo_kernels.integrations.tlpo_explore import build_groups

    tok, model, prompts = tiny
    checker = LanguageChecker("ko", ignore_ascii=False)
    groups, stats = build_groups(model, tok, prompts, checker, num_samples=4, temperature=1.0,
                                 max_new_tokens=8, num_candidates=8, continue_tokens=2, drop_uniform=False, seed=0)
    assert stats["responses"] == 16 and 0 < stats["confused"] <= 16
    assert len(groups) == stats["confused"] - stats["duplicates_dropped"] > 0
    for grp in groups:
        assert grp.candidates.shape == (8,) and grp.advantages.shape == (8,)
        response = grp.prefix_ids[grp.prompt_len:].tolist()
        # the prefix stops right before the confused token: clean up to u, confused with token c
        assert checker(tok.decode(response, skip_special_tokens=True)) is None
        assert checker(tok.decode(response + [grp.confused_token], skip_special_tokens=True)) is not None
        assert grp.update_position == grp.prefix_ids.numel() - 1
    again, _ = build_groups(model, tok, prompts, checker, num_samples=4, temperature=1.0, max_new_tokens=8,
                            num_candidates=8, continue_tokens=2, drop_uniform=False, seed=0)
    assert [g.prefix_ids.tolist() for g in again] == [g.prefix_ids.tolist() for g in groups]  # seeded
    kept, st = build_groups(model, tok, prompts, checker, num_samples=4, temperature=1.0, max_new_tokens=8,
                            num_candidates=8, continue_tokens=2, seed=0)
    assert all(not g.uniform for g in kept) and len(kept) + st["uniform_dropped"] == len(groups)


# -------------------------------------------------------------------------------------------------
# training


def _fixed_groups(tok, model, prompts):
    from tokpo_kernels.integrations.tlpo_explore import TLPOGroup, explore_candidates

    checker = LanguageChecker("ko", ignore_ascii=False)
    prefixes = [p + tok("사과", add_special_tokens=False)["input_ids"] for p in prompts]
    ex = explore_candidates(model, tok, prefixes, [len(p) for p in prompts], checker, num_candidates=8)
    groups = []
    for i, (p, e) in enumerate(zip(prefixes, ex, strict=True)):
        rewards = e["rewards"].clone()
        rewards[0], rewards[1] = 1.0, -1.0  # make every group informative
        import tokpo_kernels as tk

        adv = tk.tlpo_advantages(e["probs"], rewards)
        groups.append(TLPOGroup(torch.tensor(p), len(prompts[i]), e["candidates"], e["probs"], rewards, adv))
    groups[-1].candidates = groups[-1].candidates[:5]  # ragged K is padded with ignore_index
    groups[-1].advantages = torch.tensor([0.5, -0.25, -0.25, 0.0, 0.0])
    return groups


def test_group_loss_uses_one_row_per_group(tiny):
    """The candidates' log-probs from the single hidden row equal the model's own logits at u."""
    import copy

    from tokpo_kernels.integrations.tlpo_trainer import collate_groups, frozen_reference, tlpo_group_loss

    tok, model, prompts = tiny
    model = copy.deepcopy(model)
    groups = _fixed_groups(tok, model, prompts)
    ref = frozen_reference(model)
    batch = collate_groups(groups, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == len(groups)  # G sequences, not G*K
    out = tlpo_group_loss(model, ref, batch, kl_beta=0.04)
    with torch.no_grad():
        logps = []
        for grp in groups:
            logits = model(grp.prefix_ids[None]).logits[0, -1].float()
            logps.append(torch.log_softmax(logits, -1)[grp.candidates])
        expected = torch.cat(logps).mean()
    assert torch.allclose(out.metrics["logps/candidates"], expected, atol=1e-5)
    assert float(out.metrics["kl"]) < 1e-6  # reference == policy
    assert abs(float(out.loss.detach())) < 1e-6  # ρ ≡ 1 and zero-sum advantages: the loss value is 0


def test_tlpo_train_step_decreases_loss(tiny):
    import copy

    from tokpo_kernels.integrations.tlpo_trainer import (
        _candidate_logp,
        collate_groups,
        frozen_reference,
        tlpo_group_loss,
        tlpo_train_step,
    )

    tok, model, prompts = tiny
    model = copy.deepcopy(model)
    groups = _fixed_groups(tok, model, prompts)
    ref = frozen_reference(model)
    batch = collate_groups(groups, pad_id=tok.pad_token_id)
    old = _candidate_logp(model, batch, -100, "auto")  # the sampling policy's log-probs, fixed
    before = float(tlpo_group_loss(model, ref, batch, old_logp=old).loss.detach())
    adv_logp_before = float((old * batch["advantages"]).sum())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    metrics = tlpo_train_step(model, ref, groups, opt, kl_beta=0.04, pad_id=tok.pad_token_id)
    assert set(metrics) >= {"loss", "policy_loss", "kl", "num_candidates"}
    after_out = tlpo_group_loss(model, ref, batch, old_logp=old)
    assert float(after_out.loss.detach()) < before - 1e-4
    new = _candidate_logp(model, batch, -100, "auto")
    valid = batch["candidates"] != -100
    # candidates with positive advantage gained probability mass relative to negative ones
    assert float((new * batch["advantages"])[valid].sum()) > adv_logp_before
    assert not any(p.grad is not None for p in ref.parameters())


# The method options as trainer keywords: the deprecated spelling, which must keep working (its
# FutureWarning and TLPOConfig are checked in tests/test_tlpo_trainer_config.py).
@pytest.mark.filterwarnings("ignore:.*is deprecated. set these fields:FutureWarning")
def test_tlpo_trainer_smoke(tiny, tmp_path):
    pytest.importorskip("accelerate")
    import copy

    from transformers import TrainingArguments

    from tokpo_kernels.integrations.tlpo_trainer import TLPOTrainer

    tok, model, prompts = tiny
    model = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = TLPOTrainer(model=model, args=args, processing_class=tok,
                          train_dataset=[{"input_ids": p} for p in prompts],
                          target="ko", ignore_ascii=False, num_samples=4, sample_temperature=1.0, max_new_tokens=6,
                          num_candidates=8, continue_tokens=2)
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    logged = [h for h in trainer.state.log_history if "tlpo/confusion_rate" in h]
    assert logged and 0.0 <= logged[0]["tlpo/confusion_rate"] <= 1.0
    changed = any(not torch.equal(start[n], p) for n, p in model.named_parameters())
    assert changed
    # the reference is frozen and was copied from the policy at the start of the (single) epoch
    assert all(not p.requires_grad for p in trainer.ref_model.parameters())
    assert all(torch.equal(start[n], p) for n, p in trainer.ref_model.named_parameters())


@pytest.mark.filterwarnings("ignore:.*is deprecated. set these fields:FutureWarning")
def test_tlpo_trainer_step_without_groups(tiny, tmp_path):
    """A prompt batch with no confusion at all trains nothing and does not crash."""
    pytest.importorskip("accelerate")
    import copy

    from transformers import TrainingArguments

    from tokpo_kernels.integrations.tlpo_trainer import TLPOTrainer

    tok, model, prompts = tiny
    model = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    everything = LanguageChecker(["Hangul", "Latin", "Cyrillic"], ignore_ascii=False)  # never flags this vocab
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                             learning_rate=1e-2, weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = TLPOTrainer(model=model, args=args, processing_class=tok,
                          train_dataset=[{"input_ids": p} for p in prompts],
                          target=everything, num_samples=2, max_new_tokens=4, num_candidates=4, continue_tokens=1)
    out = trainer.train()
    assert out.training_loss == 0.0
    assert all(torch.equal(start[n], p) for n, p in model.named_parameters())
