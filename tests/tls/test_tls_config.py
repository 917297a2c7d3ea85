"""TLS settings: paths relative to the config file, one clear line for every mistake, and
``dicom-node serve`` listening on both ports with DCMTK peers on each."""

import logging
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme

from dicom_node.cli import main
from dicom_node.config import ConfigError, load_settings
from dicom_node.tls import TLS12_CIPHERS, certificate_not_after, check_files
from tests.conftest import require_tool
from tests.nodeproc import CONFIG, NodeProcess, free_port
from tests.tls.pki import Pki, make_pki

TLS = """
[node]
listen = ["plain", "tls"]
[tls]
port = 2762
certificate = "pki/node.pem"
private_key = "pki/node.key"
ca_certificates = ["pki/ca.pem"]
"""


DESTINATION = '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 104\n'


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_todays_config_listens_plain_only_and_tls_defaults_are_safe() -> None:
    settings = load_settings(Path(__file__).resolve().parents[2] / "config" / "node.toml", environ={})
    assert settings.node.listen == ("plain",)
    assert settings.tls.port == 2762 and settings.tls.min_version == "TLSv1.2"
    assert settings.tls.require_client_certificate is True
    assert all(not d.tls for d in settings.destinations)
    for suite in TLS12_CIPHERS.split(":"):  # ECDHE and AEAD only: no DHE (RFC 9325 4.1)
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite), suite


def test_tls_paths_are_relative_to_the_file_and_destinations_inherit_nothing_they_set(
    tmp_path: Path, pki: Pki,
) -> None:
    text = TLS + """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example"
port = 2762
tls = true
tls_ca_certificates = ["pki/other-ca.pem"]
tls_server_name = "pacs.hospital"
tls_check_hostname = false
"""
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.tls.certificate == pki.node.certificate and settings.tls.ca_certificates == (pki.ca,)
    [pacs] = settings.destinations
    assert pacs.tls and pacs.tls_ca_certificates == (pki.other_ca,) and pacs.tls_certificate is None
    assert (pacs.tls_server_name, pacs.tls_check_hostname) == ("pacs.hospital", False)
    check_files(settings)  # every file loads


@pytest.mark.parametrize(("text", "expected"), [
    ('[node]\nlisten = ["tls"]\n', "'node.listen' has \"tls\" but 'tls.certificate'"),
    ('[node]\nlisten = ["ssl"]\n', "'node.listen' = ['ssl'] is invalid"),
    ('[node]\nlisten = []\n', "'node.listen' = [] is invalid"),
    ('[node]\nlisten = ["tls", "tls"]\n' + "[tls]" + TLS.split("[tls]")[1], "each once"),
    ('[tls]\ncertificate = "a.pem"\n', "'tls.certificate' and 'tls.private_key' go together"),
    ('[tls]\nmin_version = "TLSv1.1"\n', "never below TLS 1.2"),
    ('[node]\nlisten = ["tls"]\n[tls]\ncertificate = "a"\nprivate_key = "b"\n', "needs 'tls.ca_certificates'"),
    ('[node]\nport = 2762\nlisten = ["plain", "tls"]\n[tls]\ncertificate = "a"\nprivate_key = "b"\n'
     "require_client_certificate = false\n", "other than node.port"),
    ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 104\ntls = true\n',
     "'destinations[0].tls' = true needs"),
    ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 104\ntls_private_key = "k"\n',
     "'destinations[0].tls_certificate' and 'tls_private_key' go together"),
    ('[node]\ninstitution_name = "a\\\\b"\n', "'node.institution_name'"),
    # a tls_* key without tls = true would send in clear to a destination meant for TLS
    (DESTINATION + 'tls_ca_certificates = ["ca.pem"]\n',
     "'destinations[0].tls' = false is invalid with destinations[0].tls_ca_certificates set"),
    (DESTINATION + 'tls = false\ntls_certificate = "c.pem"\ntls_private_key = "k.pem"\n',
     "destinations[0].tls_certificate, destinations[0].tls_private_key set; expected 'tls = true'"),
    (DESTINATION + 'tls_server_name = "pacs.hospital"\n', "with destinations[0].tls_server_name set"),
    (DESTINATION + "tls_check_hostname = false\n", "with destinations[0].tls_check_hostname set"),
])
def test_tls_mistakes_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})
    assert expected in str(error.value) and str(path) in str(error.value), str(error.value)


