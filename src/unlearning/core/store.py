"""The results store: one SQLite database, ``<runs root>/results.db``, indexing every run directory
under that root (runs, sweep rows, tune trials, evaluations, tamper attacks, rank reports).

Run directories stay the source of truth: a record is read from a folder's files alone
(:func:`unlearning.core.run_records.describe_run_dir`), so ``unlearn report --rebuild`` recreates
the same database from them.
Every ``results.json`` write records its folder (:meth:`unlearning.core.rundir.RunDir.write_results`,
through :func:`record_quietly`, which logs and never raises: the folder is already written); a
report first re-reads the folders whose files changed since they were recorded (:meth:`Store.sync`),
so a missed write (a store that could not be opened, a ``trial.json`` written after the run)
is caught up.

Tables (``run_dir`` is the folder relative to the root, or absolute when outside it)::

    runs     run_dir, kind (run|eval|tamper|ranks), status, error, method, model, reference_model,
             sweep, study, trial, trial_state, started_at, resumed_at, finished_at, failed_at,
             git_commit, git_dirty, config (JSON), varied (JSON {dotted key: value}),
             mean_erank, mean_srank, signature (sizes and mtimes of the files read)
    metrics  run_dir, section (before|after|reference|eval), task, metric, value
             (every number of results.json's task dicts; by_attribute flattened as
             ``by_attribute.<attr>.<metric>``)
    terms    run_dir, at (final: the last metrics.jsonl record | summary: the method's
             train_summary), key, value
    attacks  run_dir, attack, kind (finetune|probe|in_context), label, model, role
             (model|filtered|base), target (the attacked run's run_dir when it is in this store),
             data, status, error, task, metric and value (the cell's attack.json headline),
             base_acc, step0_acc, final_acc, max_acc, max_acc_step, gap, half_gap_step,
             recovery_auc, mean_acc (a fine-tuning curve's summary; null for the other kinds)

Where records come from: ``sweep.json`` in a row's parent folder (written by the sweep) names
the sweep and its varied keys; ``trial.json`` in a trial's folder (written by ``unlearn tune``,
``{"study", "trial", "params", "state"}``) names the study, the trial and its parameters;
``provenance.json`` the git commit.

Concurrency: WAL journal and one ``BEGIN IMMEDIATE`` transaction per record, so the processes of
a sweep (local or a SLURM array on one file system) can record at once; a writer waits for the
lock up to :data:`BUSY_TIMEOUT_S`. WAL needs a local or POSIX-locking file system (not NFS
without locks).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from unlearning.core.errors import UserError
from unlearning.core.paths import runs_root
from unlearning.core.run_records import ATTACK_COLUMNS, RUN_COLUMNS, describe_run_dir, find_run_dirs, store_name

log = logging.getLogger(__name__)

STORE_FILE = "results.db"
SCHEMA_VERSION = 2
# attacks columns schema 2 added (every grid cell, not only fine-tuning): version 1 stores get them
ADDED_IN_2 = ("kind", "role", "metric", "value")
BUSY_TIMEOUT_S = 120.0

SCHEMA = f"""
CREATE TABLE runs ({", ".join(RUN_COLUMNS)}, PRIMARY KEY (run_dir));
CREATE TABLE metrics (run_dir REFERENCES runs ON DELETE CASCADE, section, task, metric, value REAL,
                      PRIMARY KEY (run_dir, section, task, metric));
CREATE TABLE terms (run_dir REFERENCES runs ON DELETE CASCADE, at, key, value REAL,
                    PRIMARY KEY (run_dir, at, key));
CREATE TABLE attacks ({", ".join(ATTACK_COLUMNS)}, PRIMARY KEY (run_dir, attack),
                      FOREIGN KEY (run_dir) REFERENCES runs ON DELETE CASCADE);
