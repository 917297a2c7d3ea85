"""``study_summary``: one record per study of ``instance_keys``, holding what a STUDY-level search
answers (store schema 5, rebuilt in this layout by schema 6), so that search reads a record per
study instead of grouping the records of every instance (:mod:`dicom_node.query.match`).

A study's record holds, for each key of the PATIENT and STUDY levels (:data:`ATTRIBUTES`), the
greatest value its instances' records hold, '' for none (``coalesce(max(column), '')`` over
them: a result may leave out what its inputs hold), and next to it ``n_<column>``, how many of
its records hold that value; the numbers of its instance records and of its series; its
modalities as grouping the records gave them (``replace(group_concat(DISTINCT modality), ',',
'\\')`` in (Series Instance UID, record) order). ``study_summary_series`` has one record per
study, series and modality: how many instance records, and the first of them (its rowid).
``study_summary_modalities`` has one per study and modality: its first position in that order
(the series, as a text that sorts a NULL series first, and the record).

Triggers on ``instance_keys`` keep them exact whoever writes (the store's C-STORE path, results,
the backfill, the recovery scan, the retention purge, the trigger that follows ``instances``):

- insert: counts + 1; per attribute, a greater value replaces the study's with one holder, an
  equal one adds a holder; the series count + 1 when no other record of the study has the
  record's series (an index lookup); the modality's first position moves when the record comes
  before it. All index lookups: nothing grows with the study's size.
- delete: counts - 1; per attribute, a holder less when the record held the greatest value. Only
  an attribute whose greatest value has no holder left (it left the study) is read again from
  the study's records (O(instances of the study)): at most once per distinct value of it
  that was the study's greatest, so a study whose records disagree (one device's description,
  another's later time) pays it a few times, not at every delete. A study whose greatest value
  keeps leaving (its records deleted in decreasing order of a value that differs on each) pays
  it at every delete. The series count - 1 when no record of its series is left (an index
  lookup); a series' first record is looked up again when it was the one deleted, and a
  modality's first position when its first record was.
- the modalities text is rebuilt from the study's few ``study_summary_modalities`` records when
  one appears, goes or moves (triggers on that table).
- replace: SQLite's ``REPLACE`` deletes the old record without firing delete triggers (unless
  ``recursive_triggers``), so :func:`dicom_node.store.keyindex.put_keys` deletes first, and a
  trigger refuses an insert over an existing record rather than let the summary drift.

A raw ``UPDATE`` of ``instance_keys`` is not followed (the store never updates a record: it
deletes and inserts); :func:`build_summary` (the schema-5 and -6 migrations) rebuilds the tables
from the records. Records without a Study Instance UID (NULL; the store never writes one) are
left out.

:func:`study_source` and :func:`study_attribute` are the SQL a search reads them with.
"""

import sqlite3
from collections.abc import Sequence

from dicom_node.store.keys import KEYS, Level

TABLE = "study_summary"
SERIES_TABLE = "study_summary_series"
MODALITY_TABLE = "study_summary_modalities"
#: The study's attributes: the columns of every key of the PATIENT and STUDY levels (a sequence
#: key's item columns too), its UID aside; a search reads each from the summary by that name.
ATTRIBUTES = tuple(column for key in KEYS if key.level in (Level.PATIENT, Level.STUDY)
                   for column in key.columns if column != "study_instance_uid")
#: STUDY-level return keys computed from a study's records -> the summary's column.
DERIVED = {"NumberOfStudyRelatedSeries": "series_count", "NumberOfStudyRelatedInstances": "instance_count",
           "ModalitiesInStudy": "modalities"}
#: Every trigger that keeps the summary (those on ``instance_keys``, then on the modalities).
TRIGGERS = ("study_summary_no_replace", "study_summary_insert", "study_summary_delete",
            "study_summary_modality_insert", "study_summary_modality_delete", "study_summary_modality_update")


