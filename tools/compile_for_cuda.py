"""Compile the Triton kernels for a CUDA target without a GPU, and check their machine code.

The interpreter checks semantics but not code generation. This compiles each kernel of ``KERNELS``
for ``--arch`` (default sm_90: H100/H200) with the ptxas shipped in the triton wheel, reads the SASS
with its cuobjdump and asserts on it (``tools/sass.py``: every ``tl.dot`` a Hopper ``HGMMA``, wide
main-loop loads, no spills in loops, no atomics or fences in a backward kernel, shared memory within
227 KiB). Run from the repository root::

    python tools/compile_for_cuda.py            # compile and check; exit status 1 on any failure
    python tools/compile_for_cuda.py --report   # also a table of registers, spills, shared memory,
                                                # CTAs/SM, wgmma shapes and loop load kinds
    python tools/compile_for_cuda.py --space    # and every config of the autotune space fits sm_90

What is compiled, per kernel:

* its default variant and its heaviest feature variant, **specialised as the Triton JIT
  specialises them** at the core-tier shape (Llama-3-8B head: N = 16384, D = 4096, V = 128256,
  bf16, one target per token): Triton's own argument binder sees the sample argument values of
  ``CORE_ARGS`` (plus the kernel's ``args``), so ints equal to 1 (unit strides, J) become
  ``constexpr 1``, 16-byte-aligned pointers and multiples of 16 get ``tt.divisibility = 16``, and
  ``do_not_specialize`` arguments get neither. All SASS checks apply to these;
* the heaviest variant **unspecialised** (arbitrary strides and alignment, what a non-contiguous
  input runs) in each dtype of ``--dtypes`` (default bf16; ``--dtypes bf16,fp32`` adds fp32 and the
  mixed-precision reference heads): a fit check (it builds, its shared memory fits). The checks it
  would fail are printed as ``info`` lines: they show what the specialisation buys.

``--space`` also compiles every config of each autotuned kernel's ``configs.tuning_space``
(heaviest variant, specialised, in each dtype of ``--space-dtypes``, default bf16) and asserts
that it builds and fits.

Adding a kernel is one ``KernelEntry`` in ``KERNELS``. Compile signatures come from each kernel's
own parameter list and a dtype rule (``signature``), so a new argument is typed without an edit, a
runtime argument with no sample value fails loudly, and so does a constexpr flag no variant sets.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

# Before triton is imported: this tool compiles for real, even from a shell that interprets (the
# interpreter decision is taken when a kernel is decorated).
os.environ.pop("TRITON_INTERPRET", None)
# Triton 3.9 fuses multiply-adds unless told otherwise and warns that the default will change; pin
# today's default so the compile matches what a launch does now, without the warning.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import sass  # tools/sass.py: tools/ is sys.path[0] when this file runs as a script
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from tokpo_kernels.kernels import configs

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TORCH = {name: dtype for dtype, name in _DT.items()} | {"i64": torch.int64, "i32": torch.int32}

# ------------------------------------------------------------------------------------------------
# The dtype rule. Pointers of the policy head (hidden, weight, bias) take the input dtype, those of
# the reference head the reference's dtype (the input dtype unless a mixed variant says otherwise:
# a bf16 reference beside an fp32 policy is a supported set-up); target ids and the compaction
# index are int64 and the valid-row count int32 (as kernels/launch.py passes them); every other
# pointer is fp32 (statistics, cotangents, partials, accumulators) unless the kernel's entry says
# otherwise. Scalars take the type of their core-tier sample value (CORE_ARGS, KernelEntry.args): sizes,
# offsets and strides are Python ints (int32), the runtime parameters (temperature, softcap,
# filter_eps) Python floats (fp32).
HEAD_POINTERS = frozenset({"h_ptr", "w_ptr", "b_ptr"})
REF_POINTERS = frozenset({"rh_ptr", "rw_ptr", "rb_ptr"})
ID_POINTERS = {"tgt_ptr": "i64", "row_index_ptr": "i64", "n_valid_ptr": "i32"}

# The core tier: the Llama-3-8B head at 16k tokens (the target shape).
CORE_N, CORE_D, CORE_V = 16384, 4096, 128256
# Sample runtime arguments at the core tier, by parameter name, as the launchers pass them for
# contiguous bf16 h (N, D), W (V, D), the same-shaped reference head and (N, 1) int64 targets.
# The JIT specialises on these values: 1 -> constexpr, multiples of 16 -> divisibility 16.
CORE_ARGS: Dict[str, object] = dict(
    N=CORE_N, V=CORE_V, D=CORE_D, D_REF=CORE_D,
    J=1,  # one target per token
    stride_hn=CORE_D, stride_hd=1, stride_wv=CORE_D, stride_wd=1,
    stride_rhn=CORE_D, stride_rhd=1, stride_rwv=CORE_D, stride_rwd=1,
    stride_tn=1, stride_tj=1,  # (N, 1) targets: both strides are 1
    inv_temperature=1.0, softcap=1.0, filter_eps=0.0,  # Python floats: fp32, never specialised
)
# Where a sample pointer points: torch's CUDA caching allocator hands out 512-byte aligned blocks,
# and every tensor the launchers pass at the core tier is such a block (or the start of one).
SAMPLE_ADDRESS = 512


Launch = Callable[[ModuleType, torch.dtype], Dict[str, object]]


def config_launch(cfg: configs.KernelConfig) -> Dict[str, object]:
    """A ``KernelConfig`` as launch keywords: its fields upper-cased (``block_n`` -> ``BLOCK_N``,
    ``group_n`` -> ``GROUP_N``; a kernel takes those of its parameters) and the two options."""
    out: Dict[str, object] = {f.name.upper(): getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    out["num_warps"], out["num_stages"] = out.pop("NUM_WARPS"), out.pop("NUM_STAGES")
    return out


def from_configs(key: str) -> Launch:
    """Launch keywords from ``configs.cuda_config(key, dtype)`` (the tl.dot kernels)."""
    return lambda module, dtype: config_launch(configs.cuda_config(key, dtype))


def from_module(attr: str) -> Launch:
    """Launch keywords from the kernel module's own dict of CUDA blocks (the row passes)."""
    return lambda module, dtype: dict(getattr(module, attr))


