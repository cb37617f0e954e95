# Signed commands (SPEC.md §10), the supplier's side: what a meter should trust and charge,
# changed offline. A command is a COSE_Sign1 like a voucher, signed by the command key its
# meter was given at provisioning (its root of trust), with the external AAD
# "OTU1 command v1" so that no command can be taken for a voucher or the other way round.
# Its payload names the meter, a number (per meter and per provisioning: the meter applies
# number == last applied + 1 only), the kind, the time it was made, and the kind's args.
#
# Numbers are allocated in the transaction that stores the signed command (BEGIN
# IMMEDIATE ... COMMIT, synchronous=FULL): a killed run leaves either every command of a
# plan stored, numbered and signed, or none of them; a number is never used twice.
#
# Trust (which issuer keys a meter accepts vouchers from), as far as the supplier knows:
#   given     the keys its current provisioning installed (device_trust), plus every
#             ADD_ISSUER_KEY made for it, minus every REVOKE_ISSUER_KEY made for it
#             (pending or applied: commands apply in order, so this is where it is heading)
#   confirmed the same with applied commands only (a command receipt came back)
# A revoked key that a meter still trusts by its confirmed view is *exposure*: vouchers
# under it that are not redeemed could still be applied there.
import hashlib
import json
import time

from protocol import base45, cbor, cose

from .db import transaction
from .errors import TopupError
from .money import format_pence
from .registry import format_eui64, get_device

AAD = b"OTU1 command v1"
TEXT_PREFIX = "OTC1:"

ADD_ISSUER_KEY = 1
REVOKE_ISSUER_KEY = 2
SET_CODE_KEY = 3
SET_TARIFF = 4
ROTATE_COMMAND_KEY = 5
CHANGE_SUPPLIER = 6
KIND_NAMES = {ADD_ISSUER_KEY: "ADD_ISSUER_KEY", REVOKE_ISSUER_KEY: "REVOKE_ISSUER_KEY",
              SET_CODE_KEY: "SET_CODE_KEY", SET_TARIFF: "SET_TARIFF",
              ROTATE_COMMAND_KEY: "ROTATE_COMMAND_KEY", CHANGE_SUPPLIER: "CHANGE_SUPPLIER"}

K_DEVICE, K_NUMBER, K_KIND, K_ISSUED, K_ARGS = 1, 2, 3, 4, 5

# SET_TARIFF args (SPEC.md §10) and their bounds: (key, name, unit, low, high).
T_EFFECTIVE = 1
TARIFF_FIELDS = (
    (2, "unit_rate_mp", "milli-pence/kWh", 1, 1_000_000),        # up to £10/kWh
    (3, "standing_mp", "milli-pence/day", 0, 10_000_000),        # up to £100/day
    (4, "ec_amount", "pence", 1, 1_000_000),
    (5, "ec_threshold", "pence", 0, 1_000_000),
    (6, "max_voucher", "pence", 1, 1_000_000),
    (7, "max_credit", "pence", 1, 1_000_000),
)
PAST_BOUND_S = 7 * 86400     # an effective time may lie this far in the past, no further

STATUSES = ("pending", "applied", "refused", "superseded")


def reference(raw):
    """A command's reference: SHA-256 of its bytes, first 16 (as a voucher's)."""
    return hashlib.sha256(bytes(raw)).digest()[:16]


def encode(signer, device, number, kind, issued, args):
    """The COSE_Sign1 bytes of a command (protocol.command: deterministic CBOR payload, the
    value bounds checked), signed by `signer` (an unlocked command key: .kid, .sign)."""
    from protocol import command as pc
    from protocol.errors import Rejected
    try:
        return pc.encode(signer.kid, signer.sign, bytes(device), number, kind, issued, args)
    except Rejected as e:
        raise TopupError("a meter would refuse this command: %s" % e) from None


def decode(raw):
    """(kid, {payload}) of a command's bytes, signature not checked; TopupError if it is
    not one."""
    from protocol.errors import Rejected
    try:
        msg = cose.decode(bytes(raw))
        fields = cbor.decode(msg.payload)
    except Rejected as e:
        raise TopupError("not a signed command: %s" % e) from None
    if not isinstance(fields, dict) or set(fields) != {K_DEVICE, K_NUMBER, K_KIND, K_ISSUED,
                                                       K_ARGS}:
        raise TopupError("not a signed command: its payload is not a command's")
    return msg.kid, fields


