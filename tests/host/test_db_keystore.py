import os
import sqlite3

import pytest

from host import db, keystore
from host.errors import TopupError

from .conftest import PASSPHRASE


def test_create_sets_wal_version_and_application_id(tmp_path):
    p = str(tmp_path / "t.db")
    db.create(p).close()
    conn = db.open_db(p)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == db.APPLICATION_ID
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_create_refuses_an_existing_file(tmp_path):
    p = tmp_path / "t.db"
    p.write_bytes(b"precious")
    with pytest.raises(TopupError, match="already exists"):
        db.create(str(p))
    assert p.read_bytes() == b"precious"


def test_open_never_creates(tmp_path):
    p = tmp_path / "missing.db"
    with pytest.raises(TopupError, match=r"no database at .*missing.db \(run `topup init`\)"):
        db.open_db(str(p))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"hello, world\n", os.urandom(4096),
                                     b"SQLite format 3\x00" + b"\xff" * 200])
def test_open_refuses_files_that_are_not_sqlite_and_leaves_them(tmp_path, content):
    p = tmp_path / "t.db"
    p.write_bytes(content)
    with pytest.raises(TopupError, match="not a topup database|damaged"):
        db.open_db(str(p))
    assert p.read_bytes() == content
    assert os.listdir(tmp_path) == ["t.db"]


def test_open_refuses_someone_elses_sqlite_database(tmp_path):
    p = tmp_path / "other.db"
    c = sqlite3.connect(str(p))
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    before = p.read_bytes()
    with pytest.raises(TopupError, match="SQLite database but not a topup database"):
        db.open_db(str(p))
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["other.db"]


def test_open_refuses_a_newer_schema(tmp_path):
    p = str(tmp_path / "t.db")
    c = db.create(p)
    c.execute("PRAGMA user_version = 99")
    c.close()
    with pytest.raises(TopupError, match="schema version 99"):
        db.open_db(p)


def test_seed_is_sealed_and_unlocks_only_with_the_passphrase(tmp_path):
    p = str(tmp_path / "t.db")
    conn = db.create(p)
    seed = bytes(range(32))
    k = keystore.new_key(conn, PASSPHRASE, seed=seed)
    assert k.active
    conn.close()
    raw = b"".join(open(f, "rb").read() for f in (p, p + "-wal") if os.path.exists(f))
    assert seed not in raw
    conn = db.open_db(p)
    assert keystore.unlock_active(conn, PASSPHRASE).kid == k.kid
    with pytest.raises(TopupError, match="^wrong passphrase$"):
        keystore.unlock_active(conn, "nope")


def _limits(conn):
    return conn.execute("SELECT opslimit, memlimit FROM keys").fetchone()


def test_keys_are_sealed_with_argon2id_moderate_limits_by_default(tmp_path, monkeypatch):
    import nacl.pwhash
    monkeypatch.delenv("TOPUP_INSECURE_FAST_KDF")  # the production default, once
    moderate = (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE)
    assert (keystore.OPSLIMIT, keystore.MEMLIMIT) == keystore.limits() == moderate
    conn = db.create(str(tmp_path / "t.db"))
    k = keystore.new_key(conn, PASSPHRASE)
    assert _limits(conn) == moderate
    assert len(conn.execute("SELECT salt FROM keys").fetchone()[0]) == 16
    assert keystore.unlock_active(conn, PASSPHRASE).kid == k.kid
    assert _limits(conn) == moderate  # nothing to re-seal


def test_a_key_sealed_with_older_limits_opens_and_is_resealed_at_moderate(tmp_path,
                                                                          monkeypatch):
    """A key file from an earlier version (INTERACTIVE limits) still opens; the first
    unlock seals it again at MODERATE with a new salt, and it opens from then on."""
    import nacl.pwhash
    a = nacl.pwhash.argon2id
    conn = db.create(str(tmp_path / "t.db"))
    monkeypatch.setattr(keystore, "limits", lambda: (a.OPSLIMIT_INTERACTIVE,
                                                     a.MEMLIMIT_INTERACTIVE))
    k = keystore.new_key(conn, PASSPHRASE, seed=bytes(range(32)))
    old_salt, old_sealed = conn.execute("SELECT salt, sealed_seed FROM keys").fetchone()
    assert _limits(conn) == (a.OPSLIMIT_INTERACTIVE, a.MEMLIMIT_INTERACTIVE)
    monkeypatch.undo()
    monkeypatch.delenv("TOPUP_INSECURE_FAST_KDF", raising=False)
    with pytest.raises(TopupError, match="^wrong passphrase$"):
        keystore.unlock_active(conn, "nope")
    assert _limits(conn) == (a.OPSLIMIT_INTERACTIVE, a.MEMLIMIT_INTERACTIVE)  # untouched
    signer = keystore.unlock_active(conn, PASSPHRASE)
    assert signer.kid == k.kid
    salt, sealed = conn.execute("SELECT salt, sealed_seed FROM keys").fetchone()
    assert _limits(conn) == (a.OPSLIMIT_MODERATE, a.MEMLIMIT_MODERATE)
    assert salt != old_salt and sealed != old_sealed
    assert keystore.unlock_active(conn, PASSPHRASE).secret64 == signer.secret64


def test_limits_are_never_lowered(tmp_path, monkeypatch):
    import nacl.pwhash
    a = nacl.pwhash.argon2id
    conn = db.create(str(tmp_path / "t.db"))
    monkeypatch.setattr(keystore, "limits", lambda: (a.OPSLIMIT_INTERACTIVE,
                                                     a.MEMLIMIT_INTERACTIVE))
    keystore.new_key(conn, PASSPHRASE)
    monkeypatch.undo()
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")  # minimum limits: nothing re-sealed down
    before = conn.execute("SELECT salt, sealed_seed, opslimit, memlimit FROM keys").fetchone()
    keystore.unlock_active(conn, PASSPHRASE)
    assert conn.execute("SELECT salt, sealed_seed, opslimit, memlimit FROM keys"
                        ).fetchone() == before


def test_several_keys_exactly_one_active_and_revocation(tmp_path):
    conn = db.create(str(tmp_path / "t.db"))
    a = keystore.new_key(conn, PASSPHRASE)
    b = keystore.new_key(conn, PASSPHRASE)
    assert [k.active for k in keystore.list_keys(conn)].count(True) == 1
    assert keystore.get_key(conn, a.kid).active and not b.active
    keystore.activate(conn, b.kid)
    assert not keystore.get_key(conn, a.kid).active and keystore.get_key(conn, b.kid).active
    c = keystore.new_key(conn, PASSPHRASE, activate=True)
    assert [k.kid for k in keystore.list_keys(conn) if k.active] == [c.kid]
    keystore.revoke(conn, c.kid)
    assert keystore.get_key(conn, c.kid).status == "revoked"
    assert c.kid not in keystore.trusted(conn)
    assert c.kid in keystore.trusted(conn, include_revoked=True)
    with pytest.raises(TopupError, match="no active issuer key"):
        keystore.unlock_active(conn, PASSPHRASE)
    with pytest.raises(TopupError, match="revoked"):
        keystore.activate(conn, c.kid)
    # The schema itself refuses a second active key.
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE keys SET active = 1")


def test_new_key_with_a_different_passphrase_is_refused(tmp_path):
    conn = db.create(str(tmp_path / "t.db"))
    keystore.new_key(conn, PASSPHRASE)
    with pytest.raises(TopupError, match="^wrong passphrase$"):
        keystore.new_key(conn, "typo")
    assert len(keystore.list_keys(conn)) == 1
