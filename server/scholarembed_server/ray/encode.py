"""Bulk encoding on Ray Data: shards of a corpus embedded by a pool of actors, written as Parquet.

The pipeline is Ray Data's batch-inference pattern: a dataset with one row per pending shard,
`map_batches` over a callable class per actor (`compute=ActorPoolStrategy(...)`, `num_gpus=1` per
actor on GPU clusters), streamed back to the driver for progress. Each actor call reads its shard's
rows straight from the input filesystem, embeds them and writes the shard file itself (see
`shards`): the rows of a shard are fixed by the plan and the file is committed by a rename, which
Ray Data's own readers and writers (random block boundaries, uuid file names) cannot give; that is
what makes a rerun skip finished work and every id land exactly once.

Two kinds of actor, both answering the same `scholarembed.v1.EmbedRequest`s (at most 64 texts each):
- `EngineShardEncoder` runs the server's embedding path in its process (`InProcessEmbedder`, loaded from
  the same `ServerConfig` as `serve`): the same validation, prompts, tokenizer, batcher (token-budget
  batches, out-of-memory halving), pooling and wire encodings as the server.
- `FleetShardEncoder` is a client of running servers (several addresses or a dns: target): the
  servers do all of it, and validate every request as they do for any client. Only what can succeed
  on a retry is retried: a full queue (RESOURCE_EXHAUSTED with a retry delay) and UNAVAILABLE.

An error that names a text (`texts[i]`) fails the shard with a CorpusError naming the record, e.g.
"corpus.jsonl:17: must not be empty or whitespace only".

Actors that die are restarted by Ray Data and their shard is run again (to a fresh temporary file),
so a lost actor costs at most its shard in progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..corpus import Columns, Record, record_error
from ..embedder import validate_embed_request
from ..errors import InvalidArgumentError
from ..names import named_embed_request
from .shards import (
    MANIFEST,
    Shard,
    ShardsError,
    completed_shards,
    filesystem,
    plan_shards,
    read_json,
    read_shard_rows,
    remove_temporary_files,
    uri_of,
    write_json,
    write_shard,
)

if TYPE_CHECKING:
    from scholarembed import EmbedResult
    from scholarembed.v1 import embedding_pb2

    from ..config import ServerConfig
    from ..engine import EmbeddingEngine

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"
TEXTS_PER_REQUEST = 64  # well under any server's limits, so the batcher mixes requests freely
REQUESTS_IN_FLIGHT = 16  # per engine actor: the batcher sorts 1,024 texts by length, tokenizing ahead


@dataclass(frozen=True)
class FleetSpec:
    """Running servers to embed through: "host:port" addresses (IP literals, round-robin) or one dns: target."""

    servers: tuple[str, ...]
    token: str | None = None
    tls: bool = False
    requests_in_flight: int = 4  # per actor: keeps every server's batcher fed

    def client(self) -> Any:
        from scholarembed import Client

        target = self.servers[0] if len(self.servers) == 1 else list(self.servers)
        return Client(target, timeout=None, token=self.token, tls=self.tls)


@dataclass(frozen=True)
class RunSettings:
    """What every shard of a run shares; recorded in the manifest, so a rerun must match it."""

    input_type: str
    dimensions: int  # resolved: a Matryoshka dimension of the model
    encoding: str
    truncation: str
    columns: Columns
    rows_per_shard: int

    def request(self, records: Sequence[Record]) -> embedding_pb2.EmbedRequest:
        """The EmbedRequest for some of a shard's records; titles belong to passages only."""
        titles = [r.title for r in records] if self.input_type == "passage" else []
        return named_embed_request(
            [r.text for r in records], input_type=self.input_type, titles=titles if any(titles) else [],
            dimensions=self.dimensions, encoding=self.encoding, truncation=self.truncation,
        )  # fmt: skip


