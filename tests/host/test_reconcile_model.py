# host.reconcile does most of its work in SQL and walks only irregular meters in Python.
# Here a plain Python model of the same rules (every receipt loaded, every chain walked,
# every top-up matched in a loop) is run on random histories with random tampering, and
# the stored statuses and anomalies must be exactly the model's.
import bisect

from hypothesis import HealthCheck, event, given, settings, strategies as st

from host import keystore, reconcile, receipts_io
from host.reconcile import WINDOW, Anomaly, _chain, _R, _span
from host.money import format_pence
from host.registry import format_eui64
from protocol import receipt as pr
from protocol.cose import kid_for

from .test_reconcile_data import A, B, C, DAY, PASS, T0, Meter, World


def model(conn, now):
    """(sorted status rows, sorted anomaly rows) by the rules, all in Python."""
    anomalies = []
    devices = {d: (kid_for(p) if p is not None else None)
               for d, p in conn.execute("SELECT device, public_key FROM devices")}
    revoked = dict(conn.execute("SELECT kid, revoked FROM keys WHERE revoked IS NOT NULL"))
    per_device = {}
    for row in conn.execute(
            "SELECT hash, device, idx, kind, prev, meter_time, balance_before, balance_after, "
            "sequence, voucher_ref, amount, sig_ok, checked_kid FROM receipts "
            "ORDER BY device, idx, hash"):
        r = _R()
        (r.hash, r.device, r.index, r.kind, r.prev, r.time, r.before, r.after, r.sequence,
         r.ref, r.amount, ok, checked) = row
        kid = devices.get(r.device)
        r.valid = ok == 1 and kid is not None and checked == kid
        per_device.setdefault(r.device, []).append(r)
    topups, highest = [], {}
    for dev in sorted(per_device):
        rs = per_device[dev]
        n = len(rs)
        if dev not in devices:
            anomalies.append(Anomaly(
                "unknown_device", dev, rs[0].index, None, None,
                "%d receipt%s (%s) from a meter not registered here; register it with its "
                "public key and reconcile again" % (n, "" if n == 1 else "s",
                                                    _span(rs[0].index, rs[-1].index))))
            continue
        if devices[dev] is None:
            anomalies.append(Anomaly(
                "no_device_key", dev, rs[0].index, None, None,
                "%d receipt%s (%s) cannot be verified: no public key is registered for this "
                "meter" % (n, "" if n == 1 else "s", _span(rs[0].index, rs[-1].index))))
            continue
        valid = []
        for r in rs:
            if r.valid:
                valid.append(r)
            else:
                anomalies.append(Anomaly("bad_signature", dev, r.index, r.hash, r.sequence,
                                         "receipt %d does not verify with the meter's "
                                         "registered key" % r.index))
        _chain(dev, {r.index for r in rs}, valid, anomalies)
        high, marks = 0, []
        for r in valid:
            if r.kind == pr.TOPUP:
                topups.append(r)
                if r.sequence > high:
                    high = r.sequence
                    marks.append((high, r.time))
        if marks:
            highest[dev] = marks
    vouchers = {(r[0], r[1]): r for r in conn.execute(
        "SELECT device, sequence, kid, amount, issued, expires, ref FROM vouchers")}
    by_ref = {v[6]: v for v in vouchers.values()}
    redeemed = {}
    for r in topups:
        key = (r.device, r.sequence)
        v = vouchers.get(key)
        if v is not None and v[6] == r.ref:
            first = redeemed.get(key)
            if first is None:
                redeemed[key] = r
                if r.amount != v[3]:
                    anomalies.append(Anomaly(
                        "amount_mismatch", r.device, r.index, r.hash, r.sequence,
                        "receipt %d applied voucher %d for %s; it was issued for %s" % (
                            r.index, r.sequence, format_pence(r.amount), format_pence(v[3]))))
            elif first.index != r.index:
                anomalies.append(Anomaly(
                    "applied_twice", r.device, r.index, r.hash, r.sequence,
                    "voucher %d applied again by receipt %d (first by receipt %d)" % (
                        r.sequence, r.index, first.index)))
            continue
        other = by_ref.get(r.ref)
        if other is not None and other[0] != r.device:
            anomalies.append(Anomaly(
                "device_mismatch", r.device, r.index, r.hash, r.sequence,
                "receipt %d applied a voucher issued for meter %s (sequence %d)" % (
                    r.index, format_eui64(other[0]), other[1])))
        elif other is not None or v is not None:
            anomalies.append(Anomaly(
                "ref_mismatch", r.device, r.index, r.hash, r.sequence,
                "receipt %d applied voucher reference %s… under sequence %d; the voucher "
                "issued %s" % (r.index, r.ref.hex()[:12], r.sequence,
                               "with that sequence is %s…" % v[6].hex()[:12] if v is not None
                               else "with that reference has sequence %d" % other[1])))
        else:
            anomalies.append(Anomaly(
                "not_issued", r.device, r.index, r.hash, r.sequence,
                "receipt %d applied sequence %d for %s, which was never issued" % (
                    r.index, r.sequence, format_pence(r.amount))))
    rows = []
    for key in sorted(vouchers):
        dev, seq, kid, amount, issued, expires, ref = vouchers[key]
        r = redeemed.get(key)
        marks = highest.get(dev)
        if r is not None:
            rows.append((dev, seq, "redeemed", r.time, r.hash, r.index, r.after))
        elif kid in revoked:
            rows.append((dev, seq, "void", revoked[kid], None, None, None))
        elif marks is not None and seq < marks[-1][0] - WINDOW:
            j = bisect.bisect_right(marks, (seq + WINDOW, float("inf")))
            rows.append((dev, seq, "stale", marks[j][1], None, None, None))
        elif expires is not None and expires <= now:
            rows.append((dev, seq, "expired", expires, None, None, None))
        else:
            rows.append((dev, seq, "outstanding", None, None, None, None))
    return rows, sorted(set(a.row() for a in anomalies))


