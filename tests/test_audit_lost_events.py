"""An audit event that a full disk refuses is counted lost and leaves nothing in the trail, not
even the part of it that fitted: it is in the trail or counted, never both, never half."""

import json
import subprocess
import sys
from pathlib import Path

#: In a child: the trail's file may grow by 50 bytes only (RLIMIT_FSIZE), so the next event is
#: cut after 50 bytes, as on a disk whose last page had 50 bytes left.
_CUT_SHORT = """
import os, resource, signal, sys
from pathlib import Path
from dicom_node.audit import AuditTrail
folder = Path(sys.argv[1])
trail = AuditTrail(folder)
trail.record("association_accepted", calling_ae_title="KEPT")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
size = (folder / "audit.jsonl").stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 50, resource.RLIM_INFINITY))
for n in range(3):
    trail.record("association_accepted", calling_ae_title=f"LOST{n}")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
trail.record("association_accepted", calling_ae_title="AFTER")  # space again: a clean line
trail.close()
print(trail.errors)
"""


def test_an_event_cut_short_by_a_full_disk_is_undone_and_counted(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _CUT_SHORT, str(tmp_path)], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    text = (tmp_path / "audit.jsonl").read_text()
    assert text.endswith("\n")
    events = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert [e["calling_ae_title"] for e in events] == ["KEPT", "AFTER"]