@pytest.mark.parametrize(("broken", "key"), [
    ("certificate", "tls.certificate"), ("ca", "tls.ca_certificates"), ("key", "tls.certificate"),
])
def test_serve_with_an_unusable_tls_file_exits_2_naming_the_key_before_taking_the_data_dir(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], broken: str, key: str,
) -> None:
    if broken == "certificate":
        pki.node.certificate.unlink()
    elif broken == "ca":
        pki.ca.write_text("not a certificate\n")
    else:
        pki.node.private_key.write_bytes(pki.stranger.private_key.read_bytes())  # not its certificate's
    text = TLS.replace("[node]\n", f'[node]\ndata_dir = "{tmp_path / "data"}"\n') + "[web]\nenabled = false\n"
    path = write(tmp_path, text)
    assert main(["serve", "--config", str(path), "--set", "tls.port=0", "--port", "0"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("dicom-node: error: ") and key in last and str(path) in last, last
    assert not (tmp_path / "data").exists()


@pytest.mark.peers
def test_serve_listens_on_both_ports_and_dicom_node_echo_uses_a_destinations_tls(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str],
) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    tls_port = free_port()
    extra = f"""
[tls]
port = {tls_port}
certificate = "{pki.node.certificate}"
private_key = "{pki.node.private_key}"
ca_certificates = ["{pki.ca}"]
[[destinations]]
name = "self"
ae_title = "XAI_NODE"
host = "127.0.0.1"
port = {tls_port}
tls = true
"""
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    config = CONFIG.format(grace=5.0, web_port=free_port())
    (node_dir / "node.toml").write_text(
        config.replace('bind = "127.0.0.1"\n', 'bind = "127.0.0.1"\nlisten = ["plain", "tls"]\n') + extra)
    with NodeProcess(node_dir) as node:
        dcmtk = [echoscu, "-aet", "MODALITY", "-aec", "XAI_NODE", "-to", "10"]
        secure = subprocess.run([*dcmtk, "+tls", str(pki.client.private_key), str(pki.client.certificate),
                                 "+cf", str(pki.ca), "127.0.0.1", str(tls_port)],
                                capture_output=True, text=True, timeout=60)
        plain = subprocess.run([*dcmtk, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
        # the node's own CLI, through the [[destinations]] entry: TLS with the node's certificate
        assert main(["echo", "self", "--config", str(node_dir / "node.toml")]) == 0
        assert "success" in capsys.readouterr().out
        log = node.log.read_text()
    assert secure.returncode == 0, secure.stderr
    assert plain.returncode == 0, plain.stderr
    assert f"127.0.0.1:{tls_port} (DICOM TLS)" in log and f"127.0.0.1:{node.port} (plain DICOM)" in log


def test_a_tls_certificate_nothing_uses_is_warned_about_at_the_start(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.tls")
    unused = load_settings(write(tmp_path, TLS.replace('listen = ["plain", "tls"]', 'listen = ["plain"]')),
                           environ={})
    check_files(unused)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "'tls.certificate' is set but unused" in warning and str(tmp_path) in warning, warning
    caplog.clear()
    check_files(load_settings(write(tmp_path, TLS), environ={}))  # the TLS listener uses it
    sender = TLS.replace('listen = ["plain", "tls"]', 'listen = ["plain"]') + DESTINATION + "tls = true\n"
    check_files(load_settings(write(tmp_path, sender), environ={}))  # a destination with TLS uses it
    assert not caplog.records


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o400, False), (0o640, True), (0o644, True)])
def test_a_private_key_others_may_read_is_warned_about(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, mode: int, warned: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.tls")
    pki.node.private_key.chmod(mode)
    check_files(load_settings(write(tmp_path, TLS), environ={}))
    messages = [r.getMessage() for r in caplog.records]
    expected = [f"{tmp_path / 'node.toml'}: key 'tls.private_key': private key {pki.node.private_key} has "
                f"mode {mode:04o} (group or others have access); expected 0600 or 0400"]
    assert messages == (expected if warned else []), messages


@pytest.mark.parametrize(("days_left", "expected"), [
    (-3, "expired on 2026-05-29T12:00:00+00:00: peers will refuse it"),
    (10, "expires on 2026-06-11T12:00:00+00:00, in 10 days"),
    (30, "expires on 2026-07-01T12:00:00+00:00, in 30 days"),
    (31, None),
])
def test_a_node_certificate_expired_or_expiring_within_30_days_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, days_left: int, expected: str | None,
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom_node.tls")
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    ca = trustme.CA()
    (tmp_path / "pki").mkdir()
    ca.cert_pem.write_to_path(str(tmp_path / "pki" / "ca.pem"))
    issued = ca.issue_cert("127.0.0.1", not_before=now - timedelta(days=400),
                           not_after=now + timedelta(days=days_left))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "pki" / "node.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "pki" / "node.key"))
    (tmp_path / "pki" / "node.key").chmod(0o600)
    check_files(load_settings(write(tmp_path, TLS), environ={}), now=now)
    messages = [r.getMessage() for r in caplog.records]
    where = f"{tmp_path / 'node.toml'}: key 'tls.certificate': certificate {tmp_path / 'pki' / 'node.pem'} "
    assert messages == ([where + expected] if expected else []), messages


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
@pytest.mark.parametrize("not_after", [datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),  # UTCTime
                                       datetime(2050, 1, 1, tzinfo=UTC),  # GeneralizedTime from 2050
                                       datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)])
def test_certificate_not_after_agrees_with_pythons_own_parser(
    tmp_path: Path, key_type: trustme.KeyType, not_after: datetime,
) -> None:
    issued = trustme.CA(key_type=key_type).issue_cert("a.example", not_after=not_after, key_type=key_type)
    pem = "".join(blob.bytes().decode() for blob in issued.cert_chain_pems)  # leaf first, then its CA
    assert certificate_not_after(pem) == not_after
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "leaf.pem"))
    decoded = ssl._ssl._test_decode_cert(str(tmp_path / "leaf.pem"))  # type: ignore[attr-defined]
    assert datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded["notAfter"]), UTC) == not_after
