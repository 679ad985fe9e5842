"""TLPO end to end on a tiny, locally built model: language confusion goes down, held-out NLL does not go up.

Nothing is downloaded. The script

1. builds a synthetic "answer in Korean" task: a prompt ``질문 w1 w2 답`` names two topic words of one of
   eight categories; the answer echoes them and continues with more Korean words of that category.
   In the *pretraining* data a controlled fraction of answers switches script mid-response (after the
   2nd or 3rd word) to Latin/Cyrillic words of the category and stays there — language confusion with a
   known rate (high for four "loanword-prone" categories, low for the others);
2. trains a BPE tokenizer on that corpus (``tokenizers``) and pretrains a random-init Llama
   (hidden 64, 2 layers) on it with plain next-token cross-entropy, so the model learns to switch;
3. measures, on held-out prompts (topic-word pairs never used for pretraining or TLPO), the **confusion
   rate** — the fraction of sampled responses in which the script checker finds a letter outside Hangul;
   4 samples per prompt at temperature ``--eval-temperature`` (1.0: the model's own distribution) with a
   fixed seed, the identical procedure before and after; ``confusion_t06_*`` repeats it at temperature
   0.6 — and the **held-out NLL** (mean per response token, EOS included) of clean Korean answers to
   those prompts;
4. runs TLPO (docs/methods.md §4): on training prompts, sample 8 responses per prompt at temperature 0.6 from
   the current policy, find each confusion point, explore the top-K candidates at the update position,
   continue each greedily for 3 tokens and label it ±1 with the checker, compute the advantages, and take
   a ``tk.tlpo_loss`` step on one hidden row per group with a frozen reference (refreshed every epoch) —
   with ``build_groups`` + ``tlpo_train_step``, or with ``--use-trainer`` through ``TLPOTrainer``;
5. measures again and prints one JSON line (the last line of output):
   ``{"confusion_before", "confusion_after", "nll_before", "nll_after", ...}``.

The checker is built with ``ignore_ascii=False``: the task's responses legitimately contain no Latin
letters at all, and half of the injected confusion is ASCII Latin (the library default, ASCII ignored,
would only see the Cyrillic half).

Run ``python examples/tlpo_language_confusion.py --quick`` (1–2 minutes on a 2-core CPU, most of it the
~2000-step pretraining; the TLPO phase itself takes a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

from tokpo_kernels.integrations.tlpo_explore import build_groups, sample_responses
from tokpo_kernels.integrations.tlpo_language import LanguageChecker
from tokpo_kernels.integrations.tlpo_trainer import frozen_reference, tlpo_train_step

# -------------------------------------------------------------------------------------------------
# synthetic bilingual data

KOREAN = [
    ["사과", "바나나", "김치", "라면", "우유", "빵", "떡볶이", "비빔밥"],
    ["하늘", "바다", "나무", "구름", "바람", "꽃", "산", "강"],
    ["학교", "선생님", "학생", "교실", "숙제", "시험", "공책", "연필"],
    ["도시", "지하철", "버스", "시장", "거리", "건물", "공원", "식당"],
    ["가족", "엄마", "아빠", "동생", "언니", "할머니", "친구", "아기"],
    ["아침", "저녁", "오늘", "내일", "주말", "여름", "겨울", "시간"],
    ["컴퓨터", "전화", "화면", "인터넷", "프로그램", "자료", "기계", "로봇"],
    ["음악", "노래", "가수", "피아노", "기타", "춤", "공연", "소리"],
]
FOREIGN = [  # what a confused answer switches to (Latin and Cyrillic)
    ["apple", "молоко", "bread", "хлеб"],
    ["sky", "море", "tree", "ветер"],
    ["school", "учитель", "exam", "урок"],
    ["city", "метро", "bus", "парк"],
    ["family", "мама", "friend", "брат"],
    ["morning", "вечер", "today", "время"],
    ["computer", "сеть", "data", "робот"],
    ["music", "песня", "piano", "звук"],
]
SWITCH_PROB = [0.8, 0.1, 0.8, 0.1, 0.8, 0.1, 0.8, 0.1]  # per category, in the pretraining data


def make_prompt(cat: int, a: int, b: int) -> str:
    return f"질문 {KOREAN[cat][a]} {KOREAN[cat][b]} 답"


def make_response(rng: random.Random, cat: int, a: int, b: int, switch_prob: float) -> str:
    words = [KOREAN[cat][a], KOREAN[cat][b]]
    length = rng.randint(4, 7)
    switch_at = rng.choice([2, 3]) if rng.random() < switch_prob else None
    while len(words) < length:
        if switch_at is not None and len(words) >= switch_at:
            words.append(rng.choice(FOREIGN[cat]))
        else:
            words.append(rng.choice(KOREAN[cat]))
    return " ".join(words)


def split_prompts(seed: int):
    """All (cat, a, b) topic pairs, split into training / held-out by a fixed shuffle."""
    pairs = [(c, a, b) for c in range(len(KOREAN)) for a in range(8) for b in range(8) if a != b]
    rng = random.Random(1000 + seed)
    rng.shuffle(pairs)
    n_eval = len(pairs) // 4
    return pairs[n_eval:], pairs[:n_eval]


# -------------------------------------------------------------------------------------------------
# tokenizer and model


def build_tokenizer(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_model(vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def encode_pair(tokenizer, prompt: str, response: str):
    p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p, r


def lm_batch(pairs, pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and shifted ``labels`` (-100 on prompt/pad)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        seq = p + r
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = torch.tensor(r)
    return ids, mask, labels


def nll(model, pairs, pad_id: int) -> float:
    """Mean per-token NLL of the response tokens (EOS included)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(pairs), 128):
            ids, mask, labels = lm_batch(pairs[lo: lo + 128], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((tgt != -100).sum())
    return total / count


def confusion_rate(model, tokenizer, prompts, checker, *, samples: int, temperature: float, seed: int,
                   max_new_tokens: int) -> float:
    """Fraction of sampled responses with a confusion point (same sampler and seed before and after)."""
    out = sample_responses(model, tokenizer, prompts, num_samples=samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, seed=seed)
    return sum(checker(tokenizer.decode(s.response_ids, skip_special_tokens=True)) is not None for s in out) / len(out)


# -------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CPU acceptance configuration (< 5 min on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--tlpo-steps", type=int, default=None)
    ap.add_argument("--tlpo-lr", type=float, default=3e-4)
    ap.add_argument("--prompts-per-step", type=int, default=16)
    ap.add_argument("--num-samples", type=int, default=8, help="responses per prompt (reference 8)")
    ap.add_argument("--sample-temperature", type=float, default=0.6, help="TLPO sampling (reference 0.6)")
    ap.add_argument("--num-candidates", type=int, default=16, help="K (reference 16)")
    ap.add_argument("--continue-tokens", type=int, default=3, help="greedy continuation (reference 3)")
    ap.add_argument("--kl-beta", type=float, default=0.04, help="reference 0.04")
    ap.add_argument("--eval-temperature", type=float, default=1.0)
    ap.add_argument("--eval-samples", type=int, default=4, help="samples per held-out prompt")
    ap.add_argument("--use-trainer", action="store_true",
                    help="run TLPO through TLPOTrainer (transformers.Trainer) instead of the plain loop")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (the model is tiny: one thread is fastest and immune to contention)")
    args = ap.parse_args(argv)
    if args.pretrain_steps is None:
        args.pretrain_steps = 2000 if args.quick else 5000
    if args.tlpo_steps is None:
        args.tlpo_steps = 30 if args.quick else 80
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    train_pairs, eval_pairs = split_prompts(args.seed)
    # Pretraining corpus: training prompts only, with injected confusion.
    corpus_rows = []
    for _ in range(12000):
        c, a, b = rng.choice(train_pairs)
        corpus_rows.append((make_prompt(c, a, b), make_response(rng, c, a, b, SWITCH_PROB[c])))
    tokenizer = build_tokenizer([p + " " + r for p, r in corpus_rows])
    pad = tokenizer.pad_token_id
    data = [encode_pair(tokenizer, p, r) for p, r in corpus_rows]
    model = build_model(len(tokenizer), tokenizer)
    checker = LanguageChecker("ko", ignore_ascii=False)

    # Held-out evaluation: prompts never seen in pretraining or TLPO; clean Korean answers for the NLL.
    eval_prompts = [[tokenizer.bos_token_id] + tokenizer(make_prompt(*t), add_special_tokens=False)["input_ids"]
                    for t in eval_pairs]
    erng = random.Random(7)
    eval_clean = [encode_pair(tokenizer, make_prompt(*t), make_response(erng, *t, 0.0)) for t in eval_pairs]
    tlpo_prompts = [[tokenizer.bos_token_id] + tokenizer(make_prompt(*t), add_special_tokens=False)["input_ids"]
                    for t in train_pairs]

    # ---- pretraining (plain next-token cross-entropy)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.pretrain_lr, total_steps=args.pretrain_steps,
                                                pct_start=0.1)
    model.train()
    for step in range(args.pretrain_steps):
        batch = [data[i] for i in torch.randint(len(data), (64,)).tolist()]
        ids, mask, labels = lm_batch(batch, pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.pretrain_steps - 1:
            print(f"pretrain step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    t_pre = time.time() - t0

    def measure(tag: str) -> dict:
        m = {
            "confusion": confusion_rate(model, tokenizer, eval_prompts, checker, samples=args.eval_samples,
                                        temperature=args.eval_temperature, seed=12345, max_new_tokens=12),
            "confusion_t06": confusion_rate(model, tokenizer, eval_prompts, checker, samples=args.eval_samples,
                                            temperature=0.6, seed=54321, max_new_tokens=12),
            "nll": nll(model, eval_clean, pad),
        }
        print(f"[{tag}] held-out confusion (T={args.eval_temperature}) {m['confusion']:.3f}, "
              f"(T=0.6) {m['confusion_t06']:.3f}, clean NLL {m['nll']:.4f}", flush=True)
        return m

    before = measure("before")

    # ---- TLPO
    if args.use_trainer:
        run_trainer(args, model, tokenizer, tlpo_prompts, checker)
    else:
        run_loop(args, model, tokenizer, tlpo_prompts, checker, t0)
    model.eval()
    after = measure("after")

    result = {
        "confusion_before": round(before["confusion"], 4),
        "confusion_after": round(after["confusion"], 4),
        "nll_before": round(before["nll"], 4),
        "nll_after": round(after["nll"], 4),
        "confusion_t06_before": round(before["confusion_t06"], 4),
        "confusion_t06_after": round(after["confusion_t06"], 4),
        "eval_temperature": args.eval_temperature,
        "seed": args.seed,
        "trainer": "TLPOTrainer" if args.use_trainer else "tlpo_train_step",
        "pretrain_seconds": round(t_pre, 1),
        "seconds": round(time.time() - t0, 1),
    }
    ok = (result["confusion_before"] >= 0.2 and result["confusion_after"] <= result["confusion_before"] / 2
          and result["nll_after"] <= 1.05 * result["nll_before"])
    result["pass"] = bool(ok)
    print(json.dumps(result))
    return result


def run_loop(args, model, tokenizer, tlpo_prompts, checker, t0) -> None:
    """TLPO with the plain functions: build_groups + tlpo_train_step, reference refreshed every epoch."""
    ref = frozen_reference(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.tlpo_lr, weight_decay=0.0)
    order = list(range(len(tlpo_prompts)))
    prng = random.Random(args.seed + 1)
    prng.shuffle(order)
    cursor, epoch = 0, 0
    for step in range(args.tlpo_steps):
        if cursor + args.prompts_per_step > len(order):  # a new epoch: refresh the reference
            prng.shuffle(order)
            cursor, epoch = 0, epoch + 1
            ref.load_state_dict(model.state_dict())
        prompts = [tlpo_prompts[i] for i in order[cursor: cursor + args.prompts_per_step]]
        cursor += args.prompts_per_step
        groups, stats = build_groups(model, tokenizer, prompts, checker, num_samples=args.num_samples,
                                     temperature=args.sample_temperature, max_new_tokens=12,
                                     num_candidates=args.num_candidates, continue_tokens=args.continue_tokens,
                                     seed=args.seed * 100003 + step)
        metrics = tlpo_train_step(model, ref, groups, opt, kl_beta=args.kl_beta, pad_id=tokenizer.pad_token_id)
        print(f"tlpo step {step:3d} epoch {epoch} sampled confusion {stats['confusion_rate']:.3f} "
              f"groups {len(groups):3d} loss {metrics.get('loss', float('nan')):+.4f} "
              f"kl {metrics.get('kl', float('nan')):.4f} ({time.time() - t0:.0f}s)", flush=True)


def run_trainer(args, model, tokenizer, tlpo_prompts, checker) -> None:
    """The same TLPO run through ``TLPOTrainer`` (transformers.Trainer): groups built inside compute_loss."""
    import tempfile

    from tokpo_kernels.integrations.tlpo_config import TLPOConfig
    from tokpo_kernels.integrations.tlpo_trainer import TLPOTrainer

    with tempfile.TemporaryDirectory() as out_dir:
        targs = TLPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.prompts_per_step, max_steps=args.tlpo_steps,
            learning_rate=args.tlpo_lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
            disable_tqdm=True, seed=args.seed, dataloader_drop_last=True,
            num_samples=args.num_samples, sample_temperature=args.sample_temperature, max_new_tokens=12,
            num_candidates=args.num_candidates, continue_tokens=args.continue_tokens, kl_beta=args.kl_beta,
        )
        trainer = TLPOTrainer(
            model=model, args=targs, processing_class=tokenizer, train_dataset=[{"input_ids": p} for p in tlpo_prompts],
            target=checker,
        )
        trainer.train()
        for entry in trainer.state.log_history:
            if "tlpo/confusion_rate" in entry:
                print(f"trainer step {entry.get('step')}: sampled confusion {entry['tlpo/confusion_rate']:.3f} "
                      f"groups {entry.get('tlpo/groups', 0):.1f} loss {entry.get('loss', float('nan')):+.4f} "
                      f"kl {entry.get('tlpo/kl', float('nan')):.4f}", flush=True)


if __name__ == "__main__":
    main()
