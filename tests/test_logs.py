"""Log lines cannot be forged by peer data, and a noisy peer cannot flood the log."""

import io
import logging
from collections.abc import Iterator

import pytest

from dicom_node import logs
from dicom_node.logs import PeerLogLimiter, SafeFormatter, clean_text, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("tests.logs.captured")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_clean_text_escapes_every_control_character() -> None:
    assert clean_text("CT01") == "CT01"
    assert clean_text("A\nB\rC\x1b[31mD\x00E\tF\x7fG") == "A\\x0aB\\x0dC\\x1b[31mD\\x00E\\x09F\\x7fG"
    assert clean_text("x\u2028y\u202ez\x85") == "x\\u2028y\\u202ez\\x85"
    assert clean_text("Müller ÄÖ") == "Müller ÄÖ"  # printable non-ASCII stays (never mind the name)
    assert clean_text(b"\n") == "b'\\n'"  # str() of anything


def test_a_newline_in_an_ae_title_cannot_forge_a_record(
    captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    forged = "EVIL\nERROR tests.logs.captured: admin logged in\r\x1b[2K"
    logger.warning("rejected association from %s@%s", forged, "10.0.0.1")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "WARNING tests.logs.captured: rejected association from "
        "EVIL\\x0aERROR tests.logs.captured: admin logged in\\x0d\\x1b[2K@10.0.0.1"
    ]


def test_a_traceback_keeps_its_lines_but_none_starts_a_record(
    captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad AE\nCRITICAL tests.logs.captured: forged")
    except ValueError:
        logger.exception("failed for %s", "10.0.0.1")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "ERROR tests.logs.captured: failed for 10.0.0.1"
    assert len(lines) > 3
    assert all(line.startswith("  ") for line in lines[1:])
    assert any("bad AE" in line for line in lines[1:])


def test_setup_logging_installs_the_safe_formatter() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("INFO")
        assert [type(h.formatter) for h in root.handlers] == [SafeFormatter]
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_each_peer_gets_n_lines_a_minute_then_one_summary(
    captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    clock = Clock()
    limiter = PeerLogLimiter(logger, 3, clock)
    results = [limiter.log(logging.WARNING, "10.0.0.1", "dropped %s #%d", "10.0.0.1", i)
               for i in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert limiter.log(logging.WARNING, "10.0.0.2", "dropped %s", "10.0.0.2")  # its own budget
    clock.now += 59.9
    assert not limiter.log(logging.WARNING, "10.0.0.1", "dropped %s #%d", "10.0.0.1", 10)
    clock.now += 0.1
    assert limiter.log(logging.WARNING, "10.0.0.1", "dropped %s #%d", "10.0.0.1", 11)
    assert stream.getvalue().splitlines() == [
        "WARNING tests.logs.captured: dropped 10.0.0.1 #0",
        "WARNING tests.logs.captured: dropped 10.0.0.1 #1",
        "WARNING tests.logs.captured: dropped 10.0.0.1 #2",
        "WARNING tests.logs.captured: dropped 10.0.0.2",
        "WARNING tests.logs.captured: suppressed 8 log line(s) about 10.0.0.1 in the last minute",
        "WARNING tests.logs.captured: dropped 10.0.0.1 #11",
    ]


def test_lines_below_the_level_spend_no_budget(
    captured: tuple[logging.Logger, io.StringIO]
) -> None:
    logger, stream = captured
    logger.setLevel(logging.INFO)
    limiter = PeerLogLimiter(logger, 1, Clock())
    assert not limiter.log(logging.DEBUG, "10.0.0.1", "health check")
    assert limiter.log(logging.WARNING, "10.0.0.1", "junk")
    assert stream.getvalue().splitlines() == ["WARNING tests.logs.captured: junk"]


def test_peers_remembered_are_bounded(
    captured: tuple[logging.Logger, io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, stream = captured
    monkeypatch.setattr(logs, "MAX_PEERS", 2)
    clock = Clock()
    limiter = PeerLogLimiter(logger, 1, clock)
    assert limiter.log(logging.INFO, "a", "a")
    assert limiter.log(logging.INFO, "b", "b")
    assert limiter.log(logging.INFO, "c", "c")  # over the bound: shares the "others" budget
    assert not limiter.log(logging.INFO, "d", "d")
    clock.now += 60
    assert limiter.log(logging.INFO, "e", "e")  # a and b had nothing to report: forgotten
    assert len(limiter._peers) <= 3
    assert stream.getvalue().count("\n") == 4
