"""Server configuration: one dataclass, filled from flags, each flag defaulting to an environment variable.

This module imports nothing heavy: the command line reads it to say which extra is missing before torch,
the model or any door is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "LinerAI/embeddinggemma-300m-academic"
ENV_PREFIX = "SCHOLAREMBED_"
DEFAULT_HTTP_PORT = 8080
DEFAULT_METRICS_PORT = 9464  # the Prometheus exporter port OpenTelemetry registered
CUDA_BATCH_TOKENS = 65536  # an H100/H200's budget: 1.75x the eager throughput of 16,384 (2026-11-26 run)
CPU_BATCH_TOKENS = 16384


def default_tokenizer_threads() -> int:
    """Half the CPUs this process may use, 2 to 8: two threads tokenize about 1M tokens/s, below a GPU's rate."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(2, min(8, cpus // 2))


def batch_token_budget(max_batch_tokens: int, device_type: str) -> int:
    """--max-batch-tokens, where 0 (the default) means sized for the device."""
    if max_batch_tokens:
        return max_batch_tokens
    return CUDA_BATCH_TOKENS if device_type == "cuda" else CPU_BATCH_TOKENS


def default_data_dir() -> Path:
    """Where `scholarembed serve` keeps the embedded store unless told otherwise: $XDG_DATA_HOME/scholarembed,
    that is ~/.local/share/scholarembed (the XDG base directory rule: user data, kept across upgrades)."""
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "scholarembed"


def serve_defaults() -> dict[str, Any]:
    """What `scholarembed serve` turns on when no flag says otherwise: the whole product (the HTTP door,
    metrics, the embedded store in the default data folder). ServerConfig's own defaults stay "gRPC only",
    so a program or test that builds a server in-process gets exactly what it asks for."""
    return {"http_port": DEFAULT_HTTP_PORT, "metrics_port": DEFAULT_METRICS_PORT, "data_dir": str(default_data_dir())}


