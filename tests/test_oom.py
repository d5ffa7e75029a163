"""OOM classification (trainer.meter.is_oom): an OOM is only an OOM.

Exceptions are built here the way torch and its libraries raise them (messages from
c10/cuda/CUDAException.cpp, c10/cuda/driver_api.h, the caching allocator, cuBLAS, cuDNN, Triton's
launcher); the compile wrappers are torch's own classes where the installed torch has them.
"""
import pytest
import torch

from trainer.meter import OOM_MESSAGES, is_oom
from trainer.step import InjectedOOM

ALLOCATOR = ("CUDA out of memory. Tried to allocate 1.54 GiB. GPU 0 has a total capacity of 11.99 GiB "
             "of which 1.10 GiB is free.")
CUDNN_NOT_SUPPORTED = ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                       "non-contiguous input.")


def raised(make):
    """The exception `make()` raises, with the tracebacks and chains Python gives it."""
    try:
        make()
    except BaseException as e:  # noqa: BLE001 - the test wants whatever was raised
        return e
    raise AssertionError("nothing raised")


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError(ALLOCATOR),
    torch.cuda.OutOfMemoryError("any text: the type decides"),
    InjectedOOM("injected out-of-memory at optimizer step 3"),
    RuntimeError(ALLOCATOR),  # TorchScript re-raises the allocator's OOM as a plain RuntimeError
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA driver error: out of memory"),
    RuntimeError("Triton Error [CUDA]: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB"),
], ids=lambda e: f"{type(e).__name__}:{str(e)[:32]}")
def test_out_of_memory_forms_are_oom(exc):
    assert is_oom(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError(CUDNN_NOT_SUPPORTED),
    RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph."),
    RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x576 and 768x2304)"),
    ValueError("CUDA out of memory"),  # only runtime errors carry allocator messages
    KeyboardInterrupt(),
], ids=lambda e: f"{type(e).__name__}:{str(e)[:32]}")
def test_other_errors_are_not_oom(exc):
    assert not is_oom(exc)


def test_not_supported_raised_while_handling_an_oom_is_not_oom():
    # cuDNN fails during the OOM handler: the OOM is only its __context__, which says nothing about
    # why cuDNN failed, so shrinking the micro-batch would hide a real error.
    def make():
        try:
            raise torch.OutOfMemoryError(ALLOCATOR)
        except torch.OutOfMemoryError:
            raise RuntimeError(CUDNN_NOT_SUPPORTED)  # noqa: B904 - the OOM is only its __context__
    e = raised(make)
    assert isinstance(e.__context__, torch.OutOfMemoryError) and e.__cause__ is None
    assert not is_oom(e)


def test_inductor_like_wrapper_with_the_oom_as_cause_is_oom():
    class InductorLikeError(RuntimeError):
        pass

    def make():
        try:
            raise torch.OutOfMemoryError(ALLOCATOR)
        except torch.OutOfMemoryError as inner:
            raise InductorLikeError("compilation failed") from inner  # no OOM text of its own
    assert is_oom(raised(make))


def test_the_cause_chain_is_followed_several_links_deep():
    def make():
        try:
            try:
                raise RuntimeError("CUDA error: out of memory")
            except RuntimeError as a:
                raise RuntimeError("autotuning failed") from a
        except RuntimeError as b:
            raise RuntimeError("lowering failed") from b
    assert is_oom(raised(make))


def test_wrapper_keeping_the_oom_as_inner_exception_is_oom():
    # Dynamo's BackendCompilerFailed and Inductor's InductorError are raised `from None` and keep
    # the original exception as `inner_exception` (torch/_dynamo/output_graph.py, _inductor/compile_fx.py)
    class Wrapped(RuntimeError):
        def __init__(self, inner):
            super().__init__("backend raised an error")
            self.inner_exception = inner

    def make():
        try:
            raise torch.OutOfMemoryError(ALLOCATOR)
        except torch.OutOfMemoryError as inner:
            raise Wrapped(inner) from None
    e = raised(make)
    assert e.__cause__ is None and e.__suppress_context__
    assert is_oom(e)
    assert not is_oom(Wrapped(RuntimeError(CUDNN_NOT_SUPPORTED)))


def test_torchs_own_compile_wrappers_are_seen_through():
    exc = pytest.importorskip("torch._dynamo.exc")
    oom = torch.OutOfMemoryError(ALLOCATOR)
    assert is_oom(exc.BackendCompilerFailed(lambda gm, inputs: gm, oom, None))
    assert not is_oom(exc.BackendCompilerFailed(lambda gm, inputs: gm, RuntimeError(CUDNN_NOT_SUPPORTED), None))
    inductor = pytest.importorskip("torch._inductor.exc")
    if hasattr(inductor, "InductorError"):  # torch >= 2.6
        assert is_oom(inductor.InductorError(oom, None))
        assert not is_oom(inductor.InductorError(RuntimeError(CUDNN_NOT_SUPPORTED), None))


def test_an_oom_raised_by_a_compiler_backend_reaches_the_caller_as_an_oom():
    # The real path: torch.compile calls the backend, the backend runs out of memory, Dynamo wraps
    # the error; the training loop must still see an OOM. (A backend that fails for another reason
    # must not be taken for one.)
    def oom_backend(gm, example_inputs):
        raise torch.OutOfMemoryError(ALLOCATOR)

    def other_backend(gm, example_inputs):
        raise RuntimeError(CUDNN_NOT_SUPPORTED)

    torch._dynamo.reset()
    try:
        oom = raised(lambda: torch.compile(lambda x: x * 2 + 1, backend=oom_backend)(torch.ones(3)))
        torch._dynamo.reset()
        other = raised(lambda: torch.compile(lambda x: x * 3 - 1, backend=other_backend)(torch.ones(3)))
    finally:
        torch._dynamo.reset()
    assert not isinstance(oom, torch.OutOfMemoryError)  # it arrives wrapped
    assert is_oom(oom)
    assert not is_oom(other)


def test_cycles_and_broken_messages_do_not_raise():
    a, b = RuntimeError("first"), RuntimeError("second")
    a.__cause__, b.__cause__ = b, a
    assert not is_oom(a)

    class BadStr(RuntimeError):
        def __str__(self):
            raise ValueError("no message")
    assert not is_oom(BadStr())


def test_messages_are_lower_case_and_never_match_not_supported():
    assert all(m == m.lower() for m in OOM_MESSAGES)
    assert not any(m in CUDNN_NOT_SUPPORTED.lower() for m in OOM_MESSAGES)


def test_the_plain_cpus_allocator_refusal_is_an_oom():
    """`run --no-probe` of a model larger than the machine (or its ulimit): a 118-line traceback
    from DefaultCPUAllocator's RuntimeError; as an OOM it is the one line of the build's OOM."""
    try:
        torch.empty(2**55, dtype=torch.uint8)  # 32 PiB: malloc refuses it at once
    except RuntimeError as e:
        err = e
    assert not isinstance(err, torch.OutOfMemoryError) and is_oom(err)
