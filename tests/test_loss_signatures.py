"""The public signatures of the losses are a contract: pinned here, parameter by parameter.

The lists were copied from the code before the shared options were declared once
(``tokpo_kernels/losses/_options.py``); keywords may only be added at the end (the KL-coefficient
aliases ``kl_beta`` / ``beta``, TDPO's and TI-DPO's ``token_stats``), never renamed, reordered or given other
defaults. A loss added
later pins its own signature in its own test file with ``described`` (``test_loss_simpo.py``); the
module-class and docstring checks below run over every registered loss.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

import tokpo_kernels as tk

P, K = "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY"
REQUIRED = inspect.Parameter.empty
SHARED = [("bias", K, None), ("ref_bias", K, None), ("ignore_index", K, -100), ("temperature", K, 1.0),
          ("softcap", K, None), ("impl", K, "auto"), ("filter_eps", K, None), ("process_group", K, None),
          ("validate", K, "async"), ("chunk_budget", K, None)]
PAIR = [("hidden", P, REQUIRED), ("weight", P, REQUIRED), ("targets", P, REQUIRED)]

PINNED = {
    "tdpo_loss": PAIR + [("ref_hidden", P, REQUIRED), ("ref_weight", P, REQUIRED), ("beta", K, 0.1),
                         ("alpha", K, 0.5), ("variant", K, "tdpo2")] + SHARED + [("token_stats", K, False)],
    "tidpo_loss": PAIR + [("ref_hidden", P, REQUIRED), ("ref_weight", P, REQUIRED), ("token_weights", K, None),
                          ("anchor_hidden", K, None), ("anchor_ref_hidden", K, None), ("anchor_targets", K, None),
                          ("beta", K, 0.1), ("alpha", K, 0.5), ("gamma", K, 0.1), ("margin", K, 0.01),
                          ("preference", K, "tdpo2"), ("kl_coef", K, 0.0)] + SHARED
                          + [("token_stats", K, False)],
    "dpo_loss": PAIR + [("ref_hidden", P, None), ("ref_weight", P, None), ("beta", K, 0.1),
                        ("loss_type", K, "sigmoid"), ("label_smoothing", K, 0.0), ("ref_logp", K, None),
                        ("average_log_prob", K, None), ("reference_free", K, False)] + SHARED,
    "ppo_loss": PAIR + [("advantages", P, REQUIRED), ("old_logp", P, None), ("ref_hidden", P, None),
                        ("ref_weight", P, None), ("ref_logp", K, None), ("beta", K, 0.04), ("eps_low", K, 0.2),
                        ("eps_high", K, 0.2), ("entropy_coef", K, 0.0), ("loss_type", K, "grpo"),
                        ("max_tokens", K, None)] + SHARED + [("kl_beta", K, None)],
    "tlpo_loss": [("hidden", P, REQUIRED), ("weight", P, REQUIRED), ("candidates", P, REQUIRED),
                  ("advantages", P, REQUIRED), ("ref_hidden", P, None), ("ref_weight", P, None),
                  ("old_logp", K, None), ("kl_beta", K, 0.04), ("eps_low", K, 0.2), ("eps_high", K, 0.2),
                  ("ref_logp", K, None)] + SHARED + [("beta", K, None)],
    "linear_cross_entropy": PAIR + [("bias", K, None), ("ignore_index", K, -100), ("reduction", K, "mean"),
                                    ("label_smoothing", K, 0.0), ("z_loss", K, 0.0), ("token_weights", K, None),
                                    ("temperature", K, 1.0), ("softcap", K, None), ("impl", K, "auto"),
                                    ("filter_eps", K, None), ("process_group", K, None),
                                    ("validate", K, "async"), ("chunk_budget", K, None),
                                    ("weight_normalization", K, "tokens")],
}


def described(fn) -> list:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_signature_is_pinned(name: str) -> None:
    assert described(getattr(tk, name)) == PINNED[name]


REGISTERED = sorted(spec.name for spec in tk.losses.LOSSES)


def test_every_registered_loss_is_exported() -> None:
    assert set(PINNED) <= set(REGISTERED), "a pinned (contract) loss is no longer registered"
    for spec in tk.losses.LOSSES:
        assert getattr(tk, spec.name) is spec.fn and spec.name in tk.__all__ and spec.module in tk.__all__


@pytest.mark.parametrize("name", REGISTERED)
def test_module_class_signature_lists_the_keyword_options(name: str) -> None:
    spec = next(s for s in tk.losses.LOSSES if s.name == name)
    keywords = [(n, d) for n, kind, d in described(spec.fn) if kind == K]
    got = [(p.name, p.default) for p in inspect.signature(getattr(tk, spec.module)).parameters.values()]
    assert got == keywords


@pytest.mark.parametrize("name", REGISTERED)
def test_docstring_documents_every_option(name: str) -> None:
    """help() shows every keyword option; the shared ones as their own ``Args`` entries."""
    doc = getattr(tk, name).__doc__
    args = doc[doc.index("Args:"):]
    keywords = [p for p, kind, _ in described(getattr(tk, name)) if kind == K]
    assert not [p for p in keywords if p not in doc], f"{name}'s docstring does not name every option"
    shared = [p for p in keywords if p in dict((o[0], o) for o in SHARED)]
    missing = [p for p in shared if not re.search(rf"^\s+(\w+, )*{p}(, \w+)*:", args, re.M)]
    assert not missing, f"{name}'s Args do not document {missing}"


def test_unknown_keyword_raises_type_error() -> None:
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="betta"):
        tk.dpo_loss(h, w, y, h, w, betta=0.1)
    with pytest.raises(TypeError, match="ref_bias"):  # a shared option this loss does not take
        tk.linear_cross_entropy(h, w, y, ref_bias=torch.zeros(5))
    with pytest.raises(TypeError, match="head"):  # the internal marker is not a public keyword
        tk.tdpo_loss(h, w, y, h, w, head=None)


def test_kl_coefficient_aliases() -> None:
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 6, generator=g), torch.randn(11, 6, generator=g)
    cand, adv = torch.randint(0, 11, (3, 2), generator=g), torch.randn(3, 2, generator=g)
    ref = torch.randn(3, 2, generator=g) - 2.0
    want = tk.tlpo_loss(h, w, cand, adv, ref_logp=ref, kl_beta=0.3, impl="torch").loss
    assert torch.equal(tk.tlpo_loss(h, w, cand, adv, ref_logp=ref, beta=0.3, impl="torch").loss, want)
    with pytest.raises(ValueError, match="kl_beta and beta are two names"):
        tk.tlpo_loss(h, w, cand, adv, ref_logp=ref, kl_beta=0.3, beta=0.2, impl="torch")
    hb, y, a = torch.randn(2, 3, 6, generator=g), torch.randint(0, 11, (2, 3), generator=g), torch.randn(2)
    rl = torch.randn(2, 3, generator=g) - 2.0
    want = tk.ppo_loss(hb, w, y, a, ref_logp=rl, beta=0.3, impl="torch").loss
    assert torch.equal(tk.ppo_loss(hb, w, y, a, ref_logp=rl, kl_beta=0.3, impl="torch").loss, want)
    with pytest.raises(ValueError, match="beta and kl_beta are two names"):
        tk.ppo_loss(hb, w, y, a, ref_logp=rl, beta=0.1, kl_beta=0.3, impl="torch")
