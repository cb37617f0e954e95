# host.reconcile does most of its work in SQL and walks only irregular meters in Python.
# Here the reconciliation rules are written out plainly, as a model that knows nothing of
# the code: it takes the scenario as the test built it (the meters' keys as registered,
# the vouchers as issued, the receipt bytes as imported), parses and verifies receipts with
# protocol/ and PyNaCl, and derives every voucher's status and every anomaly. Random
# histories (factory resets and fault receipts included) with random tampering are
# imported and reconciled through the public entry points, and what the database holds
# afterwards must be exactly what the model says.
#
# THE RULES
#
# Receipts are distinct by their bytes. Per meter (device):
#   K  Keys. Every key the meter has had is registered with the index of its first receipt
#      (and a sequence floor). A receipt's key is the one with the largest first index <=
#      its index (the later one if two share it); a receipt below every key's first index
#      has no key.
#   U  A meter not registered: one `unknown_device` at its lowest index, nothing else.
#      A registered meter without any key: one `no_device_key` at its lowest index,
#      nothing else. Receipts of a registered meter with no key: one `no_device_key` at
#      the lowest of them.
#   S  A receipt with a key is valid if it names that key's kid and its Ed25519 signature
#      verifies with it; otherwise one `bad_signature` at its index.
#   G  Gaps: indices from the first key's first index to the highest index of a receipt
#      with a key, that no receipt with a key has: one `chain_gap` per run, at its start.
#   F  Forks: two or more valid receipts at one index: one `chain_fork` there (naming the
#      second by hash).
#   E  Epochs: a valid receipt at its key's first index must have prev = 32 zero bytes (it
#      starts the key's chain), else `chain_fork`. Any other valid receipt, if valid
#      receipts exist at index - 1, must have as prev the hash of one of them, else
#      `chain_fork`; if it does follow one (p) and its balance_before > p's balance_after,
#      `balance_rise` (credit may only fall between receipts; nothing is compared across
#      a key boundary: a reset starts a new ledger).
#   B  Balances inside a valid receipt: a top-up must add exactly 1000 x amount
#      (more: `balance_rise`, less: `balance_mismatch`); any other kind must leave the
#      balance as it was (up: `balance_rise`, down: `balance_mismatch`).
#   X  A valid fault receipt (kind 4) counting any fault: `meter_fault`.
# Matching, over valid top-ups in (device, index, hash) order:
#   M1 A top-up with an issued voucher of the same device, sequence and reference: the
#      first one redeems it (`amount_mismatch` if its amount is not the voucher's); a later
#      one at another index is `applied_twice` (in one key epoch or across a reset).
#   M2 Any other top-up: a voucher with its reference issued for another meter:
#      `device_mismatch`; else a voucher with its sequence, or with its reference:
#      `ref_mismatch`; else `not_issued`.
# Statuses of every issued voucher, first that applies:
#   redeemed     by M1 (closed at the receipt's meter time; its hash, index, balance after)
#   void         its issuer key is revoked (closed at the revocation)
#   stale        the meter refuses it: sequence < highest - 64, highest = the largest
#                sequence of the meter's valid top-ups; or sequence <= the floor of one of
#                the meter's keys. Closed at the earlier of: the meter time of the first
#                valid top-up (index order) with a sequence > sequence + 64; the
#                registration time of the first key whose floor covers it
#   expired      expires <= the time reconciliation judges at (closed at expiry)
#   outstanding  none of these
import hashlib

import nacl.exceptions
import nacl.signing
from hypothesis import HealthCheck, event, given, settings, strategies as st

from host import issuer, keystore, reconcile, receipts_io, registry
from protocol import cose, receipt as pr
from tests.soak import examples

from .test_reconcile_data import A, B, C, DAY, PASS, T0, Meter, World

WINDOW = 64
ZERO = bytes(32)


class Key:
    def __init__(self, epoch, public, first, floor, registered):
        self.epoch, self.public, self.first, self.floor = epoch, public, first, floor
        self.registered = registered
        self.kid = hashlib.sha256(public).digest()[:8]


class Receipt:
    def __init__(self, raw):
        r = pr.parse(raw)
        msg = cose.decode(raw)
        self.raw, self.hash = raw, hashlib.sha256(raw).digest()
        self.device, self.index, self.kind, self.time = r.device, r.index, r.kind, r.time
        self.prev, self.before, self.after = r.prev, r.balance_before, r.balance_after
        self.sequence, self.ref, self.amount = r.sequence, r.voucher, r.amount
        self.faults = r.faults
        self.kid, self.tbs, self.sig = msg.kid, msg.to_be_signed(), msg.signature
        self.key = None
        self.valid = False


def key_of(keys, index):
    """K: the key with the largest first index <= index (the later on a tie), or None."""
    found = None
    for k in keys:                       # in registration order: first indices never fall
        if k.first <= index:
            found = k
    return found