@dataclass(frozen=True)
class KernelEntry:
    """One kernel: where it lives, its variants, its sample arguments and the checks it obeys.

    ``default``: every constexpr flag of the variant a plain launch requests, except the block
    sizes, which ``launch`` gives (with ``num_warps`` / ``num_stages``) for a dtype as the kernel's
    launcher picks them. ``heaviest``: the flags the heaviest feature variant sets on top of
    ``default``. ``args``: sample runtime values at the core tier beyond (or replacing)
    ``CORE_ARGS``. ``pointers``: element types of pointers the dtype rule gets wrong (``"input"``,
    ``"ref"``, ``"fp32"``, ``"i64"``, ``"i32"``). ``rules``: which SASS checks apply
    (``sass.Rules``). ``space``: the ``configs.tuning_space`` key, if the kernel has an autotune
    space.
    """

    name: str
    module: str
    function: str
    launch: Launch
    default: Dict[str, object]
    heaviest: Dict[str, object]
    rules: sass.Rules
    args: Dict[str, object] = field(default_factory=dict)
    pointers: Dict[str, str] = field(default_factory=dict)
    space: Optional[str] = None

    def kernel(self):
        """The JIT function (imported on first use, so a missing module names its entry)."""
        return getattr(importlib.import_module(self.module), self.function)

    def launch_keywords(self, dtype: torch.dtype) -> Dict[str, object]:
        return self.launch(importlib.import_module(self.module), dtype)


# The tl.dot flags the launchers pass on a GPU for bf16/fp16 operands ("ieee" is the default there;
# fp32 operands take torch's matmul precision: launch._kernel_flags).
_DOT_FLAGS = dict(UPCAST=False, DOT_PRECISION="ieee", REF_UPCAST=False, REF_DOT_PRECISION="ieee")
# The dz kernels' gradient terms: all off is cross-entropy; the heaviest sets every one the
# launcher can combine (FILTER is never set with USE_SUM: a logit-sum cotangent disables it).
_DZ_DEFAULT = dict(HAS_BIAS=False, HAS_REF_BIAS=False, HAS_SOFTCAP=False, USE_Q=False, USE_ENTROPY=False,
                   USE_SUM=False, FILTER=False, NEED_DB=False)
_DZ_HEAVIEST = dict(HAS_BIAS=True, HAS_REF_BIAS=True, HAS_SOFTCAP=True, USE_Q=True, USE_ENTROPY=True,
                    FILTER=True, NEED_DB=True)