OPS = st.lists(st.tuples(st.sampled_from(["apply", "apply", "apply", "apply", "reapply",
                                          "forge", "other_device", "emergency", "rejections",
                                          "rise", "use", "foreign_bytes", "wrong_amount",
                                          "ec_fall", "jump"]),
                         st.integers(0, 200)), max_size=30)
TAMPER = st.lists(st.tuples(st.sampled_from(["drop", "flip", "fork", "dup", "relink"]),
                            st.integers(0, 10**6)), max_size=4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(ops=OPS, tamper=TAMPER, revoke=st.integers(0, 3), late_days=st.integers(0, 40),
       unknown=st.booleans(), keyless=st.booleans())
def test_sql_reconcile_equals_python_model(tmp_path_factory, ops, tamper, revoke, late_days,
                                           unknown, keyless):
    w = World(tmp_path_factory.mktemp("m") / "topup.db", a_count=90, b_count=6,
              b_expires_days=20)
    try:
        a, b = w.a, w.b
        t = T0
        for op, n in ops:
            t += 3600
            m, vs = (a, w.va) if n % 3 else (b, w.vb)
            v = vs[n % len(vs)]
            if op == "apply":
                try:
                    if m.window.is_used(v.sequence):
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
            elif what == "flip":
                bad = bytearray(raws[k])
                bad[-1 - n % 64] ^= 1 << (n % 8)
                raws[k] = bytes(bad)
            elif what == "dup":
                raws.append(raws[k])
            else:
                r = pr.parse(raws[k])
                m = a if r.device == A else b
                raws.append(m.make(pr.EMERGENCY, r.time, r.balance_before - n % 7,
                                   r.balance_before - n % 7, index=r.index + (what == "relink"),
                                   prev=r.prev if what == "fork" else bytes(32), amount=5))
        if unknown:
            c = Meter(C, 0xC3)
            c.apply(w.forge(C, 1, 100), T0)
            raws += c.receipts
        if keyless:
            from host import issuer, registry
            d = bytes.fromhex("70b3d5f0000000d4")
            registry.add_device(w.conn, d, now=T0)
            dv = issuer.issue(w.conn, w.signer, d, 300, 3, now=T0)
            dm = Meter(d, 0xD4)
            dm.apply(dv[0].cose, T0 + DAY)
            raws += dm.receipts
        if revoke == 0:
            keystore.new_key(w.conn, PASS, activate=True, now=T0)
            keystore.revoke(w.conn, w.signer.kid, now=T0 + 2 * DAY)
        path = tmp_path_factory.mktemp("f") / "r.cbor"
        receipts_io.write_receipts(path, raws)
        reconcile.import_files(w.conn, [path])
        now = T0 + late_days * DAY
        res = reconcile.reconcile(w.conn, now=now)
        rows, anomalies = model(w.conn, now)
        stored = w.conn.execute("SELECT device, sequence, status, closed_at, receipt, "
                                "receipt_index, balance_after FROM voucher_status "
                                "ORDER BY device, sequence").fetchall()
        assert stored == rows
        for kind in sorted({a[1] for a in anomalies}):
            event(kind)
        for status in sorted({r[2] for r in rows}):
            event("status " + status)
        assert sorted(a.row() for a in res.anomalies) == anomalies
        assert sorted(w.conn.execute("SELECT id, kind, device, receipt_index, receipt, "
                                     "sequence, detail FROM anomalies").fetchall()) == anomalies
    finally:
        w.close()