def verify(raw, public_key):
    """Whether `raw` is signed by `public_key` as a command (the AAD included)."""
    import nacl.exceptions
    import nacl.signing
    msg = cose.decode(bytes(raw))
    try:
        nacl.signing.VerifyKey(bytes(public_key)).verify(msg.to_be_signed(AAD), msg.signature)
        return True
    except nacl.exceptions.BadSignatureError:
        return False


def to_text(raw):
    """The text form: OTC1: + base45 (fits a QR code's alphanumeric mode)."""
    return TEXT_PREFIX + base45.encode(bytes(raw))


def from_text(text):
    t = text.strip()
    if not t.upper().startswith(TEXT_PREFIX):
        raise TopupError("a command's text form starts with %s" % TEXT_PREFIX)
    try:
        return bytes(base45.decode(t[len(TEXT_PREFIX):]))
    except Exception:  # noqa: BLE001 - any decoding failure is one message
        raise TopupError("not a command's text form (bad base45)") from None


# --- tariff -------------------------------------------------------------------------------

def tariff_args(effective, now=None, **values):
    """The SET_TARIFF args map from named values (TARIFF_FIELDS names, integers), checked
    against the bounds a meter enforces: TopupError in one line if any is out of them."""
    now = int(time.time()) if now is None else int(now)
    if not isinstance(effective, int) or effective < 0:
        raise TopupError("the effective time must be Unix seconds")
    if effective < now - PAST_BOUND_S:
        raise TopupError("effective time %s is more than 7 days in the past: a meter refuses "
                         "it (COMMAND_REFUSED)" % _utc(effective))
    args = {T_EFFECTIVE: effective}
    for key, name, unit, low, high in TARIFF_FIELDS:
        v = values.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise TopupError("%s must be a whole number of %s" % (name, unit))
        if not low <= v <= high:
            what = name.replace("_mp", "").replace("_", " ")
            if unit == "pence":
                raise TopupError("%s %s is outside %s..%s: a meter refuses it" % (
                    what, format_pence(v), format_pence(low), format_pence(high)))
            raise TopupError("%s %s is outside %s..%s: a meter refuses it" % (
                what, _pence_mp(v) + unit[len("milli-pence"):],
                _pence_mp(low), _pence_mp(high) + unit[len("milli-pence"):]))
        args[key] = v
    if len(args) == 1:
        raise TopupError("a tariff change needs at least one of --unit-rate, --standing, "
                         "--ec-amount, --ec-threshold, --max-voucher, --max-credit")
    mv, mc = args.get(6), args.get(7)
    if mv is not None and mc is not None and mc < mv:
        raise TopupError("maximum credit %s is below the per-voucher maximum %s"
                         % (format_pence(mc), format_pence(mv)))
    return args


def describe_tariff(args):
    """A SET_TARIFF args map ({int: int}, or its JSON with string keys) in words."""
    a = {int(k): v for k, v in args.items()}
    parts = []
    if 2 in a:
        parts.append("unit rate %s/kWh" % _pence_mp(a[2]))
    if 3 in a:
        parts.append("standing charge %s/day" % _pence_mp(a[3]))
    if 4 in a:
        parts.append("emergency credit %s" % format_pence(a[4]))
    if 5 in a:
        parts.append("emergency threshold %s" % format_pence(a[5]))
    if 6 in a:
        parts.append("max per voucher %s" % format_pence(a[6]))
    if 7 in a:
        parts.append("max credit %s" % format_pence(a[7]))
    if 1 in a:
        parts.append("from %s" % _utc(a[1]))
    return ", ".join(parts)


def _pence_mp(mp):
    p, m = divmod(mp, 1000)
    return ("%d.%03d" % (p, m)).rstrip("0").rstrip(".") + "p"



# --- trust --------------------------------------------------------------------------------

def current_epochs(conn, devices=None):
    """{device: (epoch, command_kid)} of the current key epoch of every registered device
    with one (or of `devices`)."""
    out = {}
    for dev, epoch, ckid in conn.execute(
            "SELECT device, epoch, command_kid FROM device_keys d WHERE epoch = "
            "(SELECT max(epoch) FROM device_keys e WHERE e.device = d.device) ORDER BY device"):
        dev = bytes(dev)
        if devices is None or dev in devices:
            out[dev] = (epoch, None if ckid is None else bytes(ckid))
    return out


