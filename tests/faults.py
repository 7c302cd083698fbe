"""A test engine that fails where a request's text tells it to, for the supervision tests.

`FaultyEngine` is the real tiny engine in static bucket shapes (eager), so that the batcher launches each
batch and fetches its vectors in its fetch thread, as on a GPU. A marker in a text arms a fault:

    FAULT:plan     planning the round the text is in raises (every caller of that round fails)
    FAULT:launch   the forward pass of the text's batch raises a plain RuntimeError
    FAULT:wait     waiting for the vectors of the text's batch raises
    FAULT:deliver  the text's batch gives back one vector too few, so handing them out fails
    FAULT:device   the text's batch raises CUDA's illegal memory access (torch.AcceleratorError), and so
                   does every batch after it, as in a poisoned CUDA context: fatal
    FAULT:hang     the forward pass of the text's batch never returns: fatal once the watchdog fires

Run as a script, this file is `scholarembed serve` with the engine wrapped: the real command line, its
exit status included.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

FAULTS = ("plan", "launch", "wait", "deliver", "device", "hang")
ILLEGAL_ADDRESS = 700  # cudaErrorIllegalAddress


def device_error() -> torch.AcceleratorError:
    error = torch.AcceleratorError(
        "CUDA error: an illegal memory access was encountered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call (injected)"
    )
    error.error_code = ILLEGAL_ADDRESS  # type: ignore[attr-defined]  # as torch sets it from cudaGetLastError
    return error


class FaultyEngine:
    def __init__(self, engine: Any) -> None:
        assert engine.runner.buckets is not None, "the batcher fetches vectors in its fetch thread only with buckets"
        self._engine = engine
        self.runner = _FaultyRunner(engine.runner, self)
        self._faulty_rows: dict[tuple[int, ...], str] = {}
        self._plan_armed = threading.Event()
        self._poisoned = False
        # A device fault can be held at the moment it strikes, so that a test can queue callers behind it.
        self.hold_device_fault = False
        self.device_fault_reached = threading.Event()
        self.release_device_fault = threading.Event()
        self.release_hang = threading.Event()  # never set by the subprocess: a forward pass stuck for good

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def tokenize(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        tokenized = self._engine.tokenize(texts, *args, **kwargs)
        for text, tokens in zip(texts, tokenized, strict=True):
            for fault in FAULTS:
                if f"FAULT:{fault}" in text:
                    self._faulty_rows[tuple(tokens.ids)] = fault
                    if fault == "plan":
                        self._plan_armed.set()
        return tokenized


class _FaultyRunner:
    """The engine's runner, failing where its FaultyEngine's texts say."""

    def __init__(self, runner: Any, engine: FaultyEngine) -> None:
        self._runner = runner
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def plan(self, lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
        if self._engine._plan_armed.is_set():
            self._engine._plan_armed.clear()
            raise RuntimeError("injected fault while planning a round")
        return self._runner.plan(lengths, max_batch_tokens)

    def launch(self, batch: Sequence[Sequence[int]]) -> Any:
        engine = self._engine
        faults = {engine._faulty_rows.get(tuple(row)) for row in batch}
        if "device" in faults or engine._poisoned:
            engine._poisoned = True
            if engine.hold_device_fault and not engine.device_fault_reached.is_set():
                engine.device_fault_reached.set()
                assert engine.release_device_fault.wait(60)
            raise device_error()
        if "launch" in faults:
            raise RuntimeError("injected fault in a forward pass")
        if "hang" in faults:
            engine.release_hang.wait()
        return _Fetched(self._runner.launch(batch), "wait" in faults, "deliver" in faults)


class _Fetched:
    """A launched batch whose vectors are not back yet, so the batcher waits for them in its fetch thread."""

    ready = False
    eager_reason = None

    def __init__(self, pending: Any, fail_wait: bool, one_short: bool) -> None:
        self._pending = pending
        self._fail_wait = fail_wait
        self._one_short = one_short

    def wait(self) -> np.ndarray:
        if self._fail_wait:
            raise RuntimeError("injected fault while waiting for a batch's vectors")
        vectors: np.ndarray = self._pending.wait()
        return vectors[:-1] if self._one_short else vectors


def main() -> None:
    import scholarembed_server.app as app
    from scholarembed_server.cli import main as cli

    bucketed = app.with_buckets
    app.with_buckets = lambda engine, config: FaultyEngine(bucketed(engine, config))
    raise SystemExit(cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
