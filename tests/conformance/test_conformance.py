"""One contract, proven the same way on every door: each case of cases.py through each door of doors.py.

A door that supports a case's features must give the model card's vectors (tests/reference.py, which
shares no code with the server) or the case's refusal, in the door's words. A door that declares it
does something else for a feature is held to exactly that declaration. Search results are checked
against oracles computed here from the reference vectors and the proto's documented rules (filters,
BM25 matching words, reciprocal-rank fusion).
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reference import ModelCard, card_passage, card_query, cosine

from scholarembed.v1 import search_pb2 as spb

from .adapters import Failure, HitView, Vectors
from .cases import (
    AUTH_CASES,
    EMBED_CASES,
    MAX_TOKENS,
    MAX_TOP_K,
    PASSAGES,
    SEARCH_CASES,
    AuthCase,
    EmbedCase,
    Refusal,
    SearchCase,
)
from .doors import DOORS, Absent, Door, Feature, Ignores, NotReported, Refuses, Splits

Case = EmbedCase | SearchCase | AuthCase


def runs_on(door: Door, case: Case) -> bool:
    """A case runs on a door unless the door has no way to ask for one of its features."""
    return not any(isinstance(door.support(feature), Absent) for feature in case.needs)


def parameters(cases: tuple[Case, ...]) -> list[Any]:
    return [
        pytest.param(door, case, id=f"{door.name}: {case.name}")
        for door in DOORS
        for case in cases
        if runs_on(door, case)
    ]


def expected_refusal(door: Door, case: Case) -> Refuses | Refusal | None:
    """What the door must answer: a declared refusal (in the door's words), the case's own refusal (to be
    put in the door's words), or None for a result. A door that splits or ignores gives a result."""
    for feature in case.needs:
        support = door.support(feature)
        if isinstance(support, Refuses):
            return support
        if isinstance(support, Splits | Ignores):
            return None
    return case.refusal


def check_refused(outcome: Any, refusal: Refuses | Refusal, door_field: str | None) -> None:
    assert isinstance(outcome, Failure), f"expected {refusal}, got a result"
    assert outcome.code == refusal.code, outcome
    if refusal.code in ("USAGE", "ValueError"):  # a local error names the field in its message
        assert door_field is not None and door_field in outcome.message, outcome
    else:
        assert outcome.field == door_field, outcome


# -- embeddings ------------------------------------------------------------------------------------


def reference_prompt(case: EmbedCase, index: int) -> str:
    text = case.texts[index]
    if case.input_type == "query":
        return card_query(text)
    if case.input_type == "passage":
        return card_passage(text, case.titles[index] if len(case.titles) == len(case.texts) else "")
    return text


def check_vectors(outcome: Vectors, case: EmbedCase, card: ModelCard, door: Door) -> None:
    expected = np.array([card.embed(reference_prompt(case, i), case.dimensions) for i in range(len(case.texts))])
    vectors = outcome.vectors
    if case.encoding == "binary":
        assert vectors.dtype == np.uint8 and vectors.shape == (len(case.texts), math.ceil(case.output_dimensions / 8))
        bits = np.unpackbits(vectors, axis=1)[:, : case.output_dimensions].astype(bool)
        clear = np.abs(expected) > 1e-3  # a component this close to 0 may round to either side
        assert (bits == (expected > 0))[clear].all()
    else:
        assert vectors.dtype == {"float32": np.float32, "float16": np.float16}[case.encoding], vectors.dtype
        assert vectors.shape == (len(case.texts), case.output_dimensions)
        close = 0.99999 if case.encoding == "float32" else 0.999
        assert cosine(vectors.astype(np.float32), expected).min() >= close
        np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float64), axis=1), 1.0, atol=2e-3)
    if isinstance(door.support(Feature.TOKEN_COUNTS), NotReported):
        return
    if Feature.TOKEN_COUNTS in case.needs:
        assert outcome.token_counts is not None and outcome.truncated is not None, "the door reports no counts"
    if outcome.token_counts is not None:
        full = [len(card.tokenizer(reference_prompt(case, i))["input_ids"]) for i in range(len(case.texts))]
        assert outcome.token_counts == [min(count, MAX_TOKENS) for count in full]
        assert outcome.truncated == [count > MAX_TOKENS for count in full]


@pytest.mark.parametrize(("door", "case"), parameters(EMBED_CASES))
def test_embedding(door: Door, case: EmbedCase, doors: Any, card: ModelCard, request: Any) -> None:
    adapter = doors.get(door.name, request)
    outcome = adapter.embed(case)
    refusal = expected_refusal(door, case)
    if refusal is None:
        assert isinstance(outcome, Vectors), outcome
        check_vectors(outcome, case, card, door)
    elif isinstance(refusal, Refuses):
        check_refused(outcome, refusal, refusal.field)
    else:
        check_refused(outcome, refusal, adapter.field(refusal.field, case))


# -- search ----------------------------------------------------------------------------------------


