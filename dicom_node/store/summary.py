"""``study_summary``: one record per study of ``instance_keys``, holding what a STUDY-level search
answers (store schema 5), so that search reads a record per study instead of grouping the
records of every instance (:mod:`dicom_node.query.match`).

A study's record holds, for each key of the PATIENT and STUDY levels (:data:`ATTRIBUTES`), the
greatest value its instances' records hold, '' for none (``coalesce(max(column), '')`` over
them: a result may leave out what its inputs hold); the numbers of its instance records and of
its series; its modalities as grouping the records gave them (``replace(group_concat(DISTINCT
modality), ',', '\\')`` in (Series Instance UID, record) order); and ``holders``, the number of
its records that hold every one of those greatest values. ``study_summary_series`` has one
record per study, series and modality: how many instance records, and the first of them (its
rowid); the series count and the modalities are rebuilt from it, in O(series of the study).

Triggers on ``instance_keys`` keep both exact whoever writes (the store's C-STORE path, results,
the backfill, the recovery scan, the retention purge, the trigger that follows ``instances``):

- insert: counts + 1, each value the greater of the two, ``holders`` + 1 when the record
  holds them all; the series count and modalities are rebuilt only when the record is the first
  of its series and modality. No cost grows with the study's size.
- delete: counts - 1; while another record holds every greatest value (``holders``), they
  stand; otherwise they are read again from the study's records (O(instances of the study),
  only for a study whose records disagree). A series' first record is looked up again when it
  was the one deleted (the next one in the study index's order).
- replace: SQLite's ``REPLACE`` deletes the old record without firing delete triggers (unless
  ``recursive_triggers``), so :func:`dicom_node.store.keyindex.put_keys` deletes first, and a
  trigger refuses an insert over an existing record rather than let the summary drift.

A raw ``UPDATE`` of ``instance_keys`` is not followed (the store never updates a record: it
deletes and inserts); :func:`build_summary` (the schema-5 migration) rebuilds both tables from
the records. Records without a Study Instance UID (NULL; the store never writes one) are left out.
"""

import sqlite3

from dicom_node.store.keys import KEYS, Level

TABLE = "study_summary"
SERIES_TABLE = "study_summary_series"
#: The study's attributes: the keys of the PATIENT and STUDY levels, its UID aside.
ATTRIBUTES = tuple(key.column for key in KEYS if key.level in (Level.PATIENT, Level.STUDY)
                   and not key.items and key.column != "study_instance_uid")
#: STUDY-level return keys computed from a study's records -> the summary's column.
DERIVED = {"NumberOfStudyRelatedSeries": "series_count", "NumberOfStudyRelatedInstances": "instance_count",
           "ModalitiesInStudy": "modalities"}
_TRIGGERS = ("study_summary_no_replace", "study_summary_insert", "study_summary_delete")


def _same_series(row: str) -> str:
    """The ``study_summary_series`` record of ``row`` (``new`` or ``old``), NULL-safe."""
    return (f"study_instance_uid = {row}.study_instance_uid AND series_instance_uid IS "
            f"{row}.series_instance_uid AND modality IS {row}.modality")


def _refresh_series(study: str, condition: str = "1") -> str:
    """Set the series count and modalities of ``study`` from its ``study_summary_series``
    records, where ``condition`` holds. The modalities are listed as the query module listed
    them from the records: distinct, by their first record in (series, record) order."""
    return (f"UPDATE {TABLE} SET series_count = (SELECT count(DISTINCT series_instance_uid) FROM "
            f"{SERIES_TABLE} WHERE study_instance_uid = {study}), modalities = (SELECT "
            "replace(group_concat(DISTINCT modality), ',', '\\') FROM (SELECT modality FROM "
            f"{SERIES_TABLE} WHERE study_instance_uid = {study} ORDER BY series_instance_uid, first_record)) "
            f"WHERE study_instance_uid = {study} AND {condition}")


