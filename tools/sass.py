"""Read Hopper machine code (SASS) and check the properties that decide a kernel's speed on sm_90.

``tools/compile_for_cuda.py`` compiles each kernel variant the way the Triton JIT specialises it at
the core-tier shape and hands the result to :func:`analyse`; :func:`check` then asserts on it:

* ``hgmma``: every ``tl.dot`` of the kernel lowered to Hopper's asynchronous warpgroup MMA
  (``ttng.warp_group_dot`` in TTGIR, ``HGMMA`` in SASS); never the Ampere-style ``HMMA``, which
  runs at a fraction of Hopper's tensor-core rate.
* ``loads``: the loads that feed the main loops are wide. A tensor-core kernel (``loads="dot"``)
  must fill shared memory with 16-byte ``cp.async`` (``LDGSTS.*.128``) or TMA (``UTMALDG``) in every
  innermost loop that issues an MMA; a memory-bound kernel (``loads="stream"``) must read the
  operands it streams (named in its ``Rules``: a logit chunk, the hidden and weight rows) in 8- or
  16-byte vectors (``LDG.E.64`` / ``LDG.E.128``, or ``cp.async``), wherever the loads sit: such a
  kernel may have no loop at all (one tile per program), and its per-row side inputs (an lse, a
  target id) are legitimately scalar. Which pointer a load reads comes from the PTX (below). A
  scalar ``LDG.E.U16`` in a main loop is the symptom of a compile that lost the alignment and
  unit-stride facts.
* ``spills``: no local-memory traffic (``STL`` / ``LDL``) inside any loop.
* ``atomics`` (backward kernels only): no ``ATOM*`` / ``RED*`` / TMA reductions, and none of the
  fences (``MEMBAR.*.GPU``) and L1 invalidations (``CCTL.IVALL``) that Triton's default
  acquire-release atomics bring: the backward must be deterministic and free of read-modify-writes.
* ``smem``: at most 227 KiB of shared memory per CTA, sm_90's limit.

Loops are found without a control-flow graph: a branch to a lower address closes a loop whose
body is every instruction between the target and the branch (what ptxas emits for ``scf.for``).

Only the standard library is used here, so the parsing and the checks can be unit tested on
hand-written SASS and PTX (``tests/test_sass_checks.py``) without a compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# sm_90 (H100/H200) resources, from the CUDA programming guide's table of compute capabilities.
SM90_MAX_SHARED_PER_CTA = 232448  # 227 KiB: the most dynamic shared memory one CTA may opt into
SM90_SHARED_PER_SM = 233472  # 228 KiB of shared memory per SM ...
SM90_SHARED_RESERVED_PER_CTA = 1024  # ... of which the system reserves 1 KiB for every resident CTA
SM90_REGS_PER_SM = 65536  # 64 K 32-bit registers per SM
SM90_REG_GRANULE = 8  # registers are allocated per warp in units of 256, i.e. 8 per thread
SM90_MAX_THREADS_PER_SM = 2048
SM90_MAX_CTAS_PER_SM = 32
WARP = 32

# Opcode families (the part before the first dot). REDUX is a warp-wide register reduction, not
# a memory reduction, which is why the atomic families are listed instead of matched by prefix.
ATOMIC_FAMILIES = frozenset({"ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDAS", "UTMAREDG"})
GLOBAL_LOAD_FAMILIES = frozenset({"LDG", "LDGSTS", "UTMALDG"})
LOCAL_MEMORY_FAMILIES = frozenset({"STL", "LDL"})
# Widths a load opcode may carry; a plain ``LDG.E`` / ``LDGSTS.E`` moves 4 bytes.
_WIDTHS = ("128", "64", "U16", "S16", "U8", "S8")
# A streamed operand moves at least 8 bytes per load and thread (LDG.E.64, the floor the issue sets;
# the kernels reach 16, LDG.E.128, at the core tier): a scalar 2- or 4-byte load issues 4 to 8 times
# the load instructions for the same bytes, and that is what an unspecialised compile emits.
MIN_STREAM_LOAD_BYTES = 8

# One SASS instruction as cuobjdump prints it: ``/*0a30*/  @!P0 OPCODE operands ;  /* encoding */``.
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);", re.M)
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
# TTGIR: an MMA that stayed ``tt.dot`` (lowered to mma.sync / FMA) rather than ``warp_group_dot``.
_TT_DOT = re.compile(r"\btt\.dot(?:_scaled)?\b")
_WGMMA = re.compile(r"\bttng\.warp_group_dot\b(?!_wait)")
_LOC_REF = re.compile(r"loc\((#loc\d*)\)\s*$")
_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$", re.M)
_FILE_LOC = re.compile(r'"([^"]+)":(\d+)')


@dataclass(frozen=True)
class Instr:
    """One instruction: address, guard predicate (``@P0``; empty if none), opcode, operands."""

    addr: int
    pred: str
    op: str
    operands: str

    @property
    def family(self) -> str:
        """``LDGSTS.E.BYPASS.128`` -> ``LDGSTS``."""
        return self.op.split(".", 1)[0]

    def __str__(self) -> str:
        pred = f"{self.pred} " if self.pred else ""
        return f"/*{self.addr:04x}*/ {pred}{self.op}{self.operands.rstrip()} ;"


@dataclass(frozen=True)
class Loop:
    """The address range ``[start, end]`` closed by the backward branch at ``end``."""

    start: int
    end: int

    def __contains__(self, addr: int) -> bool:
        return self.start <= addr <= self.end

    def contains_loop(self, other: "Loop") -> bool:
        return other != self and self.start <= other.start and other.end <= self.end


@dataclass
class Analysis:
    """What :func:`check` and the report need from one compiled variant."""

    label: str
    num_warps: int
    regs: int
    stack: int
    smem: int
    instrs: List[Instr]
    dots: int  # tl.dot ops in TTIR
    wgmma_dots: int  # of those, lowered to warp_group_dot in TTGIR
    plain_dots: List[str] = field(default_factory=list)  # source locations of the others
    ptx_loads: List["PtxLoad"] = field(default_factory=list)  # global loads with the pointers they read

    @property
    def loops(self) -> List[Loop]:
        return find_loops(self.instrs)


@dataclass(frozen=True)
class Rules:
    """Which checks apply to a kernel: its load discipline (``"dot"`` or ``"stream"``), the pointer
    parameters it streams (``"stream"`` only: the bulk operands, e.g. a logit chunk, whose loads
    must be vectors) and whether it is a backward kernel (no atomics, no fences)."""

    loads: str = "dot"
    operands: Tuple[str, ...] = ()
    backward: bool = False

    def __post_init__(self) -> None:
        if self.loads not in ("dot", "stream"):
            raise ValueError(f"loads must be 'dot' or 'stream', got {self.loads!r}")
        if (self.loads == "stream") != bool(self.operands):
            raise ValueError("a 'stream' kernel names its streamed operands (and only a stream kernel does)")


@dataclass(frozen=True)
class Failure:
    """A failed check: the variant, the check's name, what is wrong, and the offending lines."""

    label: str
    check: str
    message: str
    lines: Tuple[str, ...] = ()

    # Enough offending lines to see the pattern without burying the other failures.
    MAX_LINES = 8

    def __str__(self) -> str:
        out = [f"FAIL {self.label} [{self.check}]: {self.message}"]
        out += [f"    {line}" for line in self.lines[: self.MAX_LINES]]
        if len(self.lines) > self.MAX_LINES:
            out.append(f"    ... and {len(self.lines) - self.MAX_LINES} more")
        return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Reading a cubin