def trust(conn, device, confirmed=False):
    """The kids of the issuer keys the meter of `device` trusts (its current provisioning
    and the commands since): the supplier's view (`confirmed`: applied commands only)."""
    cur = current_epochs(conn, {bytes(device)}).get(bytes(device))
    if cur is None:
        return set()
    epoch = cur[0]
    kids = {bytes(k) for (k,) in conn.execute(
        "SELECT kid FROM device_trust WHERE device = ? AND epoch = ?", (device, epoch))}
    statuses = ("applied",) if confirmed else ("applied", "pending")
    for kind, args in conn.execute(
            "SELECT kind, args FROM commands WHERE device = ? AND epoch = ? AND status IN (%s) "
            "AND kind IN (1, 2, 6) ORDER BY number" % ",".join("?" * len(statuses)),
            (device, epoch) + statuses):
        if kind == CHANGE_SUPPLIER:       # the new supplier's keys only from then on
            kids = {bytes.fromhex(k) for k in json.loads(args)["issuer_kids"]}
            continue
        kid = bytes.fromhex(json.loads(args)["kid"])
        if kind == ADD_ISSUER_KEY:
            kids.add(kid)
        else:
            kids.discard(kid)
    return kids


# --- making commands ----------------------------------------------------------------------

class Made:
    __slots__ = ("device", "epoch", "number", "kind", "args", "raw", "ref")

    def __init__(self, device, epoch, number, kind, args, raw, ref):
        self.device, self.epoch, self.number, self.kind, self.args, self.raw, self.ref = (
            device, epoch, number, kind, args, raw, ref)


def make(conn, passphrase, plan, now=None, before_commit=None, also=None):
    """Sign and store commands: `plan` is [(device, kind, cbor args, json args)]. All in
    one transaction, numbered per meter in plan order after what each meter has. Every
    device must take commands (a command key registered for its current provisioning).
    `also` (a callable) runs first inside the same transaction: what the commands follow
    from (a key revoked, a key stored) is stored with them or not at all. `before_commit`
    (tests) runs inside the transaction after the inserts. Returns [Made]."""
    now = int(time.time()) if now is None else int(now)
    if not plan:
        if also is not None:
            with transaction(conn):
                also()
        return []
    epochs = current_epochs(conn, {bytes(p[0]) for p in plan})
    signers = {}
    for device, *_ in plan:
        gone = changed_supplier(conn, device)
        if gone is not None:
            raise TopupError("meter %s %s: its commands now come from the new supplier" % (
                format_eui64(device), "has changed supplier" if gone == "applied"
                else "is changing supplier (a CHANGE_SUPPLIER command is pending)"))
        cur = epochs.get(bytes(device))
        if cur is None or cur[1] is None:
            raise TopupError("meter %s takes no signed commands: %s" % (
                format_eui64(device), "it has not been provisioned" if cur is None else
                "its provisioning installed no command key (firmware older than commands, "
                "or a database without one): `topup provision --factory-reset` it"))
        ckid = signing_kid(conn, device)
        if ckid not in signers:
            from . import keystore
            signers[ckid] = keystore.unlock_command_key(conn, passphrase, ckid)
    rotating = set()
    for device, kind, *_ in plan:
        if bytes(device) in rotating:
            raise TopupError("meter %s: a command after a ROTATE_COMMAND_KEY in the same run "
                             "(make it in a run of its own)" % format_eui64(device))
        if kind == ROTATE_COMMAND_KEY:
            rotating.add(bytes(device))
    keys = {bytes(p[0]): signing_kid(conn, p[0]) for p in plan}
    made = []
    with transaction(conn):
        if also is not None:
            also()
        nxt = {}
        for device, kind, args, jargs in plan:
            device = bytes(device)
            epoch, ckid = epochs[device][0], keys[device]
            if device not in nxt:
                nxt[device] = conn.execute(
                    "SELECT coalesce(max(number), 0) + 1 FROM commands WHERE device = ? AND "
                    "epoch = ? AND status IN ('pending', 'applied')", (device, epoch)
                ).fetchone()[0]
            number = nxt[device]
            nxt[device] += 1
            raw = encode(signers[ckid], device, number, kind, now, args)
            ref = reference(raw)
            conn.execute("INSERT INTO commands (device, epoch, number, kind, args, raw, ref, "
                         "command_kid, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (device, epoch, number, kind, json.dumps(jargs, sort_keys=True), raw,
                          ref, ckid, now))
            made.append(Made(device, epoch, number, kind, jargs, raw, ref))
        if before_commit is not None:
            before_commit()
    return made