def _recount_holders(study: str, condition: str) -> str:
    held = " AND ".join(f"ifnull(k.{column}, '') = {TABLE}.{column}" for column in ATTRIBUTES)
    return (f"UPDATE {TABLE} SET holders = (SELECT count(*) FROM instance_keys k WHERE "
            f"k.study_instance_uid = {study} AND {held}) WHERE study_instance_uid = {study} AND {condition}")


def _reread(study: str, condition: str) -> str:
    """Read the study's greatest values from its records again."""
    columns = ", ".join(ATTRIBUTES)
    greatest = ", ".join(f"max(ifnull({column}, ''))" for column in ATTRIBUTES)
    return (f"UPDATE {TABLE} SET ({columns}) = (SELECT {greatest} FROM instance_keys WHERE "
            f"study_instance_uid = {study}) WHERE study_instance_uid = {study} AND {condition}")


def _inserted() -> list[str]:
    new = "new.study_instance_uid"
    at_most = " AND ".join(f"ifnull(new.{column}, '') <= {column}" for column in ATTRIBUTES)
    at_least = " AND ".join(f"ifnull(new.{column}, '') >= {column}" for column in ATTRIBUTES)
    greatest = ", ".join(f"{column} = max({column}, ifnull(new.{column}, ''))" for column in ATTRIBUTES)
    values = ", ".join(f"ifnull(new.{column}, '')" for column in ATTRIBUTES)
    # Each INSERT runs only when the UPDATE before it found no record (changes() counts the
    # rows of the trigger's last statement); no conflict clause: a writer's own (OR REPLACE)
    # would override it. The last statement rebuilds the series count and modalities only
    # when the series record was just created (the INSERT before it inserted one).
    return [
        # holders: the record holds every greatest value (at_least) and none grew (at_most): one
        # more; a value grew: the record is its only holder, or there is none
        f"UPDATE {TABLE} SET instance_count = instance_count + 1, holders = CASE WHEN {at_most} THEN "
        f"holders + ({at_least}) ELSE ({at_least}) END, {greatest} WHERE study_instance_uid = {new}",
        f"INSERT INTO {TABLE} (study_instance_uid, instance_count, series_count, holders, "
        f"{', '.join(ATTRIBUTES)}) SELECT {new}, 1, 0, 1, {values} WHERE changes() = 0",
        f"UPDATE {SERIES_TABLE} SET record_count = record_count + 1 WHERE {_same_series('new')}",
        f"INSERT INTO {SERIES_TABLE} SELECT {new}, new.series_instance_uid, new.modality, 1, new.rowid "
        "WHERE changes() = 0",
        _refresh_series(new, "changes() = 1"),
    ]


def _deleted() -> list[str]:
    old = "old.study_instance_uid"
    holds = " AND ".join(f"ifnull(old.{column}, '') = {column}" for column in ATTRIBUTES)
    # each UPDATE runs only when the DELETE before it deleted nothing (changes(), as on insert)
    return [
        f"DELETE FROM {SERIES_TABLE} WHERE {_same_series('old')} AND record_count = 1",
        # the next record of the series in the study index's (study, series, rowid) order
        f"UPDATE {SERIES_TABLE} SET record_count = record_count - 1, first_record = CASE WHEN first_record "
        f"= old.rowid THEN (SELECT rowid FROM instance_keys WHERE {_same_series('old')} ORDER BY rowid "
        f"LIMIT 1) ELSE first_record END WHERE changes() = 0 AND {_same_series('old')}",
        f"DELETE FROM {TABLE} WHERE study_instance_uid = {old} AND instance_count = 1",
        # holders -1: no record is known to hold every greatest value any more: read them again
        f"UPDATE {TABLE} SET instance_count = instance_count - 1, holders = CASE WHEN "
        f"holders - ({holds}) > 0 THEN holders - ({holds}) ELSE -1 END WHERE changes() = 0 "
        f"AND study_instance_uid = {old}",
        _reread(old, "holders < 0"),
        _recount_holders(old, "holders < 0"),
        # only when the series record went, or its first record changed in a series of several
        # modalities (their order within it may change)
        _refresh_series(old, f"NOT EXISTS (SELECT 1 FROM {SERIES_TABLE} WHERE {_same_series('old')} "
                             f"AND first_record < old.rowid) AND (NOT EXISTS (SELECT 1 FROM {SERIES_TABLE} "
                             f"WHERE {_same_series('old')}) OR EXISTS (SELECT 1 FROM {SERIES_TABLE} WHERE "
                             "study_instance_uid = old.study_instance_uid AND series_instance_uid IS "
                             "old.series_instance_uid AND modality IS NOT old.modality))"),
    ]


