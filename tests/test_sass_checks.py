"""The SASS/PTX parsing and the machine-code checks of ``tools/sass.py``, on hand-written code.

``tests/test_cuda_codegen.py`` runs the checks on the real kernels (slow: it compiles them); these
tests pin what each check accepts and rejects without a compile, so a check that could never fail,
or that fails on legitimate code (``REDUX`` is no atomic, a self-branch is no loop), shows here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "tokpo_tools_sass", Path(__file__).resolve().parents[1] / "tools" / "sass.py")
sass = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = sass  # dataclasses resolve their module through sys.modules
_SPEC.loader.exec_module(sass)


def _sass(*lines: str) -> str:
    """cuobjdump-style text: ``(address, instruction)`` lines with the encoding comment it prints."""
    out = ["\tcode for sm_90a", "\t\tFunction : k"]
    for addr, text in lines:
        out.append(f"        /*{addr:04x}*/                   {text} ;   /* 0x000000000000000000 */")
        out.append("                                                      /* 0x000fe20000000a00 */")
    return "\n".join(out)


# A kernel with a K-loop (0x40 .. 0x90, closed by the predicated backward branch at 0x90) nested in
# an outer loop (0x20 .. 0xb0), and the branch-to-itself ptxas pads the end of the code with.
_LOOPS = [
    (0x00, "LDC R1, c[0x0][0x28]"),
    (0x10, "LDG.E.64 R4, desc[UR4][R2.64]"),
    (0x20, "LDG.E R6, desc[UR4][R2.64]"),
    (0x30, "BAR.SYNC.DEFER_BLOCKING 0x0"),
    (0x40, "LDGSTS.E.BYPASS.128 [R3], desc[UR4][R8.64]"),
    (0x50, "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0"),
    (0x60, "REDUX.MAX.S32 UR5, R7"),
    (0x70, "ISETP.GE.AND P0, PT, R9, R10, PT"),
    (0x80, "NOP"),
    (0x90, "@!P0 BRA 0x40"),
    (0xa0, "STL [R1+0x8], R13"),
    (0xb0, "@P1 BRA 0x20"),
    (0xc0, "EXIT"),
    (0xd0, "BRA 0xd0"),
]


def _analysis(lines, *, dots=1, wgmma=1, plain=(), regs=128, stack=0, smem=98304, ptx_loads=()):
    return sass.Analysis(label="k bf16 default", num_warps=8, regs=regs, stack=stack, smem=smem,
                         instrs=sass.parse(_sass(*lines)), dots=dots, wgmma_dots=wgmma, plain_dots=list(plain),
                         ptx_loads=list(ptx_loads))


def test_parse_reads_address_predicate_opcode_and_operands():
    ins = sass.parse(_sass(*_LOOPS))
    assert len(ins) == len(_LOOPS)
    hgmma = ins[5]
    assert (hgmma.addr, hgmma.op, hgmma.family) == (0x50, "HGMMA.64x128x16.F32.BF16", "HGMMA")
    branch = ins[9]
    assert (branch.pred, branch.op, branch.operands.strip()) == ("@!P0", "BRA", "0x40")
    assert str(branch) == "/*0090*/ @!P0 BRA 0x40 ;"


def test_loops_come_from_backward_branches_innermost_first():
    ins = sass.parse(_sass(*_LOOPS))
    loops = sass.find_loops(ins)
    assert loops == [sass.Loop(0x40, 0x90), sass.Loop(0x20, 0xb0)]  # the self-branch at 0xd0 is no loop
    assert sass.innermost(loops) == [sass.Loop(0x40, 0x90)]
    assert sass.main_loops(ins) == [sass.Loop(0x40, 0x90)]
    assert [i.addr for i in sass.inside(ins, loops)] == list(range(0x20, 0xb1, 0x10))


@pytest.mark.parametrize("op, kind", [
    ("LDGSTS.E.BYPASS.128", "LDGSTS.128"), ("LDGSTS.E", "LDGSTS"), ("LDG.E.128.CONSTANT", "LDG.E.128"),
    ("LDG.E.64", "LDG.E.64"), ("LDG.E.U16", "LDG.E.U16"), ("LDG.E", "LDG.E"), ("UTMALDG.2D", "UTMALDG.2D"),
    ("LDS.128", None), ("STG.E.128", None),
])
def test_load_kind(op, kind):
    assert sass.load_kind(sass.Instr(0, "", op, " R0, [R2]")) == kind


def test_clean_kernel_passes_every_check():
    a = _analysis([line for line in _LOOPS if not line[1].startswith("STL")])
    assert sass.check(a, sass.Rules(loads="dot", backward=True)) == []


def test_spill_inside_a_loop_fails_and_names_the_instruction():
    (failure,) = sass.check(_analysis(_LOOPS), sass.Rules())
    assert (failure.label, failure.check) == ("k bf16 default", "spills")
    assert "/*00a0*/ STL [R1+0x8], R13 ;" in str(failure) and str(failure).startswith("FAIL k bf16 default [spills]")


def test_spill_outside_loops_is_allowed():
    lines = [line for line in _LOOPS if not line[1].startswith("STL")] + [(0xe0, "STL [R1], R2")]
    assert sass.check_spills(_analysis(lines)) == []


@pytest.mark.parametrize("op", ["LDG.E.U16 R5, desc[UR4][R8.64]", "LDG.E.64 R4, desc[UR4][R8.64]",
                                "LDGSTS.E [R3], desc[UR4][R8.64]"])
def test_narrow_load_in_the_mma_loop_fails(op):
    lines = [line if line[0] != 0x40 else (0x40, op) for line in _LOOPS if not line[1].startswith("STL")]
    (failure,) = sass.check(_analysis(lines), sass.Rules())
    assert failure.check == "loads" and f"/*0040*/ {op} ;" in failure.lines


def test_tma_load_in_the_mma_loop_passes():
    lines = [line if line[0] != 0x40 else (0x40, "UTMALDG.2D [UR8], [UR4]")
             for line in _LOOPS if not line[1].startswith("STL")]
    assert sass.check_loads(_analysis(lines), sass.Rules()) == []


def test_dot_kernel_without_an_mma_loop_fails():
    lines = [(0x00, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24"), (0x10, "EXIT")]
    (failure,) = sass.check_loads(_analysis(lines), sass.Rules())
    assert "no main loop" in failure.message


def test_hmma_and_plain_dots_fail():
    lines = [line if line[0] != 0x50 else (0x50, "HMMA.16816.F32.BF16 R24, R4, R8, R24")
             for line in _LOOPS if not line[1].startswith("STL")]
    failures = sass.check_hgmma(_analysis(lines, dots=2, wgmma=1, plain=("dz_chunk.py:42",)))
    assert [f.check for f in failures] == ["hgmma", "hgmma"]
    assert "/*0050*/ HMMA.16816.F32.BF16 R24, R4, R8, R24 ;" in failures[0].lines
    assert failures[1].lines == ("dz_chunk.py:42",) and "1 of 2 tl.dot" in failures[1].message


def test_dot_without_hgmma_in_sass_fails():
    lines = [line for line in _LOOPS if "HGMMA" not in line[1] and not line[1].startswith("STL")]
    assert [f.check for f in sass.check_hgmma(_analysis(lines))] == ["hgmma"]


@pytest.mark.parametrize("op", ["ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, desc[UR12][R28.64], R40",
                                "REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5",
                                "MEMBAR.ALL.GPU", "CCTL.IVALL", "ATOMS.ADD R0, [R2], R3"])
def test_atomics_and_fences_fail_in_a_backward_kernel(op):
    lines = [line for line in _LOOPS if not line[1].startswith("STL")] + [(0xe0, op)]
    rules = sass.Rules(backward=True)
    (failure,) = sass.check(_analysis(lines), rules)
    assert failure.check == "atomics" and failure.lines == (f"/*00e0*/ {op} ;",)
    # A forward kernel may use them (only the backward must be deterministic and fence-free).
    assert sass.check(_analysis(lines), sass.Rules(backward=False)) == []


def test_redux_is_not_an_atomic():
    a = _analysis([line for line in _LOOPS if not line[1].startswith("STL")])
    assert any(i.family == "REDUX" for i in a.instrs)
    assert sass.check_atomics(a) == []


def test_shared_memory_limit_is_227_kib():
    lines = [line for line in _LOOPS if not line[1].startswith("STL")]
    assert sass.check_smem(_analysis(lines, smem=232448)) == []
    (failure,) = sass.check_smem(_analysis(lines, smem=232449))
    assert "232449 B" in failure.message


@pytest.mark.parametrize("regs, warps, smem, expected", [
    (128, 8, 98304, (2, 2, 2)),  # 128·256 = 32 K registers; 96 KiB + 1 KiB reserved fits twice in 228 KiB
    (255, 8, 98304, (1, 2, 1)),  # 255 rounds up to 256 registers per thread
    (48, 4, 128, (10, 202, 10)),  # 48·128 = 6 K registers: 10 CTAs; 1 KiB reserved per CTA bounds smem at 202
    (32, 1, 0, (64, 228, 32)),  # at most 32 CTAs per SM whatever else fits
])
def test_ctas_per_sm(regs, warps, smem, expected):
    assert sass.ctas_per_sm(regs, warps, smem) == expected


_PTX = """
	ld.param.b64 	%rd41, [k_param_0];
	ld.param.b64 	%rd42, [k_param_2];
	.loc	1 42 12                         // dz_chunk.py:42:12
	ld.param.s32 	%rd53, [k_param_3];
	mad.wide.s32 	%rd2, %r70, 8, %rd42;
	@%p1 ld.global.b64 { %rd1 }, [ %rd2 + 0 ];
	mul.lo.s64 	%rd60, %rd1, %rd53;
	add.s64 	%rd9, %rd41, %rd60;
	.loc	1 123 11                        // dz_chunk.py:123:11
	@%p3 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd9 + 0 ];
	@%p3 ld.global.b32 { %r5 }, [ %rd9 + 16 ];
	st.global.b32 [ %rd9 + 0 ], %r5;