# A vocabulary chunk at the core tier: kernels/chunking.py sizes chunks in multiples of 128 columns
# (1024 is a typical width there). The JIT specialises only on "equals 1" and "multiple of 16", so
# every chunk width it can produce compiles to this same code. The sample chunk is neither the first
# (col0 = 0) nor the last, and chunk buffers are contiguous (n, C), so their row strides equal C.
_C = 1024
_CHUNK_ARGS = dict(N_ROWS=CORE_N, col0=_C, C=_C, stride_zn=_C, stride_zrn=_C, stride_dzn=_C)

KERNELS: Tuple[KernelEntry, ...] = (
    KernelEntry(
        name="forward_stats", module="tokpo_kernels.kernels.forward_stats", function="_forward_stats_kernel",
        launch=from_configs("fwd"), space="fwd", rules=sass.Rules(loads="dot"),
        # Cross-entropy: the row statistics of the policy only.
        default=dict(HAS_BIAS=False, HAS_REF=False, HAS_REF_BIAS=False, HAS_SOFTCAP=False, NEED_KL=False,
                     NEED_ENTROPY=False, NEED_SUM=False, **_DOT_FLAGS),
        heaviest=dict(HAS_BIAS=True, HAS_REF=True, HAS_REF_BIAS=True, HAS_SOFTCAP=True, NEED_KL=True,
                      NEED_ENTROPY=True, NEED_SUM=True),
        # configs.forward_splits on an H100 at the core tier: min(1002 tiles // 8, max(8, ceil(2 · 132 SMs /
        # 128 row blocks))) = 8 (the L2-sharing minimum).
        args=dict(NUM_SPLITS=8),
    ),
    KernelEntry(
        name="target_logits", module="tokpo_kernels.kernels.target_logits", function="_target_logits_kernel",
        launch=from_module("_CUDA_BLOCKS"), rules=sass.Rules(loads="stream", operands=("h_ptr", "w_ptr")),
        default=dict(HAS_BIAS=False, HAS_SOFTCAP=False), heaviest=dict(HAS_BIAS=True, HAS_SOFTCAP=True),
        args=dict(PAIRS=CORE_N),  # N·J (row, target) pairs
        pointers=dict(ids_ptr="i64"),
    ),
    KernelEntry(
        name="row_stats", module="tokpo_kernels.kernels.row_stats", function="_row_stats_kernel",
        launch=from_module("_CUDA_BLOCKS"), rules=sass.Rules(loads="stream", operands=("z_ptr", "zr_ptr")),
        default=dict(HAS_BIAS=False, HAS_REF=False, HAS_REF_BIAS=False, HAS_SOFTCAP=False, NEED_KL=False,
                     NEED_ENTROPY=False, NEED_SUM=False),
        heaviest=dict(HAS_BIAS=True, HAS_REF=True, HAS_REF_BIAS=True, HAS_SOFTCAP=True, NEED_KL=True,
                      NEED_ENTROPY=True, NEED_SUM=True),
        args=_CHUNK_ARGS,
    ),
    KernelEntry(
        name="dz_from_logits", module="tokpo_kernels.kernels.dz_chunk", function="_dz_from_logits_kernel",
        launch=from_module("_ELEMENTWISE_CUDA"),
        rules=sass.Rules(loads="stream", operands=("z_ptr", "zr_ptr"), backward=True),
        default=_DZ_DEFAULT, heaviest=_DZ_HEAVIEST, args=_CHUNK_ARGS, pointers=dict(dz_ptr="input"),
    ),
    KernelEntry(
        name="dz_recompute", module="tokpo_kernels.kernels.dz_chunk", function="_dz_recompute_kernel",
        launch=from_configs("bwd"), space="bwd", rules=sass.Rules(loads="dot", backward=True),
        default=dict(_DZ_DEFAULT, **_DOT_FLAGS), heaviest=_DZ_HEAVIEST,
        args=_CHUNK_ARGS,
        pointers=dict(dz_ptr="input"),
    ),
)


# ------------------------------------------------------------------------------------------------
# Signatures and specialisation


def pointer_dtype(name: str, dtype: torch.dtype, ref_dtype: torch.dtype, overrides: Dict[str, str]) -> str:
    """The element type of pointer parameter ``name`` (rule above) as a signature string."""
    role = overrides.get(name)
    if role is None:
        role = ("input" if name in HEAD_POINTERS else "ref" if name in REF_POINTERS
                else ID_POINTERS.get(name, "fp32"))
    return {"input": _DT[dtype], "ref": _DT[ref_dtype]}.get(role, role)