def _create_triggers(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TRIGGER study_summary_no_replace BEFORE INSERT ON instance_keys WHEN EXISTS "
                 "(SELECT 1 FROM instance_keys WHERE sop_instance_uid = new.sop_instance_uid) BEGIN "
                 "SELECT RAISE(ABORT, 'instance_keys: delete a record before writing it again "
                 "(study_summary follows inserts and deletes)'); END")
    for name, event, statements in (("study_summary_insert", "AFTER INSERT", _inserted()),
                                    ("study_summary_delete", "AFTER DELETE", _deleted())):
        row = "new" if event == "AFTER INSERT" else "old"
        conn.execute(f"CREATE TRIGGER {name} {event} ON instance_keys WHEN {row}.study_instance_uid "
                     f"IS NOT NULL BEGIN {'; '.join(statements)}; END")


def build_summary(conn: sqlite3.Connection) -> None:
    """Schema 5: (re)build ``study_summary`` and ``study_summary_series`` from ``instance_keys``
    and create the triggers that keep them (the caller holds the transaction). Whatever a test
    or an older step left of them is dropped first: both are derived from the records."""
    for trigger in _TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for table in (TABLE, SERIES_TABLE):
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    attributes = ", ".join(f"{column} TEXT NOT NULL" for column in ATTRIBUTES)
    conn.execute(f"CREATE TABLE {TABLE} (study_instance_uid TEXT NOT NULL PRIMARY KEY, instance_count "
                 "INTEGER NOT NULL, series_count INTEGER NOT NULL, modalities TEXT, "
                 f"holders INTEGER NOT NULL, {attributes}) WITHOUT ROWID")
    conn.execute(f"CREATE TABLE {SERIES_TABLE} (study_instance_uid TEXT NOT NULL, series_instance_uid TEXT, "
                 "modality TEXT, record_count INTEGER NOT NULL, first_record INTEGER NOT NULL)")
    conn.execute(f"CREATE INDEX {SERIES_TABLE}_key ON {SERIES_TABLE} "
                 "(study_instance_uid, series_instance_uid, modality)")
    conn.execute(f"INSERT INTO {SERIES_TABLE} SELECT study_instance_uid, series_instance_uid, modality, "
                 "count(*), min(rowid) FROM instance_keys WHERE study_instance_uid IS NOT NULL "
                 "GROUP BY study_instance_uid, series_instance_uid, modality")
    greatest = ", ".join(f"max(ifnull({column}, ''))" for column in ATTRIBUTES)
    conn.execute(f"INSERT INTO {TABLE} (study_instance_uid, instance_count, series_count, holders, "
                 f"{', '.join(ATTRIBUTES)}) SELECT study_instance_uid, count(*), 0, -1, {greatest} "
                 "FROM instance_keys WHERE study_instance_uid IS NOT NULL GROUP BY study_instance_uid")
    conn.execute(_recount_holders(f"{TABLE}.study_instance_uid", "1"))
    conn.execute(_refresh_series(f"{TABLE}.study_instance_uid"))
    _create_triggers(conn)
