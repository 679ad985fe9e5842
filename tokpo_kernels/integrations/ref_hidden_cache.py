"""The reference model's final hidden states of the completion tokens, stored once on disk.

TDPO and TI-DPO need the reference's whole next-token distribution at every completion token, so
TRL's ``precompute_ref_log_probs`` (one number per sequence) cannot replace the reference model. What
can: its final hidden states at those tokens (``D`` numbers per token, versus ``V`` for the logits)
plus its lm-head, from which the loss recomputes the reference distribution tile by tile as it does
with a live reference. :class:`RefHiddenCacheWriter` writes them during one pass of the reference over
the datasets; :class:`RefHiddenCache` serves them to the training steps, memory-mapped, so neither the
reference model nor the cache sits in memory.

Layout of the cache directory::

    manifest.json     format version, dtype, hidden size, number of examples/tokens, the fingerprint
                      of what was cached (token ids, reference weights, dtype, truncation), files
    hidden.bin        (num_tokens, D) raw rows in ``dtype`` (the dtype the live reference feeds the
                      loss: the autocast dtype under bf16/fp16 training), row-major
    index.pt          (num_examples, 4) int64: chosen start, chosen count, rejected start, rejected count
    lm_head.pt        the reference lm-head (weight, bias, softcap, scale), saved as it is

Rows are the hidden positions ``t`` whose shifted target ``targets[:, t]`` is not ``ignore_index`` —
the completion tokens — in order. The other positions are never read by the loss (masked), so a batch
is rebuilt as zeros plus those rows.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

from tokpo_kernels.integrations.hf_hidden import LMHead

__all__ = ["RefHiddenCache", "RefHiddenCacheWriter"]

FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_HIDDEN = "hidden.bin"
_INDEX = "index.pt"
_LM_HEAD = "lm_head.pt"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"reference hidden-state cache: expected a dtype in {sorted(_DTYPES)}, got {dtype}")
    return name


def read_manifest(directory: str) -> Optional[Dict[str, Any]]:
    """The manifest of a complete cache in ``directory``, or ``None`` (absent, or a write never finished:
    the manifest is written last)."""
    path = os.path.join(directory, _MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class RefHiddenCacheWriter:
    """Appends the completion-token rows of reference hidden states, batch by batch, then the manifest.

    Args:
        directory: created if missing; an older cache there is overwritten.
        num_examples: examples of all cached datasets together (their global indices are
            ``0 … num_examples − 1``).
        fingerprint: a JSON-serialisable description of what is cached, compared on reuse.
    """

    def __init__(self, directory: str, num_examples: int, fingerprint: Dict[str, Any]) -> None:
        os.makedirs(directory, exist_ok=True)
        manifest = os.path.join(directory, _MANIFEST)
        if os.path.exists(manifest):
            os.remove(manifest)  # the cache is incomplete until the new manifest is written
        self.directory = directory
        self.fingerprint = fingerprint
        self.index = torch.full((num_examples, 4), -1, dtype=torch.int64)
        self._file = open(os.path.join(directory, _HIDDEN), "wb")
        self._rows = 0
        self._dtype: Optional[torch.dtype] = None
        self._hidden_size: Optional[int] = None

    def add_batch(self, example_index: torch.Tensor, ref_hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one collated batch: ``example_index (B,)`` global indices, ``ref_hidden (2B, T, D)`` rows
        ``[chosen; rejected]`` and ``mask (2B, T)`` (True at the completion tokens)."""
        pairs = int(example_index.numel())
        if ref_hidden.dim() != 3 or ref_hidden.shape[0] != 2 * pairs or mask.shape != ref_hidden.shape[:2]:
            raise ValueError(
                f"RefHiddenCacheWriter.add_batch: expected ref_hidden (2B, T, D) and mask (2B, T) with B={pairs}, got "
                f"{tuple(ref_hidden.shape)} and {tuple(mask.shape)}"
            )
        if self._dtype is None:
            self._dtype, self._hidden_size = ref_hidden.dtype, int(ref_hidden.shape[-1])
            _dtype_name(self._dtype)
        elif ref_hidden.dtype != self._dtype or ref_hidden.shape[-1] != self._hidden_size:
            raise ValueError(
                f"RefHiddenCacheWriter.add_batch: expected {self._dtype} rows of size {self._hidden_size}, got "
                f"{ref_hidden.dtype} rows of size {ref_hidden.shape[-1]}"
            )
        counts = mask.sum(dim=1).cpu()
        rows = ref_hidden[mask].detach().to("cpu").contiguous()  # completion rows, row-major order
        # Raw bytes (numpy has no bfloat16): viewed as uint8, written as they are in memory.
        self._file.write(rows.view(torch.uint8).numpy().tobytes())
        starts = self._rows + torch.cumsum(counts, 0) - counts
        for b, example in enumerate(example_index.tolist()):
            self.index[example] = torch.stack([starts[b], counts[b], starts[pairs + b], counts[pairs + b]])
        self._rows += int(rows.shape[0])

    def finish(self, lm_head: LMHead) -> None:
        """Write the reference lm-head, the index and, last, the manifest (the cache is then complete)."""
        self._file.close()
        missing = int((self.index[:, 0] < 0).sum())
        if missing:
            raise RuntimeError(f"RefHiddenCacheWriter.finish: {missing} examples were never added")
        torch.save({"weight": lm_head.weight.detach().cpu(),
                    "bias": None if lm_head.bias is None else lm_head.bias.detach().cpu(),
                    "softcap": lm_head.softcap, "scale": lm_head.scale},
                   os.path.join(self.directory, _LM_HEAD))
        torch.save(self.index, os.path.join(self.directory, _INDEX))
        manifest = {
            "format": FORMAT_VERSION, "dtype": _dtype_name(self._dtype or torch.float32),
            "hidden_size": self._hidden_size or 0, "num_examples": int(self.index.shape[0]),
            "num_tokens": self._rows, "fingerprint": self.fingerprint,
            "files": {"hidden": _HIDDEN, "index": _INDEX, "lm_head": _LM_HEAD},
        }
        tmp = os.path.join(self.directory, _MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.directory, _MANIFEST))