def changed_supplier(conn, device):
    """'applied' or 'pending' if a CHANGE_SUPPLIER command was made for the current
    provisioning of `device`, else None."""
    cur = current_epochs(conn, {bytes(device)}).get(bytes(device))
    if cur is None:
        return None
    r = conn.execute("SELECT status FROM commands WHERE device = ? AND epoch = ? AND kind = 6 "
                     "AND status IN ('applied', 'pending') ORDER BY status = 'applied' DESC",
                     (bytes(device), cur[0])).fetchone()
    return None if r is None else r[0]


def signing_kid(conn, device, confirmed=False):
    """The kid of the command key that signs `device`'s next command: the one its current
    provisioning installed, or the new key of its last ROTATE_COMMAND_KEY (pending or
    applied: commands apply strictly in order, so every command numbered after a rotation
    must be signed by the new key; `confirmed`: applied ones only, the key the meter is
    known to hold). None if it takes no commands."""
    cur = current_epochs(conn, {bytes(device)}).get(bytes(device))
    if cur is None or cur[1] is None:
        return None
    statuses = ("applied",) if confirmed else ("applied", "pending")
    r = conn.execute("SELECT args FROM commands WHERE device = ? AND epoch = ? AND kind = 5 "
                     "AND status IN (%s) ORDER BY number DESC, id DESC LIMIT 1"
                     % ",".join("?" * len(statuses)), (bytes(device), cur[0]) + statuses
                     ).fetchone()
    return cur[1] if r is None else bytes.fromhex(json.loads(r[0])["kid"])


def code_kid(conn, device, confirmed=True):
    """The kid of the supplier code key the meter of `device` derives its keypad-code key
    from: the one its current provisioning installed, or the key of its last SET_CODE_KEY
    -- applied only (a receipt confirmed it: codes are derived with that one), or pending
    too with confirmed=False (where it is heading). None if it takes no codes."""
    from . import registry
    keys = registry.device_keys(conn, bytes(device))
    if not keys:
        return None
    cur = keys[-1]
    statuses = ("applied",) if confirmed else ("applied", "pending")
    r = conn.execute("SELECT args FROM commands WHERE device = ? AND epoch = ? AND kind = 3 "
                     "AND status IN (%s) ORDER BY number DESC, id DESC LIMIT 1"
                     % ",".join("?" * len(statuses)), (bytes(device), cur.epoch) + statuses
                     ).fetchone()
    return cur.code_kid if r is None else bytes.fromhex(json.loads(r[0])["kid"])


def commandable(conn):
    """(devices that take commands from this supplier, devices provisioned without a command
    key), as lists of 8-byte ids. A meter changing or having changed supplier is neither."""
    yes, no = [], []
    for dev, (_, ckid) in current_epochs(conn).items():
        if ckid is not None and changed_supplier(conn, dev) is not None:
            continue
        (yes if ckid is not None else no).append(dev)
    return yes, no


def new_supplier_keys(conn, path):
    """(command public key, [issuer public keys], code public key or None) of the new
    supplier, read from its database at `path` (read only): its active command key, its
    issuer keys not revoked (the active one first, at most 4) and its active code key."""
    from . import db, keystore
    other = db.open_db(path, write=False)
    try:
        ck = keystore.active_command_key(other)
        issuers = sorted((k for k in keystore.list_keys(other) if k.revoked is None),
                         key=lambda k: (not k.active, k.created, k.kid))[:4]
        code = keystore.active_code_key(other)
    finally:
        other.close()
    if ck is None or not issuers:
        raise TopupError("%s has no %s: the new supplier runs `topup key new` first"
                         % (path, "command key" if ck is None else "issuer key"))
    mine = {bytes(k.public_key) for k in keystore.list_command_keys(conn)}
    if bytes(ck.public_key) in mine:
        raise TopupError("%s holds this supplier's own command key: give the new supplier's "
                         "database" % path)
    return (bytes(ck.public_key), [bytes(k.public_key) for k in issuers],
            None if code is None else bytes(code.public_key))


def plan_change_supplier(conn, device, command_public, issuers, code_public=None, floor=0):
    """CHANGE_SUPPLIER for `device`: the new supplier's command, issuer and code keys, and a
    sequence floor at least this supplier's highest sequence issued for it (nothing of ours
    applies after it)."""
    from .registry import issued_floor
    floor = max(int(floor), issued_floor(conn, device))
    args = {1: bytes(command_public), 2: [bytes(k) for k in issuers], 4: floor}
    if code_public is not None:
        args[3] = bytes(code_public)
    jargs = {"command_kid": cose.kid_for(command_public).hex(),
             "issuer_kids": [cose.kid_for(k).hex() for k in issuers],
             "code_kid": None if code_public is None else cose.kid_for(code_public).hex(),
             "floor": floor}
    return [(bytes(device), CHANGE_SUPPLIER, args, jargs)]


