"""Bad input: a clear status naming the field, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scholarembed
from scholarembed import Client
from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc

QUERY = pb.INPUT_TYPE_QUERY
# Numbers the proto's enums and dimensions do not have. Everything else about a bad EmbedRequest (empty
# texts, input types, titles, limits, truncation) is one case of tests/conformance/, run on every door.
CASES = {
    "dimension above full": (pb.EmbedRequest(texts=["ok"], input_type=QUERY, dimensions=4096), "dimensions"),
    "unknown encoding": (pb.EmbedRequest(texts=["a"], input_type=QUERY, encoding=42), "encoding"),
    "unknown truncation": (pb.EmbedRequest(texts=["a"], input_type=QUERY, truncation=42), "truncation"),
}


@pytest.fixture(scope="module")
def stub(tiny_server):
    with grpc.insecure_channel(tiny_server.address, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


def assert_still_serving(stub) -> None:
    response = stub.Embed(pb.EmbedRequest(texts=["still here"], input_type=QUERY), timeout=30)
    assert len(response.embeddings) == 1


@pytest.mark.parametrize("case", CASES)
def test_invalid_argument_names_the_field(stub, case) -> None:
    request, field = CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(request, timeout=30)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    status = rpc_status.from_call(error)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == field
    assert_still_serving(stub)


def test_typed_client_raises_invalid_argument_with_field(tiny_server) -> None:
    with Client(tiny_server.address) as client, pytest.raises(scholarembed.InvalidArgumentError) as raised:
        client.embed_passages(["a", "b"], titles=["only one"])
    assert raised.value.field_violations[0].field == "titles"
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_client_rejects_a_bare_string_and_unknown_names() -> None:
    with Client("127.0.0.1:1") as client:
        with pytest.raises(TypeError):
            client.embed_queries("not a list")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"input_type|InputType"):
            client.embed(["x"], input_type="document")


def test_message_too_large_is_resource_exhausted(stub) -> None:
    huge = "protein " * (160 * 1024)  # ~1.3 MB, over the server's 1 MiB limit
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(pb.EmbedRequest(texts=[huge], input_type=QUERY), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(stub)


texts = st.lists(st.text(max_size=40), max_size=70)
requests = st.builds(
    pb.EmbedRequest,
    texts=texts,
    input_type=st.integers(0, 5),
    titles=st.lists(st.text(max_size=10), max_size=4),
    dimensions=st.sampled_from([0, 1, 16, 17, 32, 64, 65, 2**32 - 1]),
    encoding=st.integers(0, 5),
    truncation=st.integers(0, 4),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_arbitrary_requests_never_produce_internal(stub, request) -> None:
    try:
        response = stub.Embed(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    else:
        assert len(response.embeddings) == len(request.texts)
