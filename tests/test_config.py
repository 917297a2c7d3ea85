"""Settings: defaults, the three layers of overrides, and one clear line for every mistake."""

from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.config import ConfigError, load_settings, parse_assignment

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_embedded_default_loads_with_paths_relative_to_the_file() -> None:
    settings = load_settings(REPO / "config" / "node.toml", environ={})
    assert settings.node.ae_title == "XAI_NODE"
    assert settings.node.port == 11112
    assert settings.node.data_dir == REPO / "var"
    assert settings.models.dir == REPO / "models"
    assert settings.study.stable_seconds == 10
    assert [d.name for d in settings.destinations] == ["pacs"]
    [pipeline] = settings.pipelines
    assert pipeline.match == {"modality": ("CR", "DX")}
    assert pipeline.explain == ("gradcam", "lime") and pipeline.send_to == ("pacs",)


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nport = 1000\nae_title = "FROM_FILE"\n')
    env = {"DICOM_NODE_NODE_PORT": "2000", "DICOM_NODE_INGEST_MAX_INSTANCE_SIZE": "64 MiB"}
    settings = load_settings(path, environ=env, overrides=dict([parse_assignment("node.port=3000")]))
    assert settings.node.port == 3000
    assert settings.node.ae_title == "FROM_FILE"
    assert settings.ingest.max_instance_size == 64 * 2**20
    assert load_settings(path, environ=env).node.port == 2000


DESTINATION = '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 104\n'


def test_destination_timeouts_are_optional(tmp_path: Path) -> None:
    text = DESTINATION + "timeout_seconds = 45\n" + DESTINATION.replace('"a"', '"b"') + "[export]\nmax_unconfirmed = 2\n"
    settings = load_settings(write(tmp_path, text), environ={})
    own, plain = settings.destinations
    assert (own.timeout_seconds, own.connect_timeout_seconds) == (45.0, None)
    assert (plain.timeout_seconds, plain.connect_timeout_seconds) == (None, None)
    assert settings.export.max_unconfirmed == 2


def test_environment_lists_and_config_path(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    env = {"DICOM_NODE_CONFIG": str(path), "DICOM_NODE_NODE_ALLOWED_PEERS": '["CT01", "MR@10.1.2.3"]'}
    settings = load_settings(None, environ=env)
    assert settings.node.allowed_peers == ("CT01", "MR@10.1.2.3")
    assert settings.node.data_dir == tmp_path / "var"  # default, relative to the file


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ('[node]\nport = "abc"\n', {}, "node.toml: key 'node.port' = 'abc' is invalid; expected an integer"),
        ("[node]\nport = 70000\n", {}, "'node.port' = 70000 is invalid; expected a TCP port"),
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', {}, "'node.ae_title' = 'WAY_TOO_LONG_AE_TITLE'"),
        ('[node]\nallowed_peers = ["CT@somehost"]\n', {}, "@ and an IP address"),
        ("[node]\nprot = 1\n", {}, "unknown key 'node.prot'"),
        ("[nodes]\n", {}, "unknown table '[nodes]'"),
        ("[node\n", {}, "not valid TOML"),
        ('[ingest]\nmax_instance_size = "lots"\n', {}, 'a size in bytes'),
        ("[ingest]\nmax_pdu_size = 10\n", {}, "maximum PDU size from 4096"),
        ("", {"DICOM_NODE_NODE_PORT": "x"}, "environment variable DICOM_NODE_NODE_PORT: key 'node.port'"),
        ("", {"DICOM_NODE_NOPE_X": "1"}, "environment variable DICOM_NODE_NOPE_X: not a setting"),
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\n', {},
         "missing required key(s) ['port']"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\nsend_to = ["nowhere"]\n', {}, "pipelines[0].send_to"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\nexplain = ["magic"]\n', {}, "expected one of"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\nmatch = { colour = "red" }\n', {}, "match keys"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\nmatch = 5\n', {}, "'pipelines[0].match' = 5 is invalid; expected an inline table"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\nmatch = { modality = [["CT"]] }\n', {}, "non-empty list of non-empty strings"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\nmatch = { modality = [] }\n', {}, "non-empty list"),
        ('[[pipelines]]\nname = ""\nmodel = "m"\n', {}, "'pipelines[0].name' = '' is invalid"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\noutputs = []\n', {}, "'pipelines[0].outputs' = [] is invalid"),
        ('[[pipelines]]\nname = "p"\nmodel = "m"\noutputs = ["sc"]\n', {}, "'pipelines[0].outputs' = ['sc'] lacks 'sr'"),
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = ""\nport = 104\n', {}, "'destinations[0].host' = ''"),
        ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 0\n', {}, "a TCP port from 1 to 65535"),
        ("[workers]\nshutdown_grace_seconds = inf\n", {}, "expected a finite number"),
        ("[study]\nstable_seconds = nan\n", {}, "expected a finite number"),
        ("", {"DICOM_NODE_JOBS_LEASE_SECONDS": "inf"}, "expected a finite number"),
        (DESTINATION + 'timeout_seconds = "slow"\n', {}, "'destinations[0].timeout_seconds' = 'slow' is invalid; "
         "expected a finite number"),
        (DESTINATION + "connect_timeout_seconds = 0\n", {}, "'destinations[0].connect_timeout_seconds' = 0 is "
         "invalid; expected a number greater than 0"),
        ("[export]\nmax_unconfirmed = 0\n", {}, "'export.max_unconfirmed' = 0 is invalid"),
    ],
)
def test_mistakes_name_the_source_key_value_and_expectation(
    tmp_path: Path, text: str, env: dict, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), environ=env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_bad_set_flag() -> None:
    with pytest.raises(ConfigError, match=r"SECTION\.KEY=VALUE"):
        parse_assignment("port=1")


def test_cli_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[node]\nport = "abc"\n')
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(path) in err and "node.port" in err and "'abc'" in err


def test_serve_on_a_port_in_use_exits_2_naming_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    path = write(tmp_path, f'[node]\ndata_dir = "{tmp_path / "data"}"\nbind = "127.0.0.1"\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = main(["serve", "--config", str(path), "--port", str(busy.getsockname()[1])])
    assert code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("dicom-node: error: ") and "node.bind" in last and "node.port" in last


def test_serve_on_a_data_dir_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    path = write(tmp_path, f'[node]\ndata_dir = "{tmp_path / "afile"}"\nport = 0\n')
    assert main(["serve", "--config", str(path)]) == 2
    assert "node.data_dir" in capsys.readouterr().err


def test_serve_with_a_device_that_does_not_exist_exits_2_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f'[node]\ndata_dir = "{tmp_path / "data"}"\nport = 0\n'
                           '[inference]\ndevice = "cuda:99"\n')
    assert main(["serve", "--config", str(path)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "inference.device" in last and "cuda:99" in last
    assert not (tmp_path / "data").exists()  # stopped before it took the data folder
