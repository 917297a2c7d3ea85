"""TLS settings: paths relative to the config file, one clear line for every mistake, and
``dicom-node serve`` listening on both ports with DCMTK peers on each."""

import subprocess
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.config import ConfigError, load_settings
from dicom_node.tls import TLS12_CIPHERS, check_files
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
    for suite in TLS12_CIPHERS.split(":"):  # forward secret and AEAD only (RFC 9325 4.2)
        assert suite.startswith(("ECDHE-", "DHE-")) and ("GCM" in suite or "CHACHA20" in suite), suite


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
