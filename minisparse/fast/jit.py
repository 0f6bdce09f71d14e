"""numba.njit with one rule for the on-disk cache: a compiled function that runs threads
(parallel=True), or that calls one that does by name, is never cached; every other one is. A cached
function may still run a threaded one: passed in at run time as a kernel (kernel() and call() below).

Why. numba names the threaded part of a parallel=True function, its gufunc, after the address in
memory of the compiler's object for the loop (`__numba_parfor_gufunc_0x...`, from hash(parfor)).
That name is unique only inside one process at one moment. A function that calls a parallel one
carries a copy of that gufunc in its compiled code, under that name, and the cache stores the code
as it is. Cache entries written by different processes (the test suite, then generate.py on other
models, each compiling the types it needed) are later loaded into one process together, where two
different gufuncs can meet under one name, or the caller's copy can be bound to another entry's
definition: the call then jumps into code built for other arguments, and the process dies with a
segmentation fault and no message (numba issues 8578, 4807 and 10128 report the same family). An
address-named symbol never reaches the disk under this rule, so no mix of cache entries can bring
two together.

Kernels. Compiling again in every process is slow for the big functions that call the threaded ones
(fast/step.py's layer: a start-up several times longer than from the cache; benchmarks/RESULTS.md 20).
So they do not call them by
name: the caller (Python) passes kernel(f, *argtypes), f's compiled code for those argument types
as (its address, a key of the types), and the cached function runs it with call(kernel, *args).
Its code then holds an indirect call through a number it is given, no gufunc and no name, and its
cache entry serves every later process; only the threaded functions themselves are compiled again,
and only where a process uses them. call() checks the key against its own arguments' types, so a
kernel compiled for other types raises TypeError instead of running on arrays it was not built for.

Why not numba's first-class functions (a tuple of dispatchers, typed UniTuple(FunctionType)),
which compile the same indirect call: numba types and unboxes such a tuple in Python at every call,
hundreds of times the cost of passing two integers, more than a tiny model's whole token (RESULTS.md
20); and a dispatcher that has more than one compiled
signature, or may still compile one, is typed as a plain dispatcher in the tuple: a direct call
again, its gufunc copied into the cached caller, without an error. A kernel is two integers.

tests/test_jit.py holds every compiled function of minisparse.fast to the rule, by reading which
compiled functions each one calls and by reading the cache's files for gufunc names, and runs the
decode in fresh processes sharing one cache in several orders, then again from the cache, where the
big functions must be cache hits.
"""

import zlib

try:                                   # optional: pip install numba
    import numba
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload
except ImportError:                    # pragma: no cover - exercised where numba is absent
    numba = None

NO_KERNEL = (0, 0)                     # where none is needed: call() raises rather than run it


def njit(*, parallel=False, calls_parallel=False, **options):
    """numba.njit(parallel=parallel, cache=...) under the rule above: calls_parallel=True for a
    function that calls a parallel one by name (directly or through another function of this kind);
    one that runs them through call() stays cached."""
    return numba.njit(parallel=parallel, cache=not (parallel or calls_parallel), **options)


def threads(dispatcher):
    """Whether a compiled function runs threads itself (parallel=True)."""
    return bool(dispatcher.targetoptions.get("parallel"))


def cached(dispatcher):
    """Whether a compiled function writes and reads numba's on-disk cache."""
    return type(dispatcher._cache).__name__ != "NullCache"


def type_key(argtypes):
    """A number for a list of numba argument types, the same in every process (not Python's hash,
    which differs between processes for strings)."""
    return zlib.crc32(", ".join(str(types.unliteral(t)) for t in argtypes).encode())


def kernel(dispatcher, *argtypes):
    """(address, key): the compiled function `dispatcher` for exactly these numba argument types,
    returning nothing, for call(). Compiles it in this process if needed (a threaded one: here,
    never from the cache). The address is this process's: pass it at run time, never store it in
    compiled code."""
    cres = dispatcher.get_compile_result(types.none(*argtypes))
    # the function in numba's own calling convention, as a direct call or a FunctionType's call reaches it
    address = cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)
    return address, type_key(argtypes)


def call(kernel, *args):
    """Inside compiled code: run kernel(f, *types of args) on args. Raises TypeError where the kernel
    was compiled for other types (or is NO_KERNEL)."""
    raise TypeError("jit.call runs inside compiled code only")


if numba is not None:
    @intrinsic
    def _call_address(typingctx, address, args):
        """Call the function at `address`, numba's calling convention, with the tuple args unpacked."""
        def codegen(context, builder, signature, llargs):
            argtypes = tuple(signature.args[1])
            fnty = context.call_conv.get_function_type(types.none, argtypes)
            fn = builder.inttoptr(llargs[0], fnty.as_pointer())
            values = cgutils.unpack_tuple(builder, llargs[1], len(argtypes))
            status, _ = context.call_conv.call_function(builder, fn, types.none, argtypes, values)
            with cgutils.if_unlikely(builder, status.is_error):       # its exception becomes ours
                context.call_conv.return_status_propagate(builder, status)
            return context.get_dummy_value()
        return types.none(address, args), codegen

    @overload(call, jit_options={"cache": True})
    def _call_impl(kernel, *args):
        key = type_key(args)           # these arguments' types, as the compiled caller has them

        def impl(kernel, *args):
            if kernel[1] != key:
                raise TypeError("jit.call: the kernel was compiled for other argument types")
            _call_address(kernel[0], args)
        return impl