# `--no-<part>`: the serve default each turns off, and the fields it clears (the last flag given wins).
OFF_SWITCHES = {
    "--no-http": (("http_port",), "serve no HTTP door (the search page, OpenAI /v1/embeddings, /v1/search)"),
    "--no-metrics": (("metrics_port",), "serve no Prometheus /metrics"),
    "--no-index": (("data_dir", "index_uri"), "no passage store: embeddings only, no SearchService"),
}


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ServerConfig:
    model: str = _opt(DEFAULT_MODEL, "Hugging Face hub id or local folder of the model")
    served_model_name: str | None = _opt(
        None, "the model id clients see and collections record; default: the hub id, or a local folder's path"
    )
    revision: str | None = _opt(None, "hub revision (branch, tag or commit) when --model is a hub id")
    host: str = _opt("127.0.0.1", "address to bind; use 0.0.0.0 to serve beyond this machine")
    port: int = _opt(50051, "gRPC port; 0 picks a free one (see --port-file)")
    port_file: str | None = _opt(None, "write the bound gRPC port to this file once serving")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _opt("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16")
    max_tokens: int | None = _opt(None, "longest input in tokens; default: the model's own limit")
    matryoshka_dims: str | None = _opt(None, "comma-separated dimensions a request may ask for, e.g. 768,512,256,128")
    max_texts_per_request: int = _opt(1024, "most texts in one EmbedRequest")
    max_batch_tokens: int = _opt(
        0, "padded-token budget of one forward pass (rows x longest row); 0: 65536 on CUDA, 16384 elsewhere"
    )
    max_queue_tokens: int = _opt(2_000_000, "tokens that may wait; beyond, unary calls get RESOURCE_EXHAUSTED")
    max_wait_ms: float = _opt(2.0, "how long a lone request waits for company before its batch runs")
    max_message_bytes: int = _opt(32 * 1024 * 1024, "largest gRPC message accepted or sent")
    stream_window: int = _opt(8, "requests of one EmbedStream processed at once; the rest wait in flow control")
    tokenizer_threads: int = _opt(
        default_tokenizer_threads(), "threads that tokenize, overlapping the forward pass (default: half the CPUs, 2-8)"
    )
    compile: str = _opt(
        "auto", "torch.compile the repeated layer once per bucket length, served early: auto (on with CUDA), on, off"
    )
    compile_mode: str = _opt("default", "torch.compile mode, e.g. max-autotune-no-cudagraphs")
    compile_artifacts: str | None = _opt(
        None, "folder written by `scholarembed compile`: its compilations are loaded at start instead of made"
    )
    compile_cache_dir: str = _opt(
        "~/.cache/scholarembed/inductor", "persistent compile cache (inductor, Triton): restarts load, not compile"
    )
    buckets: str = _opt(
        "auto", "static batch shapes: auto (on when compiling), on, off, or bucket lengths, e.g. 64,128,256,512"
    )
    tail: str = _opt("smaller", "a batch short of its bucket's rows: smaller (row ladder) or pad (full rows)")
    bucket_row_step: int = _opt(4, "row ladder of a bucket below its full row count: 1, step, step^2, ...")
    data_dir: str | None = _opt(
        None, "folder of the embedded passage store (FAISS, SQLite, a lexical index); enables SearchService"
    )
    index_uri: str | None = _opt(
        None, "Milvus URI (http://host:19530, or a milvus-lite .db file) instead of the embedded store"
    )
    index_kind: str = _opt("flat", "vector index of new collections: flat (exact), hnsw or ivf")
    vector_storage: str = _opt("float16", "precision of stored vectors: float16 or float32")
    max_top_k: int = _opt(1000, "largest top_k a search may ask for")
    max_tokens_per_request: int = _opt(1_048_576, "most tokens (after truncation) in one request")
    max_concurrent_rpcs: int = _opt(
        1000,
        "calls in progress server-wide (probes aside); beyond, unary calls get RESOURCE_EXHAUSTED with a retry "
        "hint and streams wait",
    )
    max_concurrent_streams: int = _opt(
        100, "calls at once on one HTTP/2 connection (grpc.max_concurrent_streams); a client queues the rest"
    )
    keepalive_min_ping_interval_ms: int = _opt(10_000, "clients pinging more often than this are disconnected")
    tls_cert: str | None = _opt(None, "PEM certificate chain: serve TLS instead of plain text")
    tls_key: str | None = _opt(None, "PEM private key of --tls-cert")
    tls_client_ca: str | None = _opt(None, "PEM CA bundle: require client certificates signed by it (mTLS)")
    auth_token_file: str | None = _opt(
        None, "file of accepted bearer tokens, one per line; tokens may also come from $SCHOLAREMBED_AUTH_TOKENS"
    )
    auth_open_probes: bool = _opt(False, "with auth on, leave health checking and reflection open for probes")
    metrics_port: int | None = _opt(None, "port of Prometheus /metrics (0 picks a free one)")
    http_port: int | None = _opt(
        None, "port of the HTTP door: the search page, OpenAI /v1/embeddings, /v1/search, /health (0: a free one)"
    )
    http_max_body_bytes: int = _opt(16 * 1024 * 1024, "largest HTTP request body; beyond, 413")
    http_default_input_type: str | None = _opt(
        None,
        "prompt (query, passage or raw) of an HTTP embeddings request that names neither input_type nor a "
        ":query/:passage model; unset, such a request is refused (400), as on every other door",
    )
    log_format: str = _opt("text", "text or json (one JSON object per line, with request ids)")
    grace_s: float = _opt(20.0, "on SIGTERM, seconds in-flight calls get to finish")
    forward_timeout_s: float = _opt(
        300.0,
        "seconds a forward pass (or the wait for its vectors) may take before the model thread counts as "
        "unreachable: the server reports NOT_SERVING and exits",
    )

    def auth_tokens(self) -> list[str]:
        """Accepted bearer tokens, from --auth-token-file and $SCHOLAREMBED_AUTH_TOKENS (comma-separated).

        Never from a flag's value: command lines are visible to every user of the machine.
        """
        tokens = [t.strip() for t in os.environ.get(ENV_PREFIX + "AUTH_TOKENS", "").split(",")]
        if self.auth_token_file:
            tokens += [line.strip() for line in Path(self.auth_token_file).read_text().splitlines()]
        return [token for token in tokens if token and not token.startswith("#")]

    @property
    def matryoshka_dim_list(self) -> list[int] | None:
        if not self.matryoshka_dims:
            return None
        return [int(part) for part in str(self.matryoshka_dims).split(",") if part.strip()]