@dataclass
class EmbedSummary:
    output: str
    rows: int  # embedded in this run
    tokens: int
    seconds: float
    actors: int
    actor_processes: int  # distinct processes that wrote shards: above `actors` when some were restarted
    shards_written: int
    shards_skipped: int  # already complete from an earlier run
    shards_total: int
    model: str
    dimensions: int
    encoding: str
    resources_per_actor: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"{self.rows:,} rows ({self.tokens:,} tokens) in {self.seconds:.1f} s: {self.rows_per_second:,.1f} rows/s, "
            f"{self.tokens_per_second:,.0f} tokens/s on {self.actors} actor(s) {self.resources_per_actor}; "
            f"{self.shards_written} shards written, {self.shards_skipped} already complete, "
            f"{self.shards_total} in {self.output}"
        )


def engine_metadata(engine: EmbeddingEngine) -> dict[str, Any]:
    return {
        "model": engine.model_id,
        "model_source": engine.model.source,
        "model_dimensions": engine.dimensions,
        "matryoshka_dimensions": list(engine.matryoshka_dims),
        "max_tokens": engine.max_tokens,
        "prompts": {
            "query": engine.prompts.query,
            "passage": engine.prompts.passage,
            "passage_untitled": engine.prompts.passage_untitled,
        },
    }


def fleet_metadata(info: Any) -> dict[str, Any]:
    return {
        "model": info.model_id,
        "model_source": info.model_source,
        "model_dimensions": info.dimensions,
        "matryoshka_dimensions": list(info.matryoshka_dimensions),
        "max_tokens": info.max_tokens,
        "prompts": {
            "query": info.query_prompt,
            "passage": info.passage_prompt,
            "passage_untitled": info.passage_untitled_prompt,
        },
    }


def shard_metadata(model: dict[str, Any], settings: RunSettings) -> dict[str, Any]:
    """What each shard file records: the model, the prompt its rows got, dimension and encoding."""
    prompts = model["prompts"]
    prompt = {"passage": f"{prompts['passage']} (untitled: {prompts['passage_untitled']})", "query": prompts["query"]}
    return {
        **model,
        "input_type": settings.input_type,
        "prompt": prompt.get(settings.input_type, "{text}"),
        "dimensions": settings.dimensions,
        "encoding": settings.encoding,
    }


