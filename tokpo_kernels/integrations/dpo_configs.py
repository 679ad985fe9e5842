"""``TDPOConfig`` and ``TIDPOConfig``: ``DPOConfig`` subclasses holding the method hyperparameters of
``TDPOTrainer`` / ``TIDPOTrainer``.

Being ``DPOConfig``s (``transformers.TrainingArguments`` dataclasses), they are saved with the training
arguments (``training_args.bin``), filled by ``HfArgumentParser`` from a YAML file or command-line flags
(``--tdpo_alpha 0.3 --loss_impl torch``), and every method field is checked in ``__post_init__``: an
invalid value raises ``ValueError`` at construction, before a model is loaded.

``DPOConfig.beta`` is β for both methods. The fields named ``tdpo_*`` / ``tidpo_*`` keep the names the
trainers' (now deprecated) keyword arguments had, so moving from ``TDPOTrainer(..., tdpo_alpha=0.3)``
to ``TDPOConfig(tdpo_alpha=0.3)`` is a move, not a rename.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

try:
    from trl import DPOConfig
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "tokpo_kernels.integrations.dpo_configs needs TRL: pip install tokpo_kernels[trl] "
        f"(import failed: {err})"
    ) from err

from tokpo_kernels.integrations._config_utils import check_field, check_loss_impl
from tokpo_kernels.losses.tdpo import TDPO_VARIANTS
from tokpo_kernels.losses.tidpo import TIDPO_PREFERENCES

__all__ = ["TDPOConfig", "TIDPOConfig"]


@dataclass
class TokenLevelDPOConfig(DPOConfig):
    """The fields TDPO and TI-DPO share: the loss backend and the precomputed reference.

    Args (in addition to ``DPOConfig``'s):
        loss_impl: backend of the fused statistics: ``"auto"`` or a name of
            ``tokpo_kernels.backends.backend_names()``.
        precompute_ref_hidden_states: run the reference once over the train and eval sets before
            training, store its final hidden states of the completion tokens (memory-mapped, under
            ``ref_hidden_states_dir``) and its lm-head, and train without the reference model in
            memory. The cache is reused on resume and across epochs.
        ref_hidden_states_dir: where that cache lives (default ``<output_dir>/ref_hidden_states``).
    """

    loss_impl: str = field(
        default="auto",
        metadata={"help": "Backend of the fused lm-head statistics: 'auto' or a tokpo_kernels backend name "
                          "(torch, cpp, triton, ...)."},
    )
    precompute_ref_hidden_states: bool = field(
        default=False,
        metadata={"help": "Store the reference model's final hidden states of the completion tokens (and its lm-head) "
                          "once before training, then train without the reference model in memory."},
    )
    ref_hidden_states_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Directory of the precomputed reference hidden states (default: "
                          "<output_dir>/ref_hidden_states)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_method_fields()

    def validate_method_fields(self) -> None:
        """Check (and normalise the types of) the method fields; ``ValueError`` naming the bad one."""
        self.loss_impl = check_loss_impl(self.loss_impl)
        self.precompute_ref_hidden_states = check_field(
            "precompute_ref_hidden_states", self.precompute_ref_hidden_states, kind=bool)
        if self.precompute_ref_hidden_states and self.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs: expected False (TDPO and TI-DPO need the reference's whole distribution; "
                "precompute_ref_hidden_states=True stores what they need), got True"
            )
        if self.ref_hidden_states_dir is not None and not isinstance(self.ref_hidden_states_dir, str):
            raise ValueError(
                f"ref_hidden_states_dir: expected a path string or None, got {self.ref_hidden_states_dir!r}")


@dataclass
class TDPOConfig(TokenLevelDPOConfig):
    """Configuration of :class:`~tokpo_kernels.integrations.TDPOTrainer` (TDPO, Zeng et al. 2024).

    Args (in addition to ``DPOConfig``'s and ``loss_impl``, ``precompute_ref_hidden_states``,
    ``ref_hidden_states_dir``; β is ``beta``):
        tdpo_alpha: α, weight of the KL margin in TDPO2 (``>= 0``; the reference configuration's 0.5).
        tdpo_variant: ``"tdpo1"`` or ``"tdpo2"`` (default; the reference configuration ships ``"tdpo1"``).
    """

    tdpo_alpha: float = field(default=0.5, metadata={"help": "alpha: weight of the KL margin in TDPO2 (>= 0)."})
    tdpo_variant: str = field(default="tdpo2", metadata={"help": "TDPO variant.", "choices": list(TDPO_VARIANTS)})

    def validate_method_fields(self) -> None:
        super().validate_method_fields()
        self.tdpo_alpha = check_field("tdpo_alpha", self.tdpo_alpha, ge=0.0)
        self.tdpo_variant = check_field("tdpo_variant", self.tdpo_variant, choices=TDPO_VARIANTS)


@dataclass
class TIDPOConfig(TokenLevelDPOConfig):
    """Configuration of :class:`~tokpo_kernels.integrations.TIDPOTrainer` (TI-DPO).

    Defaults are the paper's; the authors' code runs ``beta=0.2, tidpo_gamma=0.001,
    tidpo_margin=0.001, tidpo_importance_lam=0.2, tidpo_importance_sigma_div=8``.

    Args (in addition to ``DPOConfig``'s and the shared fields; β is ``beta``):
        tidpo_alpha: α of the TDPO2-style KL margin (``>= 0``).
        tidpo_gamma: γ, weight of the triplet term (``>= 0``).
        tidpo_margin: triplet margin; ``<= 0`` disables the triplet term (and the anchor sampling).
        tidpo_preference: the preference term's base, one of ``TIDPO_PREFERENCES``.
        tidpo_kl_coef: weight (``>= 0``) of the optional mean sequence-KL penalty.
        tidpo_use_importance: run the attribution pass (else uniform token weights).
        tidpo_importance_lam: λ, mix of attribution and positional prior, in ``[0, 1]``.
        tidpo_importance_sigma_div: divisor of the span length giving the prior's width (``>= 1``).
        tidpo_importance_span: ``"all"`` non-pad tokens (the authors' code) or ``"response"``.
        tidpo_use_anchor: sample one anchor response per prompt for the triplet term.
        tidpo_anchor_max_new_tokens, tidpo_anchor_top_k, tidpo_anchor_top_p, tidpo_anchor_temperature:
            the anchor's sampling.
        tidpo_anchor_generation_kwargs: extra ``generate`` keyword arguments (a dict; JSON on the
            command line).
    """

    tidpo_alpha: float = field(default=0.5, metadata={"help": "alpha of the TDPO2-style KL margin (>= 0)."})
    tidpo_gamma: float = field(default=0.1, metadata={"help": "gamma: weight of the triplet term (>= 0)."})
    tidpo_margin: float = field(default=0.01, metadata={"help": "Triplet margin; <= 0 disables the triplet term."})
    tidpo_preference: str = field(
        default="tdpo2", metadata={"help": "Base of the preference term.", "choices": list(TIDPO_PREFERENCES)})
    tidpo_kl_coef: float = field(default=0.0, metadata={"help": "Weight of the mean sequence-KL penalty (>= 0)."})
    tidpo_use_importance: bool = field(
        default=True, metadata={"help": "Gradient-attribution token weights (False: uniform weights)."})
    tidpo_importance_lam: float = field(
        default=0.7, metadata={"help": "lambda: weight of the attribution vs the positional prior, in [0, 1]."})
    tidpo_importance_sigma_div: float = field(
        default=4.0, metadata={"help": "Divisor of the span length giving the positional prior's width (>= 1)."})
    tidpo_importance_span: str = field(
        default="all", metadata={"help": "Tokens the weights are normalised over.", "choices": ["all", "response"]})
    tidpo_use_anchor: bool = field(
        default=True, metadata={"help": "Sample an anchor response per prompt for the triplet term."})
    tidpo_anchor_max_new_tokens: int = field(default=64, metadata={"help": "Anchor sampling: max new tokens (> 0)."})
    tidpo_anchor_top_k: int = field(default=50, metadata={"help": "Anchor sampling: top-k (>= 0, 0 = off)."})
    tidpo_anchor_top_p: float = field(default=0.95, metadata={"help": "Anchor sampling: top-p in (0, 1]."})
    tidpo_anchor_temperature: float = field(default=0.8, metadata={"help": "Anchor sampling: temperature (> 0)."})
    tidpo_anchor_generation_kwargs: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Extra generate() keyword arguments for the anchors (a JSON dict)."})

    def validate_method_fields(self) -> None:
        super().validate_method_fields()
        self.tidpo_alpha = check_field("tidpo_alpha", self.tidpo_alpha, ge=0.0)
        self.tidpo_gamma = check_field("tidpo_gamma", self.tidpo_gamma, ge=0.0)
        self.tidpo_margin = check_field("tidpo_margin", self.tidpo_margin)
        self.tidpo_preference = check_field("tidpo_preference", self.tidpo_preference, choices=TIDPO_PREFERENCES)
        self.tidpo_kl_coef = check_field("tidpo_kl_coef", self.tidpo_kl_coef, ge=0.0)
        self.tidpo_use_importance = check_field("tidpo_use_importance", self.tidpo_use_importance, kind=bool)
        self.tidpo_importance_lam = check_field("tidpo_importance_lam", self.tidpo_importance_lam, ge=0.0, le=1.0)
        self.tidpo_importance_sigma_div = check_field(
            "tidpo_importance_sigma_div", self.tidpo_importance_sigma_div, ge=1.0)
        self.tidpo_importance_span = check_field(
            "tidpo_importance_span", self.tidpo_importance_span, choices=("all", "response"))
        self.tidpo_use_anchor = check_field("tidpo_use_anchor", self.tidpo_use_anchor, kind=bool)
        self.tidpo_anchor_max_new_tokens = check_field(
            "tidpo_anchor_max_new_tokens", self.tidpo_anchor_max_new_tokens, kind=int, gt=0)
        self.tidpo_anchor_top_k = check_field("tidpo_anchor_top_k", self.tidpo_anchor_top_k, kind=int, ge=0)
        self.tidpo_anchor_top_p = check_field("tidpo_anchor_top_p", self.tidpo_anchor_top_p, gt=0.0, le=1.0)
        self.tidpo_anchor_temperature = check_field("tidpo_anchor_temperature", self.tidpo_anchor_temperature, gt=0.0)
        kwargs = self.tidpo_anchor_generation_kwargs
        if isinstance(kwargs, str):  # the command line gives the dict as JSON text
            import json

            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"tidpo_anchor_generation_kwargs: expected a JSON object, got {kwargs!r}") from err
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"tidpo_anchor_generation_kwargs: expected a dict or None, got {kwargs!r}")
        self.tidpo_anchor_generation_kwargs = kwargs