def scalar_type(value: object) -> str:
    """The signature type of a runtime scalar, as the JIT types it: a bool is i1, an int i32 when it
    fits in 32 bits (else i64), a float fp32."""
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"sample values are bool, int or float, got {type(value).__name__}")


def signature(fn, dtype: torch.dtype, constexprs: Dict[str, object], values: Dict[str, object],
              ref_dtype: Optional[torch.dtype] = None, pointers: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The unspecialised compile signature of ``fn`` for policy inputs of ``dtype`` and reference
    inputs of ``ref_dtype`` (default: ``dtype``): pointers by the dtype rule, scalars by the type of
    their core-tier sample value in ``values``. Raises when a scalar has no sample value or when the
    constexpr values given do not match the kernel's constexpr parameters exactly."""
    sig: Dict[str, str] = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointer_dtype(name, dtype, ref_dtype or dtype, pointers or {})
        elif name in values:
            sig[name] = scalar_type(values[name])
        else:
            raise ValueError(f"{fn.__name__}: no core-tier sample value for argument {name!r}; "
                             "add it to CORE_ARGS or to the kernel's KernelEntry.args")
    wanted = {n for n, t in sig.items() if t == "constexpr"}
    if wanted != set(constexprs):
        raise ValueError(f"{fn.__name__}: constexpr parameters {sorted(wanted)}, "
                         f"got values for {sorted(constexprs)}")
    return sig


@dataclass(frozen=True)
class SamplePointer:
    """Stands in for a tensor argument: the binder reads only its dtype and address."""

    dtype: torch.dtype

    @staticmethod
    def data_ptr() -> int:
        return SAMPLE_ADDRESS


def sample_args(sig: Dict[str, str], values: Dict[str, object]) -> Dict[str, object]:
    """A runtime value for every non-constexpr parameter of ``sig``: a ``SamplePointer`` of the
    signature's dtype for pointers, ``values[name]`` for scalars."""
    args: Dict[str, object] = {}
    for name, ty in sig.items():
        if ty.startswith("*"):
            args[name] = SamplePointer(_TORCH[ty[1:]])
        elif ty != "constexpr":
            args[name] = values[name]
    return args


def jit_specialisation(fn, sig: Dict[str, str], constexprs: Dict[str, object], values: Dict[str, object],
                       num_warps: int, num_stages: int, target: GPUTarget) -> Tuple[ASTSource, dict]:
    """The source and options the Triton JIT compiles when ``fn`` is launched with the sample
    arguments: Triton's own binder and argument packing (``JITFunction.run``'s path, private API on
    purpose: any other reimplementation could drift from what a launch really compiles).

    The JIT derives the signature from the values; it must agree with ``sig`` except where a value
    of 1 became a constexpr, else the dtype rule and the sample values disagree."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(sample_args(sig, values), **constexprs, num_warps=num_warps, num_stages=num_stages,
                  debug=False)
    bound, specialization, options = binder(**kwargs)
    options, jit_sig, jit_const, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    for name, ty in sig.items():
        if jit_sig[name] not in (ty, "constexpr"):
            raise ValueError(f"{fn.__name__}: argument {name} is {jit_sig[name]} at the core tier, the dtype "
                             f"rule says {ty}")
    return ASTSource(fn, jit_sig, jit_const, attrs), options.__dict__


# ------------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    """One compile: ``checked`` ones get every SASS check, the others the fit check only (builds,
    shared memory fits). ``launch``: block constexprs and ``num_warps`` / ``num_stages``
    (``config_launch``)."""

    label: str
    entry: KernelEntry
    dtype: torch.dtype
    ref_dtype: torch.dtype
    flags: Dict[str, object]
    launch: Dict[str, object]
    specialised: bool
    checked: bool

    @property
    def num_warps(self) -> int:
        return int(self.launch.get("num_warps", TRITON_DEFAULT_WARPS))

    @property
    def num_stages(self) -> int:
        return int(self.launch.get("num_stages", TRITON_DEFAULT_STAGES))


# What a launch without num_warps / num_stages gets (triton.backends.nvidia's CUDAOptions).
TRITON_DEFAULT_WARPS, TRITON_DEFAULT_STAGES = 4, 3


def make_variant(entry: KernelEntry, which: str, dtype: torch.dtype, specialised: bool,
                 ref_dtype: Optional[torch.dtype] = None, launch: Optional[Dict[str, object]] = None) -> Variant:
    """The ``which`` (``"default"`` / ``"heaviest"``) variant of ``entry``."""
    ref_dtype = ref_dtype or dtype
    flags = dict(entry.default, **(entry.heaviest if which == "heaviest" else {}))
    dtypes = _DT[dtype] if ref_dtype == dtype else f"{_DT[dtype]}/ref {_DT[ref_dtype]}"
    label = f"{entry.name} {dtypes} {which}" + ("" if specialised else " unspecialised")
    return Variant(label, entry, dtype, ref_dtype, flags, launch or entry.launch_keywords(dtype), specialised,
                   checked=specialised)


def has_reference(entry: KernelEntry) -> bool:
    """Whether the kernel reads a reference head (then its dtype may differ from the policy's)."""
    return any(p in REF_POINTERS or entry.pointers.get(p) == "ref" for p in entry.kernel().arg_names)


def plan(entries: Tuple[KernelEntry, ...], dtypes: List[torch.dtype]) -> List[Variant]:
    """The default compile set (module docstring): per kernel, default and heaviest specialised in
    bf16 (the core tier), then the heaviest unspecialised per dtype and mixed reference dtype."""
    out = []
    for entry in entries:
        out += [make_variant(entry, which, torch.bfloat16, True) for which in ("default", "heaviest")]
        for dtype in dtypes:
            out.append(make_variant(entry, "heaviest", dtype, False))
            if has_reference(entry):
                out += [make_variant(entry, "heaviest", dtype, False, ref) for ref in dtypes if ref != dtype]
    return out


def same_compile(v: Variant) -> tuple:
    """What decides a compile's result (two variants with equal keys compile the same code)."""
    return (v.entry.name, v.dtype, v.ref_dtype, v.specialised, tuple(sorted(v.flags.items())),
            tuple(sorted(v.launch.items())))


def space_plan(entries: Tuple[KernelEntry, ...], dtypes: List[torch.dtype]) -> List[Variant]:
    """Every config of each autotune space, heaviest variant, specialised: the multi-stage buffers
    that decide the fit exist only once the loads are known to be aligned (unspecialised compiles
    use a fraction of the shared memory)."""
    out = []
    for entry in entries:
        for dtype in dtypes:
            for cfg in configs.tuning_space(entry.space, dtype) if entry.space else ():
                v = make_variant(entry, "heaviest", dtype, True, launch=config_launch(cfg))
                out.append(dataclasses.replace(v, checked=False, label=f"{v.label} {cfg.block_n}x{cfg.block_v}x"
                                               f"{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}"))
    return out


# ------------------------------------------------------------------------------------------------
# Compiling and checking


def compile_variant(v: Variant, target: GPUTarget):
    """Compile one variant (specialised like the JIT at the core tier, or not at all)."""
    fn = v.entry.kernel()
    const = dict(v.flags, **{k: val for k, val in v.launch.items() if k in fn.arg_names})
    values = dict(CORE_ARGS, **v.entry.args)
    sig = signature(fn, v.dtype, const, values, v.ref_dtype, v.entry.pointers)
    if v.specialised:
        src, options = jit_specialisation(fn, sig, const, values, v.num_warps, v.num_stages, target)
    else:
        src, options = ASTSource(fn=fn, signature=sig, constexprs=const), {}
    options = dict(options, num_warps=v.num_warps, num_stages=v.num_stages)
    return triton.compile(src, target=target, options=options)


# Lines of a compile error to print (a Triton CompilationError quotes the source around the error).
MAX_ERROR_LINES = 20
# The variants to compile, set before the worker processes fork: they index it (a JIT kernel
# object does not pickle, and forked workers inherit it for free).
_TODO: List[Variant] = []


def _compile_one(job: Tuple[int, int]) -> Tuple[Optional[sass.Analysis], str]:
    """Compile and analyse ``_TODO[i]`` for sm_``arch``: ``(analysis, "")`` or ``(None, error)``."""
    i, arch = job
    v = _TODO[i]
    try:
        kernel = compile_variant(v, GPUTarget("cuda", arch, 32))
        # The PTX parameters: the runtime arguments left after the JIT turned some into constexprs.
        params = [name for name, ty in kernel.src.signature.items() if ty != "constexpr"]
        return sass.analyse(v.label, kernel, v.num_warps, params), ""
    except Exception as exc:  # report every variant, then fail
        # A CompilationError's first line is only a position: keep the source excerpt and message.
        lines = str(exc).strip().splitlines()[:MAX_ERROR_LINES]
        return None, "\n    ".join([type(exc).__name__ + ":", *lines])


def compile_cost(v: Variant) -> Tuple[bool, bool, bool]:
    """A sort key that orders compiles by expected duration (measured: a specialised tl.dot kernel
    takes several times as long as a row pass, and its heaviest variant twice its default)."""
    return v.entry.rules.loads == "dot", v.specialised, "heaviest" in v.label


def failures_of(v: Variant, a: sass.Analysis) -> Tuple[List[sass.Failure], List[sass.Failure]]:
    """``(failures, informational)``: a checked variant gets every check; an unspecialised one and
    a tuning-space config only the fit (shared memory), the rest is information."""
    every = sass.check(a, v.entry.rules)
    if v.checked:
        return every, []
    fit = [f for f in every if f.check == "smem"]
    return fit, [f for f in every if f.check != "smem"]


def run(variants: List[Variant], arch: int, jobs: int, report: bool) -> int:
    """Compile, check and print; the exit status (1 if any variant failed)."""
    _TODO[:] = variants
    # Longest compiles first (the pipelined tl.dot kernels, the heaviest variants), so that no worker
    # is left with one long compile at the end while the others idle.
    order = sorted(range(len(variants)), key=lambda i: compile_cost(variants[i]), reverse=True)
    work = [(i, arch) for i in order]
    # Each variant is an independent, CPU-bound compile (MLIR passes, then ptxas): on 2 cores two
    # at a time halve the wall time. Workers are forked, so they share the already-built kernels.
    if jobs > 1 and len(work) > 1:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(work))) as pool:
            done = list(pool.imap(_compile_one, work))
    else:
        done = [_compile_one(job) for job in work]
    results = [result for _, result in sorted(zip(order, done, strict=True), key=lambda pair: pair[0])]
    failed = 0
    details: List[str] = []
    for v, (a, error) in zip(variants, results, strict=True):
        if a is None:
            failed += 1
            print(f"FAIL {v.label}: does not compile: {error}", flush=True)
            continue
        bad, info = failures_of(v, a)
        failed += bool(bad)
        kind = "checked" if v.checked else "fit"
        print(f"{'FAIL' if bad else 'ok  '} {v.label:60s} {kind}", flush=True)
        # Information keeps to one line per check: the offending instructions matter only for failures.
        details += [str(f) for f in bad] + [f"info {f.label} [{f.check}]: {f.message}" for f in info]
    if details:
        print("\n" + "\n".join(details))
    if report:
        print("\n" + sass.REPORT_HEADER)
        print("\n".join(sass.report_line(a) for a, _ in results if a is not None))
    print(f"\n{len(variants)} variants compiled for sm_{arch}, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16",
                    help="dtypes of the unspecialised fit check (the checked compiles are bf16, the core tier)")
    ap.add_argument("--kernels", default=",".join(e.name for e in KERNELS),
                    help="comma-separated KERNELS names (default: all)")
    ap.add_argument("--report", action="store_true",
                    help="print registers, spills, shared memory, CTAs/SM, wgmma shapes and loop loads per variant")
    ap.add_argument("--space", action="store_true",
                    help="also every config of the TOKPO_AUTOTUNE tuning space (heaviest variant): must fit")
    ap.add_argument("--space-dtypes", default="bf16", help="dtypes of the --space compiles")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile this many variants at once (default: one per CPU core)")
    args = ap.parse_args()
    by_name = {e.name: e for e in KERNELS}
    unknown = set(args.kernels.split(",")) - set(by_name)
    if unknown:
        ap.error(f"unknown kernels {sorted(unknown)}; known: {sorted(by_name)}")
    entries = tuple(by_name[n] for n in args.kernels.split(","))
    for entry in entries:
        try:
            entry.kernel()
        except (ImportError, AttributeError) as exc:
            ap.error(f"KERNELS entry {entry.name!r}: cannot load {entry.module}.{entry.function} ({exc}); "
                     "update or remove the entry")
    dtypes = [_TORCH[name] for name in args.dtypes.split(",")]
    space_dtypes = [_TORCH[name] for name in args.space_dtypes.split(",")]
    variants = plan(entries, dtypes)
    # One pool for everything: on 2 cores, two runs would each leave a core idle at their tail.
    if args.space:
        # The default config is in the space too; its checked compile already shows that it fits.
        done = {same_compile(v) for v in variants}
        variants += [v for v in space_plan(entries, space_dtypes) if same_compile(v) not in done]
    return run(variants, args.arch, args.jobs, args.report)


if __name__ == "__main__":
    sys.exit(main())
