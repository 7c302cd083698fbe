"""The table of cases every door runs: an input, and what must come out. A new feature is a new row.

Inputs are door-neutral, in the proto's words (EmbedRequest's and SearchRequest's fields, names for
enums); each door's adapter turns them into its own wire format. What comes out is either vectors
(checked against the model card's code in tests/reference.py, never against the server) or a refusal:
a gRPC status code and the field it names, which the adapter turns into the door's words.

The servers the suite starts have small limits, so that the limit cases stay small: at most
`MAX_TEXTS` texts and `MAX_REQUEST_TOKENS` tokens a request, top_k up to `MAX_TOP_K`. The tiny model
cuts texts at `MAX_TOKENS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from conftest import SMALL_LIMITS
from tiny_model import WORDS

from scholarembed.v1 import search_pb2 as spb

from .doors import Feature

MAX_TEXTS = SMALL_LIMITS["max_texts_per_request"]
MAX_REQUEST_TOKENS = SMALL_LIMITS["max_tokens_per_request"]
MAX_TOP_K = SMALL_LIMITS["max_top_k"]
MAX_TOKENS = 128  # the tiny model's limit
DIMENSIONS = (64, 32, 16)  # the tiny model's Matryoshka dimensions, full size first

TEXTS = ("protein folding in the cell", "gene expression of tumor cells", "a cohort study of brain outcomes")
LONG = " ".join(WORDS * 3)  # well over MAX_TOKENS: five of them are over MAX_REQUEST_TOKENS


@dataclass(frozen=True)
class Refusal:
    code: str  # gRPC status code name
    field: str | None  # as EmbedRequest / SearchRequest name it; the adapter translates


@dataclass(frozen=True)
class EmbedCase:
    name: str
    texts: tuple[str, ...]
    input_type: str | None = "query"  # None: not sent
    titles: tuple[str, ...] = ()
    dimensions: int = 0
    encoding: str = "float32"
    truncation: str = "end"
    needs: tuple[Feature, ...] = ()
    refusal: Refusal | None = None  # None: vectors

    @property
    def output_dimensions(self) -> int:
        return self.dimensions or DIMENSIONS[0]


def invalid(field: str) -> Refusal:
    return Refusal("INVALID_ARGUMENT", field)


EMBED_CASES = (
    EmbedCase("query prompt", TEXTS, "query", needs=(Feature.QUERY,)),
    EmbedCase("passage prompt", TEXTS, "passage", needs=(Feature.PASSAGE,)),
    EmbedCase("passage titles", TEXTS, "passage", titles=("Folding", "", "Brains"), needs=(Feature.TITLES,)),
    EmbedCase("raw text", TEXTS, "raw", needs=(Feature.RAW,)),
    EmbedCase("full size named", TEXTS, "query", dimensions=64, needs=(Feature.MATRYOSHKA,)),
    EmbedCase("dimensions 32", TEXTS, "passage", dimensions=32, needs=(Feature.MATRYOSHKA,)),
    EmbedCase("dimensions 16", TEXTS, "query", dimensions=16, needs=(Feature.MATRYOSHKA,)),
    EmbedCase("unknown dimensions", TEXTS, dimensions=48, needs=(Feature.MATRYOSHKA,), refusal=invalid("dimensions")),
    EmbedCase("float16", TEXTS, "passage", encoding="float16", needs=(Feature.FLOAT16,)),
    EmbedCase("binary", TEXTS, "query", dimensions=32, encoding="binary", needs=(Feature.BINARY,)),
    EmbedCase(
        "a long text is cut at the end",
        (TEXTS[0], LONG),
        "passage",
        needs=(Feature.TRUNCATION_END, Feature.TOKEN_COUNTS),
    ),
    EmbedCase(
        "a long text under truncation error",
        (TEXTS[0], LONG),
        "passage",
        truncation="error",
        needs=(Feature.TRUNCATION_ERROR,),
        refusal=invalid("texts[1]"),
    ),
    EmbedCase("an empty text", (TEXTS[0], ""), needs=(Feature.EMPTY_TEXT,), refusal=invalid("texts[1]")),
    EmbedCase("a whitespace-only text", (" \n\t", TEXTS[1]), needs=(Feature.EMPTY_TEXT,), refusal=invalid("texts[0]")),
    EmbedCase("no texts", (), needs=(Feature.EMPTY_TEXT,), refusal=invalid("texts")),
    EmbedCase(
        "too many texts",
        (TEXTS * MAX_TEXTS)[: MAX_TEXTS + 1],
        "passage",
        needs=(Feature.TEXT_LIMIT,),
        refusal=invalid("texts"),
    ),
    EmbedCase(
        "too many tokens",
        (LONG,) * (MAX_REQUEST_TOKENS // MAX_TOKENS + 1),
        "raw",
        needs=(Feature.TOKEN_LIMIT,),
        refusal=invalid("texts"),
    ),
    EmbedCase(
        "no input type", TEXTS, input_type=None, needs=(Feature.INPUT_TYPE_REQUIRED,), refusal=invalid("input_type")
    ),
    EmbedCase(
        "unknown input type",
        TEXTS,
        input_type="document",
        needs=(Feature.UNKNOWN_INPUT_TYPE,),
        refusal=invalid("input_type"),
    ),
    EmbedCase(
        "titles with queries",
        TEXTS,
        "query",
        titles=("Folding", "Genes", "Brains"),
        needs=(Feature.TITLES_FOR_PASSAGES,),
        refusal=invalid("titles"),
    ),
    EmbedCase(
        "one title for three texts",
        TEXTS,
        "passage",
        titles=("Folding",),
        needs=(Feature.TITLE_COUNT,),
        refusal=invalid("titles"),
    ),
)


# -- search ----------------------------------------------------------------------------------------

COLLECTION = "conformance"
TOPICS = (
    "protein folding of chaperone molecules",
    "tumor immune response after therapy",
    "graphene band gap under strain",
    "dark matter halo density",
    "protein expression in tumor cells",
    "brain cohort outcome study",
    "virus infection and immune signal",
    "drug dose and survival risk",
    "mouse neuron receptor pathway",
    "clinical trial of tumor therapy",
    "protein receptor signal pathway",
    "human gene expression data",
)
VENUES = ("nature", "cell", "science")
PASSAGES = tuple(
    spb.Passage(
        id=f"p{number:02d}",
        title=f"Study {number}",
        text=text,
        metadata={"venue": VENUES[number % 3], "year": str(2014 + number)},
    )
    for number, text in enumerate(TOPICS)
)
QUERIES = ("protein folding", "tumor therapy")


@dataclass(frozen=True)
class SearchCase:
    name: str
    request: spb.SearchRequest
    needs: tuple[Feature, ...] = (Feature.DENSE,)
    refusal: Refusal | None = None  # None: hits, checked against the oracle for the request's mode


def search(**fields: object) -> spb.SearchRequest:
    return spb.SearchRequest(**{"collection": COLLECTION, "queries": list(QUERIES), "top_k": 5, **fields})


def condition(key: str, **kind: object) -> spb.MetadataCondition:
    return spb.MetadataCondition(key=key, **kind)  # type: ignore[arg-type]


CONDITIONS = [
    condition("venue", any_of=spb.StringSet(values=["nature", "science"])),
    condition("year", range=spb.NumericRange(gte=2017, lt=2024)),
]
HYBRID = spb.SEARCH_MODE_HYBRID
LEXICAL = spb.SEARCH_MODE_LEXICAL

SEARCH_CASES = (
    SearchCase("dense", search()),
    SearchCase("dense, passages included", search(include_passages=True, top_k=12)),
    SearchCase("dense at 32 dimensions", search(dimensions=32)),
    SearchCase("dense, filter", search(filter={"venue": "cell"}, top_k=12), needs=(Feature.FILTER,)),
    SearchCase("dense, conditions", search(conditions=CONDITIONS, top_k=12), needs=(Feature.CONDITIONS,)),
    SearchCase(
        "dense, equals and filter",
        search(filter={"venue": "nature"}, conditions=[condition("year", equals="2017")], top_k=12),
        needs=(Feature.FILTER, Feature.CONDITIONS),
    ),
    SearchCase("lexical", search(mode=LEXICAL, top_k=12), needs=(Feature.LEXICAL,)),
    SearchCase(
        "lexical, conditions",
        search(mode=LEXICAL, top_k=12, conditions=CONDITIONS),
        needs=(Feature.LEXICAL, Feature.CONDITIONS),
    ),
    SearchCase("hybrid", search(mode=HYBRID, top_k=6), needs=(Feature.HYBRID,)),
    SearchCase(
        "hybrid, rrf_k and depth",
        search(mode=HYBRID, top_k=3, hybrid=spb.HybridOptions(rrf_k=1, depth=4)),
        needs=(Feature.HYBRID,),
    ),
    SearchCase(
        "hybrid, filter",
        search(mode=HYBRID, top_k=12, filter={"venue": "science"}, include_passages=True),
        needs=(Feature.HYBRID, Feature.FILTER),
    ),
    SearchCase("an unknown collection", search(collection="absent"), refusal=Refusal("NOT_FOUND", None)),
    SearchCase("top_k 0", search(top_k=0), refusal=invalid("top_k")),
    SearchCase("top_k over the limit", search(top_k=MAX_TOP_K + 1), refusal=invalid("top_k")),
    SearchCase("an empty query", search(queries=["protein", " "]), refusal=invalid("queries[1]")),
    SearchCase("unknown dimensions", search(dimensions=48), refusal=invalid("dimensions")),
    SearchCase(
        "depth below top_k",
        search(mode=HYBRID, top_k=5, hybrid=spb.HybridOptions(depth=2)),
        needs=(Feature.HYBRID,),
        refusal=invalid("hybrid.depth"),
    ),
    SearchCase(
        "rrf_k over 10,000",
        search(mode=HYBRID, hybrid=spb.HybridOptions(rrf_k=10_001)),
        needs=(Feature.HYBRID,),
        refusal=invalid("hybrid.rrf_k"),
    ),
    SearchCase(
        "a condition of no kind",
        search(conditions=[condition("year")]),
        needs=(Feature.CONDITIONS,),
        refusal=invalid("conditions[0]"),
    ),
    SearchCase(
        "a range with its bounds crossed",
        search(conditions=[condition("year", range=spb.NumericRange(gt=2020, lt=2010))]),
        needs=(Feature.CONDITIONS,),
        refusal=invalid("conditions[0].range"),
    ),
)


# -- access ----------------------------------------------------------------------------------------

TOKEN = "conformance-token"


@dataclass(frozen=True)
class AuthCase:
    name: str
    token: str | None  # what the caller sends; the server accepts TOKEN only
    needs: tuple[Feature, ...] = (Feature.AUTH,)
    refusal: Refusal | None = Refusal("UNAUTHENTICATED", None)


AUTH_CASES = (
    AuthCase("no token", None),
    AuthCase("a wrong token", "not-" + TOKEN),
    AuthCase("the right token", TOKEN, refusal=None),
)
