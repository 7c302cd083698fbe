"""What the process's parts share about its life: the serving state every door reports, which errors are
fatal, and closing worker threads without blocking the event loop.

Two kinds of failure (vLLM treats a dead engine the same way):

- A batch fails: its callers get an error, every other caller is served, and the next batch runs.
  This is every error but the fatal ones below: in planning a round (the round's callers fail), the
  forward pass, the wait for its vectors, handing them out. A bug is INTERNAL; a text too large for
  the accelerator even alone is RESOURCE_EXHAUSTED (running out of memory splits the batch and
  retries, it is never fatal); an index write that fails (disk full) is INTERNAL for its request.
- The server is broken, and only a new process can mend it:
  - a poisoned CUDA context (`is_fatal`): an illegal memory access, a device-side assert, a launch
    failure and the other errors after which CUDA answers every later call with the same error;
  - a dead batcher: its worker, or a task collecting a batch's vectors, ended by an error outside
    the handling above (a bug in the batcher itself);
  - the model thread unreachable: a forward pass, or the wait for its vectors, that has not returned
    after --forward-timeout-s (300 s by default).

  Then the cause is logged once, health says NOT_SERVING on every door (gRPC health for every service,
  the HTTP door's /health and /health/ready), queued and in-flight callers get UNAVAILABLE at once,
  new calls get UNAVAILABLE, and `scholarembed serve` exits with EXIT_BROKEN for its orchestrator to
  replace it.
"""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import ThreadPoolExecutor

from .errors import ServerBrokenError, UnavailableError

EXIT_BROKEN = 70  # sysexits' EX_SOFTWARE: the server broke while serving (start-up failures exit 1)

# CUDA runtime errors that "leave the process in an inconsistent state": any further CUDA work returns the
# same error, and "to continue using CUDA, the process must be terminated and relaunched" (CUDA runtime API,
# cudaError_t). torch raises them as torch.AcceleratorError, whose error_code is the cudaError_t value.
STICKY_CUDA_ERRORS = {
    214: "cudaErrorECCUncorrectable",
    700: "cudaErrorIllegalAddress",
    702: "cudaErrorLaunchTimeout",
    710: "cudaErrorAssert",
    714: "cudaErrorHardwareStackError",
    715: "cudaErrorIllegalInstruction",
    716: "cudaErrorMisalignedAddress",
    717: "cudaErrorInvalidAddressSpace",
    718: "cudaErrorInvalidPc",
    719: "cudaErrorLaunchFailure",
    810: "cudaErrorMpsClientTerminated",
    911: "cudaErrorExternalDevice",
}
# cudaGetErrorString's words for the common ones, for errors that carry no code.
STICKY_CUDA_MESSAGES = (
    "uncorrectable ECC error encountered",
    "an illegal memory access was encountered",
    "the launch timed out and was terminated",
    "device-side assert triggered",
    "hardware stack error",
    "an illegal instruction was encountered",
    "misaligned address",
    "operation not supported on global/shared address space",
    "invalid program counter",
    "unspecified launch failure",
)


def is_fatal(error: BaseException) -> bool:
    """Whether `error` leaves the device unusable for this process: a sticky CUDA error, by its code where
    torch gives one (torch.AcceleratorError), else by CUDA's words in a message that names CUDA (Triton's
    launcher, for one, raises a plain RuntimeError: "Triton Error [CUDA]: an illegal memory access ...")."""
    code = getattr(error, "error_code", None)
    if isinstance(code, int):
        return code in STICKY_CUDA_ERRORS
    message = str(error)
    return "CUDA" in message and any(words in message for words in STICKY_CUDA_MESSAGES)


class Phase(enum.Enum):
    STARTING = "warming up"
    SERVING = "serving"
    BROKEN = "broken"


class ServingState:
    """Where the process is in its life, read by every door: gRPC health, the HTTP door's readiness, and
    every call that needs the model (`check`). Owned by `app.EmbeddingServer`. (A drain is each door's
    own: gRPC refuses new calls itself, and calls in progress may still embed within the grace period.)"""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.cause: str | None = None  # why the server is broken
        self.broken = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.SERVING

    def check(self) -> None:
        """Raise UnavailableError, in words a caller can act on, unless the server is serving."""
        if self.phase is Phase.STARTING:
            raise UnavailableError("model is warming up")
        if self.phase is Phase.BROKEN:
            raise ServerBrokenError(self.cause or "unknown cause")

    def serve(self) -> None:
        if self.phase is Phase.STARTING:
            self.phase = Phase.SERVING

    def break_down(self, cause: str) -> bool:
        """Mark the server broken for good; False if it already was (the first cause is the one kept)."""
        if self.phase is Phase.BROKEN:
            return False
        self.phase, self.cause = Phase.BROKEN, cause
        self.broken.set()
        return True


async def shut_down(executor: ThreadPoolExecutor, *, wait: bool = True) -> None:
    """Stop `executor` once the work given to it is done, waiting in another thread so the event loop runs
    on. `wait=False` cancels what has not started and leaves behind, unjoined, a thread that may never
    return (stuck in a broken device)."""
    executor.shutdown(wait=False, cancel_futures=not wait)
    if wait:
        await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)


def describe(error: BaseException) -> str:
    """An error in one line: its type and the first line of its message (CUDA's run to several)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