def cuobjdump() -> str:
    """Path of the cuobjdump shipped in the triton wheel (``TRITON_CUOBJDUMP_PATH`` overrides)."""
    from triton import knobs  # imported late: parsing and checks need no triton

    return knobs.nvidia.cuobjdump.path


def _run_cuobjdump(flag: str, cubin: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        return subprocess.run([cuobjdump(), flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def disassemble(cubin: bytes) -> str:
    """The SASS text of ``cubin``."""
    return _run_cuobjdump("-sass", cubin)


def resource_usage(cubin: bytes) -> Tuple[int, int]:
    """``(registers per thread, stack bytes per thread)`` of the kernel in ``cubin``; the stack
    frame is where ptxas puts spilled registers."""
    match = _RES_USAGE.search(_run_cuobjdump("-res-usage", cubin))
    if match is None:
        raise RuntimeError("cuobjdump -res-usage printed no REG/STACK line")
    return int(match.group(1)), int(match.group(2))


def parse(sass: str) -> List[Instr]:
    """Every instruction of ``sass`` (cuobjdump's text), in address order."""
    return [Instr(int(addr, 16), (pred or "").strip(), op, rest) for addr, pred, op, rest in _INSTR.findall(sass)]


def analyse(label: str, kernel, num_warps: int, params: Sequence[str]) -> Analysis:
    """Facts of a compiled Triton kernel (``triton.compile``'s result: its ``asm`` holds the
    cubin, PTX, TTIR and TTGIR; ``metadata.shared`` the dynamic shared memory). ``params``: the
    names of its runtime (non-constexpr) parameters in order, i.e. the PTX ``.param`` list."""
    cubin = kernel.asm["cubin"]
    regs, stack = resource_usage(cubin)
    ttgir = kernel.asm["ttgir"]
    return Analysis(
        label=label, num_warps=num_warps, regs=regs, stack=stack, smem=kernel.metadata.shared,
        instrs=parse(disassemble(cubin)), dots=len(_TT_DOT.findall(kernel.asm["ttir"])),
        wgmma_dots=len(_WGMMA.findall(ttgir)), plain_dots=plain_dot_locations(ttgir),
        ptx_loads=ptx_global_loads(kernel.asm["ptx"], params),
    )


def plain_dot_locations(ttgir: str) -> List[str]:
    """``file:line`` of every ``tt.dot`` left in TTGIR, i.e. not turned into a warpgroup MMA."""
    defs = dict(_LOC_DEF.findall(ttgir))
    out = []
    for line in ttgir.splitlines():
        if _TT_DOT.search(line) and not line.lstrip().startswith("#"):
            ref = _LOC_REF.search(line)
            out.append(_resolve_loc(ref.group(1), defs) if ref else line.strip()[:120])
    return out


def _resolve_loc(name: str, defs: Dict[str, str], depth: int = 0) -> str:
    """The first ``file:line`` a location alias leads to (aliases nest through callsite/fused)."""
    body = defs.get(name, "")
    found = _FILE_LOC.search(body)
    if found:
        return f"{os.path.basename(found.group(1))}:{found.group(2)}"
    inner = re.search(r"#loc\d*", body)
    # Aliases form a DAG in practice; the depth bound only guards against a malformed dump.
    if inner and depth < 32:
        return _resolve_loc(inner.group(0), defs, depth + 1)
    return name


# ------------------------------------------------------------------------------------------------
# Which pointer a load reads (PTX)
#
# SASS reuses registers, so the pointer parameter behind a load's address is hard to recover there.
# PTX keeps one virtual register per value: a backward slice from a load's address reaches the
# ``ld.param`` of the kernel argument(s) it is computed from. The vector width of a PTX global load
# is the width of the SASS load ptxas emits for it (``ld.global.v4.b32`` -> ``LDG.E.128``): ptxas
# neither merges nor splits global loads, alignment being known only to the front end.

_PTX_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+([^;]*);", re.M)
_PTX_REG = re.compile(r"%[a-z]+\d+")
_PTX_PARAM = re.compile(r"_param_(\d+)\]")
_PTX_LOC = re.compile(r"//\s*(\S+:\d+):\d+\s*$")
_PTX_VECTOR = re.compile(r"\.v(\d+)\.")
_PTX_ELEMENT_BITS = re.compile(r"\.[bsuf](\d+)$")


@dataclass(frozen=True)
class PtxLoad:
    """A global load in PTX: bytes per thread, the pointer parameters its address derives from,
    its source line, and the instruction text."""

    width: int
    params: Tuple[str, ...]
    source: str
    text: str


def _ptx_width(op: str, operands: str) -> int:
    """Bytes one thread moves: ``ld.global.v4.b32`` -> 16; ``cp.async.*`` gives its size operand."""
    if op.startswith("cp.async"):
        size = re.search(r",\s*(0x[0-9a-f]+|\d+)\s*(?:,|$)", operands)
        return int(size.group(1), 0) if size else 0
    lanes = _PTX_VECTOR.search(op + ".")
    bits = _PTX_ELEMENT_BITS.search(op)
    return (int(lanes.group(1)) if lanes else 1) * (int(bits.group(1)) // 8 if bits else 4)


def _split_dest(operands: str) -> Tuple[List[str], str]:
    """``(destination registers, the rest)`` of an instruction's operand text; no destination
    when the first operand is an address (stores) or holds no register (branches)."""
    text = operands.strip()
    if text.startswith("{"):
        head, _, rest = text[1:].partition("}")
        return _PTX_REG.findall(head), rest
    head, _, rest = text.partition(",")
    return (_PTX_REG.findall(head) if not head.startswith("[") else []), rest


def ptx_global_loads(ptx: str, params: Sequence[str]) -> List[PtxLoad]:
    """Every ``ld.global*`` / ``cp.async`` global load of ``ptx`` with the names (from ``params``,
    the kernel's runtime parameters in order) of the pointer arguments its address derives from."""
    sources: Dict[str, List[str]] = {}  # register -> registers it is computed from
    param_of: Dict[str, int] = {}  # register -> parameter index it was loaded from
    loads: List[Tuple[str, str, str, str]] = []  # (op, address text, source line, text)
    source = "?"
    for line in ptx.splitlines():
        loc = _PTX_LOC.search(line) if line.lstrip().startswith(".loc") else None
        if loc:
            source = os.path.basename(loc.group(1))
            continue
        m = _PTX_INSTR.match(line)
        if m is None:
            continue
        op, operands = m.groups()
        dests, rest = _split_dest(operands)
        if op.startswith("ld.param"):
            index = _PTX_PARAM.search(rest)
            for d in dests:
                if index:
                    param_of[d] = int(index.group(1))
            continue
        if op.startswith("ld.global") or (op.startswith("cp.async") and ".global" in op):
            address = rest if op.startswith("ld.") else operands.split("]", 1)[1]
            loads.append((op, address.split("]", 1)[0], source, line.strip()))
        for d in dests:
            sources.setdefault(d, []).extend(_PTX_REG.findall(rest))

    def roots(reg: str, seen: set) -> set:
        if reg in seen:
            return set()
        seen.add(reg)
        out = {param_of[reg]} if reg in param_of else set()
        for src in sources.get(reg, ()):
            out |= roots(src, seen)
        return out

    out = []
    for op, address, src_line, text in loads:
        found: set = set()
        for reg in _PTX_REG.findall(address):
            found |= roots(reg, set())
        names = tuple(sorted(params[i] if i < len(params) else f"param_{i}" for i in found))
        out.append(PtxLoad(_ptx_width(op, address if op.startswith("ld.") else text), names, src_line, text))
    return out


# ------------------------------------------------------------------------------------------------
# Structure and instruction kinds


def find_loops(instrs: Sequence[Instr]) -> List[Loop]:
    """Loops as the ranges closed by backward branches (``BRA`` to a lower address), innermost
    (shortest) first. A predicated backward branch is the loop's exit test; an unpredicated one
    closes a loop whose test sits at the top: both close a loop. The branch-to-itself that
    ptxas pads the code with after the final EXIT is not a loop."""
    loops = set()
    for ins in instrs:
        if ins.family == "BRA":
            target = _BRANCH_TARGET.search(ins.operands)
            if target and int(target.group(1), 16) < ins.addr:
                loops.add(Loop(int(target.group(1), 16), ins.addr))
    return sorted(loops, key=lambda lp: (lp.end - lp.start, lp.start))


def innermost(loops: Iterable[Loop]) -> List[Loop]:
    """The loops that contain no other loop."""
    loops = list(loops)
    return [lp for lp in loops if not any(lp.contains_loop(other) for other in loops)]


def inside(instrs: Sequence[Instr], loops: Iterable[Loop]) -> List[Instr]:
    """The instructions that lie in at least one of ``loops``."""
    loops = list(loops)
    return [ins for ins in instrs if any(ins.addr in lp for lp in loops)]


def load_width(ins: Instr) -> str:
    """Width field of a load opcode (``"128"``, ``"64"``, ``"U16"``, ...; ``"32"`` when none)."""
    parts = ins.op.split(".")[1:]
    return next((w for w in _WIDTHS if w in parts), "32")


def load_kind(ins: Instr) -> Optional[str]:
    """A global load as family + width (``LDGSTS.128``, ``LDG.E.U16``, ``LDG.E`` for 4 bytes,
    ``UTMALDG.2D``); None for any other instruction. Cache hints (``.BYPASS``, ``.EL``, ...) are dropped."""
    if ins.family not in GLOBAL_LOAD_FAMILIES:
        return None
    if ins.family == "UTMALDG":
        return ins.op  # the dimensionality is the interesting part: UTMALDG.2D
    width = load_width(ins)
    suffix = "" if width == "32" else f".{width}"  # no width field: 4 bytes
    return f"LDGSTS{suffix}" if ins.family == "LDGSTS" else f"LDG.E{suffix}"


def mma_shapes(instrs: Iterable[Instr]) -> Counter:
    """``HGMMA.64x128x16`` (and any ``HMMA.*``) shapes with their instruction counts."""
    shapes: Counter = Counter()
    for ins in instrs:
        if ins.family in ("HGMMA", "HMMA"):
            shapes[".".join(ins.op.split(".")[:2])] += 1
    return shapes


def main_loops(instrs: Sequence[Instr]) -> List[Loop]:
    """The innermost loops that issue an MMA: the K-loops whose operand loads must be wide."""
    return [lp for lp in innermost(find_loops(instrs))
            if any(ins.family in ("HGMMA", "HMMA") for ins in instrs if ins.addr in lp)]


def ctas_per_sm(regs: int, num_warps: int, smem: int) -> Tuple[int, int, int]:
    """Resident CTAs per SM ``(limit by registers, limit by shared memory, overall)``."""
    threads = num_warps * WARP
    regs_per_cta = -(-regs // SM90_REG_GRANULE) * SM90_REG_GRANULE * threads
    by_regs = SM90_REGS_PER_SM // regs_per_cta
    by_smem = SM90_SHARED_PER_SM // (smem + SM90_SHARED_RESERVED_PER_CTA)
    overall = min(by_regs, by_smem, SM90_MAX_THREADS_PER_SM // threads, SM90_MAX_CTAS_PER_SM)
    return by_regs, by_smem, overall


# ------------------------------------------------------------------------------------------------
# The checks


def check_hgmma(a: Analysis) -> List[Failure]:
    """Every tl.dot is a warpgroup MMA; no HMMA anywhere."""
    out = []
    hmma = [str(i) for i in a.instrs if i.family == "HMMA"]
    if hmma:
        out.append(Failure(a.label, "hgmma", f"{len(hmma)} HMMA (mma.sync) instructions; Hopper needs HGMMA",
                           tuple(hmma)))
    if a.wgmma_dots != a.dots or a.plain_dots:
        out.append(Failure(a.label, "hgmma", f"{a.dots - a.wgmma_dots} of {a.dots} tl.dot not lowered to a "
                           "warpgroup MMA (TTGIR tt.dot left at these source lines)", tuple(a.plain_dots)))
    elif a.dots and not any(i.family == "HGMMA" for i in a.instrs):
        out.append(Failure(a.label, "hgmma", f"{a.dots} tl.dot in the kernel but no HGMMA in its SASS"))
    return out


def check_loads(a: Analysis, rules: Rules) -> List[Failure]:
    """The loads that feed the kernel are wide (module docstring: the two disciplines)."""
    if rules.loads == "stream":
        return check_operand_loads(a, rules.operands)
    loops = main_loops(a.instrs)
    if not loops:
        return [Failure(a.label, "loads", f"no loop issues an MMA ({a.dots} tl.dot): no main loop found")]

    def ok(ins: Instr) -> bool:
        return ins.family == "UTMALDG" or (ins.family == "LDGSTS" and load_width(ins) == "128")

    bad = [i for i in inside(a.instrs, loops) if load_kind(i) and not ok(i)]
    if not bad:
        return []
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(Counter(load_kind(i) for i in bad).items()))
    return [Failure(a.label, "loads", f"narrow loads in an MMA main loop ({kinds}); expected LDGSTS.*.128 "
                    "or UTMALDG", tuple(str(i) for i in bad))]


def check_operand_loads(a: Analysis, operands: Sequence[str]) -> List[Failure]:
    """A streaming kernel reads each of its streamed ``operands`` in vectors of at least 8 bytes
    (``LDG.E.64`` / ``LDG.E.128``, ``LDGSTS``); it must read at least one of them at all (else the
    table names parameters the kernel no longer has)."""
    mine = [ld for ld in a.ptx_loads if set(ld.params) & set(operands)]
    if not mine:
        return [Failure(a.label, "loads", f"no global load reads the streamed operands {', '.join(operands)}")]
    bad = [ld for ld in mine if ld.width < MIN_STREAM_LOAD_BYTES]
    if not bad:
        return []
    kinds = ", ".join(f"{w} B x{n}" for w, n in sorted(Counter(ld.width for ld in bad).items()))
    return [Failure(a.label, "loads", f"streamed operands read in narrow loads ({kinds}); expected vectors of "
                    f">= {MIN_STREAM_LOAD_BYTES} B (LDG.E.64 / LDG.E.128)",
                    tuple(f"{ld.source} {'/'.join(ld.params)}: {ld.text}" for ld in bad))]


def check_spills(a: Analysis) -> List[Failure]:
    """No local-memory stores or loads inside any loop."""
    bad = [str(i) for i in inside(a.instrs, a.loops) if i.family in LOCAL_MEMORY_FAMILIES]
    if not bad:
        return []
    return [Failure(a.label, "spills", f"{len(bad)} STL/LDL inside loops (stack {a.stack} B)", tuple(bad))]


def is_fence_or_atomic(ins: Instr) -> bool:
    """Atomics, memory reductions, device/system-scope fences and L1 invalidations."""
    if ins.family in ATOMIC_FAMILIES:
        return True
    if ins.family == "MEMBAR":
        return ".GPU" in ins.op or ".SYS" in ins.op
    return ins.op.startswith("CCTL.IVALL")


def check_atomics(a: Analysis) -> List[Failure]:
    """No atomic, reduction or fence in a backward kernel (determinism, no read-modify-write)."""
    bad = [str(i) for i in a.instrs if is_fence_or_atomic(i)]
    if not bad:
        return []
    kinds = ", ".join(f"{k} x{n}" for k, n in sorted(Counter(
        i.op for i in a.instrs if is_fence_or_atomic(i)).items()))
    return [Failure(a.label, "atomics", f"a backward kernel must not use atomics or fences: {kinds}", tuple(bad))]


def check_smem(a: Analysis) -> List[Failure]:
    """Fits sm_90's per-CTA shared memory."""
    if a.smem <= SM90_MAX_SHARED_PER_CTA:
        return []
    return [Failure(a.label, "smem", f"needs {a.smem} B of shared memory, sm_90 allows {SM90_MAX_SHARED_PER_CTA} B")]


def check(a: Analysis, rules: Rules) -> List[Failure]:
    """Every check that applies to a variant under ``rules``."""
    out = check_hgmma(a) + check_loads(a, rules) + check_spills(a) + check_smem(a)
    if rules.backward:
        out += check_atomics(a)
    return out


# ------------------------------------------------------------------------------------------------
# The report


REPORT_HEADER = (f"{'variant':58s} {'regs':>4s} {'stack':>6s} {'smem':>8s}  CTAs/SM (regs/smem)  "
                 "wgmma shapes:count  |  global loads in loops:count")


def report_line(a: Analysis) -> str:
    """One row of ``--report``: registers, spill stack, shared memory, CTAs/SM (limit by registers
    / by shared memory), MMA shapes with counts, and the global-load kinds issued inside loops."""
    by_regs, by_smem, overall = ctas_per_sm(a.regs, a.num_warps, a.smem)
    mmas = " ".join(f"{s}:{n}" for s, n in sorted(mma_shapes(a.instrs).items())) or "-"
    loads = Counter(k for k in map(load_kind, inside(a.instrs, a.loops)) if k)
    loads_text = " ".join(f"{k}:{n}" for k, n in sorted(loads.items())) or "-"
    occupancy = f"{overall} ({by_regs}/{by_smem})"
    return f"{a.label:58s} {a.regs:4d} {a.stack:5d}B {a.smem:7d}B  {occupancy:19s}  {mmas}  |  {loads_text}"
