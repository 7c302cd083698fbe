"""What each door declares it supports: the suite holds every door to these declarations, and
scripts/gen_doors_docs.py writes them as the table in docs/doors.md. Standard library only, so the
generator can import it anywhere.

A feature a door does not list is supported: its cases must pass there. Otherwise the door declares
what it does instead, and the suite checks exactly that:
- `Refuses`: asking for it gets this error (code and field, in the door's own words), never a wrong result;
- `Splits`: the door cuts the input into requests itself, so a per-request limit never applies: vectors;
- `Ignores`: the door leaves the feature out, by its documented design: vectors as without it;
- `NotReported`: it works, but the door does not report it (the vectors are still checked);
- `Absent`: the door has no way to ask for it (no search call, no token option): no case runs there.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Feature(enum.Enum):
    """A row of the table; `group` heads a section of it."""

    QUERY = ("embedding", "query prompt")
    PASSAGE = ("embedding", "passage prompt")
    TITLES = ("embedding", "passage titles, one per text")
    RAW = ("embedding", "raw text, no prompt")
    INPUT_TYPE_REQUIRED = ("embedding", "no input type: refused (the model is asymmetric)")
    UNKNOWN_INPUT_TYPE = ("embedding", "an unknown input type: refused")
    MATRYOSHKA = ("embedding", "Matryoshka dimensions; any other: refused")
    FLOAT16 = ("embedding", "float16 vectors")
    BINARY = ("embedding", "binary vectors (sign bits)")
    TRUNCATION_END = ("embedding", "a text over max_tokens: cut at the end")
    TRUNCATION_ERROR = ("embedding", "a text over max_tokens: refused on request")
    TOKEN_COUNTS = ("embedding", "token counts and truncation flags")
    EMPTY_TEXT = ("embedding", "empty or whitespace-only texts: refused, naming the text")
    TITLES_FOR_PASSAGES = ("embedding", "titles with another input type: refused")
    TITLE_COUNT = ("embedding", "titles not one per text: refused")
    TEXT_LIMIT = ("embedding", "texts per request: limited")
    TOKEN_LIMIT = ("embedding", "tokens per request: limited")
    DENSE = ("search", "dense search, top_k, dimensions, passages")
    LEXICAL = ("search", "lexical search (BM25)")
    HYBRID = ("search", "hybrid search, rrf_k and depth")
    FILTER = ("search", "exact-match filter")
    CONDITIONS = ("search", "conditions: equals, any_of, numeric range")
    AUTH = ("access", "bearer tokens: none or a wrong one refused")

    @property
    def group(self) -> str:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class Refuses:
    code: str  # a gRPC status code name; "USAGE" for a command-line error (exit 2), "ValueError" for a local one
    field: str  # as the door names it
    note: str = ""


@dataclass(frozen=True)
class Splits:
    note: str


@dataclass(frozen=True)
class Ignores:
    note: str


@dataclass(frozen=True)
class NotReported:
    note: str


@dataclass(frozen=True)
class Absent:
    note: str


Support = Refuses | Splits | Ignores | NotReported | Absent


@dataclass(frozen=True)
class Door:
    name: str  # the suite's id
    title: str  # the table's column
    how: str  # what the suite drives, for the docs
    declared: Mapping[Feature, Support] = field(default_factory=dict)

    def support(self, feature: Feature) -> Support | None:
        """What the door does instead of `feature`; None: it supports it."""
        return self.declared.get(feature)


SEARCH_FEATURES = (Feature.DENSE, Feature.LEXICAL, Feature.HYBRID, Feature.FILTER, Feature.CONDITIONS)
OPENAI_ENCODINGS = Refuses("INVALID_ARGUMENT", "encoding_format", "OpenAI's encoding_format: float or base64 (float32)")
HTTP_COUNTS = NotReported("usage.total_tokens only")
TRITON_ENCODINGS = Refuses("INVALID_ARGUMENT", "encoding", "EMBEDDING is TYPE_FP32")
NO_TOKENS = Absent("Triton checks no tokens: put a gateway in front")
NO_SEARCH_TRITON = Absent("embeddings only")
BULK_SPLITS = Splits("splits the input into requests itself")
BULK_TITLES = Ignores("titles are read for passages only")
BULK_TITLE_COUNT = Absent("each record carries its own title")
CLIENT_NAMES = Refuses("ValueError", "InputType", "refused before sending")
CLIENT_REQUIRED = Absent("input_type is a required argument")

DOORS = (
    Door("grpc", "gRPC", "the generated stubs of protos/ (`EmbeddingService`, `SearchService`)"),
    Door(
        "http-openai",
        "HTTP: openai SDK",
        "the official `openai` SDK on `POST /v1/embeddings` (input_type, titles, truncation in `extra_body`)",
        {
            Feature.FLOAT16: OPENAI_ENCODINGS,
            Feature.BINARY: OPENAI_ENCODINGS,
            Feature.TOKEN_COUNTS: HTTP_COUNTS,
            **dict.fromkeys(SEARCH_FEATURES, Absent("OpenAI's API has no search: raw JSON on /v1/search")),
        },
    ),
    Door(
        "http-json",
        "HTTP: JSON",
        "raw JSON with httpx on `POST /v1/embeddings` and `POST /v1/search` (the proto's JSON mapping)",
        {Feature.FLOAT16: OPENAI_ENCODINGS, Feature.BINARY: OPENAI_ENCODINGS, Feature.TOKEN_COUNTS: HTTP_COUNTS},
    ),
    Door(
        "triton",
        "Triton",
        "plain `tritonclient` (gRPC) on the `scholarembed` model: TEXT and TITLE rows, parameters",
        {
            Feature.FLOAT16: TRITON_ENCODINGS,
            Feature.BINARY: TRITON_ENCODINGS,
            Feature.TITLE_COUNT: Refuses("INVALID_ARGUMENT", "TEXT", "Triton's own check: as many TITLE rows as TEXT"),
            **dict.fromkeys(SEARCH_FEATURES, NO_SEARCH_TRITON),
            Feature.AUTH: NO_TOKENS,
        },
    ),
    Door(
        "client-grpc",
        "Python client",
        "`scholarembed.Client` (gRPC)",
        {Feature.INPUT_TYPE_REQUIRED: CLIENT_REQUIRED, Feature.UNKNOWN_INPUT_TYPE: CLIENT_NAMES},
    ),
    Door(
        "client-triton",
        "Python client: Triton",
        "`scholarembed.triton.TritonClient`",
        {
            Feature.INPUT_TYPE_REQUIRED: CLIENT_REQUIRED,
            Feature.UNKNOWN_INPUT_TYPE: CLIENT_NAMES,
            Feature.FLOAT16: Refuses("INVALID_ARGUMENT", "encoding", "the model's output is float32"),
            Feature.BINARY: Refuses("INVALID_ARGUMENT", "encoding", "the model's output is float32"),
            **dict.fromkeys(SEARCH_FEATURES, NO_SEARCH_TRITON),
            Feature.AUTH: NO_TOKENS,
        },
    ),
    Door(
        "cli",
        "CLI in-process",
        "`scholarembed embed --model` on a JSONL file",
        {
            Feature.INPUT_TYPE_REQUIRED: Refuses("USAGE", "--type"),
            Feature.UNKNOWN_INPUT_TYPE: Refuses("USAGE", "--type"),
            Feature.TOKEN_COUNTS: NotReported("writes vectors only"),
            Feature.TITLES_FOR_PASSAGES: BULK_TITLES,
            Feature.TITLE_COUNT: BULK_TITLE_COUNT,
            Feature.TEXT_LIMIT: BULK_SPLITS,
            Feature.TOKEN_LIMIT: BULK_SPLITS,
            **dict.fromkeys(SEARCH_FEATURES, Absent("`scholarembed search` prints a table for people")),
            Feature.AUTH: Absent("no server"),
        },
    ),
    Door(
        "cli-server",
        "CLI via server",
        "`scholarembed embed --server` on a JSONL file (the client's EmbedStream)",
        {
            Feature.INPUT_TYPE_REQUIRED: Refuses("USAGE", "--type"),
            Feature.UNKNOWN_INPUT_TYPE: Refuses("USAGE", "--type"),
            Feature.TRUNCATION_ERROR: Refuses(
                "INVALID_ARGUMENT", "--truncation", "the client's embed_stream sends no truncation yet"
            ),
            Feature.TOKEN_COUNTS: NotReported("writes vectors only"),
            Feature.TITLES_FOR_PASSAGES: BULK_TITLES,
            Feature.TITLE_COUNT: BULK_TITLE_COUNT,
            Feature.TEXT_LIMIT: BULK_SPLITS,
            Feature.TOKEN_LIMIT: BULK_SPLITS,
            **dict.fromkeys(SEARCH_FEATURES, Absent("`scholarembed search` prints a table for people")),
            Feature.AUTH: Absent("no token option yet"),
        },
    ),
    Door(
        "ray",
        "Ray",
        "`embed_corpus` with engine actors, Parquet shards read back",
        {
            Feature.TITLES_FOR_PASSAGES: BULK_TITLES,
            Feature.TITLE_COUNT: BULK_TITLE_COUNT,
            Feature.TEXT_LIMIT: BULK_SPLITS,
            Feature.TOKEN_LIMIT: BULK_SPLITS,
            **dict.fromkeys(SEARCH_FEATURES, Absent("bulk embedding only; `scholarembed load` fills a collection")),
            Feature.AUTH: Absent("no server: actors load the model"),
        },
    ),
)
DOORS_BY_NAME = {door.name: door for door in DOORS}
