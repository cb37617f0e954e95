# Issuer Ed25519 keys. Each private seed is sealed at rest with nacl.secret.SecretBox under
# a key derived from the passphrase by argon2id (its own salt and limits stored per key).
# Several keys may exist; at most one is active (the one `issue` signs with), and a key
# may be revoked: vouchers signed by a revoked key are void.
#
# Code keys (SPEC.md §8): the supplier's X25519 key pairs for keypad codes, sealed exactly
# the same way under the same passphrase (table code_keys). The active one is installed on
# meters at provisioning; each meter key epoch remembers which one it got (host/registry.py),
# so a code is always derived from the pair that meter holds. The first issuer key brings
# the first code key with it (`topup key new`); `topup key new --code` makes one alone.
#
# New keys are sealed at libsodium's MODERATE limits (3 passes, 256 MiB: about a second
# per unlock). A key sealed with weaker limits (the INTERACTIVE limits of earlier
# versions) still opens, and is sealed again at MODERATE, with a new salt, the next time
# the passphrase opens it. Limits are never lowered.
#
# Command keys (SPEC.md §10): the supplier's Ed25519 keys that sign commands to meters
# (add or revoke an issuer key, set a tariff, change supplier), sealed the same way (table
# command_keys). The active one is installed on meters at provisioning as their root of
# trust; the first issuer key brings the first command key with it, like the code key.
#
# Tests may set TOPUP_INSECURE_FAST_KDF=1 to seal new keys at argon2id's minimum limits
# (and then re-seal nothing); it makes the passphrase nearly worthless and is for tests only.
import os
import sqlite3
import time

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

from protocol.cose import kid_for

from .db import has_table, transaction
from .errors import TopupError

OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_MODERATE
FAST_KDF_ENV = "TOPUP_INSECURE_FAST_KDF"


def limits():
    """(opslimit, memlimit) that keys are sealed with now: MODERATE, unless the tests'
    TOPUP_INSECURE_FAST_KDF=1 asks for argon2id's minimum."""
    if os.environ.get(FAST_KDF_ENV) == "1":
        return nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN
    return OPSLIMIT, MEMLIMIT


class KeyInfo:
    def __init__(self, kid, public_key, created, active, revoked):
        self.kid = kid
        self.public_key = public_key
        self.created = created
        self.active = bool(active)
        self.revoked = revoked

    @property
    def status(self):
        if self.revoked is not None:
            return "revoked"
        return "active" if self.active else "inactive"


class Signer:
    """An unlocked issuer key: `sign(msg) -> 64-byte signature`, `kid`, `public_key`."""

    def __init__(self, seed):
        self._key = nacl.signing.SigningKey(seed)
        self.public_key = bytes(self._key.verify_key)
        self.kid = kid_for(self.public_key)
        # libsodium's 64-byte secret key (seed || public), for the issuer's fast path.
        self.secret64 = bytes(seed) + self.public_key

    def sign(self, msg):
        return self._key.sign(msg).signature


def _derive(passphrase, salt, opslimit, memlimit):
    if isinstance(passphrase, str):
        passphrase = passphrase.encode("utf-8")
    return nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase, salt,
                                    opslimit=opslimit, memlimit=memlimit)


def _seal(seed, passphrase, opslimit, memlimit):
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    box = nacl.secret.SecretBox(_derive(passphrase, salt, opslimit, memlimit))
    return salt, bytes(box.encrypt(seed))


def _weaker(opslimit, memlimit, target):
    return opslimit < target[0] or memlimit < target[1]


def _has_code_keys(conn):
    """Whether the database has the code_keys table (schema 5; an older database being
    set up by a test or a migration step may not)."""
    return has_table(conn, "code_keys")


def _has_command_keys(conn):
    """Whether the database has the command_keys table (schema 6)."""
    return has_table(conn, "command_keys")


def rewrap(conn, passphrase, seeds=None):
    """Seal again, at today's limits, every key (issuer or code key) sealed with weaker
    ones that `passphrase` opens. `seeds`: {kid: seed} already unsealed (saves a
    derivation). Best effort: a database that cannot be written right now keeps the old
    sealing (it still opens). Returns the kids re-sealed."""
    done = _rewrap(conn, passphrase, seeds, "keys", "sealed_seed")
    if _has_code_keys(conn):
        done += _rewrap(conn, passphrase, seeds, "code_keys", "sealed_secret")
    if _has_command_keys(conn):
        done += _rewrap(conn, passphrase, seeds, "command_keys", "sealed_seed")
    return done