def study_source(record_terms: Sequence[str], modalities: int = 0) -> str:
    """FROM and WHERE of a STUDY-level search: the studies any of whose records match every
    one of ``record_terms`` (SQL on ``instance_keys``, as when the records were grouped) and,
    given ``modalities`` parameters, that have a series of one of them (Modalities in Study).
    The study's columns are :data:`ATTRIBUTES` and :data:`DERIVED`'s, by their names."""
    terms = [f"study_instance_uid IN (SELECT study_instance_uid FROM instance_keys WHERE "
             f"{' AND '.join(record_terms)})"] if record_terms else []
    if modalities:
        terms.append(f"study_instance_uid IN (SELECT study_instance_uid FROM {MODALITY_TABLE} "
                     f"WHERE modality IN ({', '.join('?' * modalities)}))")
    return f"FROM {TABLE}" + (f" WHERE {' AND '.join(terms)}" if terms else "")


def study_attribute(column: str, study: str) -> str:
    """The SQL of one of :data:`ATTRIBUTES` (or the UID) of the study whose UID is ``study``."""
    assert column in ATTRIBUTES or column == "study_instance_uid", column
    return f"(SELECT s.{column} FROM {TABLE} s WHERE s.study_instance_uid = {study})"


def _position(row: str) -> str:
    """The series of ``row`` as a text that sorts as the study index does: NULL first."""
    return f"ifnull('x' || {row}.series_instance_uid, '')"


def _same_series(row: str) -> str:
    """The ``study_summary_series`` record of ``row`` (``new`` or ``old``), NULL-safe."""
    return (f"study_instance_uid = {row}.study_instance_uid AND modality IS {row}.modality AND "
            f"series_instance_uid IS {row}.series_instance_uid")


def _same_modality(row: str) -> str:
    return f"study_instance_uid = {row}.study_instance_uid AND modality = {row}.modality"


def _series_left(row: str, other: str) -> str:
    """Whether another record of the study holds the series of ``row`` (an index lookup)."""
    return (f"EXISTS (SELECT 1 FROM instance_keys WHERE study_instance_uid = {row}.study_instance_uid "
            f"AND series_instance_uid = {row}.series_instance_uid AND {other})")


def _modalities(study: str) -> str:
    """The study's modalities text from its ``study_summary_modalities`` records."""
    return (f"(SELECT replace(group_concat(modality), ',', '\\') FROM (SELECT modality FROM "
            f"{MODALITY_TABLE} WHERE study_instance_uid = {study} ORDER BY position, first_record))")


def _inserted() -> list[str]:
    new = "new.study_instance_uid"
    value = {column: f"ifnull(new.{column}, '')" for column in ATTRIBUTES}
    holders = ", ".join(f"n_{c} = CASE WHEN {v} > {c} THEN 1 WHEN {v} = {c} THEN n_{c} + 1 ELSE n_{c} END"
                        for c, v in value.items())
    greatest = ", ".join(f"{c} = max({c}, {v})" for c, v in value.items())
    new_series = f"(new.series_instance_uid IS NOT NULL AND NOT {_series_left('new', 'rowid != new.rowid')})"
    # Each INSERT runs only when the UPDATE before it found no record (changes() counts the
    # rows of the trigger's last statement); no conflict clause: a writer's own (OR REPLACE)
    # would override it.
    return [
        f"UPDATE {TABLE} SET instance_count = instance_count + 1, series_count = series_count + "
        f"{new_series}, {holders}, {greatest} WHERE study_instance_uid = {new}",
        f"INSERT INTO {TABLE} (study_instance_uid, instance_count, series_count, {', '.join(ATTRIBUTES)}, "
        f"{', '.join(f'n_{c}' for c in ATTRIBUTES)}) SELECT {new}, 1, new.series_instance_uid IS NOT NULL, "
        f"{', '.join(value.values())}, {', '.join('1' for _ in ATTRIBUTES)} WHERE changes() = 0",
        f"UPDATE {SERIES_TABLE} SET record_count = record_count + 1 WHERE {_same_series('new')}",
        f"INSERT INTO {SERIES_TABLE} (study_instance_uid, series_instance_uid, modality, record_count, "
        f"first_record) SELECT {new}, new.series_instance_uid, new.modality, 1, new.rowid "
        "WHERE changes() = 0",
        # the record comes before the modality's first one (a series that sorts before)
        f"UPDATE {MODALITY_TABLE} SET position = {_position('new')}, first_record = new.rowid WHERE "
        f"{_same_modality('new')} AND ({_position('new')}, new.rowid) < (position, first_record)",
        f"INSERT INTO {MODALITY_TABLE} SELECT {new}, new.modality, {_position('new')}, new.rowid WHERE "
        f"new.modality IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {MODALITY_TABLE} WHERE "
        f"{_same_modality('new')})",
    ]


