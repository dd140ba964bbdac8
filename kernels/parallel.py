"""Intra-op parallelism: how a kernel shares its work between threads, and the thread team that runs a
model's calls.

Kernel convention. A kernel that can split its work takes two trailing `i32` arguments `(thread, threads)`
after its buffer pointers and does its share of its outermost independent work units (`share`,
`for_units`): contiguous ranges whose sizes differ by at most one. Only independent outputs are split
(never a reduction), so the result is bit-identical for every thread count. Scratch memory a parallel
kernel writes is per thread: the lowering reserves `thread_stride(nbytes)` bytes per thread and the
kernel works in `thread_scratch(...)`. A kernel must be correct for any `threads` at run time (the team
may start fewer threads than the model was compiled for, see below).

The team (`emit_team_entry`). The model's entry point runs one body function on the calling thread and
on `threads - 1` threads it starts with `pthread_create` for this run and joins before returning; the
body calls every kernel, parallel ones on all threads, the others on thread 0, with `barrier` between
dependent calls. Threads are started per run rather than kept in a pool: a pool is process-wide state
that outlives neither the JIT's code nor a `dlclose`d artifact safely, and would serialise concurrent
runs of one model; per-run threads keep every run independent (its team lives on its own stack) at the
price of starting them, about 10-30 µs, which the compiler avoids for models whose parallel work is
small (it then compiles a single-threaded model). A thread that cannot be started is no error: the run
goes on with the threads it has. Shares are fixed, not claimed at run time: a thread the OS deschedules
(more threads than free cores) holds up the whole call, so `num_threads` should not exceed the cores
free for the model.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

from llvmlite import ir

from lowbit.kernels import llvm as ll
from lowbit.kernels.llvm import I8, I32, I64, VOID

ALIGNMENT = 64  # per-thread scratch starts on a cache line of its own: no false sharing
SPIN_PAUSES = 256  # pause instructions before a waiting thread yields its CPU (about 1-15 µs)
BYTE_PTR = I8.as_pointer()


# -- the kernel side -------------------------------------------------------------------------------------
def thread_stride(nbytes: int) -> int:
    """Bytes between two threads' parts of a per-thread scratch buffer of `nbytes` per thread."""
    return max(-(-int(nbytes) // ALIGNMENT) * ALIGNMENT, ALIGNMENT)


def new_parallel_kernel(module: ir.Module, name: str, buffers: int) -> tuple[ir.Function, ir.IRBuilder,
                                                                                ir.Value, ir.Value]:
    """An internal `void name(i8* noalias × buffers, i32 thread, i32 threads)`, a builder at its entry,
    and its (thread, threads) arguments."""
    function = ir.Function(module, ir.FunctionType(VOID, [BYTE_PTR] * buffers + [I32, I32]), name)
    function.linkage = "internal"
    for arg in function.args[:buffers]:
        arg.add_attribute("noalias")
    return function, ir.IRBuilder(function.append_basic_block("entry")), *function.args[buffers:]


def share(builder: ir.IRBuilder, thread: ir.Value, threads: ir.Value, count: int | ir.Value
          ) -> tuple[ir.Value, ir.Value]:
    """[begin, end) (i64) of `thread`'s part of `count` units: count·t/threads .. count·(t+1)/threads."""
    count = ir.Constant(I64, count) if isinstance(count, int) else count
    t, n = builder.zext(thread, I64), builder.zext(threads, I64)
    begin = builder.udiv(builder.mul(count, t), n)
    end = builder.udiv(builder.mul(count, builder.add(t, ir.Constant(I64, 1))), n)
    return begin, end


def thread_scratch(builder: ir.IRBuilder, scratch: ir.Value, thread: ir.Value, nbytes: int) -> ir.Value:
    """`thread`'s part of a per-thread scratch buffer of `nbytes` per thread."""
    offset = builder.mul(builder.zext(thread, I64), ir.Constant(I64, thread_stride(nbytes)))
    return builder.gep(scratch, [offset])


Prepare = Callable[[ir.IRBuilder, list[ir.Value]], None]


def for_units(builder: ir.IRBuilder, thread: ir.Value, threads: ir.Value, extents: Sequence[int], name: str,
              body: Callable[[ir.IRBuilder, list[ir.Value]], None],
              prepare: Mapping[int, Prepare] | None = None) -> None:
    """body(builder, [i0, i1, ...]) (i64 indices) for this thread's share of the units of the grid
    `extents` (row-major: the last index changes fastest, so a thread's units share leading indices).

    `prepare[d](builder, indices[:d + 1])` runs before the body whenever indices 0..d differ from the
    previous unit of this thread (and before its first): per-thread set-up that several units share,
    such as copying an image into the thread's scratch or packing a panel its units all read;
    `prepare[-1](builder, [])` runs once before the first unit (a thread without units skips it).
    """
    prepare = dict(prepare or {})
    total = math.prod(extents)
    if total == 0:
        return
    begin, end = share(builder, thread, threads, total)
    if -1 in prepare:
        with builder.if_then(builder.icmp_unsigned("<", begin, end)):
            prepare[-1](builder, [])
    minus_one = ir.Constant(I64, -1)

    def unit(b: ir.IRBuilder, i: ir.Value, previous: list[ir.Value]) -> list[ir.Value]:
        index, digits, inner = b.add(begin, i), [], 1
        for extent in reversed(extents):
            digits.append(b.urem(b.udiv(index, ir.Constant(I64, inner)), ir.Constant(I64, extent))
                          if extent > 1 else ir.Constant(I64, 0))
            inner *= extent
        digits.reverse()
        changed = ir.Constant(ll.I1, 0)
        for depth, (digit, before) in enumerate(zip(digits, previous)):
            changed = b.or_(changed, b.icmp_signed("!=", digit, before))
            if depth in prepare:
                with b.if_then(changed):
                    prepare[depth](b, digits[:depth + 1])
        body(b, digits)
        return digits

    ll.counted_loop(builder, builder.sub(end, begin), name, [minus_one] * len(extents), unit)


def split_rows(total: int, step: int, units: int, threads: int) -> int:
    """Rows per chunk (a multiple of `step`) when `total` rows are cut so that `units` independent
    pieces of work times the chunks give every one of `threads` threads about four units (load balance
    without cutting register tiles); all rows in one chunk for one thread."""
    tiles = -(-total // step)
    parts = 1 if threads <= 1 else max(1, min(tiles, -(-4 * threads // max(units, 1))))
    return -(-tiles // parts) * step


def chunk_bounds(builder: ir.IRBuilder, chunk: ir.Value, size: int, total: int) -> tuple[ir.Value, ir.Value]:
    """(first row, rows) (i64) of chunk number `chunk` of `size` rows out of `total` (the last may be
    shorter; the count is a constant when every chunk is full)."""
    first = builder.mul(chunk, ir.Constant(I64, size))
    if total % size == 0:
        return first, ir.Constant(I64, size)
    rest = builder.sub(ir.Constant(I64, total), first)
    return first, builder.select(builder.icmp_unsigned("<", rest, ir.Constant(I64, size)), rest,
                                 ir.Constant(I64, size))


# -- the team ----------------------------------------------------------------------------------------------
# team: { i8** args, i32 threads, i32 go, i32 arrived, i32 generation }
TEAM = ir.LiteralStructType([BYTE_PTR.as_pointer(), I32, I32, I32, I32])
# what a started thread receives: { team*, i32 thread }
WORKER_ARG = ir.LiteralStructType([TEAM.as_pointer(), I32])
THREADS_FIELD, GO_FIELD, ARRIVED_FIELD, GENERATION_FIELD = 1, 2, 3, 4


def _field(builder: ir.IRBuilder, team: ir.Value, index: int) -> ir.Value:
    return builder.gep(team, [ir.Constant(I32, 0), ir.Constant(I32, index)])


def _pause(builder: ir.IRBuilder, arch: str) -> None:
    """The CPU's spin-wait hint (lets the sibling hyperthread run; saves power)."""
    if arch == "x86_64":
        builder.call(ll.declare(builder.module, "llvm.x86.sse2.pause", VOID), [])
    elif arch == "aarch64":
        builder.call(ll.declare(builder.module, "llvm.aarch64.hint", VOID, I32), [ir.Constant(I32, 1)])


def _wait_while_equal(builder: ir.IRBuilder, word: ir.Value, value: ir.Value, arch: str) -> None:
    """Spin (with pauses) while the atomic i32 at `word` equals `value`, yielding the CPU after
    SPIN_PAUSES rounds (the machine may have fewer free cores than threads)."""
    sched_yield = ll.declare(builder.module, "sched_yield", I32)
    entry = builder.block
    head = builder.append_basic_block("wait.head")
    spin = builder.append_basic_block("wait.spin")
    done = builder.append_basic_block("wait.done")
    builder.branch(head)
    builder.position_at_end(head)
    rounds = builder.phi(I32)
    rounds.add_incoming(ir.Constant(I32, 0), entry)
    current = builder.load_atomic(word, "acquire", 4)
    builder.cbranch(builder.icmp_signed("==", current, value), spin, done)
    builder.position_at_end(spin)
    with builder.if_else(builder.icmp_signed("<", rounds, ir.Constant(I32, SPIN_PAUSES))) as (pause, give_up):
        with pause:
            _pause(builder, arch)
        with give_up:
            builder.call(sched_yield, [])
    rounds.add_incoming(builder.add(rounds, ir.Constant(I32, 1)), builder.block)
    builder.branch(head)
    builder.position_at_end(done)


def emit_barrier(module: ir.Module, arch: str) -> ir.Function:
    """`lowbit.barrier(i8* team, i32 threads)`: returns on every thread once all `threads` arrived.

    A counter and a generation: the last to arrive resets the counter and bumps the generation the
    others wait on. Sequentially consistent atomics: everything written before the barrier by any thread
    is visible after it to all."""
    existing = module.globals.get("lowbit.barrier")
    if existing is not None:
        return existing
    fn = ir.Function(module, ir.FunctionType(VOID, [BYTE_PTR, I32]), "lowbit.barrier")
    fn.linkage = "internal"
    handle, threads = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    team = builder.bitcast(handle, TEAM.as_pointer())
    arrived, generation = _field(builder, team, ARRIVED_FIELD), _field(builder, team, GENERATION_FIELD)
    current = builder.load_atomic(generation, "seq_cst", 4)
    before = builder.atomic_rmw("add", arrived, ir.Constant(I32, 1), "seq_cst")
    last = builder.icmp_signed("==", builder.add(before, ir.Constant(I32, 1)), threads)
    with builder.if_else(last) as (release, wait):
        with release:
            builder.store_atomic(ir.Constant(I32, 0), arrived, "seq_cst", 4)
            builder.store_atomic(builder.add(current, ir.Constant(I32, 1)), generation, "seq_cst", 4)
        with wait:
            _wait_while_equal(builder, generation, current, arch)
    builder.ret_void()
    return fn


def emit_team_entry(module: ir.Module, name: str, params: Sequence[ir.PointerType], body: ir.Function,
                    threads: int, arch: str) -> ir.Function:
    """`void name(params...)` running `body(i8** args, i32 thread, i32 threads, i8* team)` on the calling
    thread and `threads - 1` started ones; `args` holds the entry's parameters as i8*, `team` is what
    `emit_barrier`'s barrier takes."""
    fn = ir.Function(module, ir.FunctionType(VOID, params), name)
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    args = builder.alloca(BYTE_PTR, len(params), name="args")
    for index, param in enumerate(fn.args):
        builder.store(builder.bitcast(param, BYTE_PTR), builder.gep(args, [ir.Constant(I32, index)]))
    team = builder.alloca(TEAM, name="team")
    team_handle = builder.bitcast(team, BYTE_PTR)
    builder.store(args, _field(builder, team, 0))
    for index in (GO_FIELD, ARRIVED_FIELD, GENERATION_FIELD):
        builder.store(ir.Constant(I32, 0), _field(builder, team, index))
    if threads <= 1:
        builder.call(body, [args, ir.Constant(I32, 0), ir.Constant(I32, 1), team_handle])
        builder.ret_void()
        return fn
    worker = _emit_worker(module, f"{name}.worker", body, arch)
    create = ll.declare(module, "pthread_create", I32, I64.as_pointer(), BYTE_PTR, worker.type, BYTE_PTR)
    join = ll.declare(module, "pthread_join", I32, I64, BYTE_PTR.as_pointer())
    handles = builder.alloca(I64, threads - 1, name="handles")  # pthread_t: unsigned long / a pointer
    worker_args = builder.alloca(WORKER_ARG, threads - 1, name="worker_args")
    started = builder.append_basic_block("started")
    with builder.goto_block(started):
        count = builder.phi(I32, "created")
    for t in range(1, threads):
        slot = ir.Constant(I32, t - 1)
        arg = builder.gep(worker_args, [slot])
        builder.store(team, builder.gep(arg, [ir.Constant(I32, 0), ir.Constant(I32, 0)]))
        builder.store(ir.Constant(I32, t), builder.gep(arg, [ir.Constant(I32, 0), ir.Constant(I32, 1)]))
        status = builder.call(create, [builder.gep(handles, [slot]), ir.Constant(BYTE_PTR, None), worker,
                                       builder.bitcast(arg, BYTE_PTR)])
        count.add_incoming(ir.Constant(I32, t - 1), builder.block)  # this one failed: t - 1 started
        success = builder.append_basic_block(f"started{t}")
        builder.cbranch(builder.icmp_signed("==", status, ir.Constant(I32, 0)), success, started)
        builder.position_at_end(success)
    count.add_incoming(ir.Constant(I32, threads - 1), builder.block)
    builder.branch(started)
    builder.position_at_end(started)
    team_size = builder.add(count, ir.Constant(I32, 1))
    builder.store(team_size, _field(builder, team, THREADS_FIELD))
    builder.store_atomic(ir.Constant(I32, 1), _field(builder, team, GO_FIELD), "seq_cst", 4)
    builder.call(body, [args, ir.Constant(I32, 0), team_size, team_handle])

    def join_one(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        b.call(join, [b.load(b.gep(handles, [i])), ir.Constant(BYTE_PTR.as_pointer(), None)])
        return carried

    ll.counted_loop(builder, builder.zext(count, I64), "join", body=join_one)
    builder.ret_void()
    return fn


def _emit_worker(module: ir.Module, name: str, body: ir.Function, arch: str) -> ir.Function:
    """`i8* name(i8* worker_arg)`: waits for the team's go, then runs its share of the body."""
    fn = ir.Function(module, ir.FunctionType(BYTE_PTR, [BYTE_PTR]), name)
    fn.linkage = "internal"
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    arg = builder.bitcast(fn.args[0], WORKER_ARG.as_pointer())
    team = builder.load(builder.gep(arg, [ir.Constant(I32, 0), ir.Constant(I32, 0)]))
    thread = builder.load(builder.gep(arg, [ir.Constant(I32, 0), ir.Constant(I32, 1)]))
    _wait_while_equal(builder, _field(builder, team, GO_FIELD), ir.Constant(I32, 0), arch)
    threads = builder.load(_field(builder, team, THREADS_FIELD))
    builder.call(body, [builder.load(_field(builder, team, 0)), thread, threads, builder.bitcast(team, BYTE_PTR)])
    builder.ret(ir.Constant(BYTE_PTR, None))
    return fn