def _rewrap(conn, passphrase, seeds, table, column):
    target = limits()
    done = []
    rows = conn.execute("SELECT kid, salt, %s, opslimit, memlimit FROM %s" % (column, table)
                        ).fetchall()
    for kid, salt, sealed, ops, mem in rows:
        if not _weaker(ops, mem, target):
            continue
        kid = bytes(kid)
        seed = (seeds or {}).get(kid)
        if seed is None:
            try:
                seed = _unseal((salt, sealed, ops, mem), passphrase)
            except TopupError:
                continue  # sealed under another passphrase: leave it
        new_salt, new_sealed = _seal(seed, passphrase, *target)
        try:
            with transaction(conn):
                cur = conn.execute(
                    "UPDATE %s SET salt = ?, %s = ?, opslimit = ?, memlimit = ? "
                    "WHERE kid = ? AND salt = ?" % (table, column),
                    (new_salt, new_sealed, target[0], target[1], kid, salt))
            if cur.rowcount == 1:
                done.append(kid)
        except (TopupError, sqlite3.Error):  # busy, read-only: it still opens as it is
            break
    return done


def _unseal(row, passphrase):
    salt, sealed, opslimit, memlimit = row
    box = nacl.secret.SecretBox(_derive(passphrase, salt, opslimit, memlimit))
    try:
        return box.decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise TopupError("wrong passphrase") from None


def _row(conn, kid):
    return conn.execute("SELECT salt, sealed_seed, opslimit, memlimit FROM keys WHERE kid = ?",
                        (kid,)).fetchone()


def list_keys(conn):
    rows = conn.execute("SELECT kid, public_key, created, active, revoked FROM keys "
                        "ORDER BY created, kid").fetchall()
    return [KeyInfo(*r) for r in rows]


def trusted(conn, include_revoked=False):
    """{kid: public key} of the keys a meter should trust (revoked ones left out)."""
    sql = "SELECT kid, public_key FROM keys"
    if not include_revoked:
        sql += " WHERE revoked IS NULL"
    return {bytes(k): bytes(p) for k, p in conn.execute(sql)}


def get_key(conn, kid):
    r = conn.execute("SELECT kid, public_key, created, active, revoked FROM keys WHERE kid = ?",
                     (kid,)).fetchone()
    return KeyInfo(*r) if r else None


def find_key(conn, kid_text):
    """An issuer key by its kid in hex, or a unique prefix of it (at least 4 hex digits)."""
    t = kid_text.strip().lower()
    if len(t) < 4 or any(c not in "0123456789abcdef" for c in t):
        raise TopupError("key id %r: give at least 4 hex digits of a kid" % kid_text)
    matches = [k for k in list_keys(conn) if k.kid.hex().startswith(t)]
    if not matches:
        if any(k.kid.hex().startswith(t) for k in list_code_keys(conn)):
            raise TopupError("%s is a keypad-code key (X25519): activate and revoke work on "
                             "issuer keys; a new code key is `topup key new --code`" % t)
        raise TopupError("no key with kid %s" % t)
    if len(matches) > 1:
        raise TopupError("kid prefix %s matches %d keys; give more digits" % (t, len(matches)))
    return matches[0]


def check_passphrase(conn, passphrase):
    """Raise TopupError('wrong passphrase') unless `passphrase` opens the store's keys.

    New keys must share the store's passphrase, so a typo cannot silently create a key
    nobody can open. With no keys yet, any passphrase is the store's first.
    """
    r = conn.execute("SELECT salt, sealed_seed, opslimit, memlimit, kid FROM keys "
                     "ORDER BY active DESC, revoked IS NOT NULL, created LIMIT 1").fetchone()
    if r is None and _has_code_keys(conn):
        r = conn.execute("SELECT salt, sealed_secret, opslimit, memlimit, kid FROM code_keys "
                         "ORDER BY active DESC, revoked IS NOT NULL, created LIMIT 1").fetchone()
    if r is None and _has_command_keys(conn):
        r = conn.execute("SELECT salt, sealed_seed, opslimit, memlimit, kid FROM command_keys "
                         "ORDER BY active DESC, created LIMIT 1").fetchone()
    if r is not None:
        seed = _unseal(r[:4], passphrase)
        rewrap(conn, passphrase, {bytes(r[4]): seed})


