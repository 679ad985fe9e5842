"""``TLPOConfig``: the ``TrainingArguments`` of :class:`~tokpo_kernels.integrations.TLPOTrainer` with every
TLPO hyperparameter as a field.

Saved with the training arguments (``training_args.bin``), filled by ``HfArgumentParser`` from YAML or
command-line flags (``--num_candidates 16 --loss_impl torch``), each method field checked in
``__post_init__`` (a bad value raises ``ValueError`` at construction). The field names are those of
``TLPOTrainer``'s (now deprecated) keyword arguments, except ``impl``, which is ``loss_impl`` here as
in ``TDPOConfig``. A ready ``LanguageChecker`` is not a config value (not serialisable): pass it as
``TLPOTrainer(target=checker)``, which overrides ``target`` / ``ignore_ascii``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from tokpo_kernels.integrations._config_utils import check_field, check_loss_impl
from tokpo_kernels.integrations.tlpo_explore import PROMPT_FORMATS
from tokpo_kernels.integrations.tlpo_language import target_scripts

__all__ = ["TLPOConfig"]


@dataclass
class TLPOConfig(TrainingArguments):
    """Configuration of ``TLPOTrainer`` (TLPO, docs/methods.md §4). Defaults are the TLPO reference
    configuration's.

    Args (in addition to ``TrainingArguments``'):
        target: the target language or script (``"ko"``, ``"Korean"``, ``"Hangul"``, …; see
            ``target_scripts``).
        num_samples, sample_temperature, max_new_tokens: on-policy sampling per prompt (8, 0.6, 64).
        num_candidates, continue_tokens: exploration at each confusion point (16, 3).
        kl_beta, eps_low, eps_high: ``tk.tlpo_loss`` (0.04, 0.2, 0.2).
        ignore_ascii: the checker ignores ASCII letters (True); it warns once when they dominate an
            answer of a non-Latin target.
        drop_uniform: drop groups whose candidates all got the same reward (True).
        prompt_format, add_special_tokens: how string prompts are tokenised for sampling
            (``tlpo_explore.prompt_ids``): ``"auto"`` = the chat template when the tokenizer has one,
            else the plain tokenizer with its own special tokens.
        loss_impl: backend of the fused statistics (``"auto"`` or a ``backend_names()`` entry).
    """

    target: str = field(default="ko", metadata={"help": "Target language or script of the answers."})
    num_samples: int = field(default=8, metadata={"help": "Responses sampled per prompt (> 0)."})
    sample_temperature: float = field(default=0.6, metadata={"help": "Sampling temperature (> 0)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens of a sampled response (> 0)."})
    num_candidates: int = field(default=16, metadata={"help": "Candidates explored at a confusion point (>= 1)."})
    continue_tokens: int = field(default=3, metadata={"help": "Greedy tokens after each candidate (>= 0)."})
    kl_beta: float = field(default=0.04, metadata={"help": "Weight of the k3 KL penalty (>= 0)."})
    eps_low: float = field(default=0.2, metadata={"help": "PPO clip below 1 (>= 0)."})
    eps_high: float = field(default=0.2, metadata={"help": "PPO clip above 1 (>= 0)."})
    ignore_ascii: bool = field(default=True, metadata={"help": "The checker ignores ASCII letters."})
    drop_uniform: bool = field(default=True, metadata={"help": "Drop groups whose rewards are all equal."})
    prompt_format: str = field(
        default="auto", metadata={"help": "Tokenisation of string prompts.", "choices": list(PROMPT_FORMATS)})
    add_special_tokens: bool = field(
        default=True, metadata={"help": "Plain prompts get the tokenizer's special tokens (e.g. its BOS)."})
    loss_impl: str = field(default="auto", metadata={"help": "Backend of the fused statistics."})
    # The prompts column is not a model.forward argument: keep it (Trainer would drop it).
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the prompt column is not a model input."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_method_fields()

    def validate_method_fields(self) -> None:
        """Check (and normalise the types of) the method fields; ``ValueError`` naming the bad one."""
        if not isinstance(self.target, str):
            raise ValueError(f"target: expected a language or script name (str), got {self.target!r}")
        try:
            target_scripts(self.target)
        except (ValueError, KeyError) as err:
            raise ValueError(f"target: expected a known language or script, got {self.target!r} ({err})") from err
        self.num_samples = check_field("num_samples", self.num_samples, kind=int, gt=0)
        self.sample_temperature = check_field("sample_temperature", self.sample_temperature, gt=0.0)
        self.max_new_tokens = check_field("max_new_tokens", self.max_new_tokens, kind=int, gt=0)
        self.num_candidates = check_field("num_candidates", self.num_candidates, kind=int, ge=1)
        self.continue_tokens = check_field("continue_tokens", self.continue_tokens, kind=int, ge=0)
        self.kl_beta = check_field("kl_beta", self.kl_beta, ge=0.0)
        self.eps_low = check_field("eps_low", self.eps_low, ge=0.0)
        self.eps_high = check_field("eps_high", self.eps_high, ge=0.0)
        self.ignore_ascii = check_field("ignore_ascii", self.ignore_ascii, kind=bool)
        self.drop_uniform = check_field("drop_uniform", self.drop_uniform, kind=bool)
        self.prompt_format = check_field("prompt_format", self.prompt_format, choices=PROMPT_FORMATS)
        self.add_special_tokens = check_field("add_special_tokens", self.add_special_tokens, kind=bool)
        self.loss_impl = check_loss_impl(self.loss_impl)