def add_arguments(parser: argparse._ActionsContainer, only: Collection[str] | None = None) -> None:
    """One flag per ServerConfig field (or per field in `only`), with serve's defaults; SCHOLAREMBED_<FIELD>,
    if set, replaces a default."""
    defaults = serve_defaults()
    for config_field in dataclasses.fields(ServerConfig):
        if only is not None and config_field.name not in only:
            continue
        env_name = ENV_PREFIX + config_field.name.upper()
        default = os.environ.get(env_name, defaults.get(config_field.name, config_field.default))
        kind = _field_type(config_field)
        if kind is bool:
            parser.add_argument(
                "--" + config_field.name.replace("_", "-"),
                action=argparse.BooleanOptionalAction,
                default=str(default).lower() in ("1", "true", "yes"),
                help=f"{config_field.metadata['help']} [env {env_name}]",
            )
            continue
        parser.add_argument(
            "--" + config_field.name.replace("_", "-"),
            type=kind,
            default=None if default is None else kind(default),
            help=f"{config_field.metadata['help']} [env {env_name}; default {default}]",
        )
    for flag, (fields, help) in OFF_SWITCHES.items():
        parser.add_argument(flag, nargs=0, action=_TurnOff, dest=fields[0], const=fields, help=help)


class _TurnOff(argparse.Action):
    """Set each field in `const` to None."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any) -> None:
        for name in self.const:
            setattr(namespace, name, None)


def from_arguments(arguments: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(arguments, f.name) for f in dataclasses.fields(ServerConfig)})


def _field_type(config_field: dataclasses.Field[Any]) -> type:
    annotation = str(config_field.type)
    for kind in (bool, int, float):
        if annotation.startswith(kind.__name__):
            return kind
    return str


# What each optional part needs, as (modules, the extra that brings them).
SERVER_MODULES = ("torch", "transformers", "safetensors", "huggingface_hub", "grpc_health", "grpc_reflection",
                  "prometheus_client", "faiss")  # fmt: skip
HTTP_MODULES = ("fastapi", "uvicorn", "orjson")


def missing_extra(config: ServerConfig) -> str | None:
    """What to pip install before this configuration can serve, or None. Checked before anything heavy is
    imported, so a missing package is one line naming the fix, not a traceback after the model has loaded."""
    needs: list[tuple[Sequence[str], str, str]] = [(SERVER_MODULES, "server", "the server")]
    if config.http_port is not None:
        needs.append((HTTP_MODULES, "http", "the HTTP door (on by default; --no-http turns it off)"))
    if config.index_uri:
        # A path ending in .db is opened in this process by milvus-lite; a URL reaches a Milvus server.
        modules = ("pymilvus", "milvus_lite") if config.index_uri.endswith(".db") else ("pymilvus",)
        needs.append((modules, "milvus", f"--index-uri {config.index_uri}"))
    for modules, extra, what in needs:
        absent = [module for module in modules if importlib.util.find_spec(module) is None]
        if absent:
            return f"{what} needs {', '.join(absent)}: pip install 'scholarembed[{extra}]'"
    return None
