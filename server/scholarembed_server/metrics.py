"""Prometheus metrics, one registry per server so that several servers can live in one process."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import logs
from .index.base import VectorIndex

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "scholarembed_request_duration_seconds",
            "RPC latency by method, gRPC status code and door (grpc or http; HTTP calls carry the gRPC code "
            "of their outcome, so one query counts errors on both).",
            ["rpc", "code", "door"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_requests = Gauge(
            "scholarembed_queue_requests", "Texts waiting in the batch queue.", registry=self.registry
        )
        self.queue_tokens = Gauge(
            "scholarembed_queue_tokens",
            "Tokens queued or in the running batch (the backpressure measure).",
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "scholarembed_batch_size",
            "Texts per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.batch_padded_tokens = Histogram(
            "scholarembed_batch_tokens",
            "Padded tokens (rows x longest row) per forward pass.",
            buckets=(64, 256, 1024, 4096, 16384, 65536, 262144),
            registry=self.registry,
        )
        self.batch_padding_efficiency = Histogram(
            "scholarembed_batch_padding_efficiency",
            "Real tokens / padded tokens per forward pass.",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0),
            registry=self.registry,
        )
        self.tokens = Counter(
            "scholarembed_embedded_tokens",
            "Real (unpadded) tokens embedded; rate() gives tokens per second.",
            registry=self.registry,
        )
        self.texts = Counter("scholarembed_embedded_texts", "Texts embedded.", registry=self.registry)
        self.forward_seconds = Histogram(
            "scholarembed_forward_duration_seconds",
            "Time of one forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.calls_in_progress = Gauge(
            "scholarembed_calls_in_progress",
            "gRPC calls admitted and not finished, health checks and reflection aside (at most --max-concurrent-rpcs).",
            registry=self.registry,
        )
        self.calls_waiting = Gauge(
            "scholarembed_calls_waiting",
            "Streams waiting for a call slot (--max-concurrent-rpcs); none of their requests is read meanwhile.",
            registry=self.registry,
        )
        self.compiled_lengths = Gauge(
            "scholarembed_compiled_bucket_lengths",
            "Bucket lengths whose compiled forward is ready; batches of the others run eager.",
            registry=self.registry,
        )
        self.eager_batches = Counter(
            "scholarembed_eager_fallback_batches",
            "Batches a compiled engine ran eager, by reason: compiling (length not ready yet) or failed.",
            ["reason"],
            registry=self.registry,
        )

    def watch_index(self, index: VectorIndex) -> None:
        """Report passages per collection, read from the store at scrape time (nothing on the write path)."""
        self.registry.register(_IndexSizeCollector(index))

    def observe_batch(self, *, rows: int, real_tokens: int, padded_tokens: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_padded_tokens.observe(padded_tokens)
        self.batch_padding_efficiency.observe(real_tokens / padded_tokens)
        self.tokens.inc(real_tokens)
        self.texts.inc(rows)
        self.forward_seconds.observe(seconds)

    @contextlib.contextmanager
    def track(
        self, rpc: str, context: grpc.aio.ServicerContext | None, *, door: str = "grpc", metadata: Any = None
    ) -> Iterator[_Outcome]:
        """Time and log an RPC under its request id; the handler sets outcome.code unless it ends OK.
        gRPC calls pass their context; other doors pass None and their headers as `metadata`.
        A gRPC caller gets the id back in the trailing metadata (`x-request-id`), to quote it in a report."""
        logs.request_id.set(logs.request_id_from(context.invocation_metadata() if context is not None else metadata))
        if context is not None:
            context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, logs.request_id.get()),))
        outcome = _Outcome()
        started = time.monotonic()
        try:
            yield outcome
        except BaseException:
            if outcome.code is grpc.StatusCode.OK:
                outcome.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            seconds = time.monotonic() - started
            self.request_seconds.labels(rpc, outcome.code.name, door).observe(seconds)
            fields = {"rpc": rpc, "code": outcome.code.name, "door": door, "duration_ms": round(seconds * 1000, 3)}
            level = logging.DEBUG if outcome.code is grpc.StatusCode.OK else logging.WARNING
            log.log(level, "%s %s in %.1f ms", rpc, outcome.code.name, seconds * 1000, extra={"fields": fields})

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on its own port (0 picks a free one); returns the bound port."""
        http_server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(http_server.server_port)


class _IndexSizeCollector(Collector):
    def __init__(self, index: VectorIndex) -> None:
        self._index = index

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "scholarembed_index_passages", "Passages stored per collection.", labels=["collection"]
        )
        for info in self._index.list_collections():
            family.add_metric([info.name], info.passage_count)
        yield family


@dataclass
class _Outcome:
    code: grpc.StatusCode = grpc.StatusCode.OK
