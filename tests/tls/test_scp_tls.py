"""The SCP over DICOM TLS with real peers: DCMTK's echoscu and storescu, raw sockets, Python's ssl.

Certificates come from trustme, made in each test; the node runs in-process on free ports with
a plain and a TLS listener.
"""

import logging
import os
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trustme
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import NodeSettings, Settings, TlsSettings
from dicom_node.ingest.scp import IngestServer, start_ingest
from dicom_node.ingest.transport import DropReason
from dicom_node.store import InstanceStore
from tests.conftest import make_settings, require_tool
from tests.factories import ct_dataset, save
from tests.orthanc import Orthanc
from tests.tls.peers import handshake, tls12_server_context, tls_server
from tests.tls.pki import Identity, Pki, make_pki

pytestmark = pytest.mark.peers

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK disables Nagle only with this


def tls_settings(data_dir: Path, pki: Pki, handshake_timeout: float = 5.0,
                 require_client_certificate: bool = True) -> Settings:
    base = make_settings(data_dir, handshake_timeout=handshake_timeout)
    return replace(
        base,
        node=replace(base.node, listen=("plain", "tls")),
        tls=TlsSettings(port=0, certificate=pki.node.certificate, private_key=pki.node.private_key,
                        ca_certificates=(pki.ca,), require_client_certificate=require_client_certificate),
    )


class Events:
    """An audit sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


@contextmanager
def running(settings: Settings, audit: Events | None = None) -> Iterator[tuple[IngestServer, InstanceStore]]:
    store = InstanceStore(settings.node.data_dir, 0)
    server = start_ingest(settings, store, audit or Events())
    try:
        yield server, store
    finally:
        server.stop(grace_seconds=1.0)
        store.close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def node(tmp_path: Path, pki: Pki) -> Iterator[tuple[IngestServer, InstanceStore]]:
    with running(tls_settings(tmp_path / "data", pki, handshake_timeout=10.0)) as pair:
        yield pair


def dcmtk(program: str, port: int, *options: str, files: tuple[Path, ...] = (),
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    path = require_tool(program, "dcmtk")
    return subprocess.run([path, "-aet", "MODALITY", "-aec", "XAI_NODE", "-to", "10", *options,
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True,
                          timeout=timeout, env=DCMTK_ENV)


def tls_options(identity: Identity | None, ca: Path) -> list[str]:
    """DCMTK's TLS flags: our certificate (or none, anonymous), and the CA that signs the node."""
    mine = ["+tls", str(identity.private_key), str(identity.certificate)] if identity else ["+tla"]
    return [*mine, "+cf", str(ca)]


