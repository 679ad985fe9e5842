"""``python -m bench.trainer_memory``: peak memory of a TDPOTrainer step with the live reference model
versus ``precompute_ref_hidden_states=True``.

Each setting runs in its own process (same model, data, seeds and environment): a random-init
Llama built in code (nothing downloaded; by default D = 512, 12 layers, V = 4096, ~42 M parameters,
so the lm-head that the cache keeps is ~5 % of the reference), a TDPOTrainer on 16 random preference
pairs, ``--steps`` optimizer steps. Before each step the process's RSS high-water mark is reset
(``/proc/self/clear_refs``, as ``bench/_worker.py`` does for the kernels); after it, ``VmHWM`` is the
peak of that step: everything resident — policy, gradients, optimizer state, activations, the
reference model when it is live, the cache's pages when it is not. The first step (optimizer state
allocation) is reported but the figure is the maximum over the later ones. ``MALLOC_MMAP_THRESHOLD_``
is fixed (64 KiB, ``runner.CPU_MMAP_THRESHOLD``) so freed blocks leave the RSS.

Acceptance (issue 14): ``peak(live) − peak(cached) ≥ 0.9 × reference parameter bytes``.

    python -m bench.trainer_memory --json bench/results/<machine>-trainer-memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

from bench.runner import CPU_MMAP_THRESHOLD

MIB = 2.0 ** 20


def _worker(mode: str, args: argparse.Namespace) -> Dict[str, Any]:
    import warnings

    import torch
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bench._worker import _proc_status_kib
    from tokpo_kernels.integrations import TDPOConfig, TDPOTrainer

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(args.vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>")
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> str:
        return " ".join(words[i] for i in torch.randint(3, args.vocab, (n,), generator=g).tolist())

    data = Dataset.from_list([{"prompt": text(args.prompt_len), "chosen": " " + text(args.completion_len),
                               "rejected": " " + text(args.completion_len)} for _ in range(16)])
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    policy = transformers.LlamaForCausalLM(cfg)
    reference = transformers.LlamaForCausalLM(cfg)
    reference.load_state_dict(policy.state_dict())
    ref_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    head_bytes = reference.lm_head.weight.numel() * reference.lm_head.weight.element_size()

    out_dir = tempfile.mkdtemp(prefix="tokpo-trainer-memory-")
    config = TDPOConfig(output_dir=out_dir, per_device_train_batch_size=4, max_steps=args.steps, learning_rate=1e-4,
                        bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                        dataset_num_proc=None, loss_impl=args.loss_impl, disable_tqdm=True,
                        precompute_ref_hidden_states=(mode == "cached"))
    trainer = TDPOTrainer(policy, reference, args=config, train_dataset=data, processing_class=tokenizer)
    del reference  # the trainer holds it in the live setting, drops it in the cached one

    peaks: List[int] = []
    step_s: List[float] = []

    class StepPeak(transformers.TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            import gc

            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_s.append(time.perf_counter() - self.t0)
            peaks.append(_proc_status_kib("VmHWM") * 1024)

    trainer.add_callback(StepPeak())
    trainer.train()
    return {"mode": mode, "step_peak_bytes": peaks, "step_seconds": step_s, "ref_param_bytes": ref_bytes,
            "ref_lm_head_bytes": head_bytes, "loss": [x["loss"] for x in trainer.state.log_history if "loss" in x],
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--loss-impl", default="auto")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", choices=["live", "cached"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return 0

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(CPU_MMAP_THRESHOLD), "TQDM_DISABLE": "1"}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--json")]
    if args.json and args.json in forwarded:
        forwarded.remove(args.json)
    results = {}
    for mode in ("live", "cached"):
        proc = subprocess.run([sys.executable, "-m", "bench.trainer_memory", "--worker", mode, *forwarded],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    live, cached = results["live"], results["cached"]
    later = slice(1, None) if len(live["step_peak_bytes"]) > 1 else slice(None)
    peak_live, peak_cached = max(live["step_peak_bytes"][later]), max(cached["step_peak_bytes"][later])
    drop = peak_live - peak_cached
    ref = live["ref_param_bytes"]
    summary = {
        "peak_live_mib": peak_live / MIB, "peak_cached_mib": peak_cached / MIB, "drop_mib": drop / MIB,
        "ref_param_mib": ref / MIB, "ref_lm_head_mib": live["ref_lm_head_bytes"] / MIB,
        "drop_over_ref_params": drop / ref, "acceptance_drop_ge_0.9_ref": drop >= 0.9 * ref,
        "losses_live": live["loss"], "losses_cached": cached["loss"],
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m bench.trainer_memory " + " ".join(forwarded), "summary": summary,
                       "runs": results, "malloc_mmap_threshold": CPU_MMAP_THRESHOLD}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
