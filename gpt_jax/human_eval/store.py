"""The SQLite store of a human evaluation: pairs to rate (a prompt with two systems' outputs and which one is shown
on the left) and ratings (one per rater and pair; a form token makes a double submit idempotent).

Every write is one transaction; the schema's constraints reject what validation might let through.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import random
import secrets
import sqlite3
from collections.abc import Sequence

from gpt_jax.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    system_1 TEXT NOT NULL,
    output_1 TEXT NOT NULL,
    system_2 TEXT NOT NULL,
    output_2 TEXT NOT NULL,
    left_is INTEGER NOT NULL CHECK (left_is IN (1, 2)),  -- which system's output is shown on the left (as "A")
    UNIQUE (prompt, system_1, system_2),
    CHECK (system_1 <> system_2)
);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    pair_id INTEGER NOT NULL REFERENCES pairs (id),
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie')),  -- as shown: a = left, b = right
    winner TEXT,  -- the better system's name; NULL for a tie
    left_system TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    rater TEXT NOT NULL DEFAULT '',
    token TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    UNIQUE (pair_id, rater)
);
"""

CHOICES = ("a", "b", "tie")


@dataclasses.dataclass(frozen=True)
class Pair:
    id: int
    prompt: str
    left_system: str
    left_output: str
    right_system: str
    right_output: str


def connect(path: str) -> sqlite3.Connection:
    """Opens (creating if needed) the evaluation database at `path`."""
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # explicit BEGIN ... COMMIT below
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.executescript(SCHEMA)
    except sqlite3.DatabaseError as e:
        raise UserError(f"--db {path} is not a usable SQLite database: {e}") from None
    return conn


class _Transaction:
    """`with _Transaction(conn):` runs the block in BEGIN IMMEDIATE ... COMMIT, rolling back on any error."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def secret(conn: sqlite3.Connection) -> bytes:
    """The database's key for form tokens, made once."""
    with _Transaction(conn):
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('secret', ?)", (secrets.token_hex(32),))
        return bytes.fromhex(conn.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()[0])


def left_side(seed: int, prompt: str, system_1: str, system_2: str) -> int:
    """Which system (1 or 2) is shown on the left: a coin flip that depends only on the seed and the pair."""
    key = hashlib.sha256(f"{seed}\0{prompt}\0{system_1}\0{system_2}".encode()).digest()
    return 1 if random.Random(key).random() < 0.5 else 2


def add_pairs(conn: sqlite3.Connection, prompts: Sequence[str], system_1: str, outputs_1: Sequence[str],
              system_2: str, outputs_2: Sequence[str], seed: int = 0) -> int:
    """Adds a pair per prompt (kept as is when the database already has it); returns how many were new."""
    if system_1 == system_2:
        raise UserError(f"both systems are named {system_1!r}; name them apart (--name_a / --name_b)")
    if not len(prompts) == len(outputs_1) == len(outputs_2):
        raise ValueError("one output per prompt and system is needed")
    rows = [(p, system_1, o1, system_2, o2, left_side(seed, p, system_1, system_2))
            for p, o1, o2 in zip(prompts, outputs_1, outputs_2, strict=True)]
    with _Transaction(conn):
        before = conn.total_changes
        conn.executemany("INSERT OR IGNORE INTO pairs (prompt, system_1, output_1, system_2, output_2, left_is) "
                         "VALUES (?, ?, ?, ?, ?, ?)", rows)
        return conn.total_changes - before


def _pair_from_row(row) -> Pair:
    pair_id, prompt, s1, o1, s2, o2, left_is = row
    if left_is == 1:
        return Pair(pair_id, prompt, s1, o1, s2, o2)
    return Pair(pair_id, prompt, s2, o2, s1, o1)


_PAIR_COLUMNS = "id, prompt, system_1, output_1, system_2, output_2, left_is"


def get_pair(conn: sqlite3.Connection, pair_id: int) -> Pair | None:
    row = conn.execute(f"SELECT {_PAIR_COLUMNS} FROM pairs WHERE id = ?", (pair_id,)).fetchone()
    return _pair_from_row(row) if row else None


def next_pair(conn: sqlite3.Connection, rater: str = "") -> Pair | None:
    """The first pair `rater` has not rated yet, or None when all are rated."""
    row = conn.execute(f"SELECT {_PAIR_COLUMNS} FROM pairs WHERE id NOT IN "
                       "(SELECT pair_id FROM ratings WHERE rater = ?) ORDER BY id LIMIT 1", (rater,)).fetchone()
    return _pair_from_row(row) if row else None


def progress(conn: sqlite3.Connection, rater: str = "") -> tuple[int, int]:
    """(pairs rated by `rater`, pairs in all)."""
    rated = conn.execute("SELECT COUNT(*) FROM ratings WHERE rater = ?", (rater,)).fetchone()[0]
    return rated, conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]


def make_token(key: bytes, pair_id: int) -> str:
    """A fresh form token bound to `pair_id`: a random nonce and its MAC under the database's key."""
    nonce = secrets.token_hex(12)
    return f"{nonce}.{_mac(key, pair_id, nonce)}"


def check_token(key: bytes, pair_id: int, token: str) -> bool:
    """Whether `token` was made by `make_token(key, pair_id)`."""
    nonce, _, mac = token.partition(".")
    return bool(nonce) and len(token) <= 128 and hmac.compare_digest(mac, _mac(key, pair_id, nonce))


def _mac(key: bytes, pair_id: int, nonce: str) -> str:
    return hmac.new(key, f"{pair_id}:{nonce}".encode(), hashlib.sha256).hexdigest()[:32]


def add_rating(conn: sqlite3.Connection, pair_id: int, choice: str, comment: str, rater: str, token: str) -> bool:
    """Records a rating of the pair as shown (choice a = left, b = right, or tie). Returns False (and changes
    nothing) when this token or this rater already rated the pair: a double submit."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}")
    with _Transaction(conn):
        pair = get_pair(conn, pair_id)
        if pair is None:
            raise KeyError(pair_id)
        winner = {"a": pair.left_system, "b": pair.right_system, "tie": None}[choice]
        cursor = conn.execute(
            "INSERT INTO ratings (pair_id, choice, winner, left_system, comment, rater, token, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (pair_id, choice, winner, pair.left_system, comment, rater, token,
             datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")))
        return cursor.rowcount == 1


def outcomes(conn: sqlite3.Connection) -> list[tuple[str, str, str | None]]:
    """Every rating as (system_1, system_2, winner or None for a tie)."""
    return conn.execute("SELECT p.system_1, p.system_2, r.winner FROM ratings r JOIN pairs p ON p.id = r.pair_id "
                        "ORDER BY r.id").fetchall()