def outstanding(conn, device):
    """(count, pence) of vouchers and codes issued for `device`, not redeemed, cancelled or
    already stale, by the last reconciliation (those never reconciled count too)."""
    return conn.execute(
        "SELECT count(*), coalesce(sum(v.amount), 0) FROM vouchers v LEFT JOIN keys k ON "
        "k.kid = v.kid WHERE v.device = ? AND v.voided IS NULL AND k.revoked IS NULL AND NOT "
        "EXISTS (SELECT 1 FROM voucher_status s WHERE s.device = v.device AND s.sequence = "
        "v.sequence AND s.status != 'outstanding')", (bytes(device),)).fetchone()


def close_for_supplier_change(conn):
    """Reconciliation (inside its transaction): on a meter whose CHANGE_SUPPLIER command a
    receipt confirms, every voucher of ours still outstanding is refused there for ever
    (STALE under the new floor): a refund is due. Returns the devices concerned."""
    rows = conn.execute(
        "SELECT c.device, c.receipt_index, r.meter_time FROM commands c JOIN receipts r ON "
        "r.device = c.device AND r.idx = c.receipt_index AND r.hash = c.receipt "
        "WHERE c.kind = 6 AND c.status = 'applied'").fetchall()
    for dev, idx, t in rows:
        conn.execute("UPDATE voucher_status SET status = 'stale', closed_at = ?, note = ? "
                     "WHERE device = ? AND status = 'outstanding'",
                     (t, "the meter changed supplier (command receipt %d): it refuses every "
                         "voucher of ours; refund due" % idx, dev))
    return [bytes(r[0]) for r in rows]


def plan_add_key(conn, kid, public_key, devices=None):
    """ADD_ISSUER_KEY for every meter taking commands that does not trust `kid` yet."""
    yes, _ = commandable(conn)
    return [(d, ADD_ISSUER_KEY, {1: bytes(public_key)}, {"kid": bytes(kid).hex(),
                                                        "public_key": bytes(public_key).hex()})
            for d in yes if (devices is None or d in devices) and bytes(kid) not in trust(conn, d)]


def plan_revoke_key(conn, kid):
    """REVOKE_ISSUER_KEY for every meter taking commands that trusts `kid`; TopupError if
    that would leave one with no issuer key (nothing is made then)."""
    yes, _ = commandable(conn)
    plan, empty = [], []
    for d in yes:
        t = trust(conn, d)
        if bytes(kid) in t:
            if len(t) == 1:
                empty.append(d)
            plan.append((d, REVOKE_ISSUER_KEY, {1: bytes(kid)}, {"kid": bytes(kid).hex()}))
    if empty:
        raise TopupError("revoking %s would leave %s with no issuer key (a meter refuses "
                         "that): make a new key first (`topup key new --activate`), then "
                         "revoke" % (bytes(kid).hex(), ", ".join(format_eui64(d) for d in empty)))
    return plan


def plan_code_key(conn, kid, public_key):
    """SET_CODE_KEY for every meter taking commands and keypad codes (a key-agreement key
    registered by its provisioning) whose code key is not `kid` already, pending included."""
    from . import registry
    yes, _ = commandable(conn)
    plan = []
    for d in yes:
        keys = registry.device_keys(conn, d)
        if not keys or keys[-1].ka_public is None:
            continue
        if code_kid(conn, d, confirmed=False) == bytes(kid):
            continue
        plan.append((d, SET_CODE_KEY, {1: bytes(public_key)},
                     {"kid": bytes(kid).hex(), "public_key": bytes(public_key).hex()}))
    return plan


def plan_rotate(conn, kid, public_key):
    """ROTATE_COMMAND_KEY to `kid` for every meter taking commands whose next command
    would not be signed by it already (each signed by the key it holds then)."""
    yes, _ = commandable(conn)
    return [(d, ROTATE_COMMAND_KEY, {1: bytes(public_key)},
             {"kid": bytes(kid).hex(), "public_key": bytes(public_key).hex()})
            for d in yes if signing_kid(conn, d) != bytes(kid)]


