"""llvmlite plumbing shared by the kernel generators.

Generators build `llvmlite.ir` modules with the helpers here; this module turns them into machine code
for a target: optimised in-process JIT modules that hand out function addresses, assembly text (what
tests read to check the instruction route) and object code (for the AOT artifact).

Targets are taken structurally (`TargetSpec`): kernels know nothing of the backends that define
`lowbit.backends.native.Target`, so the dependency arrows stay `backends → kernels`.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import cffi
import llvmlite.binding as llvm
from llvmlite import ir

from lowbit.errors import TargetError

I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
VOID = ir.VoidType()


class TargetSpec(Protocol):
    """What code generation needs of a target (`lowbit.backends.native.Target` satisfies it)."""

    name: str
    triple: str
    cpu: str
    features: frozenset[str]
    vector_bytes: int
    llvm_features: str

    @property
    def arch(self) -> str: ...


@lru_cache(maxsize=None)
def _initialize() -> None:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()


def _new_target_machine(triple: str, cpu: str, features: str, pic: bool) -> llvm.TargetMachine:
    _initialize()
    try:
        llvm_target = llvm.Target.from_triple(triple)
    except RuntimeError as error:
        raise TargetError(f"LLVM in this llvmlite cannot generate code for {triple}: {error}") from None
    # Position-independent code for objects that are linked into shared libraries later.
    return llvm_target.create_target_machine(cpu=cpu, features=features, opt=3,
                                             reloc="pic" if pic else "default")


_cached_target_machine = lru_cache(maxsize=None)(_new_target_machine)


def target_machine(target: TargetSpec, pic: bool = False) -> llvm.TargetMachine:
    """A shared target machine for optimising and emitting (a JIT engine needs its own: it owns it)."""
    return _cached_target_machine(target.triple, target.cpu, target.llvm_features, pic)


def new_module(name: str, target: TargetSpec) -> ir.Module:
    """An empty IR module with the target's triple and data layout (the optimiser needs both)."""
    module = ir.Module(name=name)
    module.triple = target.triple
    module.data_layout = str(target_machine(target).target_data)
    return module


def declare(module: ir.Module, name: str, result: ir.Type, *params: ir.Type) -> ir.Function:
    """The function `name` in `module` (an intrinsic or a helper), declared once."""
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    return ir.Function(module, ir.FunctionType(result, params), name=name)


def vector(element: ir.Type, count: int) -> ir.VectorType:
    return ir.VectorType(element, count)


def splat(builder: ir.IRBuilder, scalar: ir.Value, count: int) -> ir.Value:
    """`scalar` in every lane of a `count`-lane vector (LLVM selects a broadcast)."""
    vec_type = vector(scalar.type, count)
    single = builder.insert_element(ir.Constant(vec_type, ir.Undefined), scalar, ir.Constant(I32, 0))
    return builder.shuffle_vector(single, ir.Constant(vec_type, ir.Undefined),
                                  ir.Constant(vector(I32, count), [0] * count))


def const_vector(element: ir.Type, values: Sequence[int]) -> ir.Constant:
    return ir.Constant(vector(element, len(values)), list(values))


def pointer_at(builder: ir.IRBuilder, base: ir.Value, byte_offset: ir.Value | int,
               pointee: ir.Type) -> ir.Value:
    """`base + byte_offset` (bytes, i8* base) as a pointer to `pointee`."""
    if isinstance(byte_offset, int):
        byte_offset = ir.Constant(I64, byte_offset)
    return builder.bitcast(builder.gep(base, [byte_offset]), pointee.as_pointer())