CREATE INDEX runs_sweep ON runs (sweep);
CREATE INDEX runs_study ON runs (study);
CREATE INDEX attacks_target ON attacks (target);
"""


def store_path(root: str | Path) -> Path:
    """The results database of a runs root (Optuna's study storage sits beside it)."""
    return Path(root) / STORE_FILE


# ------------------------------------------------------------------------------------------ the database

def _ensure_wal(con: sqlite3.Connection) -> None:
    """Switch the database to WAL once. Changing the journal mode needs the database to itself, and
    SQLite answers "locked" at once, without waiting out the busy timeout, when another process is
    inside a transaction at that moment (the first records of a sweep's rows, all at once): so wait
    and try again here. A database already in WAL needs no switch, and reading the mode takes no lock."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            con.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Store:
    """The results database of one runs root."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else runs_root()
        self.path = store_path(self.root)

    def connect(self) -> sqlite3.Connection:
        """A connection (autocommit: each write below is one explicit transaction) to the database,
        made with its schema if it is not there."""
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            _ensure_wal(con)  # persistent; readers never block the sweep's writers
            con.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint, safe under WAL
            con.execute("PRAGMA foreign_keys=ON")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                with _transaction(con):  # two processes may both see version 0: the lock decides who creates it
                    if con.execute("PRAGMA user_version").fetchone()[0] == 0:
                        for statement in filter(str.strip, SCHEMA.split(";")):
                            con.execute(statement)
                        con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version == 1:
                _migrate_from_1(con)
            elif version != SCHEMA_VERSION:
                raise UserError(f"{self.path}: results store of schema version {version}, this code reads "
                                f"{SCHEMA_VERSION}; run `unlearn report --rebuild --runs-root {self.root}`")
        except BaseException:
            con.close()
            raise
        return con

    # writes
    def record(self, run_dir: str | Path) -> bool:
        """(Re-)record one folder in one transaction; False when it holds nothing to record."""
        rec = describe_run_dir(run_dir, self.root)
        if rec is None:
            return False
        con = self.connect()
        try:
            with _transaction(con):
                _write(con, rec)
        finally:
            con.close()
        return True

    def sync(self) -> int:
        """Re-record the folders whose files changed since they were recorded (and drop records
        whose folder is gone); returns how many changed."""
        con = self.connect()
        try:
            known = {r["run_dir"]: r["signature"] for r in con.execute("SELECT run_dir, signature FROM runs")}
            changed, seen = [], set()
            for d in find_run_dirs(self.root):
                rec = _describe_or_warn(d, self.root)
                if rec is None:
                    continue
                seen.add(rec["run"]["run_dir"])
                if known.get(rec["run"]["run_dir"]) != rec["run"]["signature"]:
                    changed.append(rec)
            gone = [n for n in known if n not in seen and not (Path(n).is_absolute() and (Path(n) / "results.json").is_file())]
            if changed or gone:
                with _transaction(con):
                    for name in gone:
                        con.execute("DELETE FROM runs WHERE run_dir = ?", (name,))
                    for rec in changed:
                        _write(con, rec)
            return len(changed) + len(gone)
        finally:
            con.close()

    def rebuild(self) -> int:
        """Recreate every record from the folders under the root, in one transaction (readers see
        the old or the new store, never half of it); an unreadable database file is moved aside."""
        try:
            con = self.connect()
        except sqlite3.DatabaseError as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{os.getpid()}")
            log.warning("%s is not a readable database (%s); moved to %s, building a new one", self.path, e, aside)
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            con = self.connect()
        try:
            records = [r for d in find_run_dirs(self.root) if (r := _describe_or_warn(d, self.root)) is not None]
            with _transaction(con):
                con.execute("DELETE FROM runs")  # cascades to metrics, terms, attacks
                for rec in records:
                    _write(con, rec)
            return len(records)
        finally:
            con.close()

    # reads
    def query(self, sql: str, params: Iterable[Any] = (), *, frame: bool = False) -> Any:
        """Rows of ``sql`` as plain dicts, or a pandas DataFrame with ``frame=True`` (pandas optional)."""
        con = self.connect()
        try:
            rows = [dict(r) for r in con.execute(sql, tuple(params))]
        finally:
            con.close()
        if frame:
            import pandas as pd  # optional: only a DataFrame needs it
            return pd.DataFrame(rows)
        return rows

    def records(self, *, run_dirs: Iterable[str] | None = None, sweep: str | None = None,
                study: str | None = None) -> list[dict[str, Any]]:
        """Full records, each a runs row with ``config`` and ``varied`` parsed and ``metrics``
        ({section: {task: {metric: value}}}), ``terms`` ({at: {key: value}}) and ``attacks``
        (the attack rows this folder ran) added; in run_dir order (or the order given)."""
        where, params = [], []
        names = None if run_dirs is None else list(run_dirs)
        if names is not None:
            where.append(f"run_dir IN ({','.join('?' * len(names))})")
            params += names
        if sweep is not None:
            where.append("sweep = ?")
            params.append(sweep)
        if study is not None:
            where.append("study = ?")
            params.append(study)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        con = self.connect()
        try:
            runs = {r["run_dir"]: dict(r) for r in con.execute(f"SELECT * FROM runs{clause} ORDER BY run_dir", params)}
            for r in runs.values():
                r.update(config=json.loads(r["config"]), varied=json.loads(r["varied"]), metrics={}, terms={},
                         attacks=[])
            if runs:
                marks = ",".join("?" * len(runs))
                for m in con.execute(f"SELECT * FROM metrics WHERE run_dir IN ({marks})", list(runs)):
                    runs[m["run_dir"]]["metrics"].setdefault(m["section"], {}).setdefault(m["task"], {})[m["metric"]] = m["value"]
                for t in con.execute(f"SELECT * FROM terms WHERE run_dir IN ({marks})", list(runs)):
                    runs[t["run_dir"]]["terms"].setdefault(t["at"], {})[t["key"]] = t["value"]
                for a in con.execute(f"SELECT * FROM attacks WHERE run_dir IN ({marks}) ORDER BY attack", list(runs)):
                    runs[a["run_dir"]]["attacks"].append(dict(a))
        finally:
            con.close()
        if names is not None:
            return [runs[n] for n in names if n in runs]
        return list(runs.values())

    def attacks_on(self, run_dir: str) -> list[dict[str, Any]]:
        """The tamper attacks recorded against a run (by their target)."""
        return self.query("SELECT * FROM attacks WHERE target = ? ORDER BY run_dir, attack", (run_dir,))

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Every table's rows, sorted: what "the same store" compares."""
        keys = {"runs": "run_dir", "metrics": "run_dir, section, task, metric", "terms": "run_dir, at, key",
                "attacks": "run_dir, attack"}
        return {t: self.query(f"SELECT * FROM {t} ORDER BY {k}") for t, k in keys.items()}

    def name_of(self, run_dir: str | Path) -> str:
        """A folder's key in this store."""
        return store_name(Path(run_dir), self.root)


def _migrate_from_1(con: sqlite3.Connection) -> None:
    """Version 1 -> 2: the attacks table's new columns; the tamper folders' signatures are cleared so
    that the next sync re-reads them (their probe and in-context cells were never recorded)."""
    with _transaction(con):
        if con.execute("PRAGMA user_version").fetchone()[0] == 1:  # another process may have migrated it
            for column in ADDED_IN_2:
                con.execute(f"ALTER TABLE attacks ADD COLUMN {column}")
            con.execute("UPDATE runs SET signature = NULL WHERE kind = 'tamper'")
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): the write lock is taken at the
    start, so two writers never both read then both fail to upgrade."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> None:
        self.con.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.con.execute("ROLLBACK" if exc_type else "COMMIT")