def new_key(conn, passphrase, activate=False, now=None, seed=None, code_key=True,
            command_key=True, within=None):
    """Generate (or import `seed`), seal and store a key. The first key becomes active.

    With `code_key` (the default), a database with no active keypad-code key gets one in
    the same transaction (SPEC.md §8: provisioning installs it on meters), so that one
    `topup key new` sets up vouchers and codes alike. With `command_key` (the default), a
    database with no command key gets one too (SPEC.md §10)."""
    if not passphrase:
        raise TopupError("the passphrase must not be empty")
    check_passphrase(conn, passphrase)  # before anything is written
    seed = nacl.utils.random(32) if seed is None else bytes(seed)
    signer = Signer(seed)
    ops, mem = limits()
    salt, sealed = _seal(seed, passphrase, ops, mem)
    created = int(time.time()) if now is None else int(now)
    code = None
    if code_key and _has_code_keys(conn) and active_code_key(conn) is None:
        code = _sealed_code_key(nacl.utils.random(32), passphrase)
    command = None
    if command_key and _has_command_keys(conn) and active_command_key(conn) is None:
        command = _sealed_signing_key(nacl.utils.random(32), passphrase)
    def insert():
        if code is not None and not conn.execute(
                "SELECT 1 FROM code_keys WHERE active = 1").fetchone():
            _insert_code_key(conn, code, True, created)
        if command is not None and not conn.execute(
                "SELECT 1 FROM command_keys WHERE active = 1").fetchone():
            _insert_command_key(conn, command, created)
        if conn.execute("SELECT 1 FROM keys WHERE kid = ?", (signer.kid,)).fetchone():
            raise TopupError("a key with kid %s already exists" % signer.kid.hex())
        has_active = conn.execute("SELECT 1 FROM keys WHERE active = 1").fetchone()
        make_active = activate or not has_active
        if make_active:
            conn.execute("UPDATE keys SET active = 0 WHERE active = 1")
        conn.execute("INSERT INTO keys (kid, public_key, salt, sealed_seed, opslimit, memlimit,"
                     " created, active) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (signer.kid, signer.public_key, salt, sealed, ops, mem, created,
                      1 if make_active else 0))
    if within is not None:
        # The caller's transaction (host/commands.py: the key and its ADD_ISSUER_KEY
        # commands are stored together or not at all).
        within(insert)
    else:
        with transaction(conn):
            insert()
    return get_key(conn, signer.kid)


def _in(conn, within, fn):
    """Run fn inside the caller's transaction (`within(fn)`) or one of its own."""
    if within is not None:
        within(fn)
    else:
        with transaction(conn):
            fn()


def activate(conn, kid, within=None):
    def do():
        k = get_key(conn, kid)
        if k is None:
            raise TopupError("no key with kid %s" % kid.hex())
        if k.revoked is not None:
            raise TopupError("key %s is revoked and cannot be activated" % kid.hex())
        conn.execute("UPDATE keys SET active = 0 WHERE active = 1")
        conn.execute("UPDATE keys SET active = 1 WHERE kid = ?", (kid,))
    _in(conn, within, do)
    return get_key(conn, kid)


def revoke(conn, kid, now=None, within=None):
    """Revoke a key: it stops being active and its vouchers are void from now on.
    `within`: run inside the caller's transaction (with the REVOKE_ISSUER_KEY commands)."""
    when = int(time.time()) if now is None else int(now)

    def do():
        k = get_key(conn, kid)
        if k is None:
            raise TopupError("no key with kid %s" % kid.hex())
        if k.revoked is not None:
            raise TopupError("key %s is already revoked" % kid.hex())
        conn.execute("UPDATE keys SET active = 0, revoked = ? WHERE kid = ?", (when, kid))
    _in(conn, within, do)
    return get_key(conn, kid)


def unlock_active(conn, passphrase):
    """The active key as a Signer, or TopupError (no active key / wrong passphrase)."""
    r = conn.execute("SELECT kid, salt, sealed_seed, opslimit, memlimit FROM keys "
                     "WHERE active = 1").fetchone()
    if r is None:
        if conn.execute("SELECT 1 FROM keys").fetchone():
            raise TopupError("no active issuer key (run `topup key activate KID` or "
                             "`topup key new --activate`)")
        raise TopupError("no issuer key yet (run `topup key new`)")
    seed = _unseal(r[1:], passphrase)
    signer = Signer(seed)
    if signer.kid != bytes(r[0]):
        raise TopupError("key store is damaged: key %s does not match its seed" % bytes(r[0]).hex())
    rewrap(conn, passphrase, {signer.kid: seed})
    return signer


