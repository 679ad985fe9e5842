"""Compile the Triton kernels ahead of time for a CUDA target, without a GPU.

The interpreter checks semantics but not codegen (layouts, dtypes of tl.dot, register/shared
memory limits). This compiles every kernel variant the launchers can request down to a cubin for
``--arch`` (default sm_90, H100/H200) with the ptxas shipped in the triton wheel, and reports
registers, spills and shared memory per variant. Run: ``python tools/compile_for_cuda.py``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tokpo_kernels.kernels import backward as bwd_mod  # noqa: E402
from tokpo_kernels.kernels import forward_stats as fwd_mod  # noqa: E402
from tokpo_kernels.kernels.configs import cuda_config, tuning_space  # noqa: E402

# Largest dynamic shared memory one block may use on sm_90 (H100/H200): 227 KiB.
SM90_MAX_SHARED = 232448

_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compile(fn, signature, constexprs, target, cfg):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=target, options=opts)


def _sig(fn, dtypes):
    return {name: dtypes.get(name, "i32") for name in fn.arg_names}


def forward_variants(dtype, target, cfg=None):
    dt = _DT[dtype]
    cfg = cfg or cuda_config("fwd", dtype)
    fn = fwd_mod._forward_stats_kernel
    ptrs = {n: f"*{dt}" for n in ("h_ptr", "w_ptr", "b_ptr", "rh_ptr", "rw_ptr", "rb_ptr")}
    ptrs.update(tgt_ptr="*i64", row_index_ptr="*i64", n_valid_ptr="*i32", tgt_logit_ptr="*fp32",
                ref_tgt_logit_ptr="*fp32", part_ptr="*fp32", inv_temperature="fp32", softcap="fp32")
    for has_ref, kl, ent, sc, bias in itertools.product([False, True], [False, True], [False, True],
                                                        [False, True], [False, True]):
        if kl and not has_ref:
            continue
        const = dict(HAS_BIAS=bias, HAS_REF=has_ref, HAS_REF_BIAS=bias and has_ref, HAS_SOFTCAP=sc, NEED_KL=kl,
                     NEED_ENTROPY=ent, UPCAST=False, DOT_PRECISION="ieee", BLOCK_N=cfg.block_n,
                     BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
        sig = _sig(fn, ptrs)
        for k in const:
            sig[k] = "constexpr"
        yield f"fwd {dt} ref={has_ref} kl={kl} ent={ent} softcap={sc} bias={bias}", fn, sig, const, cfg


def backward_variants(dtype, target, cfg=None):
    dt = _DT[dtype]
    cfg = cfg or cuda_config("bwd", dtype)
    fn = bwd_mod._backward_kernel
    ptrs = {n: f"*{dt}" for n in ("h_ptr", "w_ptr", "b_ptr", "rh_ptr", "rw_ptr", "rb_ptr")}
    ptrs.update(tgt_ptr="*i64", row_index_ptr="*i64", n_valid_ptr="*i32", inv_temperature="fp32", softcap="fp32",
                filter_eps="fp32")
    for n in ("lse_ptr", "ref_lse_ptr", "ent_ptr", "g_lse_ptr", "g_tgt_ptr", "g_kl_ptr", "g_ent_ptr",
              "dh_ptr", "dw_ptr", "db_ptr"):
        ptrs[n] = "*fp32"
    for use_q, ent, sc, bias in itertools.product([False, True], [False, True], [False, True], [False, True]):
        # the tile filter is compiled into the softcap+bias variants (one switch less to multiply)
        const = dict(HAS_BIAS=bias, HAS_REF_BIAS=bias and use_q, HAS_SOFTCAP=sc, USE_Q=use_q, USE_ENTROPY=ent,
                     FILTER=sc,
                     NEED_DH=True, NEED_DW=True, NEED_DB=bias, UPCAST=False, DOT_PRECISION="ieee",
                     BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n)
        sig = _sig(fn, ptrs)
        for k in const:
            sig[k] = "constexpr"
        yield f"bwd {dt} q={use_q} ent={ent} softcap={sc} bias={bias} filter={sc}", fn, sig, const, cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--all", action="store_true", help="every flag combination (slow); default: a representative subset")
    ap.add_argument("--space", action="store_true",
                    help="instead: every config of the TOKPO_AUTOTUNE tuning space, all features on")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    want = {v: k for k, v in _DT.items()}
    failures = 0
    for name in args.dtypes.split(","):
        dtype = want[name]
        if args.space:
            # the heaviest variant of each kernel (reference, KL, entropy, softcap, bias, filter)
            variants = [list(forward_variants(dtype, target, c))[-1] for c in tuning_space("fwd", dtype)]
            variants += [list(backward_variants(dtype, target, c))[-1] for c in tuning_space("bwd", dtype)]
            variants = [(f"{v[0]} {v[4]}", *v[1:]) for v in variants]
        else:
            variants = list(forward_variants(dtype, target)) + list(backward_variants(dtype, target))
        if not args.all and not args.space:
            # Representative subset: both bias settings with and without softcap, every ref/kl/ent flag.
            variants = [v for v in variants if ("softcap=True" in v[0]) == ("bias=True" in v[0])]
        for label, fn, sig, const, cfg in variants:
            try:
                k = _compile(fn, sig, const, target, cfg)
                md = k.metadata
                if md.shared > SM90_MAX_SHARED:
                    failures += 1
                    print(f"FAIL {label}: needs {md.shared} B of shared memory, sm_90 allows {SM90_MAX_SHARED}")
                    continue
                print(f"ok   {label:58s} smem={md.shared}B")
            except Exception as exc:  # report every variant, then fail
                failures += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
