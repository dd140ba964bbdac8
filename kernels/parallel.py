"""Intra-op parallelism: how a kernel shares its work between threads, and the thread team that runs a
model's calls.

Kernel convention. A kernel that can split its work takes two trailing `i32` arguments `(thread, threads)`
after its buffer pointers and does its share of its outermost independent work units (`share`,
`for_units`): contiguous ranges whose sizes differ by at most one. Only independent outputs are split
(never a reduction), so the result is bit-identical for every thread count. Scratch memory a parallel
kernel writes is per thread: the lowering reserves `thread_stride(nbytes)` bytes per thread and the
kernel works in `thread_scratch(...)`, indexed by the share it runs. A kernel must be correct for any
`threads`.

The team (`emit_team_entry`). The model's entry point runs its steps (`Step`: a parallel kernel call, or
a run of serial calls) on the calling thread and on `threads - 1` threads it starts with `pthread_create`
for this call and joins before returning. A parallel step has `threads` shares, a serial one a single
share, and threads claim shares at run time (an atomic counter per step) rather than each owning a fixed
one: a thread the OS has not scheduled yet (more runnable threads than free cores) then delays nothing,
since the others take its shares, and when it does start it races through the finished steps. A share
runs once the step before has finished all of its shares (a second counter per step; waiters spin, then
yield). Each share index is run by exactly one thread, so per-share scratch stays private, and the shares
are the same for every schedule: results do not depend on who ran what. Threads are started per call
rather than kept in a pool: a pool is process-wide state that outlives neither the JIT's code nor a
`dlclose`d artifact safely, and would serialise concurrent runs of one model; per-call threads keep every
run independent (its counters live on its own stack) at the price of starting them, about 10-30 µs,
which the compiler avoids for models whose parallel work is small (it then compiles a single-threaded
model). A thread that cannot be started is no error: the others run its shares.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Sequence

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
# One step's counters: shares claimed so far, shares finished.
COUNTERS = ir.LiteralStructType([I32, I32])
CLAIMED, DONE = 0, 1


class Step(NamedTuple):
    """A unit of the run's schedule: `emit(builder, share, shares)` emits the code of one share (i32 values);
    a parallel step has as many shares as the team has threads, a serial one a single share. Each step
    depends on the one before it."""

    parallel: bool
    emit: Callable[[ir.IRBuilder, ir.Value, ir.Value], None]


def _pause(builder: ir.IRBuilder, arch: str) -> None:
    """The CPU's spin-wait hint (lets the sibling hyperthread run; saves power)."""
    if arch == "x86_64":
        builder.call(ll.declare(builder.module, "llvm.x86.sse2.pause", VOID), [])
    elif arch == "aarch64":
        builder.call(ll.declare(builder.module, "llvm.aarch64.hint", VOID, I32), [ir.Constant(I32, 1)])


def _wait_until_equal(builder: ir.IRBuilder, word: ir.Value, value: ir.Value, arch: str) -> None:
    """Spin (with pauses) until the atomic i32 at `word` equals `value` (acquire), yielding the CPU after
    SPIN_PAUSES rounds (the thread being waited for may need this CPU)."""
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
    builder.cbranch(builder.icmp_signed("!=", current, value), spin, done)
    builder.position_at_end(spin)
    with builder.if_else(builder.icmp_signed("<", rounds, ir.Constant(I32, SPIN_PAUSES))) as (pause, give_up):
        with pause:
            _pause(builder, arch)
        with give_up:
            builder.call(sched_yield, [])
    rounds.add_incoming(builder.add(rounds, ir.Constant(I32, 1)), builder.block)
    builder.branch(head)
    builder.position_at_end(done)


def _counter(builder: ir.IRBuilder, counters: ir.Value, step: int, field: int) -> ir.Value:
    return builder.gep(counters, [ir.Constant(I32, 0), ir.Constant(I32, step), ir.Constant(I32, field)])


def _emit_schedule(builder: ir.IRBuilder, counters: ir.Value, steps: Sequence[Step], threads: int,
                   arch: str) -> None:
    """What every thread of the team runs: for each step, claim shares until none is left, running each
    claimed one once the step before has finished all of its shares. A thread that claims nothing moves on
    without waiting (whoever holds a share waits for the step before), so a late thread races through
    finished steps; finishing a step implies every earlier one finished."""
    shares = ir.Constant(I32, threads)
    for index, step in enumerate(steps):
        count = ir.Constant(I32, threads if step.parallel else 1)
        head = builder.append_basic_block(f"step{index}.claim")
        run = builder.append_basic_block(f"step{index}.run")
        following = builder.append_basic_block(f"step{index}.end")
        builder.branch(head)
        builder.position_at_end(head)
        claimed = builder.atomic_rmw("add", _counter(builder, counters, index, CLAIMED), ir.Constant(I32, 1),
                                     "seq_cst")
        builder.cbranch(builder.icmp_unsigned("<", claimed, count), run, following)
        builder.position_at_end(run)
        if index:  # once satisfied a single load: waiting again for the next share costs nothing
            previous = ir.Constant(I32, threads if steps[index - 1].parallel else 1)
            _wait_until_equal(builder, _counter(builder, counters, index - 1, DONE), previous, arch)
        step.emit(builder, claimed, shares)
        # seq_cst publishes the share's outputs to whoever then sees the step finished
        builder.atomic_rmw("add", _counter(builder, counters, index, DONE), ir.Constant(I32, 1), "seq_cst")
        builder.branch(head)
        builder.position_at_end(following)