def _deleted() -> list[str]:
    old = "old.study_instance_uid"
    holders = ", ".join(f"n_{c} = n_{c} - (ifnull(old.{c}, '') = {c})" for c in ATTRIBUTES)
    gone = " OR ".join(f"n_{c} = 0" for c in ATTRIBUTES)
    this = f"{TABLE}.study_instance_uid"
    # a subquery names the study's record (correlated), so that it runs only where CASE takes it
    reread = ", ".join(f"{c} = CASE WHEN n_{c} = 0 THEN (SELECT max(ifnull({c}, '')) FROM instance_keys "
                       f"WHERE study_instance_uid = {this}) ELSE {c} END" for c in ATTRIBUTES)
    recount = ", ".join(f"n_{c} = CASE WHEN n_{c} = 0 THEN (SELECT count(*) FROM instance_keys k WHERE "
                        f"k.study_instance_uid = {this} AND ifnull(k.{c}, '') = {TABLE}.{c}) ELSE n_{c} END"
                        for c in ATTRIBUTES)
    series_gone = f"(old.series_instance_uid IS NOT NULL AND NOT {_series_left('old', '1')})"
    # each UPDATE runs only when the DELETE before it deleted nothing (changes(), as on insert)
    return [
        f"DELETE FROM {SERIES_TABLE} WHERE {_same_series('old')} AND record_count = 1",
        # the next record of the series in the study index's (study, series, rowid) order
        f"UPDATE {SERIES_TABLE} SET record_count = record_count - 1, first_record = CASE WHEN first_record "
        f"= old.rowid THEN (SELECT rowid FROM instance_keys WHERE {_same_series('old')} ORDER BY rowid "
        f"LIMIT 1) ELSE first_record END WHERE changes() = 0 AND {_same_series('old')}",
        f"DELETE FROM {TABLE} WHERE study_instance_uid = {old} AND instance_count = 1",
        f"UPDATE {TABLE} SET instance_count = instance_count - 1, series_count = series_count - "
        f"{series_gone}, {holders} WHERE changes() = 0 AND study_instance_uid = {old}",
        # an attribute whose greatest value left the study: read it, then its holders, again
        f"UPDATE {TABLE} SET {reread} WHERE study_instance_uid = {old} AND ({gone})",
        f"UPDATE {TABLE} SET {recount} WHERE study_instance_uid = {old} AND ({gone})",
        # the modality's first record went: its next one is the first of its series records
        f"DELETE FROM {MODALITY_TABLE} WHERE {_same_modality('old')} AND first_record = old.rowid AND "
        f"NOT EXISTS (SELECT 1 FROM {SERIES_TABLE} WHERE {_same_modality('old')})",
        f"UPDATE {MODALITY_TABLE} SET (position, first_record) = (SELECT {_position(SERIES_TABLE)}, "
        f"first_record FROM {SERIES_TABLE} WHERE {_same_modality('old')} ORDER BY series_instance_uid "
        f"LIMIT 1) WHERE {_same_modality('old')} AND first_record = old.rowid",
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
    # a modality that moves changes the text only where the study has another one
    others = (f"WHEN EXISTS (SELECT 1 FROM {MODALITY_TABLE} m WHERE m.study_instance_uid = "
              "new.study_instance_uid AND m.modality != new.modality)")
    for event, row, when in (("insert", "new", ""), ("delete", "old", ""), ("update", "new", others)):
        study = f"{row}.study_instance_uid"
        conn.execute(f"CREATE TRIGGER study_summary_modality_{event} AFTER {event.upper()} ON "
                     f"{MODALITY_TABLE} {when} BEGIN UPDATE {TABLE} SET modalities = {_modalities(study)} "
                     f"WHERE study_instance_uid = {study}; END")


def _create_tables(conn: sqlite3.Connection) -> None:
    attributes = ", ".join(f"{column} TEXT NOT NULL, n_{column} INTEGER NOT NULL" for column in ATTRIBUTES)
    conn.execute(f"CREATE TABLE {TABLE} (study_instance_uid TEXT NOT NULL PRIMARY KEY, instance_count "
                 f"INTEGER NOT NULL, series_count INTEGER NOT NULL, modalities TEXT, {attributes}) "
                 "WITHOUT ROWID")
    conn.execute(f"CREATE TABLE {SERIES_TABLE} (study_instance_uid TEXT NOT NULL, series_instance_uid TEXT, "
                 "modality TEXT, record_count INTEGER NOT NULL, first_record INTEGER NOT NULL)")
    # by modality first: a modality's first series is the first entry of its range
    conn.execute(f"CREATE INDEX {SERIES_TABLE}_key ON {SERIES_TABLE} "
                 "(study_instance_uid, modality, series_instance_uid)")
    conn.execute(f"CREATE TABLE {MODALITY_TABLE} (study_instance_uid TEXT NOT NULL, modality TEXT NOT NULL, "
                 "position TEXT NOT NULL, first_record INTEGER NOT NULL, "
                 "PRIMARY KEY (study_instance_uid, modality)) WITHOUT ROWID")


def build_summary(conn: sqlite3.Connection) -> None:
    """Schemas 5 and 6: (re)build ``study_summary`` and its tables from ``instance_keys`` and
    create the triggers that keep them (the caller holds the transaction). Whatever a test or
    an older step left of them is dropped first: they are derived from the records."""
    for trigger in TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for table in (TABLE, SERIES_TABLE, MODALITY_TABLE):
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    _create_tables(conn)
    conn.execute(f"INSERT INTO {SERIES_TABLE} SELECT study_instance_uid, series_instance_uid, modality, "
                 "count(*), min(rowid) FROM instance_keys WHERE study_instance_uid IS NOT NULL "
                 "GROUP BY study_instance_uid, series_instance_uid, modality")
    conn.execute(f"INSERT INTO {MODALITY_TABLE} SELECT study_instance_uid, modality, position, first_record "
                 f"FROM (SELECT study_instance_uid, modality, {_position(SERIES_TABLE)} AS position, "
                 "first_record, "
                 "row_number() OVER (PARTITION BY study_instance_uid, modality ORDER BY series_instance_uid) "
                 f"AS n FROM {SERIES_TABLE} WHERE modality IS NOT NULL) WHERE n = 1")
    greatest = ", ".join(f"max(ifnull({column}, ''))" for column in ATTRIBUTES)
    conn.execute(f"INSERT INTO {TABLE} (study_instance_uid, instance_count, series_count, "
                 f"{', '.join(ATTRIBUTES)}, {', '.join(f'n_{c}' for c in ATTRIBUTES)}) SELECT "
                 f"study_instance_uid, count(*), count(DISTINCT series_instance_uid), {greatest}, "
                 f"{', '.join('0' for _ in ATTRIBUTES)} FROM instance_keys WHERE study_instance_uid "
                 "IS NOT NULL GROUP BY study_instance_uid")
    counts = ", ".join(f"sum(ifnull(k.{c}, '') = {TABLE}.{c})" for c in ATTRIBUTES)
    conn.execute(f"UPDATE {TABLE} SET ({', '.join(f'n_{c}' for c in ATTRIBUTES)}) = (SELECT {counts} FROM "
                 f"instance_keys k WHERE k.study_instance_uid = {TABLE}.study_instance_uid), "
                 f"modalities = {_modalities(f'{TABLE}.study_instance_uid')}")
    _create_triggers(conn)