def untrusting(conn, kid):
    """Meters provisioned without a command key that may trust `kid` (their trust list
    cannot be changed offline)."""
    _, no = commandable(conn)
    return no


def plan_tariff(conn, devices, args):
    jargs = {str(k): v for k, v in args.items()}
    return [(bytes(d), SET_TARIFF, dict(args), jargs) for d in devices]


# --- state from the meter -----------------------------------------------------------------

def settle_from_receipts(conn, now=None):
    """Mark applied every command that a verified command receipt (kind 5) names by its
    reference on its own meter. Runs inside the caller's transaction or its own. Returns
    how many changed."""
    now = int(time.time()) if now is None else int(now)
    rows = conn.execute(
        "SELECT c.id, r.idx, r.hash FROM commands c JOIN receipts r ON r.device = c.device "
        "AND r.kind = 5 AND r.voucher_ref = c.ref AND r.sequence = c.number AND r.sig_ok = 1 "
        "WHERE c.status != 'applied' OR c.receipt IS NOT r.hash "
        "ORDER BY c.id, r.idx").fetchall()
    seen, updates = set(), []
    for cid, idx, h in rows:
        if cid in seen:
            continue
        seen.add(cid)
        updates.append((idx, h, now, cid))
    if not updates:
        return 0
    if conn.in_transaction:
        _settle(conn, updates)
    else:
        with transaction(conn):
            _settle(conn, updates)
    return len(updates)


def _settle(conn, updates):
    for _, _, now, cid in updates:
        # The meter applied these bytes: a renumbered copy still pending never applies.
        conn.execute("UPDATE commands SET status = 'superseded', settled = ? WHERE status = "
                     "'pending' AND id != ? AND (device, epoch, number) = (SELECT device, "
                     "epoch, number FROM commands WHERE id = ?)", (now, cid, cid))
    conn.executemany("UPDATE commands SET status = 'applied', receipt_index = ?, receipt = ?, "
                     "reason = NULL, settled = ? WHERE id = ?", updates)


def mark_refused(conn, cid, reason, passphrase=None, now=None):
    """Record that the meter refused command `cid` (reason code). A refused command uses
    no number on the meter (SPEC.md §10), so the pending commands after it for the same
    meter are signed again one number lower (with `passphrase`; the old bytes are kept as
    superseded), in the same transaction. Returns the renumbered [Made] (none without a
    passphrase: they stay as they are, out of order, until a run with one)."""
    now = int(time.time()) if now is None else int(now)
    row = conn.execute("SELECT device, epoch, number, command_kid FROM commands WHERE id = ?",
                       (cid,)).fetchone()
    later = []
    signer = None
    signers = {}
    if row is not None:
        later = conn.execute(
            "SELECT id, number, kind, args, raw FROM commands WHERE device = ? AND epoch = ? "
            "AND number > ? AND status = 'pending' ORDER BY number", row[:3]).fetchall()
        if later and passphrase is not None:
            from . import keystore
            # The key in force at the refused number signs the next; a rotation among the
            # later ones hands over to its new key after it (a refused rotation never
            # happened: the ones after it go back to the key it named the old one).
            kids = {bytes(row[3])} | {bytes.fromhex(json.loads(j)["kid"])
                                      for _, _, k, j, _ in later if k == ROTATE_COMMAND_KEY}
            signers = {k: keystore.unlock_command_key(conn, passphrase, k) for k in kids}
            signer = signers[bytes(row[3])]
    made = []
    with transaction(conn):
        conn.execute("UPDATE commands SET status = 'refused', reason = ?, settled = ? "
                     "WHERE id = ? AND status = 'pending'", (reason, now, cid))
        if signer is None:
            return made
        number = row[2]
        for oid, _, kind, jargs, raw in later:
            from protocol import command as pc
            args = pc.parse(bytes(raw)).args
            conn.execute("UPDATE commands SET status = 'superseded', settled = ? WHERE id = ?",
                         (now, oid))
            new_raw = encode(signer, bytes(row[0]), number, kind, now, args)
            ref = reference(new_raw)
            conn.execute("INSERT INTO commands (device, epoch, number, kind, args, raw, ref, "
                         "command_kid, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (bytes(row[0]), row[1], number, kind, jargs, new_raw, ref,
                          signer.kid, now))
            made.append(Made(bytes(row[0]), row[1], number, kind, json.loads(jargs), new_raw,
                             ref))
            number += 1
            if kind == ROTATE_COMMAND_KEY:
                signer = signers[bytes.fromhex(json.loads(jargs)["kid"])]
    return made