def python_echo(port: int) -> bool:
    """A plain C-ECHO from pynetdicom: the node still answers."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="XAI_NODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


def test_echoscu_storescu_and_findscu_succeed_with_a_certificate_of_the_nodes_ca(pki: Pki, tmp_path: Path) -> None:
    audit = Events()
    settings = tls_settings(tmp_path / "data", pki)
    settings = replace(settings, node=replace(settings.node, query_peers=("MODALITY",)))
    with running(settings, audit) as (server, store):
        study = _echo_and_store(server, store, pki, tmp_path)
        assert server.tls_port is not None
        out = tmp_path / "found"
        out.mkdir()
        found = dcmtk("findscu", server.tls_port, *tls_options(pki.client, pki.ca), "-S", "-X", "-od", str(out),
                      "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances")
        assert found.returncode == 0, found.stderr
        answers = [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
        assert [(a.StudyInstanceUID, int(a.NumberOfStudyRelatedInstances)) for a in answers] == [(study, 1)]
        assert python_echo(server.port)  # the plain port at the same time
    accepted = [fields for event, fields in audit.events if event == "association_accepted"]
    assert [a.get("tls") for a in accepted] == ["TLSv1.3", "TLSv1.3", "TLSv1.3", None]  # DCMTK 3.6.7 + OpenSSL 3


def _echo_and_store(server: IngestServer, store: InstanceStore, pki: Pki, tmp_path: Path) -> str:
    """C-ECHO and C-STORE over TLS; the stored instance's Study Instance UID."""
    assert server.tls_port is not None and server.tls_port != server.port
    echo = dcmtk("echoscu", server.tls_port, *tls_options(pki.client, pki.ca))
    assert echo.returncode == 0, echo.stderr
    ds = ct_dataset(size=32)
    path = save(ds, tmp_path / "in")
    stored = dcmtk("storescu", server.tls_port, *tls_options(pki.client, pki.ca), files=(path,))
    assert stored.returncode == 0, stored.stderr
    record = store.index.get(str(ds.SOPInstanceUID))
    assert record is not None and record.times_received == 1
    return str(ds.StudyInstanceUID)


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_a_client_without_a_certificate_of_the_nodes_ca_is_refused(
    node: tuple[IngestServer, InstanceStore], pki: Pki, tmp_path: Path, who: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node")
    server, store = node
    assert server.tls_port is not None
    identity = None if who == "no certificate" else pki.stranger
    ds = ct_dataset(size=32)
    path = save(ds, tmp_path / "in")
    echo = dcmtk("echoscu", server.tls_port, *tls_options(identity, pki.ca))
    stored = dcmtk("storescu", server.tls_port, *tls_options(identity, pki.ca), files=(path,))
    assert echo.returncode != 0 and stored.returncode != 0
    assert store.index.get(str(ds.SOPInstanceUID)) is None
    refused = [r.getMessage() for r in caplog.records if DropReason.TLS_FAILED.value in r.getMessage()]
    assert refused, [r.getMessage() for r in caplog.records]
    # the node is still up on both ports
    assert dcmtk("echoscu", server.tls_port, *tls_options(pki.client, pki.ca)).returncode == 0
    assert python_echo(server.port)


def test_a_plain_client_on_the_tls_port_fails_cleanly_and_the_node_stays_up(
    node: tuple[IngestServer, InstanceStore], pki: Pki, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node")
    server, _ = node
    assert server.tls_port is not None
    start = time.monotonic()
    plain = dcmtk("echoscu", server.tls_port)
    elapsed = time.monotonic() - start
    assert plain.returncode != 0
    assert elapsed < 6.0, elapsed  # refused at once, not left to the 10 s handshake timeout
    assert any(DropReason.TLS_FAILED.value in r.getMessage() for r in caplog.records)
    assert dcmtk("echoscu", server.tls_port, *tls_options(pki.client, pki.ca)).returncode == 0
    assert python_echo(server.port)


def test_without_required_client_certificates_an_anonymous_client_is_let_in(
    tmp_path: Path, pki: Pki,
) -> None:
    settings = tls_settings(tmp_path / "data", pki, require_client_certificate=False)
    with running(settings) as (server, _):
        assert server.tls_port is not None
        anonymous = dcmtk("echoscu", server.tls_port, *tls_options(None, pki.ca))
        stranger = dcmtk("echoscu", server.tls_port, *tls_options(pki.stranger, pki.ca))
    assert anonymous.returncode == 0, anonymous.stderr
    assert stranger.returncode != 0  # a certificate that is shown is still verified


def _still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_a_stalled_handshake_blocks_no_one_and_is_closed_at_the_timeout(tmp_path: Path, pki: Pki) -> None:
    """pynetdicom 3.0.4 handshakes in its accept loop: there, one silent connection blocks every
    later client until it closes (see the next test). The node handshakes in each connection's
    thread, under ingest.handshake_timeout."""
    timeout = 6.0  # long enough that an echo held up by the stalled connection shows (2 shared cores)
    with running(tls_settings(tmp_path / "data", pki, handshake_timeout=timeout)) as (server, _):
        assert server.tls_port is not None
        stalled = socket.create_connection(("127.0.0.1", server.tls_port))
        try:
            opened = time.monotonic()
            echo = dcmtk("echoscu", server.tls_port, *tls_options(pki.client, pki.ca))
            second = time.monotonic() - opened
            assert echo.returncode == 0, echo.stderr
            assert second < timeout - 1.5, second  # not held up until the stalled one's deadline
            assert _still_open(stalled)  # which is still waiting for its deadline
            deadline = opened + timeout + 5.0
            while _still_open(stalled) and time.monotonic() < deadline:
                time.sleep(0.05)
            closed_after = time.monotonic() - opened
        finally:
            stalled.close()
    assert timeout - 0.5 <= closed_after <= timeout + 3.0, closed_after


def test_the_defect_the_node_avoids_pynetdicoms_own_tls_server_blocks(tmp_path: Path, pki: Pki) -> None:
    """The control: upstream's server with the same context, one silent connection, and a second
    client whose TLS handshake gives up after 2 s. If this fails, pynetdicom was fixed."""
    from dicom_node.tls import server_context

    settings = tls_settings(tmp_path / "data", pki)
    ae = AE(ae_title="XAI_NODE")
    ae.add_supported_context(Verification)
    upstream = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context(settings))
    try:
        port = upstream.server_address[1]
        with socket.create_connection(("127.0.0.1", port)):
            _wait_accepted(port)  # the accept loop has taken it and blocks in its handshake
            with pytest.raises(TimeoutError):
                _handshake(port, _client(ssl.TLSVersion.TLSv1_3, "DEFAULT", pki), timeout=2.0)
    finally:
        upstream.shutdown()


def _wait_accepted(port: int, timeout: float = 5.0) -> None:
    """Poll until the listener on ``port`` has no connection left in its accept queue."""
    deadline = time.monotonic() + timeout
    while True:
        # ss -ltn: for a listener, Recv-Q is the number of connections not yet accepted
        [line] = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                                check=True).stdout.splitlines()
        if line.split()[1] == "0":
            return
        assert time.monotonic() < deadline, f"not accepted within {timeout} s: {line}"
        time.sleep(0.02)


