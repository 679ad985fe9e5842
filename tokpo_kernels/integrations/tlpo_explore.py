"""TLPO data pipeline: on-policy samples → confusion points → explored candidate groups (docs/methods.md §4).

Steps 1–4 of TLPO, none of which is a loss:

1. :func:`sample_responses` — ``n`` responses per prompt from the policy (reference: 8 at
   temperature 0.6), and :func:`detect_confusion` — the first confusion letter of a response
   (:class:`~tokpo_kernels.integrations.tlpo_language.LanguageChecker`) mapped to its token ``c``;
   the update position is ``u = c − 1`` (absolute: ``prompt_len + c − 1``).
2. :func:`explore_candidates` — at ``u``, the top-K next tokens by policy probability at
   temperature 1 (reference: K = 16), probabilities detached.
3. Each candidate is appended to the prefix and continued greedily for ``continue_tokens`` tokens
   (reference: 3); the K continuations of a group run as ONE batch of K sequences (several groups
   are batched together with left padding). The decoded *new* text (the candidate and its
   continuation, relative to the response prefix) is checked: reward ``+1`` when clean, ``−1``
   when it shows confusion.
4. :func:`tokpo_kernels.tlpo_advantages` turns ``(π_i, R_i)`` into zero-sum advantages.

:func:`build_groups` chains them and returns :class:`TLPOGroup` objects: one prefix (the sequence up to
and including ``u``) with K candidate ids and advantages — exactly what ``tk.tlpo_loss`` consumes as one
hidden row with K targets (see ``tlpo_trainer``).

All model calls here are inference (``torch.no_grad``, eval mode, restored afterwards). Next-token
probabilities come from the hidden row at ``u`` times the lm-head (never full-sequence logits);
sampling and greedy continuation use the model's ``generate``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from tokpo_kernels.integrations._hf_utils import (
    common_prefix_len,
    eos_ids,
    eval_mode,
    pad_left,
    pad_right,
    tokenizer_pad_id,
)
from tokpo_kernels.integrations.hf_hidden import causal_lm_hidden_states, gathered_lm_head
from tokpo_kernels.integrations.tlpo_language import (
    LanguageChecker,
    Target,
    confusion_token_index,
    decoded_token_offsets,
)
from tokpo_kernels.losses.tlpo import tlpo_advantages

__all__ = [
    "SampledResponse",
    "TLPOGroup",
    "build_groups",
    "detect_confusion",
    "explore_candidates",
    "next_token_probs",
    "prompt_ids",
    "sample_responses",
]

Prompt = Union[str, Sequence[int], torch.Tensor]


@dataclass
class SampledResponse:
    """One sampled response. ``response_ids`` excludes padding and the final EOS."""

    prompt_index: int
    prompt_ids: List[int]
    response_ids: List[int]
    text: str = ""
    char_offset: Optional[int] = None  # first confusion character in ``text``
    token_index: Optional[int] = None  # c: response-relative token of that character
    skipped_ascii: int = 0  # ASCII letters the checker skipped (ignore_ascii), see detect_confusion
    letters: int = 0  # all letters of ``text``

    @property
    def confused(self) -> bool:
        return self.token_index is not None


@dataclass
class TLPOGroup:
    """One TLPO group: a prefix ending at the update position and K scored candidates.

    Attributes:
        prefix_ids: ``(L,)`` long — prompt + response tokens ``[0, c)``; the hidden state at the last
            position ``L − 1 = u`` (absolute) is the group's single training row.
        prompt_len: number of prompt tokens at the start of ``prefix_ids``.
        candidates: ``(K,)`` long — the top-K next tokens at ``u``.
        probs: ``(K,)`` float — their policy probabilities at temperature 1 (detached).
        rewards: ``(K,)`` float — ``+1`` clean continuation, ``−1`` confused.
        advantages: ``(K,)`` float — ``tlpo_advantages(probs, rewards)``.
        confused_token: the sampled token ``c`` that started the confusion.
        snippets: the decoded new text of each candidate's continuation (what the checker saw).
    """

    prefix_ids: torch.Tensor
    prompt_len: int
    candidates: torch.Tensor
    probs: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    confused_token: int = -1
    prompt_index: int = -1
    snippets: List[str] = field(default_factory=list)

    @property
    def update_position(self) -> int:
        """Absolute index ``u`` (into ``prefix_ids``) of the row whose logits predicted token ``c``."""
        return int(self.prefix_ids.numel()) - 1

    @property
    def uniform(self) -> bool:
        """All rewards equal: the advantages are exactly zero and the group carries no policy signal."""
        return bool((self.rewards == self.rewards[0]).all())


# ----------------------------------------------------------------------------------------------
# helpers


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


PROMPT_FORMATS = ("auto", "chat", "plain")


def prompt_ids(x: Prompt, tokenizer: Any, *, prompt_format: str = "auto", add_special_tokens: bool = True
               ) -> List[int]:
    """Token ids of one prompt, formatted the way the model's generation sees it.

    Token-id prompts are used as given. A string prompt is

    - ``prompt_format="chat"``: a one-turn conversation ``[{"role": "user", "content": x}]`` through the
      tokenizer's chat template with the generation prompt (``add_generation_prompt=True``) — what a
      chat model is sampled with;
    - ``"plain"``: ``tokenizer(x, add_special_tokens=add_special_tokens)`` — the tokenizer's own special
      tokens (its BOS, if it adds one) when ``add_special_tokens`` is True, none otherwise;
    - ``"auto"`` (default): ``"chat"`` when the tokenizer has a chat template, else ``"plain"``.

    Sampling must see the prompt exactly as the deployed generation does: the same prompt with and
    without a BOS token gives a different next-token distribution, so the confusion TLPO would sample
    and correct is not the one users see.
    """
    if isinstance(x, torch.Tensor):
        return [int(t) for t in x.reshape(-1).tolist()]
    if not isinstance(x, str):
        return [int(t) for t in x]
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat" or (prompt_format == "auto" and has_template):
        if not has_template:
            raise ValueError("prompt_format='chat': the tokenizer has no chat_template; use 'plain' (or 'auto')")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in recent transformers
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return list(tokenizer(x, add_special_tokens=bool(add_special_tokens))["input_ids"])


def _new_text(tokenizer: Any, before: Sequence[int], after: Sequence[int]) -> str:
    """Text that ``after`` (which extends ``before``) adds when decoded, prefix-relative."""
    old = tokenizer.decode(list(before), skip_special_tokens=True)
    new = tokenizer.decode(list(after), skip_special_tokens=True)
    return new[common_prefix_len(old, new):]


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any, **kwargs: Any
              ) -> torch.Tensor:
    """``model.generate`` returning only the new tokens ``(B, new)``."""
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=tokenizer_pad_id(tokenizer), **kwargs)
    return out[:, ids.shape[1]:]


def _cut(tokens: Sequence[int], eos: Sequence[int], pad: int) -> List[int]:
    out: List[int] = []
    for t in tokens:
        if t in eos:
            break
        out.append(int(t))
    while out and out[-1] == pad and pad not in eos:
        out.pop()
    return out


# ----------------------------------------------------------------------------------------------
# step 1: samples and confusion points


def sample_responses(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    num_samples: int = 8,
    temperature: float = 0.6,
    max_new_tokens: int = 64,
    top_k: Optional[int] = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    batch_size: int = 64,
    prompt_format: str = "auto",
    add_special_tokens: bool = True,
) -> List[SampledResponse]:
    """Sample ``num_samples`` responses per prompt from ``model`` (reference: 8 at temperature 0.6).

    ``prompts`` are strings (formatted by :func:`prompt_ids` with ``prompt_format`` and
    ``add_special_tokens``: the chat template when the tokenizer has one, else the tokenizer's own
    special tokens) or token-id sequences (used as given). Prompts are
    left-padded and generated ``batch_size`` at a time (each with ``num_return_sequences``).
    ``seed`` fixes the sampling (the global RNG state is restored afterwards). ``top_k=0`` /
    ``top_p=1`` sample from the full temperature-scaled distribution.
    """
    device = _model_device(model)
    pad = tokenizer_pad_id(tokenizer)
    eos = eos_ids(model, tokenizer=tokenizer)
    ids_of = [prompt_ids(p, tokenizer, prompt_format=prompt_format, add_special_tokens=add_special_tokens)
              for p in prompts]
    out: List[SampledResponse] = []
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
        else contextlib.nullcontext()
    with rng, eval_mode(model):
        if seed is not None:
            torch.manual_seed(seed)
        for lo in range(0, len(ids_of), batch_size):
            chunk = ids_of[lo: lo + batch_size]
            ids, mask = pad_left(chunk, pad, device)
            new = _generate(
                model, ids, mask, tokenizer, do_sample=True, temperature=float(temperature), top_k=top_k,
                top_p=top_p, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
            ).tolist()
            for j, toks in enumerate(new):
                p = lo + j // num_samples
                out.append(SampledResponse(p, ids_of[p], _cut(toks, eos, pad)))
    return out


def detect_confusion(tokenizer: Any, response: SampledResponse, checker: LanguageChecker) -> SampledResponse:
    """Fill ``text``, ``char_offset``, ``token_index`` (``c``, response-relative), ``skipped_ascii`` and
    ``letters`` of ``response`` (the checker warns once if skipped ASCII letters dominate an answer).

    Offsets come from decoding the sampled ids themselves (:func:`decoded_token_offsets`), so ``c``
    indexes the sampled token sequence even when it is not the canonical tokenisation of its text.
    """
    text, offsets = decoded_token_offsets(tokenizer, response.response_ids)
    response.text = text
    response.skipped_ascii, response.letters = checker.note_skipped_ascii(text)
    response.char_offset = checker(text)
    response.token_index = confusion_token_index(offsets, response.char_offset)
    return response


# ----------------------------------------------------------------------------------------------
# steps 2-4: candidates, greedy continuations, rewards, advantages


def next_token_probs(model: torch.nn.Module, prefixes: Sequence[Sequence[int]], *, pad_id: int = 0) -> torch.Tensor:
    """``(P, V)`` float32 next-token probabilities (temperature 1) after each prefix.

    One forward of the base model on the right-padded prefixes (no logits for the other
    positions); the lm-head is applied to the last row of each prefix only.
    """
    device = _model_device(model)
    ids, mask = pad_right(prefixes, pad_id, device)
    with eval_mode(model):
        hidden = causal_lm_hidden_states(model, ids, mask)
        last = mask.sum(1) - 1
        rows = hidden[torch.arange(len(prefixes), device=device), last]
        with gathered_lm_head(model) as head:  # a sharded (ZeRO-3/FSDP) weight is gathered for this call
            logits = head.logits(rows)
    return torch.softmax(logits.float(), dim=-1)


def explore_candidates(
    model: torch.nn.Module,
    tokenizer: Any,
    prefixes: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    checker: LanguageChecker,
    *,
    num_candidates: int = 16,
    continue_tokens: int = 3,
    max_batch_sequences: int = 512,
) -> List[Dict[str, Any]]:
    """Top-K candidates at the end of each prefix, labelled by greedy continuation (steps 2–4).

    Args:
        prefixes: token ids ending at the update position ``u`` (prompt + response ``[0, c)``).
        prompt_lens: prompt length of each prefix (the response starts there).
        checker: labels each candidate's decoded new text (candidate + continuation).
        num_candidates: K (reference 16; clipped to the vocabulary size).
        continue_tokens: greedy tokens after the candidate (reference 3; 0 checks the candidate alone).
        max_batch_sequences: the continuations of several groups are generated together (left-padded)
            up to this many sequences per ``generate`` call; a group's K sequences are never split.

    An EOS candidate ends the response: its snippet is empty, hence clean (``+1``).

    Returns:
        One dict per prefix: ``candidates (K,)``, ``probs (K,)``, ``rewards (K,)`` (±1 float),
        ``advantages (K,)`` and ``snippets`` (list of K strings).
    """
    if not prefixes:
        return []
    device = _model_device(model)
    pad = tokenizer_pad_id(tokenizer)
    eos = eos_ids(model, tokenizer=tokenizer)
    probs = next_token_probs(model, prefixes, pad_id=pad)
    k = min(int(num_candidates), probs.shape[-1])
    top_p, top_i = probs.topk(k, dim=-1)
    top_p, top_i = top_p.cpu(), top_i.cpu()

    per_batch = max(1, int(max_batch_sequences) // k)
    results: List[Dict[str, Any]] = []
    with eval_mode(model):
        for lo in range(0, len(prefixes), per_batch):
            idx = list(range(lo, min(lo + per_batch, len(prefixes))))
            seqs = [list(prefixes[g]) + [int(t)] for g in idx for t in top_i[g].tolist()]
            if continue_tokens > 0:
                ids, mask = pad_left(seqs, pad, device)
                conts = _generate(model, ids, mask, tokenizer, do_sample=False, max_new_tokens=int(continue_tokens),
                                  temperature=None, top_k=None, top_p=None).tolist()
            else:
                conts = [[] for _ in seqs]
            for n, g in enumerate(idx):
                response = list(prefixes[g][int(prompt_lens[g]):])
                snippets: List[str] = []
                rewards = torch.empty(k)
                for j in range(k):
                    cand = int(top_i[g, j])
                    new = [] if cand in eos else [cand] + _cut(conts[n * k + j], eos, pad)
                    snippet = _new_text(tokenizer, response, response + new)
                    snippets.append(snippet)
                    rewards[j] = -1.0 if checker(snippet) is not None else 1.0
                results.append({
                    "candidates": top_i[g].clone(),
                    "probs": top_p[g].clone(),
                    "rewards": rewards,
                    "advantages": tlpo_advantages(top_p[g], rewards),
                    "snippets": snippets,
                })
    return results


def build_groups(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    target: Union[Target, LanguageChecker],
    *,
    num_samples: int = 8, temperature: float = 0.6, max_new_tokens: int = 64,  # step 1: sampling
    num_candidates: int = 16, continue_tokens: int = 3,  # steps 2-4: exploration
    drop_uniform: bool = True, dedupe: bool = True,  # which groups are kept
    seed: Optional[int] = None,
    ignore_ascii: bool = True,
    prompt_format: str = "auto",
    add_special_tokens: bool = True,
) -> Tuple[List[TLPOGroup], Dict[str, float]]:
    """TLPO groups from on-policy samples of ``prompts`` (docs/methods.md §4 steps 1–4).

    Samples ``num_samples`` responses per prompt at ``temperature``, keeps those with a confusion
    point, and explores ``num_candidates`` candidates at each update position.

    Args:
        target: the target language/script (see ``target_scripts``) or a ready ``LanguageChecker``.
        drop_uniform: drop groups whose K rewards are all equal (their advantages are exactly zero,
            so they would only add the KL term and dilute the batch mean). Default True.
        dedupe: keep one group per distinct prefix (several samples of one prompt often confuse at
            the same place; duplicates would only re-weight it).
        ignore_ascii: passed to the checker when ``target`` is not already a ``LanguageChecker``.
        prompt_format, add_special_tokens: how string prompts are tokenised (:func:`prompt_ids`).

    Returns:
        ``(groups, stats)`` with ``stats``: ``responses``, ``confused`` (count), ``confusion_rate``,
        ``groups``, ``uniform_dropped``, ``duplicates_dropped``, and ``ascii_skipped_share``: the
        share of the responses' letters that are ASCII letters the checker skipped
        (``ignore_ascii``; 0 when it skips none). The checker warns once when they reach 25 % of an
        answer's letters (``LanguageChecker.note_skipped_ascii``).
    """
    checker = target if isinstance(target, LanguageChecker) else LanguageChecker(target, ignore_ascii=ignore_ascii)
    samples = sample_responses(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, prompt_format=prompt_format,
                               add_special_tokens=add_special_tokens)
    confused = [s for s in (detect_confusion(tokenizer, s, checker) for s in samples) if s.confused]
    prefixes: List[List[int]] = []
    kept: List[SampledResponse] = []
    seen = set()
    dup = 0
    for s in confused:
        prefix = s.prompt_ids + s.response_ids[: s.token_index]
        if dedupe and tuple(prefix) in seen:
            dup += 1
            continue
        seen.add(tuple(prefix))
        prefixes.append(prefix)
        kept.append(s)
    explored = explore_candidates(model, tokenizer, prefixes, [len(s.prompt_ids) for s in kept], checker,
                                  num_candidates=num_candidates, continue_tokens=continue_tokens)
    groups: List[TLPOGroup] = []
    uniform = 0
    for s, prefix, ex in zip(kept, prefixes, explored, strict=True):
        group = TLPOGroup(
            prefix_ids=torch.as_tensor(prefix, dtype=torch.long), prompt_len=len(s.prompt_ids),
            candidates=ex["candidates"], probs=ex["probs"], rewards=ex["rewards"], advantages=ex["advantages"],
            confused_token=int(s.response_ids[s.token_index]), prompt_index=s.prompt_index, snippets=ex["snippets"],
        )
        if drop_uniform and group.uniform:
            uniform += 1
            continue
        groups.append(group)
    stats = {
        "responses": float(len(samples)),
        "confused": float(len(confused)),
        "confusion_rate": len(confused) / max(1, len(samples)),
        "groups": float(len(groups)),
        "uniform_dropped": float(uniform),
        "duplicates_dropped": float(dup),
        "ascii_skipped_share": sum(s.skipped_ascii for s in samples) / max(1, sum(s.letters for s in samples)),
    }
    return groups, stats
