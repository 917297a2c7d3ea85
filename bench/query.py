"""C-FIND speed: STUDY-level queries over an index of 100,000 instances.

The index is built through the store's own code (``instance_keys`` records as the store writes
them, in one transaction): 1,000 patients with 2 studies each, 5 series of 10 instances per
study, study dates over two years. Each query is timed (median of ``--repeats``) twice: the
matching alone (:mod:`dicom_node.query.match` SQL on the index), and a whole C-FIND through
pynetdicom to the node's SCP running in this process on loopback (association set up once; the
time from the request to the last response). The anchor is issue #15's target, 200 ms.

Usage: ``.venv/bin/python bench/query.py [--instances 100000] [--repeats 7]``
"""

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_node.ingest.scp import start_ingest
from dicom_node.query.match import find
from dicom_node.store import InstanceStore
from dicom_node.store.db import transaction
from dicom_node.store.keyindex import put_keys
from dicom_node.store.keys import Kind
from tests.conftest import make_settings

TARGET_MS = 200.0
FIRST_NAMES = ("JOHN", "JANE", "ALEX", "MARIA", "WEI", "FATIMA", "OLGA", "PAUL")


def build(store: InstanceStore, instances: int, seed: int = 15) -> dict[str, str]:
    """Fill the index; returns example values to query by."""
    rng = random.Random(seed)
    per_study = 50
    conn = store.index._conn  # one transaction for the whole build (the store's own writer)
    examples: dict[str, str] = {}
    with transaction(conn):
        for s in range(instances // per_study):
            patient = s // 2
            study = f"2.25.{10**6 + s}"
            date = f"{2023 + s % 2}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            keys = {"patient_id": f"PID{patient:06d}", "patient_name": f"PATIENT{patient:06d}^"
                    f"{FIRST_NAMES[patient % len(FIRST_NAMES)]}", "patient_birth_date": "19600101",
                    "patient_sex": "O", "study_instance_uid": study, "study_date": date,
                    "study_time": "101010", "accession_number": f"ACC{s:07d}", "study_id": str(s),
                    "study_description": "CT CHEST", "referring_physician_name": "",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}
            for i in range(per_study):
                series = f"{study}.{i // 10}"
                put_keys(conn, Kind.INPUT, f"instances/{study}/{series}/{i}.dcm", "1.2.840.10008.1.2.1", 0.0,
                         {**keys, "series_instance_uid": series, "modality": "CT", "series_number": i // 10,
                          "series_description": "AXIAL", "sop_instance_uid": f"{series}.{i}",
                          "instance_number": i})
            if s == 777:
                examples = {"PatientID": keys["patient_id"], "AccessionNumber": keys["accession_number"],
                            "PatientName": keys["patient_name"][:12].lower() + "*"}
    return examples


def queries(examples: dict[str, str]) -> dict[str, dict[str, str]]:
    base = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "StudyDate": "", "PatientName": "",
            "PatientID": "", "AccessionNumber": "", "ModalitiesInStudy": "",
            "NumberOfStudyRelatedInstances": ""}
    return {
        "Patient ID": {**base, "PatientID": examples["PatientID"]},
        "Accession Number": {**base, "AccessionNumber": examples["AccessionNumber"]},
        "Patient's Name wildcard": {**base, "PatientName": examples["PatientName"]},
        "Study Date, one week": {**base, "StudyDate": "20230301-20230307"},
        "Study Date, open range (last month)": {**base, "StudyDate": "20241201-"},
        "every study (universal)": base,
    }


def findscu(port: int, keys: dict[str, str]) -> int:
    """One C-FIND by DCMTK's findscu (TCP_NODELAY=1, as users are told to run it)."""
    args = [a for keyword, value in keys.items() for a in ("-k", f"{keyword}={value}")]
    subprocess.run(["findscu", "-S", "-aet", "BENCH", "-aec", "XAI_NODE", *args, "127.0.0.1", str(port)],
                   check=True, capture_output=True, env={**os.environ, "TCP_NODELAY": "1"})
    return 0


def median_ms(run: object, repeats: int) -> tuple[float, int]:
    times, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--findscu", action="store_true", help="also time DCMTK's findscu")
    parser.add_argument("--client-nodelay", action=argparse.BooleanOptionalAction, default=True,
                        help="the bench's SCU disables Nagle's algorithm (default: yes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp) / "data")
        settings = replace(settings, node=replace(settings.node, query_peers=("BENCH",)))
        store = InstanceStore(settings.node.data_dir)
        start = time.perf_counter()
        examples = build(store, args.instances)
        print(f"index of {store.index.find('SELECT count(*) FROM instance_keys', ())[0][0]} instances built "
              f"in {time.perf_counter() - start:.1f} s")
        server = start_ingest(settings, store)
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", server.port, ae_title=settings.node.ae_title)
        assert assoc.is_established
        if args.client_nodelay:  # as DCMTK does with TCP_NODELAY=1: the request goes at once
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
        try:
            for name, keys in queries(examples).items():
                query = find(keys)
                match_ms, matches = median_ms(lambda q=query: len(store.index.find(q.sql, q.params)),
                                              args.repeats)
                identifier = Dataset()
                for keyword, value in keys.items():
                    setattr(identifier, keyword, value)

                def c_find(ds: Dataset = identifier) -> int:
                    answers = assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind)
                    return sum(1 for status, _ in answers if status and status.Status == 0xFF00)

                find_ms, answered = median_ms(c_find, args.repeats)
                assert answered == matches, (name, answered, matches)
                print(f"{name:38s} {matches:5d} studies: matching {match_ms:7.1f} ms, "
                      f"C-FIND {find_ms:7.1f} ms = {find_ms / TARGET_MS:.2f} x the {TARGET_MS:.0f} ms target")
                if args.findscu:
                    dcmtk_ms, _ = median_ms(lambda k=keys: findscu(server.port, k), args.repeats)
                    print(f"{'':38s} {'':5s}          findscu (a process of its own, start included) "
                          f"{dcmtk_ms:7.1f} ms")
        finally:
            assoc.release()
            server.stop(1.0)
            store.close()


if __name__ == "__main__":
    main()
