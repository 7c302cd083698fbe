"""TLS, mTLS and bearer tokens, with certificates made here by the `cryptography` package."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import scholarembed
from scholarembed import Client
from scholarembed.v1 import embedding_pb2 as pb
from scholarembed.v1 import embedding_pb2_grpc as pb_grpc
from scholarembed_server.config import ServerConfig

TOKEN = "s3cret-token-for-tests"
PEM = serialization.Encoding.PEM


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(subject: str, key, issuer_name: str, issuer_key, *, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _certificate("test-ca", ca_key, "test-ca", ca_key, ca=True)
    server_key, client_key = _key(), _key()
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": _certificate("localhost", server_key, "test-ca", ca_key).public_bytes(
            serialization.Encoding.PEM
        ),
        "server_key": _pem(server_key),
        "client_cert": _certificate("client", client_key, "test-ca", ca_key).public_bytes(PEM),
        "client_key": _pem(client_key),
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return {name: folder / f"{name}.pem" for name in files}


def test_tls_serves_tls_clients_and_refuses_plain_text(pki, in_process_server) -> None:
    server = in_process_server(tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]))
    with Client(server.address, root_certificates=pki["ca"].read_bytes()) as client:
        assert client.embed_queries(["protein"]).shape == (1, 64)
    with Client(server.address, timeout=60) as plain, pytest.raises(scholarembed.UnavailableError):
        plain.embed_queries(["protein"])


def test_mtls_requires_a_client_certificate(pki, in_process_server) -> None:
    server = in_process_server(
        tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca"])
    )
    with Client(
        server.address,
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes(),
    ) as client:
        assert client.embed_queries(["protein"]).shape == (1, 64)
    with (
        Client(server.address, root_certificates=pki["ca"].read_bytes(), timeout=60) as no_certificate,
        pytest.raises(scholarembed.UnavailableError),
    ):
        no_certificate.embed_queries(["protein"])


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# accepted tokens\nanother-token\n{TOKEN}\n")
    return path


def test_bearer_token_is_required(token_file, in_process_server) -> None:
    server = in_process_server(auth_token_file=str(token_file))
    with Client(server.address, token=TOKEN) as client:
        assert client.embed_queries(["protein"]).shape == (1, 64)
        assert len(list(client.embed_stream(["a", "b"]))) == 1
    for token in (None, "wrong-token", TOKEN + "x"):
        with Client(server.address, token=token) as client, pytest.raises(scholarembed.AuthenticationError) as error:
            client.embed_queries(["protein"])
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.address, token=token) as client, pytest.raises(scholarembed.AuthenticationError):
            list(client.embed_stream(["a"]))
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as error:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def list_services(channel: grpc.Channel) -> set[str]:
    """Server reflection's service list, as grpcurl asks for it."""
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    response = next(reflection.ServerReflectionInfo(iter([request]), timeout=60))
    return {service.name for service in response.list_services_response.service}


@pytest.mark.parametrize("open_probes", [True, False])
def test_probes_can_be_left_open(token_file, in_process_server, open_probes) -> None:
    """--auth-open-probes leaves health checking and reflection open, and nothing else; without it,
    probes need a token too."""
    server = in_process_server(auth_token_file=str(token_file), auth_open_probes=open_probes)
    with grpc.insecure_channel(server.address) as channel:
        if open_probes:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert "scholarembed.v1.EmbeddingService" in list_services(channel)
        else:
            for probe in (lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()),
                          lambda: list_services(channel)):  # fmt: skip
                with pytest.raises(grpc.RpcError) as raised:
                    probe()
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(server.address) as client, pytest.raises(scholarembed.AuthenticationError):
        client.model_info()
    with Client(server.address, token=TOKEN) as client:
        assert client.model_info().dimensions == 64


def test_tokens_come_from_the_environment_not_flags(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SCHOLAREMBED_AUTH_TOKENS", "one, two")
    assert ServerConfig().auth_tokens() == ["one", "two"]
    assert "auth_tokens" not in ServerConfig.__dataclass_fields__  # no flag can carry a token


@pytest.mark.parametrize(("min_interval_ms", "disconnected"), [(60_000, True), (10, False)])
def test_keepalive_enforcement_disconnects_clients_that_ping_too_often(
    in_process_server, min_interval_ms, disconnected
) -> None:
    """A misspelt option would be ignored silently, so the enforcement itself is tested."""
    server = in_process_server(keepalive_min_ping_interval_ms=min_interval_ms)
    pinging_every_100ms = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    release = threading.Event()

    def requests():
        yield pb.EmbedStreamRequest(request_id="0", request=pb.EmbedRequest(texts=["a"], input_type=1))
        release.wait(6)  # an idle stream: nothing but pings on the connection

    with grpc.insecure_channel(server.address, pinging_every_100ms) as channel:
        stream = pb_grpc.EmbeddingServiceStub(channel).EmbedStream(requests())
        if disconnected:
            with pytest.raises(grpc.RpcError) as error:
                list(stream)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "too many pings" in error.value.details().lower()
        else:
            assert [r.request_id for r in stream] == ["0"]