def signed_by(r, key):
    if r.kid != key.kid:
        return False
    try:
        nacl.signing.VerifyKey(key.public).verify(r.tbs, r.sig)
        return True
    except nacl.exceptions.BadSignatureError:
        return False


def model(keys, vouchers, revoked, raws, now):
    """(status rows, anomaly tuples) by THE RULES above.

    keys: {device: [Key]} for every registered device; vouchers: [issuer.Issued];
    revoked: {issuer kid: time}; raws: every receipt imported; now: expiry judged at."""
    anomalies = []

    def anomaly(kind, r_or_dev, index=None, receipt=None, sequence=None):
        anomalies.append((kind, r_or_dev, index, receipt, sequence))

    per_device = {}
    for raw in raws:
        r = Receipt(raw)
        per_device.setdefault(r.device, {})[r.hash] = r
    valid_topups = []
    for dev in sorted(per_device):
        rs = sorted(per_device[dev].values(), key=lambda r: (r.index, r.hash))
        if dev not in keys:                                           # U
            anomaly("unknown_device", dev, rs[0].index)
            continue
        if not keys[dev]:
            anomaly("no_device_key", dev, rs[0].index)
            continue
        for r in rs:                                                  # K, S
            r.key = key_of(keys[dev], r.index)
            r.valid = r.key is not None and signed_by(r, r.key)
        keyless = [r for r in rs if r.key is None]
        if keyless:
            anomaly("no_device_key", dev, keyless[0].index)
        for r in rs:
            if r.key is not None and not r.valid:
                anomaly("bad_signature", dev, r.index, r.hash, r.sequence)
        held = {r.index for r in rs if r.key is not None}             # G
        run = None
        for i in range(keys[dev][0].first, max(held, default=-1) + 1):
            if i not in held:
                run = i if run is None else run
            elif run is not None:
                anomaly("chain_gap", dev, run)
                run = None
        valid = [r for r in rs if r.valid]
        at = {}
        for r in valid:
            at.setdefault(r.index, []).append(r)
        for i, group in sorted(at.items()):                           # F
            if len(group) > 1:
                anomaly("chain_fork", dev, i, group[1].hash)
        for r in valid:
            grows = r.after - r.before                                # B
            should = 1000 * r.amount if r.kind == pr.TOPUP else 0
            if grows > should:
                anomaly("balance_rise", dev, r.index, r.hash,
                        r.sequence if r.kind == pr.TOPUP else None)
            elif grows < should:
                anomaly("balance_mismatch", dev, r.index, r.hash,
                        r.sequence if r.kind == pr.TOPUP else None)
            if r.kind == pr.FAULT and any(r.faults.values()):         # X
                anomaly("meter_fault", dev, r.index, r.hash)
            if r.index == r.key.first:                                # E
                if r.prev != ZERO:
                    anomaly("chain_fork", dev, r.index, r.hash)
            elif at.get(r.index - 1):
                p = [q for q in at[r.index - 1] if q.hash == r.prev]
                if not p:
                    anomaly("chain_fork", dev, r.index, r.hash)
                elif r.before > p[0].after:
                    anomaly("balance_rise", dev, r.index, r.hash)
            if r.kind == pr.TOPUP:
                valid_topups.append(r)

    by_seq = {(v.device, v.sequence): v for v in vouchers}
    by_ref = {v.ref: v for v in vouchers}
    redeemed = {}
    for r in valid_topups:                                            # M1, M2
        v = by_seq.get((r.device, r.sequence))
        if v is not None and v.ref == r.ref:
            first = redeemed.get((r.device, r.sequence))
            if first is None:
                redeemed[(r.device, r.sequence)] = r
                if r.amount != v.amount:
                    anomaly("amount_mismatch", r.device, r.index, r.hash, r.sequence)
            elif first.index != r.index:
                anomaly("applied_twice", r.device, r.index, r.hash, r.sequence)
            continue
        other = by_ref.get(r.ref)
        if other is not None and other.device != r.device:
            anomaly("device_mismatch", r.device, r.index, r.hash, r.sequence)
        elif other is not None or v is not None:
            anomaly("ref_mismatch", r.device, r.index, r.hash, r.sequence)
        else:
            anomaly("not_issued", r.device, r.index, r.hash, r.sequence)

    rows = []
    for v in sorted(vouchers, key=lambda v: (v.device, v.sequence)):
        r = redeemed.get((v.device, v.sequence))
        if r is not None:
            rows.append((v.device, v.sequence, "redeemed", r.time, r.hash, r.index, r.after))
            continue
        if v.kid in revoked:
            rows.append((v.device, v.sequence, "void", revoked[v.kid], None, None, None))
            continue
        mine = [t for t in valid_topups if t.device == v.device]
        highest = max((t.sequence for t in mine), default=0)
        floors = [k for k in keys.get(v.device, []) if k.floor >= v.sequence]
        if v.sequence < highest - WINDOW or floors:
            times = [t.time for t in mine if t.sequence > v.sequence + WINDOW][:1]
            times += [k.registered for k in floors][:1]
            rows.append((v.device, v.sequence, "stale", min(times), None, None, None))
        elif v.expires is not None and v.expires <= now:
            rows.append((v.device, v.sequence, "expired", v.expires, None, None, None))
        else:
            rows.append((v.device, v.sequence, "outstanding", None, None, None, None))
    return rows, sorted(anomalies, key=repr)