# --- code keys (SPEC.md §8) -------------------------------------------------------------

class CodeKey:
    """An unlocked code key: `kid`, `public_key` (X25519), and `code_key(device,
    meter_public)`: the per-meter keypad-code key (HKDF-SHA-256 of the X25519 agreement
    with the meter's key-agreement key, SPEC.md §8)."""

    def __init__(self, secret):
        self._secret = bytes(secret)
        self.public_key = x25519_public(self._secret)
        self.kid = kid_for(self.public_key)

    def shared(self, meter_public):
        """X25519(own secret, meter public): TopupError for a small-order meter key."""
        try:
            return nacl.bindings.crypto_scalarmult(self._secret, bytes(meter_public))
        except (nacl.exceptions.RuntimeError, nacl.exceptions.CryptoError, ValueError):
            raise TopupError("the meter's key-agreement key %s is not usable (a small-order "
                             "point): provision the meter again" % bytes(meter_public).hex()
                             ) from None

    def code_key(self, device, meter_public):
        from protocol import keycode
        return keycode.derive_key(self.shared(meter_public), bytes(device), self.public_key,
                                  bytes(meter_public))


def x25519_public(secret):
    """The X25519 public key of a 32-byte secret (libsodium; RFC 7748 clamping)."""
    return nacl.bindings.crypto_scalarmult_base(bytes(secret))


def list_code_keys(conn):
    """Every code key, oldest first ([] on a database without code keys yet)."""
    if not _has_code_keys(conn):
        return []
    rows = conn.execute("SELECT kid, public_key, created, active, revoked FROM code_keys "
                        "ORDER BY created, kid").fetchall()
    return [KeyInfo(*r) for r in rows]


def get_code_key(conn, kid):
    r = conn.execute("SELECT kid, public_key, created, active, revoked FROM code_keys "
                     "WHERE kid = ?", (kid,)).fetchone()
    return KeyInfo(*r) if r else None


def active_code_key(conn):
    """The active code key (KeyInfo), or None."""
    if not _has_code_keys(conn):
        return None
    r = conn.execute("SELECT kid, public_key, created, active, revoked FROM code_keys "
                     "WHERE active = 1").fetchone()
    return KeyInfo(*r) if r else None


def new_code_key(conn, passphrase, activate=False, now=None, secret=None, within=None):
    """Generate (or import `secret`), seal and store an X25519 code key under the store's
    passphrase. The first becomes active (later ones only with `activate`). `within(fn)`:
    run the insert inside the caller's transaction (host/commands.py: the key and its
    SET_CODE_KEY commands together or not at all)."""
    if not passphrase:
        raise TopupError("the passphrase must not be empty")
    check_passphrase(conn, passphrase)  # before anything is written
    sealed = _sealed_code_key(nacl.utils.random(32) if secret is None else bytes(secret),
                              passphrase)
    created = int(time.time()) if now is None else int(now)
    kid = sealed[0].kid
    if within is not None:
        within(lambda: _insert_code_key(conn, sealed, activate, created))
    else:
        with transaction(conn):
            _insert_code_key(conn, sealed, activate, created)
    return get_code_key(conn, kid)


def _sealed_code_key(secret, passphrase):
    """(CodeKey, salt, sealed secret, opslimit, memlimit): a code key sealed for storing."""
    key = CodeKey(secret)
    ops, mem = limits()
    salt, sealed = _seal(bytes(secret), passphrase, ops, mem)
    return key, salt, sealed, ops, mem


def _insert_code_key(conn, sealed, activate, created):
    """Store a sealed code key (inside the caller's transaction); the first is active."""
    key, salt, blob, ops, mem = sealed
    if conn.execute("SELECT 1 FROM code_keys WHERE kid = ?", (key.kid,)).fetchone():
        raise TopupError("a code key with kid %s already exists" % key.kid.hex())
    has_active = conn.execute("SELECT 1 FROM code_keys WHERE active = 1").fetchone()
    make_active = activate or not has_active
    if make_active:
        conn.execute("UPDATE code_keys SET active = 0 WHERE active = 1")
    conn.execute("INSERT INTO code_keys (kid, public_key, salt, sealed_secret, opslimit, "
                 "memlimit, created, active) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (key.kid, key.public_key, salt, blob, ops, mem, created,
                  1 if make_active else 0))
    return key.kid