def counted_loop(builder: ir.IRBuilder, count: ir.Value, name: str, carried: Sequence[ir.Value] = (),
                 body=None) -> list[ir.Value]:
    """Emit `for i in range(count)` (count ≥ 0, i64) around `body(builder, i, carried) -> carried`.

    `carried` are loop-carried values (phis); the body returns their next values (None when there
    are none) and their final values are returned. The builder is left after the loop.
    """
    entry = builder.block
    head = builder.append_basic_block(f"{name}.head")
    loop = builder.append_basic_block(f"{name}.body")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(head)
    builder.position_at_end(head)
    index = builder.phi(I64, name=f"{name}.i")
    phis = [builder.phi(value.type) for value in carried]
    index.add_incoming(ir.Constant(I64, 0), entry)
    for phi, value in zip(phis, carried):
        phi.add_incoming(value, entry)
    builder.cbranch(builder.icmp_signed("<", index, count), loop, done)
    builder.position_at_end(loop)
    updated = body(builder, index, list(phis)) if body else None
    updated = phis if updated is None else list(updated)
    latch = builder.block
    index.add_incoming(builder.add(index, ir.Constant(I64, 1)), latch)
    for phi, value in zip(phis, updated):
        phi.add_incoming(value, latch)
    builder.branch(head)
    builder.position_at_end(done)
    return list(phis)


def compile_module(module: ir.Module, target: TargetSpec, pic: bool = False,
                   hand_vectorized: bool = False) -> llvm.ModuleRef:
    """Parse, verify and optimise (O3, no fast-math: kernels are integer or exact) `module`.

    `hand_vectorized`: the generator already chose vectors and unrolling, so LLVM's loop unroller and
    vectorizers are skipped; on such code they only multiply compile time (2–3× on GEMM tiles).
    """
    _initialize()
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    options = llvm.PipelineTuningOptions(speed_level=3)
    if hand_vectorized:
        options.loop_unrolling = options.loop_vectorization = options.slp_vectorization = False
    builder = llvm.create_pass_builder(target_machine(target, pic), options)
    builder.getModulePassManager().run(parsed, builder)
    return parsed


def emit_assembly(module: ir.Module, target: TargetSpec, hand_vectorized: bool = False) -> str:
    return target_machine(target).emit_assembly(compile_module(module, target, False, hand_vectorized))


def emit_object(module: ir.Module, target: TargetSpec, hand_vectorized: bool = False) -> bytes:
    compiled = compile_module(module, target, True, hand_vectorized)
    return target_machine(target, pic=True).emit_object(compiled)


@dataclass(frozen=True)
class HostCpu:
    """This machine as LLVM sees it."""

    triple: str
    cpu: str
    features: frozenset[str]  # every feature LLVM reports as present
    llvm_features: str  # the full +/- string, for code generation

    @property
    def arch(self) -> str:
        return self.triple.split("-", 1)[0]


@lru_cache(maxsize=None)
def host_cpu() -> HostCpu:
    detected = llvm.get_host_cpu_features()
    features = frozenset(name for name, present in detected.items() if present)
    triple = llvm.get_process_triple()
    if triple.startswith(("aarch64", "arm64")):
        features |= {"neon"}  # Advanced SIMD is mandatory in ARMv8-A; LLVM may not list it
    return HostCpu(triple, llvm.get_host_cpu_name(), features, detected.flatten())


def check_runs_here(target: TargetSpec, host: TargetSpec | HostCpu | None = None) -> None:
    """Raise TargetError unless code for `target` can run in this process (on `host`, default detected)."""
    host = host or host_cpu()
    if target.arch != host.arch or not target.features <= host.features:
        missing = sorted(target.features - host.features) if target.arch == host.arch else []
        why = f"missing {', '.join(missing)}" if missing else f"it is {target.arch}, this is {host.arch}"
        raise TargetError(f"code for target {target.name} cannot run on this machine ({host.cpu}): {why}")
    if "amx-tile" in target.features:
        enable_amx()


def runs_here(target: TargetSpec) -> bool:
    """Whether code for `target` can run in this process (`check_runs_here` without the error)."""
    try:
        check_runs_here(target)
    except TargetError:
        return False
    return True