# --- random histories -------------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["apply", "apply", "apply", "apply", "reapply",
                                          "forge", "other_device", "emergency", "rejections",
                                          "rise", "use", "foreign_bytes", "wrong_amount",
                                          "ec_fall", "jump", "reset", "reset_forked",
                                          "fault", "old_key"]),
                         st.integers(0, 200)), max_size=30)
TAMPER = st.lists(st.tuples(st.sampled_from(["drop", "drop_first", "flip", "fork", "dup",
                                             "relink", "continue"]),
                            st.integers(0, 10**6)), max_size=4)


@settings(max_examples=examples(80), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(ops=OPS, tamper=TAMPER, revoke=st.integers(0, 3), late_days=st.integers(0, 40),
       unknown=st.booleans(), keyless=st.booleans(), late_keys=st.booleans(),
       carried=st.integers(0, 2))
def test_reconcile_equals_the_plain_model(tmp_path_factory, ops, tamper, revoke, late_days,
                                          unknown, keyless, late_keys, carried):
    w = World(tmp_path_factory.mktemp("m") / "topup.db", a_count=90, b_count=6,
              b_expires_days=20)
    try:
        a, b = w.a, w.b
        keys = {A: [Key(1, a.public, 0, 0, T0 - DAY)], B: [Key(1, b.public, 0, 0, T0 - DAY)]}
        vouchers = list(w.va) + list(w.vb)
        pending = []                           # key registrations done after the import
        seeds = iter(range(0x10, 0x100))
        old_keys = {A: [], B: []}              # (signing key, kid) of earlier epochs
        t = T0
        for op, n in ops:
            t += 3600
            m, vs = (a, w.va) if n % 3 else (b, w.vb)
            v = vs[n % len(vs)]
            if op == "apply":
                try:
                    if v.sequence <= m.floor or m.window.is_used(v.sequence):
                        continue
                except Exception:
                    continue  # stale for this meter
                m.apply(v.cose, t)
            elif op == "reapply":  # the meter's last top-up again
                refs = [r for r in (pr.parse(x).voucher for x in m.receipts) if r]
                again = [x for x in vs if refs and x.ref == refs[-1]]
                if again:
                    m.apply(again[0].cose, t, check_window=False)
            elif op == "wrong_amount":
                m.apply(v.cose, t, amount=v.amount + 1 + n, check_window=False)
            elif op == "ec_fall":
                m.emit(pr.EMERGENCY, t, m.balance, m.balance - 1 - n, amount=500)
                m.balance -= 1 + n
            elif op == "jump" and m is a:
                m.apply(w.va[70 + n % 20].cose, t, check_window=False)
            elif op == "forge":
                m.apply(w.forge(m.device, 95 + n % 9, 100 + n), t, check_window=False)
            elif op == "other_device":
                m.apply((w.vb if m is a else w.va)[n % 5].cose, t, check_window=False)
            elif op == "foreign_bytes":
                m.apply(w.forge(m.device, v.sequence, v.amount, issued=T0 + 1), t,
                        check_window=False)
            elif op == "emergency":
                m.emergency(500, t)
            elif op == "rejections":
                m.rejections({4: 1 + n % 3}, t)
            elif op == "fault":
                m.faults({1 + n % 5: 1 + n % 3, 1 + n % 4: n % 2} if n % 4 else {}, t)
            elif op == "old_key" and old_keys[m.device]:  # an earlier key signs on
                key, kid = old_keys[m.device][-1]
                raw = pr.encode(kid, lambda msg: key.sign(msg).signature, {
                    pr.K_DEVICE: m.device, pr.K_INDEX: m.index, pr.K_KIND: pr.EMERGENCY,
                    pr.K_TIME: t, pr.K_PREV: m.prev, pr.K_BEFORE: m.balance,
                    pr.K_AFTER: m.balance, pr.K_AMOUNT: 100})
                m.receipts.append(raw)
                m.index += 1
                m.prev = pr.chain_hash(raw)
            elif op in ("reset", "reset_forked"):
                # topup provision --factory-reset: the supplier's figures, the meter's carry
                old_keys[m.device].append((m.key, m.kid))
                prev = m.prev
                floor = m.reset(next(seeds), floor=registry.issued_floor(w.conn, m.device),
                                opening=n * 7)
                if op == "reset_forked":  # a meter that carries on the old chain: a fork
                    m.prev = prev
                k = Key(len(keys[m.device]) + 1, m.public, m.first_index, floor, t + 1800)
                keys[m.device].append(k)
                register = (m.device, registry.MeterKey(m.public, k.first, k.floor), k.registered)
                if late_keys:
                    pending.append(register)
                else:
                    registry.set_public_key(w.conn, register[0], register[1], now=register[2])
                fresh = issuer.issue(w.conn, w.signer, m.device, 700, 6, now=t)
                vs.extend(fresh)
                vouchers.extend(fresh)
            elif op == "rise":
                m.balance += 1 + n * 10
            else:
                m.use(n * 1000)
        raws = a.receipts + b.receipts
        for what, n in tamper:
            if not raws:
                break
            k = n % len(raws)
            if what == "drop":
                del raws[k]
            elif what == "drop_first":  # the start of a meter's chain
                del raws[min(range(len(raws)), key=lambda i: pr.parse(raws[i]).index)]
            elif what == "flip":
                bad = bytearray(raws[k])
                bad[-1 - n % 64] ^= 1 << (n % 8)
                raws[k] = bytes(bad)
            elif what == "dup":
                raws.append(raws[k])
            else:
                r = pr.parse(raws[k])
                m = a if r.device == A else b
                prev = {"fork": r.prev, "relink": bytes(32),
                        "continue": pr.chain_hash(raws[k - 1]) if k else bytes(32)}[what]
                raws.append(m.make(pr.EMERGENCY, r.time, r.balance_before - n % 7,
                                   r.balance_before - n % 7, index=r.index + (what == "relink"),
                                   prev=prev, amount=5))
        if unknown:
            c = Meter(C, 0xC3)
            c.apply(w.forge(C, 1, 100), T0)
            raws += c.receipts
        if keyless:
            d = bytes.fromhex("70b3d5f0000000d4")
            registry.add_device(w.conn, d, now=T0)
            keys[d] = []
            dv = issuer.issue(w.conn, w.signer, d, 300, 3, now=T0)
            vouchers.extend(dv)
            dm = Meter(d, 0xD4)
            dm.apply(dv[0].cose, T0 + DAY)
            raws += dm.receipts
        if carried:
            # A meter first provisioned here with receipts counted from an earlier life:
            # its first key's span starts above 0 (with, or without, that older receipt).
            e = bytes.fromhex("70b3d5f0000000e5")
            registry.add_device(w.conn, e, now=T0)
            em = Meter(e, 0xE5)
            em.emergency(500, T0)
            floor = em.reset(0xE6, floor=3)
            ev = issuer.issue(w.conn, w.signer, e, 400, 6, now=T0)
            vouchers.extend(ev)
            keys[e] = [Key(1, em.public, em.first_index, floor, T0 + 60)]
            registry.set_public_key(w.conn, e, registry.MeterKey(em.public, em.first_index,
                                                                  floor), now=T0 + 60)
            for v in ev[3:5]:
                em.apply(v.cose, T0 + DAY)
            raws += em.receipts[carried - 1:]
        revoked = {}
        if revoke == 0:
            keystore.new_key(w.conn, PASS, activate=True, now=T0)
            keystore.revoke(w.conn, w.signer.kid, now=T0 + 2 * DAY)
            revoked[w.signer.kid] = T0 + 2 * DAY
        path = tmp_path_factory.mktemp("f") / "r.cbor"
        receipts_io.write_receipts(path, raws)
        reconcile.import_files(w.conn, [path])
        for device, key, when in pending:
            registry.set_public_key(w.conn, device, key, now=when)
        now = T0 + late_days * DAY
        res = reconcile.reconcile(w.conn, now=now)

        rows, anomalies = model(keys, vouchers, revoked, raws, now)
        stored = w.conn.execute("SELECT device, sequence, status, closed_at, receipt, "
                                "receipt_index, balance_after FROM voucher_status "
                                "ORDER BY device, sequence").fetchall()
        assert stored == rows
        got = sorted(((x.kind, x.device, x.index, x.receipt, x.sequence)
                      for x in res.anomalies), key=repr)
        assert got == anomalies
        kept = sorted(((k, d, i, h, s) for k, d, i, h, s in w.conn.execute(
            "SELECT kind, device, receipt_index, receipt, sequence FROM anomalies")), key=repr)
        assert kept == anomalies
        for kind in sorted({x[0] for x in anomalies}):
            event(kind)
        for status in sorted({r[2] for r in rows}):
            event("status " + status)
        if any(len(k) > 1 for k in keys.values()):
            event("reset")
    finally:
        w.close()