class RefHiddenCache:
    """A complete cache, memory-mapped: batches of reference hidden states and the reference lm-head."""

    def __init__(self, directory: str) -> None:
        manifest = read_manifest(directory)
        if manifest is None:
            raise FileNotFoundError(f"RefHiddenCache: no complete cache in {directory!r} (manifest.json missing)")
        if manifest.get("format") != FORMAT_VERSION:
            raise ValueError(f"RefHiddenCache: expected format {FORMAT_VERSION}, got {manifest.get('format')!r}")
        self.directory = directory
        self.manifest = manifest
        self.dtype = _DTYPES[manifest["dtype"]]
        self.hidden_size = int(manifest["hidden_size"])
        self.index = torch.load(os.path.join(directory, manifest["files"]["index"]))
        rows = int(manifest["num_tokens"])
        path = os.path.join(directory, manifest["files"]["hidden"])
        # from_file maps the file (MAP_PRIVATE with shared=False): pages are read when a batch touches them.
        self._flat = (torch.from_file(path, shared=False, size=rows * self.hidden_size, dtype=self.dtype)
                      .view(rows, self.hidden_size) if rows else torch.empty(0, self.hidden_size, dtype=self.dtype))
        head = torch.load(os.path.join(directory, manifest["files"]["lm_head"]))
        self._lm_head = LMHead(weight=head["weight"], bias=head["bias"], softcap=head["softcap"], scale=head["scale"])

    def lm_head(self, device: torch.device) -> LMHead:
        """The reference lm-head on ``device`` (moved once, then kept there)."""
        if self._lm_head.weight.device != torch.device(device):
            h = self._lm_head
            self._lm_head = LMHead(weight=h.weight.to(device), bias=None if h.bias is None else h.bias.to(device),
                                   softcap=h.softcap, scale=h.scale)
        return self._lm_head

    def batch_hidden(self, example_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(2B, T, D)`` reference hidden states of a ``[chosen; rejected]`` batch: the cached rows at
        ``mask`` (True at completion tokens), zeros elsewhere (positions the loss never reads)."""
        pairs = int(example_index.numel())
        if mask.dim() != 2 or mask.shape[0] != 2 * pairs:
            raise ValueError(
                f"RefHiddenCache.batch_hidden: expected mask (2B, T) with B={pairs}, got {tuple(mask.shape)}")
        entries = self.index[example_index.cpu()]
        spans = [(int(s), int(n)) for s, n in entries[:, 0:2].tolist()] + \
                [(int(s), int(n)) for s, n in entries[:, 2:4].tolist()]
        counts = mask.sum(dim=1).tolist()
        for row, ((_, n), want) in enumerate(zip(spans, counts, strict=True)):
            if n != want:
                raise RuntimeError(
                    f"RefHiddenCache: row {row} of the batch has {want} completion tokens but the cache holds {n} for "
                    f"example {int(example_index[row % pairs])}: the cache was built for other data (delete "
                    f"{self.directory!r} to rebuild it)"
                )
        rows = torch.cat([self._flat[s:s + n] for s, n in spans]) if spans else self._flat[:0]
        out = torch.zeros(*mask.shape, self.hidden_size, dtype=self.dtype, device=mask.device)
        out[mask] = rows.to(mask.device, non_blocking=True)
        return out