def _write(con: sqlite3.Connection, rec: dict[str, Any]) -> None:
    name = rec["run"]["run_dir"]
    con.execute("DELETE FROM runs WHERE run_dir = ?", (name,))
    con.execute(f"INSERT INTO runs ({','.join(RUN_COLUMNS)}) VALUES ({','.join('?' * len(RUN_COLUMNS))})",
                [rec["run"][c] for c in RUN_COLUMNS])
    con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", [(name, *m) for m in rec["metrics"]])
    con.executemany("INSERT INTO terms VALUES (?, ?, ?, ?)", [(name, *t) for t in rec["terms"]])
    con.executemany(f"INSERT INTO attacks ({','.join(ATTACK_COLUMNS)}) VALUES ({','.join('?' * len(ATTACK_COLUMNS))})",
                    [[a[c] for c in ATTACK_COLUMNS] for a in rec["attacks"]])


def _describe_or_warn(run_dir: Path, root: Path) -> dict[str, Any] | None:
    try:
        return describe_run_dir(run_dir, root)
    except (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError, UserError, OSError) as e:
        log.warning("results store: %s skipped: its files are unreadable (%s)", run_dir, e)
        return None


def record_quietly(run_dir: str | Path, root: str | Path) -> None:
    """The run life cycle's hook: record ``run_dir`` in ``root``'s store; a failure is logged, never
    raised (the run directory is already written, and the next report or --rebuild catches up)."""
    try:
        Store(root).record(run_dir)
    except Exception as e:  # noqa: BLE001 - the store is an index: it must never fail the run it indexes
        log.warning("results store %s not updated for %s (%s: %s); the run directory is intact, "
                    "`unlearn report --rebuild` restores the record", store_path(root), run_dir, type(e).__name__, e)
