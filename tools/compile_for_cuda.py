"""Compile the Triton kernels ahead of time for a CUDA target, without a GPU.

The interpreter checks semantics but not codegen (layouts, dtypes of tl.dot, register/shared
memory limits). This compiles the kernel variants the launchers can request down to a cubin for
``--arch`` (default sm_90, H100/H200) with the ptxas shipped in the triton wheel, and reports
registers, spills and shared memory per variant. Run: ``python tools/compile_for_cuda.py``.

By default a representative subset is compiled: every combination of the statistics flags, each
with all other features off and with all on, plus each kernel's heaviest variant with the reference
head in each other dtype of ``--dtypes`` (mixed-precision reference); ``--all`` compiles every flag
combination. Compile
signatures are built from each kernel's own argument list and a dtype rule (``signature``), so a
new kernel argument is typed here without an edit, and a new constexpr flag that no variant sets
fails loudly instead of being compiled at a default.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

# Before triton is imported: this tool compiles for real, even from a shell that interprets.
os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tokpo_kernels.kernels import backward as bwd_mod
from tokpo_kernels.kernels import forward_stats as fwd_mod
from tokpo_kernels.kernels.configs import KernelConfig, cuda_config, tuning_space

# Largest dynamic shared memory one block may use on sm_90 (H100/H200): 227 KiB.
SM90_MAX_SHARED = 232448

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# The dtype rule. Pointers of the policy head (hidden, weight, bias) take the input dtype, those of
# the reference head the reference's dtype (the input dtype unless a mixed variant says otherwise:
# a bf16 reference beside an fp32 policy is a supported set-up); target ids and the compaction
# index are int64 and the valid-row count int32 (as kernels/launch.py passes them); every other
# pointer is an fp32 statistic, cotangent, partial or gradient accumulator. Scalars: sizes (upper
# case: N, V, D, ...) and strides are int32; the rest are the fp32 runtime parameters
# (temperature, softcap, filter_eps).
HEAD_POINTERS = frozenset({"h_ptr", "w_ptr", "b_ptr"})
REF_POINTERS = frozenset({"rh_ptr", "rw_ptr", "rb_ptr"})
ID_POINTERS = {"tgt_ptr": "*i64", "row_index_ptr": "*i64", "n_valid_ptr": "*i32"}


def signature(fn, dtype: torch.dtype, constexprs: Dict[str, object],
              ref_dtype: Optional[torch.dtype] = None) -> Dict[str, str]:
    """The compile signature of ``fn`` for policy inputs of ``dtype`` and reference inputs of
    ``ref_dtype`` (default: ``dtype``; rule above); raises when the constexpr values given do not
    match the kernel's constexpr parameters exactly."""
    sig: Dict[str, str] = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in HEAD_POINTERS:
            sig[name] = f"*{_DT[dtype]}"
        elif name in REF_POINTERS:
            sig[name] = f"*{_DT[ref_dtype or dtype]}"
        elif name in ID_POINTERS:
            sig[name] = ID_POINTERS[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.isupper() or name.startswith("stride_"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    wanted = {n for n, t in sig.items() if t == "constexpr"}
    if wanted != set(constexprs):
        raise ValueError(f"{fn.__name__}: constexpr parameters {sorted(wanted)}, "
                         f"got values for {sorted(constexprs)}")
    return sig


@dataclass(frozen=True)
class KernelSpec:
    """How to enumerate one kernel's variants.

    ``stats``: flags compiled in every combination; ``extras``: the other features, every
    combination with ``--all`` and otherwise the settings in ``representative``. ``allowed`` drops
    combinations a launcher never requests; ``derived`` sets the flags that follow from others.
    """

    kind: str  # "fwd" / "bwd": the configs.cuda_config / tuning_space key
    fn: object
    stats: Tuple[str, ...]
    extras: Tuple[str, ...]
    representative: Tuple[Tuple[bool, ...], ...]
    allowed: Callable[[Dict[str, bool]], bool]
    derived: Callable[[Dict[str, bool]], Dict[str, bool]]
    fixed: Dict[str, object] = field(default_factory=dict)

    def flag_sets(self, full: bool) -> List[Dict[str, bool]]:
        extra_values = itertools.product([False, True], repeat=len(self.extras)) if full else self.representative
        out = []
        for extra in extra_values:
            for stats in itertools.product([False, True], repeat=len(self.stats)):
                flags = dict(zip(self.stats, stats, strict=True), **dict(zip(self.extras, extra, strict=True)))
                if self.allowed(flags):
                    out.append(flags)
        return out


FORWARD = KernelSpec(
    kind="fwd",
    fn=fwd_mod._forward_stats_kernel,
    stats=("HAS_REF", "NEED_KL", "NEED_ENTROPY"),
    extras=("HAS_SOFTCAP", "HAS_BIAS", "NEED_SUM"),
    representative=((False, False, False), (True, True, True)),
    allowed=lambda f: f["HAS_REF"] or not f["NEED_KL"],  # KL needs the reference
    derived=lambda f: dict(HAS_REF_BIAS=f["HAS_BIAS"] and f["HAS_REF"]),
)

BACKWARD = KernelSpec(
    kind="bwd",
    fn=bwd_mod._backward_kernel,
    stats=("USE_Q", "USE_ENTROPY"),
    extras=("HAS_SOFTCAP", "HAS_BIAS", "FILTER", "USE_SUM"),
    # The launcher never sets FILTER with USE_SUM, so "all on" is one of the two.
    representative=((False, False, False, False), (True, True, True, False), (True, True, False, True)),
    allowed=lambda f: not (f["FILTER"] and f["USE_SUM"]),
    derived=lambda f: dict(HAS_REF_BIAS=f["HAS_BIAS"] and f["USE_Q"], NEED_DB=f["HAS_BIAS"]),
    fixed=dict(NEED_DH=True, NEED_DW=True),
)

SPECS = (FORWARD, BACKWARD)


def variants(spec: KernelSpec, dtype: torch.dtype, cfg: KernelConfig, full: bool,
             ref_dtype: Optional[torch.dtype] = None) -> Iterator[tuple]:
    """``(label, fn, signature, constexprs, cfg)`` for every variant of ``spec`` (see KernelSpec),
    with the reference head in ``ref_dtype`` (default: ``dtype``)."""
    blocks = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
    if "GROUP_N" in spec.fn.arg_names:
        blocks["GROUP_N"] = cfg.group_n
    dtypes = _DT[dtype] if ref_dtype in (None, dtype) else f"{_DT[dtype]}/ref {_DT[ref_dtype]}"
    for flags in spec.flag_sets(full):
        # On a GPU both sides' tl.dot run at "ieee" for bf16/fp16 operands and at torch's fp32
        # matmul precision for fp32 ones (launch._kernel_flags); "ieee" is the default there.
        const = dict(flags, **spec.derived(flags), **spec.fixed, UPCAST=False, DOT_PRECISION="ieee",
                     REF_UPCAST=False, REF_DOT_PRECISION="ieee", **blocks)
        on = " ".join(k for k, v in flags.items() if v) or "-"
        yield f"{spec.kind} {dtypes} [{on}]", spec.fn, signature(spec.fn, dtype, const, ref_dtype), const, cfg


def heaviest(spec: KernelSpec, dtype: torch.dtype, cfg: KernelConfig, ref_dtype: Optional[torch.dtype] = None) -> tuple:
    """The variant with the most features on (the last of the full enumeration)."""
    return list(variants(spec, dtype, cfg, full=True, ref_dtype=ref_dtype))[-1]


def mixed_variants(dtype: torch.dtype, dtypes: List[torch.dtype]) -> Iterator[tuple]:
    """The heaviest variant of each kernel with the reference in each other dtype of ``dtypes``:
    the reference tile's tl.dot then reads another dtype than the policy's (pointer types and
    operand layouts differ between the two logit tiles of one kernel)."""
    for ref_dtype in dtypes:
        if ref_dtype != dtype:
            for spec in SPECS:
                yield heaviest(spec, dtype, cuda_config(spec.kind, dtype), ref_dtype)


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(fn, sig, const, target, cfg) -> Tuple[object, str]:
    """Compile one variant; returns the kernel and the ptxas resource line (registers, spills)."""
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    log = io.StringIO()
    # ptxas already runs with -v; triton prints its log only when asked to (and runs ptxas only on
    # a cold cache: a cached variant reports no registers).
    triton.knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=target, options=opts)
    text = log.getvalue()
    regs = _REGS.findall(text)
    spills = _SPILLS.findall(text)
    usage = ""
    if regs:
        usage = f"regs={regs[-1]}"
    if spills:
        usage += f" spill={spills[-1][0]}/{spills[-1][1]}B"
    return kernel, usage


# The variants to compile, set before the worker processes fork: they index it (a JIT kernel
# object does not pickle, and forked workers inherit it for free).
_TODO: List[tuple] = []


def _compile_one(job: Tuple[int, int]) -> Tuple[bool, str]:
    """Compile ``_TODO[i]`` for sm_``arch``; ``(ok, report line)``."""
    i, arch = job
    label, fn, sig, const, cfg = _TODO[i]
    try:
        k, usage = compile_variant(fn, sig, const, GPUTarget("cuda", arch, 32), cfg)
    except Exception as exc:  # report every variant, then fail
        return False, f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    shared = k.metadata.shared
    if shared > SM90_MAX_SHARED:
        return False, f"FAIL {label}: needs {shared} B of shared memory, sm_90 allows {SM90_MAX_SHARED}"
    return True, f"ok   {label:60s} smem={shared}B {usage}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--all", action="store_true",
                    help="every flag combination (slow); default: a representative subset")
    ap.add_argument("--space", action="store_true",
                    help="instead: every config of the TOKPO_AUTOTUNE tuning space, all features on")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile this many variants at once (default: one per CPU core)")
    args = ap.parse_args()
    want = {v: k for k, v in _DT.items()}
    dtypes = [want[name] for name in args.dtypes.split(",")]
    for dtype in dtypes:
        for spec in SPECS:
            if args.space:
                for cfg in tuning_space(spec.kind, dtype):
                    label, *rest = heaviest(spec, dtype, cfg)
                    _TODO.append((f"{label} {cfg}", *rest))
            else:
                _TODO.extend(variants(spec, dtype, cuda_config(spec.kind, dtype), args.all))
        if not args.space:
            _TODO.extend(mixed_variants(dtype, dtypes))
    jobs = [(i, args.arch) for i in range(len(_TODO))]
    # Each variant is an independent, CPU-bound compile (MLIR passes, then ptxas): on 2 cores two
    # at a time halve the wall time. Workers are forked, so they share the already-built kernels.
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = list(pool.imap(_compile_one, jobs))
    else:
        results = [_compile_one(job) for job in jobs]
    for _, line in results:
        print(line, flush=True)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
