"""Train a tiny causal LM with TI-DPO through TRL (``tokpo_kernels.integrations.TIDPOTrainer``).

The task, tokenizer and model are those of ``examples/tdpo_tiny.py`` (built locally, nothing
downloaded): chosen responses continue the prompt's last word with its successors, rejected ones are
random. Every training batch runs the two extra passes of TI-DPO: the gradient attribution that
weights each token (``tidpo_use_importance``) and one anchor response sampled from the current policy
per prompt for the triplet term (``tidpo_use_anchor``; a few new tokens, so it stays fast on a CPU).

Before and after training, on held-out pairs, the script reports the reward accuracy the trainer logs
(``β(M + K) of chosen > of rejected``, with uniform weights here: the evaluation does not run the
attribution pass) and the policy's own preference accuracy (``logps/chosen > logps/rejected``), plus
the mean ``triplet_loss`` and ``rewards/accuracies`` logged during training.

    python examples/tidpo_tiny.py --quick      # CPU, a few minutes at most

The last line printed is one JSON object.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tdpo_tiny import build_model, build_tokenizer, evaluate, make_pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, CPU-friendly")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40 quick / 300 full)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--margin", type=float, default=0.01)
    parser.add_argument("--anchor-tokens", type=int, default=4, help="tidpo_anchor_max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (40 if args.quick else 300)

    t0 = time.time()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import transformers

    from tokpo_kernels.integrations import TIDPOConfig, TIDPOTrainer

    datasets.disable_progress_bar()
    transformers.logging.set_verbosity_error()

    rng = random.Random(args.seed)
    train = datasets.Dataset.from_list(make_pairs(steps * args.batch_size, rng))
    held_out = datasets.Dataset.from_list(make_pairs(128, random.Random(args.seed + 1000)))
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    config = TIDPOConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="tidpo_tiny_"),
        per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, beta=args.beta,
        bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=max(1, steps // 5), disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
        tidpo_gamma=args.gamma, tidpo_margin=args.margin, tidpo_anchor_max_new_tokens=args.anchor_tokens,
    )
    eval_ref = copy.deepcopy(model).eval().requires_grad_(False)  # the initial policy, for evaluation
    trainer = TIDPOTrainer(model, None, args=config, train_dataset=train, eval_dataset=held_out,
                           processing_class=tokenizer)
    trainer.remove_callback(transformers.PrinterCallback)
    eval_set = trainer.eval_dataset
    before = evaluate(trainer, eval_set, eval_ref, alpha=config.tidpo_alpha, variant="tdpo2")
    print(f"before: {json.dumps(before)}", file=sys.stderr)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    for entry in logged:
        print(f"step {entry['step']}: loss {entry['loss']:.4f} reward_acc {entry.get('rewards/accuracies', 0):.3f} "
              f"triplet {entry.get('triplet_loss', 0):.4f}", file=sys.stderr)
    after = evaluate(trainer, eval_set, eval_ref, alpha=config.tidpo_alpha, variant="tdpo2")
    print(f"after:  {json.dumps(after)}", file=sys.stderr)

    result = {
        "reward_accuracy_before": round(before["reward_accuracy"], 4),
        "reward_accuracy_after": round(after["reward_accuracy"], 4),
        "logps_accuracy_before": round(before["logps_accuracy"], 4),
        "logps_accuracy_after": round(after["logps_accuracy"], 4),
        "train_triplet_loss_mean": round(sum(e.get("triplet_loss", 0.0) for e in logged) / max(1, len(logged)), 5),
        "train_reward_accuracy_last": round(logged[-1].get("rewards/accuracies", float("nan")), 4) if logged else None,
        "steps": int(trainer.state.global_step),
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
