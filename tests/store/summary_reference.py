"""The reference for ``study_summary``: what the query module computed by grouping every
``instance_keys`` record per study before store schema 5 (its SQL, kept here as it was)."""

import sqlite3

from dicom_node.store.keys import KEYS, Level

#: The study's attributes (the keys of the PATIENT and STUDY levels but the study's UID).
ATTRIBUTES = tuple(key.column for key in KEYS if key.level in (Level.PATIENT, Level.STUDY)
                   and not key.items and key.column != "study_instance_uid")

#: Per study: the columns of ``study_summary`` a search reads, in this order.
COLUMNS = ("study_instance_uid", "instance_count", "series_count", "modalities", *ATTRIBUTES)

GROUPED = (
    "SELECT study_instance_uid, count(*), (SELECT count(DISTINCT s.series_instance_uid) FROM instance_keys s "
    "WHERE s.study_instance_uid = instance_keys.study_instance_uid), "
    "replace(group_concat(DISTINCT modality), ',', '\\'), "
    + ", ".join(f"coalesce(max({column}), '')" for column in ATTRIBUTES)
    + " FROM instance_keys GROUP BY study_instance_uid ORDER BY study_instance_uid")
SUMMARISED = f"SELECT {', '.join(COLUMNS)} FROM study_summary ORDER BY study_instance_uid"


def grouped(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    """Every study as the records grouped give it."""
    return conn.execute(GROUPED).fetchall()


def summarised(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    """Every study as ``study_summary`` holds it."""
    return conn.execute(SUMMARISED).fetchall()


def wrong_holders(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    """(study, attribute, held count, records holding it) where ``n_<attribute>`` is not the
    number of the study's records that hold its greatest value (the counts deletes rely on)."""
    wrong: list[tuple[object, ...]] = []
    for column in ATTRIBUTES:
        wrong += conn.execute(
            f"SELECT s.study_instance_uid, '{column}', s.n_{column}, (SELECT count(*) FROM instance_keys k "
            f"WHERE k.study_instance_uid = s.study_instance_uid AND ifnull(k.{column}, '') = s.{column}) AS n "
            f"FROM study_summary s WHERE s.n_{column} != n").fetchall()
    return wrong