"""


def test_ptx_loads_know_the_pointers_they_read():
    loads = sass.ptx_global_loads(_PTX, ["z_ptr", "zr_ptr", "row_index_ptr", "stride_zn"])
    assert [(ld.width, ld.params, ld.source) for ld in loads] == [
        (8, ("row_index_ptr",), "dz_chunk.py:42"),
        (16, ("row_index_ptr", "stride_zn", "z_ptr"), "dz_chunk.py:123"),
        (4, ("row_index_ptr", "stride_zn", "z_ptr"), "dz_chunk.py:123"),
    ]


def test_streamed_operand_loaded_narrow_fails():
    loads = sass.ptx_global_loads(_PTX, ["z_ptr", "zr_ptr", "row_index_ptr", "stride_zn"])
    a = _analysis([(0x00, "EXIT")], dots=0, wgmma=0, ptx_loads=loads)
    (failure,) = sass.check_loads(a, sass.Rules(loads="stream", operands=("z_ptr", "zr_ptr")))
    assert "4 B x1" in failure.message
    assert failure.lines == (
        "dz_chunk.py:123 row_index_ptr/stride_zn/z_ptr: @%p3 ld.global.b32 { %r5 }, [ %rd9 + 16 ];",)
    # Without the narrow load, z's 16-byte load passes (row_index's load is no streamed operand).
    assert sass.check_loads(sass.Analysis(**{**a.__dict__, "ptx_loads": loads[:2]}),
                            sass.Rules(loads="stream", operands=("z_ptr",))) == []


def test_stream_kernel_that_reads_none_of_its_operands_fails():
    loads = sass.ptx_global_loads(_PTX, ["z_ptr", "zr_ptr", "row_index_ptr", "stride_zn"])
    a = _analysis([(0x00, "EXIT")], dots=0, wgmma=0, ptx_loads=loads)
    (failure,) = sass.check_loads(a, sass.Rules(loads="stream", operands=("h_ptr",)))
    assert "no global load reads the streamed operands h_ptr" in failure.message


def test_rules_refuse_a_stream_kernel_without_operands():
    with pytest.raises(ValueError, match="streamed operands"):
        sass.Rules(loads="stream")
    with pytest.raises(ValueError, match="'dot' or 'stream'"):
        sass.Rules(loads="vector")


def test_report_line_lists_resources_mma_shapes_and_loop_loads():
    line = sass.report_line(_analysis(_LOOPS, regs=128, stack=8, smem=98304))
    assert "k bf16 default" in line and " 128 " in line and "8B" in line and "98304B" in line
    assert "2 (2/2)" in line and "HGMMA.64x128x16:1" in line
    assert "LDG.E:1" in line and "LDGSTS.128:1" in line and "LDG.E.64" not in line  # 0x10 is outside the loops