def emit_team_entry(module: ir.Module, name: str, params: Sequence[ir.PointerType], threads: int, arch: str,
                    prologue: Callable[[ir.IRBuilder, list[ir.Value]], list[Step]]) -> ir.Function:
    """`void name(params...)` running the steps that `prologue(builder, params)` returns (after emitting,
    at the start of the code every thread runs, what the steps share, such as loads from `params`) on the
    calling thread and `threads - 1` threads started for the call."""
    fn = ir.Function(module, ir.FunctionType(VOID, params), name)
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    if threads <= 1:
        one = ir.Constant(I32, 1)
        for step in prologue(builder, list(fn.args)):
            step.emit(builder, ir.Constant(I32, 0), one)
        builder.ret_void()
        return fn
    # The run's state lives on the caller's stack: every argument as an i8*, then the steps' counters.
    args = builder.alloca(BYTE_PTR, len(params), name="args")
    for index, param in enumerate(fn.args):
        builder.store(builder.bitcast(param, BYTE_PTR), builder.gep(args, [ir.Constant(I32, index)]))
    body, steps = _emit_body(module, f"{name}.body", params, threads, arch, prologue)
    if not steps:  # nothing to run: no team either
        builder.ret_void()
        return fn
    counters_type = ir.ArrayType(COUNTERS, len(steps))
    team_type = ir.LiteralStructType([BYTE_PTR.as_pointer(), counters_type])
    team = builder.alloca(team_type, name="team")
    builder.store(args, builder.gep(team, [ir.Constant(I32, 0), ir.Constant(I32, 0)]))
    counters = builder.gep(team, [ir.Constant(I32, 0), ir.Constant(I32, 1)])
    builder.store(ir.Constant(counters_type, None), counters)
    last = len(steps) - 1
    finished = ir.Constant(I32, threads if steps[last].parallel else 1)
    worker = _emit_worker(module, f"{name}.worker", body, team_type, finished)
    create = ll.declare(module, "pthread_create", I32, I64.as_pointer(), BYTE_PTR, worker.type, BYTE_PTR)
    join = ll.declare(module, "pthread_join", I32, I64, BYTE_PTR.as_pointer())
    handles = builder.alloca(I64, threads - 1, name="handles")  # pthread_t: unsigned long / a pointer
    team_handle = builder.bitcast(team, BYTE_PTR)
    started = builder.append_basic_block("started")
    with builder.goto_block(started):
        count = builder.phi(I32, "created")
    for t in range(1, threads):
        status = builder.call(create, [builder.gep(handles, [ir.Constant(I32, t - 1)]),
                                       ir.Constant(BYTE_PTR, None), worker, team_handle])
        count.add_incoming(ir.Constant(I32, t - 1), builder.block)  # this one failed: t - 1 started
        success = builder.append_basic_block(f"started{t}")
        builder.cbranch(builder.icmp_signed("==", status, ir.Constant(I32, 0)), success, started)
        builder.position_at_end(success)
    count.add_incoming(ir.Constant(I32, threads - 1), builder.block)
    builder.branch(started)
    builder.position_at_end(started)
    builder.call(body, [args, builder.bitcast(counters, BYTE_PTR)])

    # Every share is run by whoever claimed it before that thread exits, so once all are joined the run
    # is complete (and no thread touches the team on this stack any more).
    def join_one(b: ir.IRBuilder, i: ir.Value, carried: list) -> list:
        b.call(join, [b.load(b.gep(handles, [i])), ir.Constant(BYTE_PTR.as_pointer(), None)])
        return carried

    ll.counted_loop(builder, builder.zext(count, I64), "join", body=join_one)
    builder.ret_void()
    return fn


def _emit_body(module: ir.Module, name: str, params: Sequence[ir.PointerType], threads: int, arch: str,
               prologue: Callable[[ir.IRBuilder, list[ir.Value]], list[Step]]) -> tuple[ir.Function, list[Step]]:
    """`void name(i8** args, i8* counters)`, what every thread of the team runs, and its steps."""
    body = ir.Function(module, ir.FunctionType(VOID, [BYTE_PTR.as_pointer(), BYTE_PTR]), name)
    body.linkage = "internal"
    builder = ir.IRBuilder(body.append_basic_block("entry"))
    args, counters = body.args
    steps = prologue(builder, [builder.bitcast(builder.load(builder.gep(args, [ir.Constant(I32, i)])), param)
                               for i, param in enumerate(params)])
    counters = builder.bitcast(counters, ir.ArrayType(COUNTERS, len(steps)).as_pointer())
    _emit_schedule(builder, counters, steps, threads, arch)
    builder.ret_void()
    return body, steps


def _emit_worker(module: ir.Module, name: str, body: ir.Function, team_type: ir.LiteralStructType,
                 finished: ir.Constant) -> ir.Function:
    """`i8* name(i8* team)`: runs the body, unless the run's last step already finished (a thread the OS
    started late then only costs its join)."""
    fn = ir.Function(module, ir.FunctionType(BYTE_PTR, [BYTE_PTR]), name)
    fn.linkage = "internal"
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    team = builder.bitcast(fn.args[0], team_type.as_pointer())
    counters = builder.gep(team, [ir.Constant(I32, 0), ir.Constant(I32, 1)])
    last = team_type.elements[1].count - 1
    done = builder.load_atomic(_counter(builder, counters, last, DONE), "acquire", 4)
    with builder.if_then(builder.icmp_unsigned("!=", done, finished)):
        builder.call(body, [builder.load(builder.gep(team, [ir.Constant(I32, 0), ir.Constant(I32, 0)])),
                            builder.bitcast(counters, BYTE_PTR)])
    builder.ret(ir.Constant(BYTE_PTR, None))
    return fn