def _client(version: ssl.TLSVersion, ciphers: str, pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)
    context.load_verify_locations(pki.ca)
    context.load_cert_chain(pki.client.certificate, pki.client.private_key)
    return context


def _handshake(port: int, context: ssl.SSLContext, timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        return str(conn.version())


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["TLSv1.0", "TLSv1.1"])
def test_tls_1_0_and_1_1_are_refused_by_the_node(
    node: tuple[IngestServer, InstanceStore], pki: Pki, version: ssl.TLSVersion,
) -> None:
    server, _ = node
    assert server.tls_port is not None
    # SECLEVEL=0: this client really offers the old version (OpenSSL 3 would refuse locally)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point is to use them
        old = _client(version, "DEFAULT:@SECLEVEL=0", pki)
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(server.tls_port, old)
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value.reason), refused.value  # the node's answer
    # the same client, allowed TLS 1.2, gets in
    assert _handshake(server.tls_port, _client(ssl.TLSVersion.TLSv1_2, "DEFAULT:@SECLEVEL=0", pki)) == "TLSv1.2"


def test_tls_1_3_is_offered_and_weak_tls_1_2_ciphers_are_refused(
    node: tuple[IngestServer, InstanceStore], pki: Pki,
) -> None:
    server, _ = node
    assert server.tls_port is not None
    assert _handshake(server.tls_port, _client(ssl.TLSVersion.TLSv1_3, "DEFAULT", pki)) == "TLSv1.3"


#: TLS 1.2 suites outside the node's policy that an RSA certificate could serve: RSA key
#: exchange (no forward secrecy), CBC, finite-field DHE (RFC 9325 4.1: SHOULD NOT).
WEAK_RSA_SUITES = ("AES128-SHA", "AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA", "DHE-RSA-AES128-GCM-SHA256")


@pytest.mark.parametrize("weak", WEAK_RSA_SUITES)
def test_weak_tls_1_2_suites_are_refused_by_the_node_though_its_rsa_certificate_could_serve_them(
    tmp_path: Path, weak: str,
) -> None:
    """With trustme's default ECDSA key, RSA-authenticated suites fail whatever the policy: an
    RSA PKI here, and the control shows the same suite agreed by a server without the policy.
    (The node's server context loads no DH parameters, so it refused DHE even when its list
    named DHE suites; the list's fix shows on the client side, in ``test_policy.py``.)"""
    rsa = make_pki(tmp_path / "rsa", trustme.KeyType.RSA)
    client = _client(ssl.TLSVersion.TLSv1_2, f"{weak}:@SECLEVEL=0", rsa)
    control = tls12_server_context(rsa.node.certificate, rsa.node.private_key, "ALL:@SECLEVEL=0", tmp_path)
    with tls_server(control) as port:
        assert handshake(port, client) == ("TLSv1.2", weak)
    with running(tls_settings(tmp_path / "data", rsa)) as (server, _):
        assert server.tls_port is not None
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            _handshake(server.tls_port, client)