class Row:
    __slots__ = ("id", "device", "epoch", "number", "kind", "args", "raw", "ref",
                 "command_kid", "created", "status", "receipt_index", "reason", "settled")

    def __init__(self, *values):
        for name, v in zip(self.__slots__, values):
            setattr(self, name, v)
        self.device = bytes(self.device)
        self.raw = bytes(self.raw)
        self.ref = bytes(self.ref)
        self.args = json.loads(self.args)

    @property
    def kind_name(self):
        return KIND_NAMES.get(self.kind, "kind %d" % self.kind)

    def describe(self):
        a = self.args
        if self.kind in (ADD_ISSUER_KEY, REVOKE_ISSUER_KEY):
            return "issuer key %s" % a.get("kid")
        if self.kind == SET_TARIFF:
            return describe_tariff(a)
        if self.kind == SET_CODE_KEY:
            return "code key %s" % a.get("kid")
        if self.kind == ROTATE_COMMAND_KEY:
            return "to command key %s" % a.get("kid")
        if self.kind == CHANGE_SUPPLIER:
            return "to command key %s, issuer keys %s%s, sequence floor %d" % (
                a["command_kid"], ", ".join(a["issuer_kids"]),
                ", code key %s" % a["code_kid"] if a.get("code_kid") else "", a["floor"])
        return json.dumps(a, sort_keys=True)


def list_commands(conn, device=None, status=None, epoch_current=False):
    sql = ("SELECT %s FROM commands WHERE 1 = 1" % ", ".join(Row.__slots__))
    args = []
    if device is not None:
        sql += " AND device = ?"
        args.append(bytes(device))
    if status is not None:
        sql += " AND status = ?"
        args.append(status)
    sql += " ORDER BY device, epoch, number, id"
    return [Row(*r) for r in conn.execute(sql, args)]


def pending_for(conn, device):
    """The pending commands of `device`'s current provisioning, in number order."""
    cur = current_epochs(conn, {bytes(device)}).get(bytes(device))
    if cur is None:
        return []
    return [r for r in list_commands(conn, device, "pending") if r.epoch == cur[0]]


# --- exposure and revocation anomalies ------------------------------------------------------

class Exposure:
    __slots__ = ("device", "kid", "vouchers", "pence", "pending")

    def __init__(self, device, kid, vouchers, pence, pending):
        self.device, self.kid, self.vouchers, self.pence, self.pending = (
            device, kid, vouchers, pence, pending)

    def line(self):
        return ("meter %s still trusts revoked key %s (%s): %d outstanding voucher%s "
                "under it, %s" % (format_eui64(self.device), self.kid.hex(),
                                  "revocation pending: `topup han sync`" if self.pending
                                  else "no revocation made for it",
                                  self.vouchers, "" if self.vouchers == 1 else "s",
                                  format_pence(self.pence)))


def exposure(conn):
    """[Exposure]: every meter that, as far as its receipts confirm, still trusts a revoked
    issuer key, with the vouchers under that key issued for it and never redeemed or
    cancelled (a meter could still apply them)."""
    revoked = [bytes(k) for (k,) in conn.execute(
        "SELECT kid FROM keys WHERE revoked IS NOT NULL ORDER BY kid")]
    if not revoked:
        return []
    out = []
    for dev in current_epochs(conn):
        confirmed = trust(conn, dev, confirmed=True)
        for kid in revoked:
            if kid not in confirmed:
                continue
            n, pence = conn.execute(
                "SELECT count(*), coalesce(sum(amount), 0) FROM vouchers v WHERE device = ? AND "
                "kid = ? AND voided IS NULL AND NOT EXISTS (SELECT 1 FROM voucher_status s "
                "WHERE s.device = v.device AND s.sequence = v.sequence AND s.status IN "
                "('redeemed', 'stale'))", (dev, kid)).fetchone()
            pending = any(json.loads(args).get("kid") == kid.hex() for (args,) in conn.execute(
                "SELECT args FROM commands WHERE device = ? AND kind = 2 AND "
                "status = 'pending'", (dev,)))
            out.append(Exposure(dev, kid, n, pence, pending))
    return out