def unlock_code_key(conn, passphrase, kid):
    """Code key `kid` as a CodeKey, or TopupError (no such key / wrong passphrase)."""
    r = conn.execute("SELECT kid, salt, sealed_secret, opslimit, memlimit FROM code_keys "
                     "WHERE kid = ?", (bytes(kid),)).fetchone()
    if r is None:
        raise TopupError("no code key %s in this database" % bytes(kid).hex())
    secret = _unseal(r[1:], passphrase)
    key = CodeKey(secret)
    if key.kid != bytes(r[0]):
        raise TopupError("key store is damaged: code key %s does not match its secret"
                         % bytes(r[0]).hex())
    rewrap(conn, passphrase, {key.kid: secret})
    return key


# --- command keys (SPEC.md §10) ---------------------------------------------------------

def _sealed_signing_key(seed, passphrase):
    """(Signer, salt, sealed seed, opslimit, memlimit): an Ed25519 key sealed for storing."""
    signer = Signer(seed)
    ops, mem = limits()
    salt, sealed = _seal(bytes(seed), passphrase, ops, mem)
    return signer, salt, sealed, ops, mem


def _insert_command_key(conn, sealed, created):
    """Store a sealed command key as the active one (inside the caller's transaction)."""
    signer, salt, blob, ops, mem = sealed
    if conn.execute("SELECT 1 FROM command_keys WHERE kid = ?", (signer.kid,)).fetchone():
        raise TopupError("a command key with kid %s already exists" % signer.kid.hex())
    conn.execute("UPDATE command_keys SET active = 0 WHERE active = 1")
    conn.execute("INSERT INTO command_keys (kid, public_key, salt, sealed_seed, opslimit, "
                 "memlimit, created, active) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                 (signer.kid, signer.public_key, salt, blob, ops, mem, created))
    return signer.kid


def list_command_keys(conn):
    """Every command key, oldest first ([] on a database without them)."""
    if not _has_command_keys(conn):
        return []
    rows = conn.execute("SELECT kid, public_key, created, active, NULL FROM command_keys "
                        "ORDER BY created, kid").fetchall()
    return [KeyInfo(*r) for r in rows]


def active_command_key(conn):
    """The active command key (KeyInfo), or None."""
    if not _has_command_keys(conn):
        return None
    r = conn.execute("SELECT kid, public_key, created, active, NULL FROM command_keys "
                     "WHERE active = 1").fetchone()
    return KeyInfo(*r) if r else None


def new_command_key(conn, passphrase, now=None, seed=None, within=None):
    """Generate (or import `seed`), seal and store a command key; it becomes the active
    one (meters provisioned from now on get it). `within(fn)`: run the insert inside the
    caller's transaction (the key and its ROTATE_COMMAND_KEY commands together)."""
    if not passphrase:
        raise TopupError("the passphrase must not be empty")
    check_passphrase(conn, passphrase)
    sealed = _sealed_signing_key(nacl.utils.random(32) if seed is None else bytes(seed),
                                 passphrase)
    created = int(time.time()) if now is None else int(now)
    kid = sealed[0].kid
    if within is not None:
        within(lambda: _insert_command_key(conn, sealed, created))
    else:
        with transaction(conn):
            _insert_command_key(conn, sealed, created)
    return [k for k in list_command_keys(conn) if k.kid == kid][0]


def unlock_command_key(conn, passphrase, kid):
    """Command key `kid` as a Signer, or TopupError (no such key / wrong passphrase)."""
    r = conn.execute("SELECT kid, salt, sealed_seed, opslimit, memlimit FROM command_keys "
                     "WHERE kid = ?", (bytes(kid),)).fetchone()
    if r is None:
        raise TopupError("no command key %s in this database" % bytes(kid).hex())
    seed = _unseal(r[1:], passphrase)
    signer = Signer(seed)
    if signer.kid != bytes(r[0]):
        raise TopupError("key store is damaged: command key %s does not match its seed"
                         % bytes(r[0]).hex())
    rewrap(conn, passphrase, {signer.kid: seed})
    return signer