def test_listening_on_tls_only_leaves_no_plain_port(tmp_path: Path, pki: Pki) -> None:
    base = tls_settings(tmp_path / "data", pki)
    settings = replace(base, node=replace(base.node, listen=("tls",)))
    with running(settings) as (server, _):
        assert [s.tls_context is not None for s in server.servers] == [True]
        assert server.tls_port == server.port
        assert dcmtk("echoscu", server.port, *tls_options(pki.client, pki.ca)).returncode == 0


def test_the_plain_node_of_todays_config_has_no_tls_listener(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    assert settings.node.listen == NodeSettings().listen == ("plain",)
    with running(settings) as (server, _):
        assert server.tls_port is None and len(server.servers) == 1
        assert python_echo(server.port)


def test_stop_closes_a_stalled_tls_handshake_at_once(tmp_path: Path, pki: Pki) -> None:
    settings = tls_settings(tmp_path / "data", pki, handshake_timeout=30.0)
    store = InstanceStore(settings.node.data_dir, 0)
    server = start_ingest(settings, store)
    try:
        assert server.tls_port is not None
        with socket.create_connection(("127.0.0.1", server.tls_port)) as stalled:
            deadline = time.monotonic() + 5
            while server.servers[1].open_connections() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # accepted, its thread in the TLS handshake
            assert server.servers[1].open_connections() == 1
            start = time.monotonic()
            assert server.stop(grace_seconds=5.0)  # clean: no thread left behind
            assert time.monotonic() - start < 4.0  # not the 5 s grace, not the 30 s handshake timeout
            stalled.settimeout(2.0)
            assert stalled.recv(1) == b""  # closed by the node
            deadline = time.monotonic() + 2.0  # and its thread, woken, has let go of it
            while server.servers[1].open_connections() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.servers[1].open_connections() == 0
    finally:
        store.close()


@pytest.fixture
def orthanc_program() -> str:
    return require_tool("Orthanc", "orthanc")


def test_orthanc_echoes_and_stores_to_the_node_over_tls(
    node: tuple[IngestServer, InstanceStore], pki: Pki, tmp_path: Path, orthanc_program: str,
) -> None:
    """Orthanc as the node's TLS client: its certificate (serverAuth and clientAuth) from the
    node's CA, and the node's CA to verify the node."""
    server, store = node
    assert server.tls_port is not None
    pacs = Orthanc(tmp_path / "orthanc", orthanc_program, {}, extra={
        "DicomModalities": {"node": {"AET": "XAI_NODE", "Host": "127.0.0.1", "Port": server.tls_port,
                                     "UseDicomTls": True}},
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.client.certificate),
        "DicomTlsPrivateKey": str(pki.client.private_key), "DicomTlsTrustedCertificates": str(pki.ca),
    })
    ds = ct_dataset(size=32)
    path = save(ds, tmp_path / "in")
    with pacs:
        pacs.post("/modalities/node/echo", {})  # raises on anything but 200
        uploaded = pacs.upload(path)
        pacs.post("/modalities/node/store", {"Resources": [uploaded["ID"]], "Synchronous": True})
    record = store.index.get(str(ds.SOPInstanceUID))
    assert record is not None and record.times_received == 1


def test_stalled_tls_handshakes_count_against_admission_and_are_evicted_for_a_good_peer(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture,
) -> None:
    """Three silent TLS connections fill the host's places; a real client evicts the oldest."""
    caplog.set_level(logging.WARNING, logger="dicom_node")
    base = tls_settings(tmp_path / "data", pki, handshake_timeout=30.0)
    settings = replace(base, ingest=replace(base.ingest, max_connections_per_host=3))
    with running(settings) as (server, _):
        assert server.tls_port is not None
        stalled = [socket.create_connection(("127.0.0.1", server.tls_port)) for _ in range(3)]
        try:
            deadline = time.monotonic() + 5
            while server.servers[1].open_connections() < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            echo = dcmtk("echoscu", server.tls_port, *tls_options(pki.client, pki.ca))
            assert echo.returncode == 0, echo.stderr
            stalled[0].settimeout(2.0)
            assert stalled[0].recv(1) == b""  # the oldest was evicted
            assert _still_open(stalled[1]) and _still_open(stalled[2])
        finally:
            for sock in stalled:
                sock.close()
    assert any(DropReason.EVICTED.value in r.getMessage() for r in caplog.records)