class _ShardEncoder:
    """The part both actor kinds share: one call per batch of shard descriptions, one summary row per shard."""

    def __init__(self, output: str, settings: RunSettings, expected: dict[str, Any]) -> None:
        self.output = output
        self.settings = settings
        self.expected = expected  # what the driver's probe found; every actor must embed the same way
        self.metadata: dict[str, Any] = {}

    def check_metadata(self) -> None:
        """Refuse to write shards of another model or revision than the run's (a node with another
        snapshot in its cache, a server of another model behind the same address)."""
        if self.metadata != self.expected:
            differs = sorted(k for k in self.expected if self.metadata.get(k) != self.expected[k])
            raise ShardsError(
                f"this actor embeds with {[self.metadata.get(k) for k in differs]} for {differs}; "
                f"the run uses {[self.expected[k] for k in differs]}"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        summaries: dict[str, list[Any]] = {"shard": [], "rows": [], "tokens": [], "pid": []}
        for description in batch["shard"]:
            shard = Shard.from_json(json.loads(description))
            records = read_shard_rows(shard, self.settings.columns)
            chunks = [records[start : start + TEXTS_PER_REQUEST] for start in range(0, len(records), TEXTS_PER_REQUEST)]
            results = self.embed(chunks)
            token_counts = [count for result in results for count in result.token_counts]
            write_shard(
                self.output, shard, [r.id for r in records], np.concatenate([result.vectors for result in results]),
                token_counts, [flag for result in results for flag in result.truncated], self.metadata,
            )  # fmt: skip
            summaries["shard"].append(shard.name)
            summaries["rows"].append(len(records))
            summaries["tokens"].append(int(sum(token_counts)))
            summaries["pid"].append(os.getpid())
        return summaries

    def embed(self, chunks: list[list[Record]]) -> list[EmbedResult]:
        """One result per chunk, in order (vectors in the run's encoding, as `scholarembed.decode` reads them)."""
        raise NotImplementedError


class EngineShardEncoder(_ShardEncoder):
    """An actor running the server's embedding path: one per GPU, or a CPU actor with `cpus` torch threads."""

    def __init__(
        self, output: str, settings: RunSettings, expected: dict[str, Any], engine: ServerConfig, cpus: float,
        gpus: float,
    ) -> None:  # fmt: skip
        super().__init__(output, settings, expected)
        import torch

        from ..inprocess import InProcessEmbedder

        if gpus == 0:
            torch.set_num_threads(max(1, int(cpus)))
        # Ray points CUDA_VISIBLE_DEVICES at this actor's GPU, so "cuda" is the right one.
        self.embedder = InProcessEmbedder(dataclasses.replace(engine, device="cuda" if gpus > 0 else "cpu"))
        self.metadata = shard_metadata(engine_metadata(self.embedder.engine), settings)
        self.check_metadata()

    def embed(self, chunks: list[list[Record]]) -> list[EmbedResult]:
        from scholarembed import decode

        results: list[EmbedResult] = []
        try:
            for response in self.embedder.embed_many(map(self.settings.request, chunks), REQUESTS_IN_FLIGHT):
                results.append(decode(response))
        except InvalidArgumentError as error:
            raise record_error(chunks[len(results)], error) from None
        return results


class FleetShardEncoder(_ShardEncoder):
    """An actor that is a client of running servers; requests of one shard go out several at a time."""

    def __init__(self, output: str, settings: RunSettings, expected: dict[str, Any], fleet: FleetSpec) -> None:
        super().__init__(output, settings, expected)
        self.client = fleet.client()
        info = self.client.model_info()
        self.metadata = shard_metadata(fleet_metadata(info), settings)
        self.check_metadata()
        self.threads = ThreadPoolExecutor(fleet.requests_in_flight, thread_name_prefix="fleet")

    def embed(self, chunks: list[list[Record]]) -> list[EmbedResult]:
        return list(self.threads.map(self._embed_with_retry, chunks))

    def _embed_with_retry(self, chunk: list[Record], attempts: int = 8) -> EmbedResult:
        """What can succeed on a retry (`retryable`) is retried with backoff; anything else fails the shard
        at once, naming the record when the server names a text."""
        from scholarembed import InvalidArgumentError as RefusedError
        from scholarembed import ScholarEmbedError as CallError

        request = self.settings.request(chunk)
        for attempt in range(attempts):
            try:
                result = self.client.embed(
                    list(request.texts), input_type=self.settings.input_type, titles=list(request.titles),
                    dimensions=request.dimensions, encoding=self.settings.encoding,
                    truncation=self.settings.truncation,
                )  # fmt: skip
            except RefusedError as error:
                if not error.field_violations:
                    raise
                violation = error.field_violations[0]
                raise record_error(chunk, InvalidArgumentError(violation.field, violation.description)) from None
            except CallError as error:
                if not retryable(error) or attempt == attempts - 1:
                    raise
                time.sleep(max(error.retry_after_s or 0.0, min(0.25 * 2**attempt, 10.0)))
                continue
            if result.model != self.expected["model"]:  # each call may reach another server of the fleet
                raise ShardsError(
                    f"a server answered with model {result.model!r}; the run uses {self.expected['model']!r}"
                )
            return result
        raise AssertionError("unreachable")


def retryable(error: Exception) -> bool:
    """Whether a server's error can succeed on a retry: a full queue (RESOURCE_EXHAUSTED carrying the
    server's retry delay) or a server that is down, starting or draining (UNAVAILABLE). Not a message or a
    text too large for the server (RESOURCE_EXHAUSTED without a delay), nor anything else."""
    from scholarembed import ResourceExhaustedError, UnavailableError

    return isinstance(error, UnavailableError) or (
        isinstance(error, ResourceExhaustedError) and error.retry_after_s is not None
    )


def resolve_settings(
    engine: ServerConfig | None,
    fleet: FleetSpec | None,
    *,
    input_type: str,
    dimensions: int,
    encoding: str,
    truncation: str,
    columns: Columns,
    rows_per_shard: int,
) -> tuple[RunSettings, dict[str, Any]]:
    """Check the arguments before anything is written, with the validation every door shares; return the
    run's settings and its shard metadata. The model is loaded once here (on CPU) or asked over gRPC."""
    if (engine is None) == (fleet is None):
        raise ValueError("give exactly one of engine= (actors load the model) or fleet= (actors call servers)")
    probe_request = named_embed_request(
        ["probe"], input_type=input_type, dimensions=dimensions, encoding=encoding, truncation=truncation
    )
    if engine is not None:
        from ..app import load_engine

        probe = load_engine(dataclasses.replace(engine, device="cpu"))
        resolved = validate_embed_request(probe_request, probe, engine.max_texts_per_request).dimensions
        model = engine_metadata(probe)
        del probe
    else:
        assert fleet is not None
        with fleet.client() as client:
            # The servers' own validation: a bad dimension gets their InvalidArgumentError.
            resolved = client.embed(
                ["probe"], input_type=input_type, dimensions=dimensions, encoding=encoding, truncation=truncation
            ).dimensions
            model = fleet_metadata(client.model_info())
    settings = RunSettings(input_type, resolved, encoding, truncation, columns, rows_per_shard)
    return settings, shard_metadata(model, settings)


def plan_or_resume(inputs: Sequence[str], output: str, settings: RunSettings, metadata: dict[str, Any]) -> list[Shard]:
    """The run's shards: planned and recorded on the first run, read back on a rerun (which must ask for
    the same thing: the same inputs, settings and model)."""
    # Inputs as absolute paths or URIs, so a rerun from another folder is still the same run.
    key = {
        "inputs": [uri_of(*filesystem(source)) for source in inputs],
        "settings": asdict(settings),
        "model": metadata["model_source"],
    }
    manifest = read_json(output, MANIFEST)
    if manifest is not None:
        if manifest["key"] != key:
            raise ShardsError(
                f"output {output!r} holds a run with other inputs or settings: {manifest['key']}, "
                f"not {key}; resume with the same ones or use a new output folder"
            )
        return [Shard.from_json(s) for s in manifest["shards"]]
    shards = plan_shards(inputs, settings.columns, settings.rows_per_shard)
    write_json(output, MANIFEST, {"key": key, "metadata": metadata, "shards": [s.to_json() for s in shards]})
    return shards


def embed_corpus(
    inputs: str | Sequence[str],
    output: str,
    *,
    input_type: str,
    engine: ServerConfig | None = None,
    fleet: FleetSpec | None = None,
    dimensions: int = 0,
    encoding: str = "float32",
    truncation: str = "end",
    columns: Columns | None = None,
    rows_per_shard: int = 10_000,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    address: str | None = None,
    progress: bool = True,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> EmbedSummary:
    """Embed BEIR JSONL / Parquet `inputs` (files or folders; local paths or pyarrow URIs) into Parquet
    shards under `output`, on the Ray cluster at `address` (None: the one this process is connected to,
    else $RAY_ADDRESS, else a local one). Reruns skip complete shards. `on_shard` is called on the driver
    with each finished shard's summary row, as it arrives.

    `input_type` ("query", "passage" or "raw") is required: the model is asymmetric. `engine`: the
    settings of `serve` (a ServerConfig: model, revision, dtype, limits, ...) for actors that load the
    model; `fleet`: servers to call instead. `actors`: pool size; default one per GPU with `engine` on a
    GPU cluster, else one per CPU (less one). `gpus_per_actor`: default 1 with `engine` when the cluster
    has GPUs, else 0.
    """
    import ray

    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    settings, metadata = resolve_settings(
        engine, fleet, input_type=input_type, dimensions=dimensions, encoding=encoding, truncation=truncation,
        columns=columns or Columns(), rows_per_shard=rows_per_shard,
    )  # fmt: skip
    shards = plan_or_resume(inputs, output, settings, metadata)
    removed = remove_temporary_files(output)
    if removed:
        log.info("removed %d temporary files of interrupted attempts", removed)
    done = completed_shards(output)
    pending = [s for s in shards if s.name not in done]
    skipped = len(shards) - len(pending)

    started_ray = not ray.is_initialized()
    if started_ray:
        # Ray starts its workers at nice 15: next to other work on the same machine, that starves the
        # actors. A cluster started here runs them at normal priority; `ray start` clusters keep theirs.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=address, log_to_driver=False)
    try:
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if engine is not None and cluster_gpus >= 1 else 0.0
        if actors is None:
            actors = int(cluster_gpus // gpus_per_actor) if gpus_per_actor else int(cluster_cpus // cpus_per_actor) - 1
            actors = max(1, min(actors, max(1, len(pending))))
        resources = {"num_cpus": cpus_per_actor, "num_gpus": gpus_per_actor}
        summary = EmbedSummary(
            output=output, rows=0, tokens=0, seconds=0.0, actors=actors, actor_processes=0,
            shards_written=0, shards_skipped=skipped, shards_total=len(shards), model=metadata["model"],
            dimensions=settings.dimensions, encoding=encoding, resources_per_actor=resources,
        )  # fmt: skip
        if not pending:
            log.info("all %d shards of %s are complete", len(shards), output)
            return summary
        started = time.perf_counter()
        pids = _run_pool(
            ray, pending, output, settings, metadata, engine, fleet, actors, resources, progress, summary, on_shard
        )
        summary.seconds = time.perf_counter() - started
        summary.actor_processes = len(pids)
    finally:
        if started_ray:
            ray.shutdown()
    missing = [s.name for s in shards if s.name not in completed_shards(output)]
    if missing:
        raise ShardsError(f"{len(missing)} shards were not written, e.g. {missing[:3]}; run again to resume")
    write_json(output, SUMMARY, {**asdict(summary), "rows_per_second": summary.rows_per_second,
                                 "tokens_per_second": summary.tokens_per_second})  # fmt: skip
    return summary


def _run_pool(
    ray: Any,
    pending: list[Shard],
    output: str,
    settings: RunSettings,
    expected: dict[str, Any],
    engine: ServerConfig | None,
    fleet: FleetSpec | None,
    actors: int,
    resources: dict[str, float],
    progress: bool,
    summary: EmbedSummary,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> set[int]:
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = progress
    context.raise_original_map_exception = True  # a CorpusError reaches the driver as itself, with its message
    if engine is not None:
        encoder: type[_ShardEncoder] = EngineShardEncoder
        arguments: dict[str, Any] = {"output": output, "settings": settings, "expected": expected, "engine": engine,
                                     "cpus": resources["num_cpus"], "gpus": resources["num_gpus"]}  # fmt: skip
    else:
        encoder = FleetShardEncoder
        arguments = {"output": output, "settings": settings, "expected": expected, "fleet": fleet}
    # One block per shard, so any actor can take any shard; one shard per call.
    dataset = ray.data.from_items(
        [{"shard": json.dumps(s.to_json())} for s in pending], override_num_blocks=len(pending)
    ).map_batches(
        encoder,
        fn_constructor_kwargs=arguments,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    pids: set[int] = set()
    bar = tqdm(total=sum(s.rows for s in pending), unit="row", disable=not progress, file=sys.stderr)
    rows = iter(dataset.iter_rows())
    try:
        for row in rows:
            summary.rows += int(row["rows"])
            summary.tokens += int(row["tokens"])
            summary.shards_written += 1
            pids.add(int(row["pid"]))
            bar.update(int(row["rows"]))
            bar.set_postfix(shards=f"{summary.shards_written}/{len(pending)}", tokens=summary.tokens)
            if on_shard is not None:
                on_shard(dict(row))
    except Exception as error:
        raise _user_error(error) from error
    finally:
        # Closing the iterator shuts the run's executor down and kills its actors now, whatever ended the
        # loop (an error, an interrupt): no shard of this run is written after embed_corpus returns.
        getattr(rows, "close", lambda: None)()
        bar.close()
    return pids


def _user_error(error: BaseException) -> BaseException:
    """The error an actor raised on bad input, out of Ray's RayTaskError (which keeps it in `.cause`);
    anything else as it came."""
    from ray.exceptions import RayError

    from ..errors import ScholarEmbedError

    seen: BaseException | None = error
    while seen is not None:
        # RayTaskError(CorpusError) is an instance of both; the plain one, further down, reads better.
        if isinstance(seen, ScholarEmbedError) and not isinstance(seen, RayError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__ or seen.__context__
    return error
