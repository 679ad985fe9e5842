"""Train a tiny causal LM with TDPO through TRL (``tokpo_kernels.integrations.TDPOTrainer``).

Everything is built locally — a word-level tokenizer made in code, a randomly initialised 2-layer
Llama — nothing is downloaded. The synthetic preference task has a rule the chosen responses follow
and the rejected ones break:

    prompt:   3–5 random words  "w7 w2 w11"
    chosen:   the successors of the prompt's last word, wrapping around   " w12 w13 w14"
    rejected: three random words that are not that sequence             " w5 w9 w0"

(Every response ends with ``<eos>``.) The held-out evaluation set uses fresh prompts. Before and after
training the script reports, on that set, TDPO's ``rewards/accuracies`` — the fraction of pairs with
``β(M_c + K_c) > β(M_r + K_r)``, computed with ``tk.tdpo_loss`` exactly as the trainer logs it — and
the policy's own preference accuracy (``logps/chosen > logps/rejected``). Note that the reward
accuracy is 0 before training by construction: the reference is a frozen copy of the initial policy,
so every reward is exactly 0 and no pair is strictly preferred.

    python examples/tdpo_tiny.py --quick                   # CPU, well under 3 minutes
    python examples/tdpo_tiny.py --quick --bf16            # under CPU autocast (bf16), as bf16=True on a GPU
    python examples/tdpo_tiny.py --quick --precompute-ref  # reference hidden states cached, no reference model

The method options are fields of ``TDPOConfig`` (a ``DPOConfig``). With ``--precompute-ref`` the
trainer holds no reference model; the before/after evaluation here uses its own frozen copy of the
initial policy (the reference by definition), made before training.

The last line printed is one JSON object:
``{"reward_accuracy_before", "reward_accuracy_after", "steps", "seconds", ...}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
import warnings

import torch

VOCAB_WORDS = 20
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [f"w{i}" for i in range(VOCAB_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def make_pairs(n: int, rng: random.Random) -> list:
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(VOCAB_WORDS) for _ in range(rng.randint(3, 5))]
        chosen = [(prompt[-1] + k) % VOCAB_WORDS for k in (1, 2, 3)]
        rejected = chosen
        while rejected == chosen:
            rejected = [rng.randrange(VOCAB_WORDS) for _ in range(3)]
        words = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
        rows.append({"prompt": words(prompt), "chosen": " " + words(chosen), "rejected": " " + words(rejected)})
    return rows


@torch.no_grad()
def evaluate(trainer, dataset, ref, batch_size: int = 32, *, alpha=None, variant=None) -> dict:
    """Per-pair TDPO metrics of the policy vs ``ref`` on ``dataset`` (tk.tdpo_loss, as logged in training;
    ``alpha`` / ``variant`` default to the trainer's TDPO options)."""
    alpha = trainer.tdpo_alpha if alpha is None else alpha
    variant = trainer.tdpo_variant if variant is None else variant
    import tokpo_kernels as tk
    from tokpo_kernels.integrations import causal_lm_hidden_states, frozen_lm_head

    model = trainer.model
    was_training = model.training
    model.eval()
    accs, pref, losses = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = trainer.data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = ids.masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
        h = causal_lm_hidden_states(model, ids, mask)[:, :-1]
        h_ref = causal_lm_hidden_states(ref, ids, mask)[:, :-1]
        head, ref_head = frozen_lm_head(model), frozen_lm_head(ref)
        out = tk.tdpo_loss(h, head.weight, targets, h_ref, ref_head.weight, beta=trainer.beta,
                           alpha=alpha, variant=variant)
        accs.append(out.metrics["rewards/accuracies"])
        pref.append((out.metrics["logps/chosen"] > out.metrics["logps/rejected"]).float())
        losses.append(out.loss.reshape(1) * (ids.shape[0] // 2))
    model.train(was_training)
    pairs = sum(a.numel() for a in accs)
    return {
        "reward_accuracy": torch.cat(accs).mean().item(),
        "logps_accuracy": torch.cat(pref).mean().item(),
        "loss": (torch.cat(losses).sum() / pairs).item(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, CPU-friendly (< 3 minutes)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40 quick / 300 full)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--variant", choices=["tdpo1", "tdpo2"], default="tdpo2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (CPU autocast here)")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="precompute_ref_hidden_states=True: no reference model in memory while training")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (40 if args.quick else 300)

    t0 = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import transformers

    from tokpo_kernels.integrations import TDPOConfig, TDPOTrainer

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()

    rng = random.Random(args.seed)
    train = datasets.Dataset.from_list(make_pairs(steps * args.batch_size, rng))
    held_out = datasets.Dataset.from_list(make_pairs(128, random.Random(args.seed + 1000)))
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.seed)

    out_dir = args.output_dir or tempfile.mkdtemp(prefix="tdpo_tiny_")
    config = TDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, beta=args.beta, bf16=args.bf16, use_cpu=True,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=max(1, steps // 5),
        disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
        tdpo_alpha=args.alpha, tdpo_variant=args.variant, precompute_ref_hidden_states=args.precompute_ref,
    )
    # The reference of TDPO is the initial policy; this copy is the example's own, for evaluation only.
    eval_ref = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = TDPOTrainer(model, None, args=config, train_dataset=train, eval_dataset=held_out,
                          processing_class=tokenizer)
    trainer.remove_callback(transformers.PrinterCallback)  # our own summary goes to stderr below
    eval_set = trainer.eval_dataset  # tokenized by TRL like the training set
    before = evaluate(trainer, eval_set, eval_ref)
    print(f"before: {json.dumps(before)}", file=sys.stderr)
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f} reward_acc {entry.get('rewards/accuracies', 0):.3f} "
                  f"kl/chosen {entry.get('kl/chosen', 0):.4f}", file=sys.stderr)
    after = evaluate(trainer, eval_set, eval_ref)
    print(f"after:  {json.dumps(after)}", file=sys.stderr)

    result = {
        "reward_accuracy_before": round(before["reward_accuracy"], 4),
        "reward_accuracy_after": round(after["reward_accuracy"], 4),
        "steps": int(trainer.state.global_step),
        "seconds": round(time.time() - t0, 1),
        "logps_accuracy_before": round(before["logps_accuracy"], 4),
        "logps_accuracy_after": round(after["logps_accuracy"], 4),
        "eval_loss_before": round(before["loss"], 4),
        "eval_loss_after": round(after["loss"], 4),
        "bf16": bool(args.bf16),
        "precompute_ref": bool(args.precompute_ref),
        "logged_metrics": sorted({k for entry in trainer.state.log_history for k in entry}),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
