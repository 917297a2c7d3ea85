"""One log line per delivered result (issue 14: operators see what reached the PACS)."""

import logging
from pathlib import Path

import pytest

from tests.export.test_outbox import Clock, Peer, _exporter, _results, peer  # noqa: F401 (fixture)


def test_each_delivery_logs_one_info_line(tmp_path: Path, peer: Peer,  # noqa: F811
                                          caplog: pytest.LogCaptureFixture) -> None:
    exporter = _exporter(tmp_path, peer.port, Clock())
    results = _results(tmp_path, 3)
    exporter.outbox.enqueue(1, results, ["pacs"])
    caplog.set_level(logging.INFO, logger="dicom_node.export")
    assert exporter.send_due() == 3
    lines = [r for r in caplog.records if "delivered to pacs" in r.getMessage()]
    assert sorted(r.getMessage().split()[3] for r in lines) == sorted(r.sop_instance_uid for r in results)
    assert {r.levelno for r in lines} == {logging.INFO} and len(lines) == 3
    assert all("status 0x0000" in r.getMessage() for r in lines)