def applied_after_revocation(conn):
    """[(device, receipt index, receipt hash, sequence, kid, revoke receipt index)]: vouchers
    redeemed by a receipt after the receipt of their meter's revocation of their key."""
    out = []
    for dev, args, revoked_at in conn.execute(
            "SELECT device, args, receipt_index FROM commands WHERE kind = 2 AND "
            "status = 'applied'").fetchall():
        kid = bytes.fromhex(json.loads(args)["kid"])
        out.extend(tuple(r) + (revoked_at,) for r in conn.execute(
            "SELECT s.device, s.receipt_index, s.receipt, s.sequence, v.kid FROM vouchers v "
            "JOIN voucher_status s ON s.device = v.device AND s.sequence = v.sequence "
            "AND s.status = 'redeemed' AND s.receipt_index > ? "
            "WHERE v.device = ? AND v.kid = ?", (revoked_at, dev, kid)))
    out.sort(key=lambda r: (bytes(r[0]), r[1]))
    return out


def _utc(ts):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def device_label(conn, device):
    return get_device(conn, device).name


# --- the new supplier's side of a change of supplier --------------------------------------

class Adopted:
    __slots__ = ("device", "receipt_index", "balance_mp", "floor", "first_index")

    def __init__(self, device, receipt_index, balance_mp, floor, first_index):
        self.device, self.receipt_index, self.balance_mp, self.floor, self.first_index = (
            device, receipt_index, balance_mp, floor, first_index)


def adopt(conn, device, old_path, now=None):
    """The new supplier takes over meter `device` from the old supplier's database at
    `old_path` (read only), once a receipt there confirms the CHANGE_SUPPLIER command that
    installed this database's command key: the meter is registered here with its receipt
    key (receipts after the command receipt, their chain going on from it), the sequence
    floor of the command, the issuer keys it installed, this database's command key (its
    command numbering starts again at 1) and, for keypad codes, the code key it installed
    with the meter's key-agreement key. The ledger opens at the meter's balance confirmed
    by that receipt. Returns Adopted."""
    from . import db, keystore, registry
    device = bytes(device)
    mine = keystore.active_command_key(conn)
    if mine is None:
        raise TopupError("this database has no command key (run `topup key new` first)")
    old = db.open_db(old_path, write=False)
    try:
        epochs = registry.device_keys(old, device)
        rec = registry.find_device(old, device)
        row = None
        if epochs:
            row = old.execute(
                "SELECT c.args, c.raw, r.idx, r.hash, r.balance_after FROM commands c "
                "JOIN receipts r ON r.device = c.device AND r.idx = c.receipt_index AND "
                "r.hash = c.receipt WHERE c.device = ? AND c.epoch = ? AND c.kind = 6 AND "
                "c.status = 'applied'", (device, epochs[-1].epoch)).fetchone()
    finally:
        old.close()
    if rec is None or not epochs:
        raise TopupError("%s does not know meter %s" % (old_path, format_eui64(device)))
    if row is None:
        raise TopupError("%s holds no confirmed change of supplier for meter %s: the old "
                         "supplier runs `topup supplier change`, an engineer `topup han sync`"
                         % (old_path, format_eui64(device)))
    jargs, raw, idx, h, balance = row
    from protocol import command as pc
    args = pc.parse(bytes(raw)).args
    if bytes(args[1]) != bytes(mine.public_key):
        raise TopupError("meter %s changed to another supplier (command key %s, not this "
                         "database's %s)" % (format_eui64(device),
                                             cose.kid_for(bytes(args[1])).hex(), mine.kid.hex()))
    if registry.find_device(conn, device) is not None:
        raise TopupError("meter %s is already registered here" % format_eui64(device))
    cur = epochs[-1]
    code = keystore.active_code_key(conn)
    code_pub = args.get(3)
    ka, code_kid = None, None
    if code_pub is not None and cur.ka_public is not None and code is not None and \
            bytes(code.public_key) == bytes(code_pub):
        ka, code_kid = cur.ka_public, code.kid
    floor = args[4]
    now = int(time.time()) if now is None else int(now)
    with transaction(conn):       # the meter and its key epoch together, or nothing
        conn.execute("INSERT INTO devices (device, public_key, max_voucher, max_credit, "
                     "next_sequence, label, created) VALUES (?, ?, ?, ?, 1, ?, ?)",
                     (device, cur.public_key, rec.max_voucher, rec.max_credit, rec.label, now))
        registry._insert_epoch(conn, device, 1, cur.public_key, idx + 1, floor, now, ka,
                               code_kid, mine.kid, [cose.kid_for(bytes(k)) for k in args[2]],
                               bytes(h))
    return Adopted(device, idx, balance, floor, idx + 1)
