"""Random writes through the store's API for the ``study_summary`` tests (the store's and the
query module's): records of a few studies whose values mostly agree."""

import random

from dicom_node.store.index import Index, InstanceRecord
from dicom_node.store.keys import KEY_COLUMNS

STUDIES = [f"2.25.{n}" for n in range(1, 6)]
MODALITIES = ["CT", "MR", "SR", "", "SEG"]
#: Values of the study's attributes: a study's records mostly agree, and sometimes do not (a
#: result leaves some out, a modality sends another description), or lack the key (NULL).
POOL = ["", "A", "B", "DOE^JOHN", "20240101", None]


def keys(rng: random.Random, study: str, series: str, sop: str, modality: str) -> dict[str, object]:
    values: dict[str, object] = {column: (rng.choice(POOL) if rng.random() < 0.3 else f"{column[:3]}-{study}")
                                 for column in KEY_COLUMNS}
    values.update(study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
                  modality=modality, series_number=rng.randint(1, 3), instance_number=rng.randint(1, 9))
    return values


def record(study: str, series: str, sop: str, modality: str, at: float) -> InstanceRecord:
    return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", series, study, "1.2.840.10008.1.2.1", modality,
                          "CHEST", "AXIAL", "MODALITY", 100, f"{study}/{series}/{sop}.dcm", at)


def step(index: Index, rng: random.Random, at: float, studies: list[str] = STUDIES) -> None:
    """One random write through the store's API."""
    study = rng.choice(studies)
    series = f"{study}.{rng.randint(1, 4)}"
    sop = f"2.25.9{rng.randint(1, 80)}"  # few UIDs: re-stores, moves and input/result clashes happen
    modality = rng.choice(MODALITIES)
    action = rng.random()
    if action < 0.5:
        index.put(record(study, series, sop, modality, at), "Maker", keys=keys(rng, study, series, sop, modality))
    elif action < 0.7:
        index.put_result(f"results/{study}/{series}/{sop}.dcm", "1.2.840.10008.1.2.1", at,
                         keys(rng, study, series, sop, modality))
    elif action < 0.9:
        stored = index.get(sop)
        if stored is not None:
            assert index.remove(stored)
    else:
        index.remove_result(sop)
