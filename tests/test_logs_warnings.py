"""Library warnings through the node's logging, and redacted tracebacks of encode failures."""

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.valuerep import validate_value

from dicom_node.cli import main
from dicom_node.logs import WARNINGS_LOGGER, route_library_warnings
from tests.test_cli import EXPLAIN_CONFIG

NAME, PATIENT_ID, BIRTH = "Zyxwvutsra^Qponmlkj", "ZQ-991177", "19310405"


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    route_library_warnings()
    caplog.set_level(logging.WARNING, logger=WARNINGS_LOGGER)
    yield
    for old in list(logging.getLogger(WARNINGS_LOGGER).filters):
        logging.getLogger(WARNINGS_LOGGER).removeFilter(old)


def _library_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == WARNINGS_LOGGER]


def test_highdicoms_multiline_warning_is_logged_once_on_one_line_without_the_name(
        routed: None, caplog: pytest.LogCaptureFixture) -> None:
    from highdicom.sr import PersonObserverIdentifyingAttributes

    for _ in range(4):  # as per series today: the registry is reset between them
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            PersonObserverIdentifyingAttributes(name="Zyxwvutsra")
    [line] = _library_warnings(caplog)
    assert line.startswith("highdicom: UserWarning: The string \"…\" is unlikely")
    assert "\n" not in line and "Zyxwvutsra" not in line and "(value_types.py:" in line


def test_pydicoms_warning_is_logged_once(routed: None, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            validate_value("LO", "x" * 70, pydicom_config.WARN)
    [line] = _library_warnings(caplog)
    assert line.startswith("pydicom: UserWarning:") and "exceeds the maximum length of 64" in line


def test_a_failed_encoding_logs_its_traceback_at_debug_without_patient_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.phantoms import write_study

    [path] = write_study(tmp_path / "in", 1, seed=3_000_002, size=256, findings={"nodule": True})
    ds = dcmread(path)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
    ds.save_as(path)

    def fails(sources: list, *args: object, **kwargs: object) -> list:  # as highdicom does: the message quotes values
        source = sources[0]
        raise ValueError(f"invalid name {source.PatientName!r} ({str(source.PatientName).upper()}), "
                         f"id {source.PatientID}, born {source.PatientBirthDate}")

    monkeypatch.setattr("dicom_node.pipeline.encode_series", fails)
    monkeypatch.setattr("dicom_node.cli.setup_logging", lambda level: None)  # keep caplog's handler
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    config = tmp_path / "node.toml"
    config.write_text(EXPLAIN_CONFIG.format(models=Path(__file__).resolve().parents[1] / "models"))
    assert main(["explain", str(path), "--out", str(tmp_path / "out"), "--config", str(config)]) == 1
    [record] = [r for r in caplog.records if "encoding failed" in r.getMessage()]
    text = record.getMessage()
    assert record.levelno == logging.DEBUG and "Traceback (most recent call last)" in text
    assert "ValueError: invalid name" in text and "[redacted]" in text
    for value in (*NAME.split("^"), NAME.upper().split("^")[0], PATIENT_ID, BIRTH):
        assert value not in text