# Linux (5.16+) hands AMX tile state to a process only on request, before its first tile instruction.
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


@lru_cache(maxsize=None)
def enable_amx() -> None:
    """Ask the kernel for this process's AMX tile state (arch_prctl); TargetError if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        raise TargetError(f"the operating system refused this process AMX tile state (arch_prctl "
                          f"ARCH_REQ_XCOMP_PERM: errno {ctypes.get_errno()}); compile for a target without "
                          f"amx-tile (e.g. x86_64-avx512vnni)")


class JitModule:
    """A module compiled into this process; holds the engine so its code stays mapped."""

    def __init__(self, module: ir.Module, target: TargetSpec, host: TargetSpec | None = None,
                 hand_vectorized: bool = False) -> None:
        check_runs_here(target, host)
        start = time.perf_counter()
        compiled = compile_module(module, target, False, hand_vectorized)
        machine = _new_target_machine(target.triple, target.cpu, target.llvm_features, False)
        self._engine = llvm.create_mcjit_compiler(compiled, machine)
        self._engine.finalize_object()
        self.compile_seconds = time.perf_counter() - start

    @classmethod
    def from_object(cls, code: bytes, target: TargetSpec, host: TargetSpec | None = None) -> "JitModule":
        """Load object code made by `emit_object` for `target` (e.g. from a cache) into this process."""
        check_runs_here(target, host)
        jit = cls.__new__(cls)
        start = time.perf_counter()
        machine = _new_target_machine(target.triple, target.cpu, target.llvm_features, False)
        jit._engine = llvm.create_mcjit_compiler(llvm.parse_assembly(f'target triple = "{target.triple}"'), machine)
        jit._object = llvm.ObjectFileRef.from_data(code)
        jit._engine.add_object_file(jit._object)
        jit._engine.finalize_object()
        jit.compile_seconds = time.perf_counter() - start
        return jit

    def address(self, name: str) -> int:
        address = self._engine.get_function_address(name)
        if not address:
            raise KeyError(f"no function '{name}' in the compiled module")
        return address

    def function(self, name: str, result, *params) -> ctypes._CFuncPtr:
        """The compiled `name` as a ctypes function; calls release the GIL."""
        return ctypes.CFUNCTYPE(result, *params)(self.address(name))

    def cffi_function(self, name: str, signature: str):
        """The compiled `name` as a cffi function of C type `signature` (`"void(*)(char *, int64_t)"`).

        Cheaper than `function` for calls from Python with numpy buffers (≈ 3 µs instead of ≈ 8 µs
        with `FFI.from_buffer`); it releases the GIL just the same.
        """
        return FFI.cast(signature, self.address(name))


FFI = cffi.FFI()  # ABI mode only: casts, buffers and calls through addresses


# -- vector loops over static extents (pooling, reductions, normalisation, resize) -------------------
F16 = ir.HalfType()
F32 = ir.FloatType()
F64 = ir.DoubleType()


def element_type(dtype) -> ir.Type:
    """The LLVM type that stores one element of a `lowbit.ir.DType` (bool as i8, sub-byte types one per byte)."""
    if dtype.is_float:
        return {16: F16, 32: F32, 64: F64}[dtype.bits]
    return ir.IntType(max(dtype.bits, 8))


def element_bytes(element: ir.Type) -> int:
    if isinstance(element, ir.IntType):
        return element.width // 8
    return {ir.HalfType: 2, ir.FloatType: 4, ir.DoubleType: 8}[type(element)]


def vector_lanes(target: TargetSpec, element: ir.Type) -> int:
    """Elements of `element` in one vector register of `target`."""
    return max(1, target.vector_bytes // element_bytes(element))


def type_suffix(value_type: ir.Type) -> str:
    """The overload suffix of an intrinsic on `value_type` (`f32`, `v16f32`, `v8i16`)."""
    if isinstance(value_type, ir.VectorType):
        return f"v{value_type.count}{type_suffix(value_type.element)}"
    if isinstance(value_type, ir.IntType):
        return f"i{value_type.width}"
    return f"f{element_bytes(value_type) * 8}"


def intrinsic(builder: ir.IRBuilder, name: str, *args: ir.Value) -> ir.Value:
    """`name.<suffix of the first operand's type>(args)` for an intrinsic whose result has that type too
    (`intrinsic(b, "llvm.sqrt", v)` → `llvm.sqrt.v16f32`)."""
    value_type = args[0].type
    function = declare(builder.module, f"{name}.{type_suffix(value_type)}", value_type,
                       *(arg.type for arg in args))
    return builder.call(function, list(args))


def load_vector(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, count: int) -> ir.Value:
    """`count` consecutive elements from `base[index]` (`base` a typed pointer) as a vector; unaligned."""
    element = base.type.pointee
    pointer = builder.bitcast(builder.gep(base, [index]), vector(element, count).as_pointer())
    return builder.load(pointer, align=element_bytes(element))


def store_vector(builder: ir.IRBuilder, value: ir.Value, base: ir.Value, index: ir.Value) -> None:
    element = base.type.pointee
    pointer = builder.bitcast(builder.gep(base, [index]), value.type.as_pointer())
    builder.store(value, pointer, align=element_bytes(element))


def static_loop(builder: ir.IRBuilder, count: int, name: str, body, carried: Sequence[ir.Value] = ()
                ) -> list[ir.Value]:
    """`counted_loop` for a count known now; a count of 1 emits the body once, without a loop."""
    if count == 1:
        return list(body(builder, ir.Constant(I64, 0), list(carried)))
    return counted_loop(builder, ir.Constant(I64, count), name, carried, body)


def strip_mine(builder: ir.IRBuilder, start: ir.Value, count: int, lanes: int, name: str, body,
               overlap: bool = False) -> None:
    """`body(builder, index, width)` over the elements [start, start + count): a loop of `lanes`-wide
    steps, then the remainder as straight-line pieces of halving power-of-two widths (no scalar loop).

    `overlap`: the body is idempotent (it writes what it computes from data it does not write), so the
    remainder is one more full-width step ending at the last element, overlapping the previous one.
    """
    if overlap and count:
        width = min(lanes, 1 << (count.bit_length() - 1))
        full = count // width
        strip_mine(builder, start, full * width, width, name, body)
        if count % width:
            body(builder, builder.add(start, ir.Constant(I64, count - width)), width)
        return
    full = count // lanes
    if full:
        def step(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
            body(b, b.add(start, b.mul(i, ir.Constant(I64, lanes))), lanes)
            return carried

        static_loop(builder, full, name, step)
    offset, width = full * lanes, lanes
    while offset < count:
        width = min(width, 1 << ((count - offset).bit_length() - 1))
        body(builder, builder.add(start, ir.Constant(I64, offset)), width)
        offset += width


def tree_reduce(builder: ir.IRBuilder, value: ir.Value, combine) -> ir.Value:
    """Combine the lanes of a power-of-two-wide vector pairwise into a one-lane vector."""
    while value.type.count > 1:
        half = value.type.count // 2
        undefined = ir.Constant(value.type, ir.Undefined)
        low = builder.shuffle_vector(value, undefined, const_vector(I32, range(half)))
        high = builder.shuffle_vector(value, undefined, const_vector(I32, range(half, 2 * half)))
        value = combine(builder, low, high)
    return value


def global_table(module: ir.Module, name: str, element: ir.Type, values: Sequence) -> ir.Value:
    """A read-only table in the module (index maps, weights known at generation time); a typed pointer."""
    array_type = ir.ArrayType(element, len(values))
    table = ir.GlobalVariable(module, array_type, name)
    table.global_constant = True
    table.linkage = "internal"
    table.initializer = ir.Constant(array_type, [ir.Constant(element, v) for v in values])
    return table.gep([ir.Constant(I32, 0), ir.Constant(I32, 0)])


# -- partial vectors (edges of static extents) ---------------------------------------------------------
def _pieces(count: int) -> list[tuple[int, int]]:
    """(offset, width) power-of-two pieces, widest first, that cover [0, count)."""
    pieces, offset = [], 0
    while offset < count:
        width = 1 << ((count - offset).bit_length() - 1)
        pieces.append((offset, width))
        offset += width
    return pieces


def store_partial(builder: ir.IRBuilder, value: ir.Value, base: ir.Value, count: int) -> None:
    """Store the first `count` lanes of vector `value` at `base` (a typed element pointer), touching no
    element past them: one store when every lane counts, else power-of-two pieces."""
    lanes = value.type.count
    if count >= lanes:
        store_vector(builder, value, base, ir.Constant(I64, 0))
        return
    undefined = ir.Constant(value.type, ir.Undefined)
    for offset, width in _pieces(count):
        piece = builder.shuffle_vector(value, undefined, const_vector(I32, range(offset, offset + width)))
        if width == 1:
            builder.store(builder.extract_element(piece, ir.Constant(I32, 0)),
                          builder.gep(base, [ir.Constant(I64, offset)]), align=element_bytes(base.type.pointee))
        else:
            store_vector(builder, piece, base, ir.Constant(I64, offset))


def load_partial(builder: ir.IRBuilder, base: ir.Value, count: int, lanes: int) -> ir.Value:
    """A `lanes`-wide vector of the `count` elements at `base` (a typed element pointer), the other lanes 0;
    reads no element past them."""
    if count >= lanes:
        return load_vector(builder, base, ir.Constant(I64, 0), lanes)
    result = ir.Constant(vector(base.type.pointee, lanes), None)
    for offset, width in _pieces(count):
        piece = load_vector(builder, base, ir.Constant(I64, offset), width)
        wide = builder.shuffle_vector(piece, ir.Constant(piece.type, ir.Undefined),
                                      const_vector(I32, [min(i, width - 1) for i in range(lanes)]))
        mask = [lanes + i - offset if offset <= i < offset + width else i for i in range(lanes)]
        result = builder.shuffle_vector(result, wide, const_vector(I32, mask))
    return result


# -- object code for linking (AOT artifacts) --------------------------------------------------------------
@lru_cache(maxsize=None)
def _linking_target_machine(triple: str, cpu: str, features: str) -> llvm.TargetMachine:
    _initialize()
    # The small code model: target machines made for the JIT default to the large one on x86-64, which
    # addresses every call and table through 64-bit GOT offsets.
    return llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3,
                                                                 reloc="pic", codemodel="small")


def emit_linkable_object(module: ir.Module, target: TargetSpec, hand_vectorized: bool = False) -> bytes:
    """Position-independent object code (small code model) to link into a shared library or program."""
    compiled = compile_module(module, target, True, hand_vectorized)
    return _linking_target_machine(target.triple, target.cpu, target.llvm_features).emit_object(compiled)


def masked_load(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, mask: Sequence[bool],
                passthru: ir.Value) -> ir.Value:
    """`len(mask)` consecutive elements from `base[index]`, reading only where `mask` (known now) is set;
    the other lanes come from `passthru`. Lanes off the mask may lie outside any allocation."""
    element = base.type.pointee
    vector_type = vector(element, len(mask))
    suffix = type_suffix(vector_type)
    function = declare(builder.module, f"llvm.masked.load.{suffix}.p0{suffix}", vector_type,
                       vector_type.as_pointer(), I32, vector(I1, len(mask)), vector_type)
    pointer = builder.bitcast(builder.gep(base, [index]), vector_type.as_pointer())
    lanes = ir.Constant(vector(I1, len(mask)), [int(bool(m)) for m in mask])
    return builder.call(function, [pointer, ir.Constant(I32, element_bytes(element)), lanes, passthru])