def matches(passage: spb.Passage, request: spb.SearchRequest) -> bool:
    """The proto's filter rules: every `filter` entry equal, every condition met (values read as numbers
    for ranges)."""
    metadata = passage.metadata
    if any(metadata.get(key) != value for key, value in request.filter.items()):
        return False
    for condition in request.conditions:
        value = metadata.get(condition.key)
        kind = condition.WhichOneof("condition")
        if value is None:
            return False
        if kind == "equals" and value != condition.equals:
            return False
        if kind == "any_of" and value not in condition.any_of.values:
            return False
        if kind == "range":
            bounds, number = condition.range, float(value)
            checks = {"gt": number > bounds.gt, "gte": number >= bounds.gte, "lt": number < bounds.lt,
                      "lte": number <= bounds.lte}  # fmt: skip
            if not all(checks[name] for name in checks if bounds.HasField(name)):
                return False
    return True


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def dense_ranking(card: ModelCard, request: spb.SearchRequest, query: str) -> list[tuple[str, float]]:
    """Every passage the filters let through, by the reference cosine, best first."""
    query_vector = card.embed(card_query(query), request.dimensions)
    scored = [
        (p.id, float(cosine(query_vector, card.embed(card_passage(p.text, p.title), request.dimensions))[0]))
        for p in PASSAGES
        if matches(p, request)
    ]
    return sorted(scored, key=lambda item: -item[1])


def lexical_matches(request: spb.SearchRequest, query: str) -> set[str]:
    """Passages with a query word in their title or text (the corpus has no words that stem alike)."""
    return {p.id for p in PASSAGES if matches(p, request) and words(query) & words(p.title + " " + p.text)}


def check_dense(hits: list[HitView], ranking: list[tuple[str, float]], top_k: int) -> None:
    reference = dict(ranking)
    assert len(hits) == min(top_k, len(ranking))
    for hit in hits:
        assert hit.id in reference, f"{hit.id} does not pass the filters"
        assert hit.score == pytest.approx(reference[hit.id], abs=1e-4)
    scores = [reference[hit.id] for hit in hits]
    assert all(a >= b - 1e-4 for a, b in itertools.pairwise(scores)), "not best first"
    if len(hits) < len(ranking):  # nothing left out scores above the last hit
        assert max(score for id_, score in ranking if id_ not in {h.id for h in hits}) <= scores[-1] + 1e-4


def check_hybrid(hits: list[HitView], request: spb.SearchRequest, ranking: list[tuple[str, float]], query: str):
    rrf_k = request.hybrid.rrf_k or 60
    depth = request.hybrid.depth or min(max(100, request.top_k), MAX_TOP_K)
    dense_ranks = {id_: rank for rank, (id_, _) in enumerate(ranking[:depth], start=1)}
    lexical = lexical_matches(request, query)
    candidates = set(dense_ranks) | lexical
    assert len(hits) == min(request.top_k, len(candidates))
    for hit in hits:
        assert (hit.dense is not None) == (hit.id in dense_ranks), hit
        if hit.dense is not None:
            assert hit.dense[0] == dense_ranks[hit.id], hit
        assert hit.lexical is None or (hit.id in lexical and hit.lexical[0] <= depth), hit
        places = [place[0] for place in (hit.dense, hit.lexical) if place is not None]
        assert hit.score == pytest.approx(sum(1 / (rrf_k + rank) for rank in places), rel=1e-5)
    assert [h.id for h in hits] == [h.id for h in sorted(hits, key=lambda h: (-round(h.score, 6), h.id))]


def check_hits(results: list[list[HitView]], request: spb.SearchRequest, card: ModelCard) -> None:
    assert len(results) == len(request.queries)
    by_id = {p.id: p for p in PASSAGES}
    for hits, query in zip(results, request.queries, strict=True):
        if request.mode == spb.SEARCH_MODE_LEXICAL:
            assert {h.id for h in hits} == lexical_matches(request, query)
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        elif request.mode == spb.SEARCH_MODE_HYBRID:
            check_hybrid(hits, request, dense_ranking(card, request, query), query)
        else:
            check_dense(hits, dense_ranking(card, request, query), request.top_k)
        for hit in hits:
            stored = by_id[hit.id]
            if request.include_passages:
                assert (hit.title, hit.text, dict(hit.metadata)) == (stored.title, stored.text, dict(stored.metadata))
            else:
                assert (hit.title, hit.text, hit.metadata) == ("", "", ())


@pytest.mark.parametrize(("door", "case"), parameters(SEARCH_CASES))
def test_search(door: Door, case: SearchCase, doors: Any, card: ModelCard, request: Any) -> None:
    adapter = doors.get(door.name, request)
    outcome = adapter.search(case)
    refusal = expected_refusal(door, case)
    if refusal is None:
        assert not isinstance(outcome, Failure), outcome
        check_hits(outcome, case.request, card)
    elif isinstance(refusal, Refuses):
        check_refused(outcome, refusal, refusal.field)
    else:
        check_refused(outcome, refusal, adapter.field(refusal.field, case))


# -- access ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("door", "case"), parameters(AUTH_CASES))
def test_auth(door: Door, case: AuthCase, doors: Any, request: Any) -> None:
    outcome = doors.get(door.name, request).auth(case)
    if case.refusal is None:
        assert isinstance(outcome, Vectors) and outcome.vectors.shape[0] == 1, outcome
    else:
        check_refused(outcome, case.refusal, None)


# -- the declarations themselves -------------------------------------------------------------------


def test_every_feature_has_cases_and_every_door_runs_some() -> None:
    """A row of the doors table is proven by at least one case; a declared exception is about a feature
    some case exercises."""
    exercised = {feature for case in (*EMBED_CASES, *SEARCH_CASES, *AUTH_CASES) for feature in case.needs}
    assert exercised == set(Feature)
    for door in DOORS:
        assert set(door.declared) <= exercised
        assert any(runs_on(door, case) for case in EMBED_CASES), door.name


def test_the_doors_page_is_generated_from_these_declarations() -> None:
    """docs/doors.md is the table of these declarations: fails when it is stale (regenerate it with
    `python scripts/gen_doors_docs.py`)."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_doors_docs.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
