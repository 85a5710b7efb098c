"""The guard over HTTPS: certificates are verified as urllib does, a trusted server's body arrives whole,
and the deadline still bounds a server that drips bytes through TLS. A loopback TLS server with a
certificate made here (`cryptography`); the guard's TLS context is swapped for one that trusts it only
where a test says so."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from laion_vq.download import guard
from laion_vq.download.guard import AddressPolicy, FetchError, FetchLimits, fetch
from laion_vq.testing.hostile_server import HostileServer

LIMITS = FetchLimits(timeout=2, deadline=1.5, policy=AddressPolicy.from_cidrs("127.0.0.1/32"))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "laion-vq-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


class TLSHostileServer(HostileServer):
    """The hostile server behind TLS."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(drip_interval_s=0.1)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)

    def _make_server(self):
        server = super()._make_server()
        server.socket = self.context.wrap_socket(server.socket, server_side=True)
        return server


@pytest.fixture(scope="module")
def server(certificate: tuple[Path, Path]) -> Iterator[TLSHostileServer]:
    with TLSHostileServer(*certificate) as s:
        yield s


@pytest.fixture()
def trusting(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's own TLS context (deadline-keeping sockets), trusting the test certificate too."""
    context = ssl.create_default_context(cafile=str(certificate[0]))
    context.sslsocket_class = guard._DeadlineSSLSocket
    monkeypatch.setattr(guard, "_tls_context", lambda: context)


def _https(server: TLSHostileServer, path: str) -> str:
    return server.url(path).replace("http://", "https://")


def test_an_untrusted_certificate_is_refused(server: TLSHostileServer) -> None:
    with pytest.raises(FetchError, match=r"^tls error: .*CERTIFICATE_VERIFY_FAILED"):
        fetch(_https(server, "/img/photo.jpg"), LIMITS)


def test_a_trusted_server_is_fetched_whole(server: TLSHostileServer, trusting: None) -> None:
    assert fetch(_https(server, "/img/photo.jpg"), LIMITS) == HostileServer.images()["/img/photo.jpg"]


def test_the_deadline_holds_through_tls(server: TLSHostileServer, trusting: None) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"^deadline"):
        fetch(_https(server, "/drip.jpg"), LIMITS)
    assert time.monotonic() - started < 10  # bounded by the deadline, not by the body's length
