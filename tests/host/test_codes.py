# Keypad codes on the supplier's side (issue 11, SPEC.md §8): set-up (`key new`), issuance
# (`topup code`), storage beside vouchers in one sequence space, list/export/void,
# reconciliation of code receipts, `topup verify CODE`.
#
# The codes are held to a model written here from SPEC.md §8, independent of host/ (which
# derives with libsodium's X25519 and its own encoder): the METER's side of the agreement
# in pure Python (protocol/x25519.py, X25519(meter secret, supplier public)), HKDF and HMAC
# from Python's hmac module, and the Damm table as published (Damm 2004; Wikipedia).
import csv
import hashlib
import hmac
import io
import json

import pytest

from host import db, issuer, keystore, receipts_io, registry
from host.errors import TopupError
from protocol import receipt as pr
from protocol import x25519

from .conftest import DEVICE, DEVICE_BYTES, OTHER, PASSPHRASE, one_line_error, snapshot
from .test_reconcile_data import Meter

SUPPLIER_SECRET = bytes(range(40, 72))
METER_SECRET = bytes(range(100, 132))        # the meter's key-agreement private key
METER_KA = x25519.public_key(METER_SECRET)
METER_SEED = 0xA7                            # its receipt key (test_reconcile_data.Meter)

DAMM = ["0317598642", "7092154863", "4206871359", "1750983426", "6123045978",
        "3674209581", "5869720134", "8945362017", "9438617205", "2581436790"]


def damm_ok(digits):
    d = 0
    for ch in digits:
        d = int(DAMM[d][int(ch)])
    return d == 0


def model_code(device, amount, sequence, supplier_public=None):
    """The 20 digits of a code, from SPEC.md §8, computed as the meter would check them."""
    supplier_public = supplier_public or x25519.public_key(SUPPLIER_SECRET)
    shared = x25519.x25519(METER_SECRET, supplier_public)
    prk = hmac.new(b"OTU1 keypad code key v1", shared, hashlib.sha256).digest()
    key = hmac.new(prk, device + supplier_public + METER_KA + b"\x01", hashlib.sha256).digest()
    h = hmac.new(key, b"OTU1 keypad code v1" + device + b"\x00" + amount.to_bytes(4, "big")
                 + sequence.to_bytes(4, "big"), hashlib.sha256).digest()
    # NB SPEC §8 says "the first 31 bits (big-endian)"; protocol/keycode.py (meter and
    # supplier alike) takes the first 4 bytes big-endian with the top bit dropped: the model
    # follows what both ends do (reported to the lead).
    tag = int.from_bytes(h[:4], "big") & 0x7FFFFFFF
    n = ((amount << 14) | (sequence & 0x3FFF)) << 31 | tag       # kind 0 on top
    body = "%019d" % n
    check = next(str(c) for c in range(10) if damm_ok(body + str(c)))
    return body + check


def ref_of(digits):
    return hashlib.sha256(b"OTU1 code " + digits.encode()).digest()[:16]


def grouped(d):
    return " ".join(d[i:i + 4] for i in range(0, 20, 4))


@pytest.fixture
def codes(run):
    """A database whose code key is SUPPLIER_SECRET, and DEVICE registered as a meter
    provisioned with it (receipt key, key-agreement key)."""
    run.ok("init")
    run.ok("key", "new")
    conn = db.open_db(run.db_path)
    try:
        # replace the code key `key new` made with a known one (rotation: the new is active)
        keystore.new_code_key(conn, PASSPHRASE, activate=True, secret=SUPPLIER_SECRET)
        active = keystore.active_code_key(conn)
        assert active.public_key == x25519.public_key(SUPPLIER_SECRET)
        meter = Meter(DEVICE_BYTES, METER_SEED)
        registry.add_device(conn, DEVICE_BYTES, max_voucher=100_000, max_credit=500_000,
                            public_key=meter.public, ka_public=METER_KA, code_kid=active.kid)
    finally:
        conn.close()
    run.meter = meter
    return run


def _conn(run):
    return db.open_db(run.db_path)


# --- set-up -----------------------------------------------------------------------------

def test_key_new_makes_the_code_key_with_the_first_issuer_key(run):
    run.ok("init")
    r = run.ok("key", "new")
    assert "new code key" in r.stdout and "(active)" in r.stdout
    conn = _conn(run)
    try:
        (ck,) = keystore.list_code_keys(conn)
        # sealed under the passphrase: it opens with it, and its public key is its secret's
        key = keystore.unlock_code_key(conn, PASSPHRASE, ck.kid)
        assert key.public_key == ck.public_key
        with pytest.raises(TopupError):
            keystore.unlock_code_key(conn, "wrong passphrase", ck.kid)
        sealed = conn.execute("SELECT sealed_secret FROM code_keys").fetchone()[0]
        assert key._secret not in bytes(sealed)
    finally:
        conn.close()
    r = run.ok("key", "new")
    assert "code key" not in r.stdout                         # one is enough
    r = run.ok("key", "new", "--code")
    assert r.stdout.startswith("new code key") and "(inactive)" in r.stdout
    listing = run.ok("key", "list").stdout
    assert [ln.split()[-1] for ln in listing.splitlines()[1:]] == [
        "issuer", "issuer", "codes", "codes", "commands"]


def test_an_older_database_gets_its_code_key_from_the_next_key_new(run):
    """A database made before codes (issuer key, no code key): `key new` adds one."""
    run.ok("init")
    conn = _conn(run)
    try:
        keystore.new_key(conn, PASSPHRASE, code_key=False)
        assert keystore.active_code_key(conn) is None
    finally:
        conn.close()
    assert "no keypad-code key" in run.ok("key", "list").stderr
    r = run.ok("key", "new")
    assert "new code key" in r.stdout


# --- issuance ---------------------------------------------------------------------------

def test_one_code_matches_the_model_and_is_stored(codes):
    r = codes.ok("code", DEVICE, "10.50")
    digits = model_code(DEVICE_BYTES, 1050, 1)
    assert r.stdout == grouped(digits) + "\n"
    assert "issued 1 code of £10.50" in r.stderr and "sequence 1" in r.stderr
    conn = _conn(codes)
    try:
        (v,) = issuer.stored(conn, DEVICE_BYTES)
        assert (v.form, v.code, v.ref, v.amount, v.sequence, v.expires, v.cose) == (
            2, digits, ref_of(digits), 1050, 1, None, None)
        assert registry.get_device(conn, DEVICE_BYTES).next_sequence == 2
    finally:
        conn.close()


@pytest.mark.parametrize("fmt", ["text", "json", "csv"])
def test_bulk_codes_in_every_format_across_batches(codes, tmp_path, fmt):
    codes.ok("issue", DEVICE, "1")                           # vouchers share the sequences
    out = tmp_path / ("codes." + fmt)
    r = codes.ok("code", DEVICE, "£2", "-n", "23", "--batch-size", "5", "-f", fmt, "-o", out)
    assert "issued 23 codes of £2.00" in r.stderr and "sequences 2-24" in r.stderr
    want = [model_code(DEVICE_BYTES, 200, s) for s in range(2, 25)]
    text = out.read_text()
    if fmt == "text":
        assert text.splitlines() == [grouped(d) for d in want]
    elif fmt == "json":
        objs = [json.loads(ln) for ln in text.splitlines()]
        assert [o["code"] for o in objs] == [grouped(d) for d in want]
        assert [o["sequence"] for o in objs] == list(range(2, 25))
        assert {(o["form"], o["amount_pence"], o["ref"]) for o in objs[:1]} == {
            ("code", 200, ref_of(want[0]).hex())}
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [row["text"] for row in rows] == [grouped(d) for d in want]
        assert {row["form"] for row in rows} == {"code"}
        assert [int(row["sequence"]) for row in rows] == list(range(2, 25))
        assert all(row["expires_utc"] == "" and row["amount"] == "2.00" for row in rows)
    # an existing file is never replaced without --force, and nothing is issued then
    before = snapshot(codes.db_path)
    assert "already exists" in one_line_error(codes("code", DEVICE, "2", "-o", out))
    assert snapshot(codes.db_path) == before
    codes.ok("code", DEVICE, "2", "-o", out, "--force")
    assert out.read_text() == grouped(model_code(DEVICE_BYTES, 200, 25)) + "\n"


@pytest.mark.parametrize("args, words", [
    (("10", "--expires-in", "3"), "codes carry no expiry"),
    (("655.36",), "the most a keypad code carries"),
    (("0",), "amount"),
    (("10", "-f", "png"), "'png' is not one of"),
    (("10", "-n", "0"), "0"),
])
def test_refusals_store_nothing(codes, args, words):
    before = snapshot(codes.db_path)
    assert words in one_line_error(codes("code", DEVICE, *args))
    assert snapshot(codes.db_path) == before


def test_limits_are_refused_never_truncated(codes, run):
    conn = _conn(codes)
    try:
        registry.add_device(conn, bytes.fromhex(OTHER.replace("-", "")), max_voucher=500,
                            public_key=Meter(bytes(8), 1).public, ka_public=METER_KA,
                            code_kid=keystore.active_code_key(conn).kid)
    finally:
        conn.close()
    before = snapshot(codes.db_path)
    assert "per-voucher maximum of £5.00" in one_line_error(codes("code", OTHER, "5.01"))
    # a meter rebuilds a code's sequence near its window: more than 2^14 - 64 codes ahead of
    # what it may have applied would be CODE_WRONG there, so they are refused, not issued
    msg = one_line_error(codes("code", DEVICE, "1", "-n", "16321"))
    assert "more than 16320 above 0" in msg and "fewer codes" in msg
    assert snapshot(codes.db_path) == before
    codes.ok("code", DEVICE, "1", "-n", "16320", "-o", "/dev/null")
    assert "code sequence 16321" in one_line_error(codes("code", DEVICE, "1"))


def test_a_meter_that_takes_no_codes_is_a_clear_error(run):
    run.ok("init")
    run.ok("key", "new")
    run.ok("device", "add", DEVICE)
    assert "no meter key registered yet" in one_line_error(run("code", DEVICE, "5"))
    run.ok("device", "add", OTHER, "--public-key", "ab" * 32)     # provisioned, old firmware
    msg = one_line_error(run("code", OTHER, "5"))
    assert "cannot take keypad codes" in msg and "no key-agreement key" in msg
    assert "--ka-key goes with --public-key" in one_line_error(
        run("device", "add", "00-00-00-00-00-00-00-01", "--ka-key", "cd" * 32))


def test_a_new_provisioning_changes_the_codes_of_a_meter(codes):
    """A code is derived from the key pair of the meter's current key epoch."""
    first = codes.ok("code", DEVICE, "1").stdout.strip()
    other_secret = bytes(range(7, 39))
    conn = _conn(codes)
    try:
        registry.set_public_key(conn, DEVICE_BYTES, Meter(DEVICE_BYTES, 3).public,
                                first_index=0, floor=1,
                                ka_public=x25519.public_key(other_secret),
                                code_kid=keystore.active_code_key(conn).kid)
    finally:
        conn.close()
    second = codes.ok("code", DEVICE, "1").stdout.strip()
    assert first == grouped(model_code(DEVICE_BYTES, 100, 1))
    assert second != grouped(model_code(DEVICE_BYTES, 100, 2))      # not the old meter key
    global METER_KA, METER_SECRET
    saved = METER_KA, METER_SECRET
    METER_SECRET, METER_KA = other_secret, x25519.public_key(other_secret)
    try:
        assert second == grouped(model_code(DEVICE_BYTES, 100, 2))
    finally:
        METER_KA, METER_SECRET = saved


# --- list, export, void -----------------------------------------------------------------

def test_codes_are_listed_exported_and_voided_like_vouchers(codes, tmp_path):
    codes.ok("issue", DEVICE, "1")
    codes.ok("code", DEVICE, "2", "-n", "2")
    codes.ok("issue", DEVICE, "3")
    listing = codes.ok("vouchers", "list").stdout.splitlines()
    assert [(ln.split()[1], ln.split()[2]) for ln in listing[1:-1]] == [
        ("1", "voucher"), ("2", "code"), ("3", "code"), ("4", "voucher")]
    assert "2 vouchers and 2 codes, £8.00" in listing[-1]
    only = codes.ok("vouchers", "list", "--form", "code").stdout
    assert "2 codes, £4.00" in only
    # export again: text of a mixed selection; codes have no QR/PNG/CBOR form
    out = tmp_path / "again.txt"
    codes.ok("vouchers", "export", "-o", out)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("OTU1:") and lines[3].startswith("OTU1:")
    assert lines[1:3] == [grouped(model_code(DEVICE_BYTES, 200, s)) for s in (2, 3)]
    assert "2 of the 4 selected are keypad codes" in one_line_error(
        codes("vouchers", "export", "-f", "png", "-o", tmp_path))
    codes.ok("vouchers", "export", "-f", "png", "--form", "voucher", "-o", tmp_path)
    # void one code by its reference
    r = codes.ok("vouchers", "void", ref_of(model_code(DEVICE_BYTES, 200, 3)).hex(), "--yes")
    assert r.stdout.startswith("cancelled code 3 of %s" % DEVICE)
    assert "already void" in one_line_error(codes("vouchers", "void", "--device", DEVICE,
                                                  "--seq", "3", "--yes"))


# --- reconciliation ---------------------------------------------------------------------

def _import(run, raws, tmp_path, name="r.cbor"):
    path = tmp_path / name
    receipts_io.write_receipts(path, raws)
    run.ok("receipts", "import", path)


def test_code_receipts_reconcile_by_reference(codes, tmp_path):
    codes.ok("code", DEVICE, "2", "-n", "3")
    codes.ok("issue", DEVICE, "1")
    m = codes.meter
    t = 1_800_000_000
    raws = [m.apply_code(model_code(DEVICE_BYTES, 200, 1), 1, 200, t, supply=1),
            m.apply_code(model_code(DEVICE_BYTES, 200, 3), 3, 200, t + 60, supply=2)]
    _import(codes, raws, tmp_path)
    r = codes("reconcile")
    assert r.exit_code == 0 and "no anomalies" in r.stdout, r.stdout
    conn = _conn(codes)
    try:
        st = dict(conn.execute("SELECT sequence, status FROM voucher_status"))
        assert st == {1: "redeemed", 2: "outstanding", 3: "redeemed", 4: "outstanding"}
        assert list(conn.execute("SELECT idx, form, supply FROM receipts ORDER BY idx")) == [
            (0, 2, 1), (1, 2, 2)]
    finally:
        conn.close()
    # the report's CSV names the form of each
    path = tmp_path / "report.csv"
    codes.ok("report", "--csv", path)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [(r["sequence"], r["form"], r["status"]) for r in rows] == [
        ("1", "code", "redeemed"), ("2", "code", "outstanding"), ("3", "code", "redeemed"),
        ("4", "voucher", "outstanding")]
    html = tmp_path / "report.html"
    codes.ok("report", "--html", html)
    assert '<td class="n">2</td><td>code</td>' in html.read_text()      # outstanding table
    # verify explains a redeemed code: applied already, no more credit
    v = codes("verify", grouped(model_code(DEVICE_BYTES, 200, 1)), "--device", DEVICE)
    assert v.exit_code == 1 and "redeemed: receipt 0" in v.stdout and "REDEEMED" in v.stdout


def test_code_anomalies(codes, tmp_path):
    codes.ok("code", DEVICE, "2", "-n", "2")
    codes.ok("issue", DEVICE, "1")
    m = codes.meter
    t = 1_800_000_000
    conn = _conn(codes)
    try:
        voucher_ref = issuer.find_sequence(conn, DEVICE_BYTES, 3).ref
    finally:
        conn.close()
    raws = [
        # a code's reference, but the receipt says it was a voucher (field 13 = 1)
        m.apply_code(model_code(DEVICE_BYTES, 200, 1), 1, 200, t, form=pr.FORM_VOUCHER),
        # a code applied for another amount than issued
        m.apply_code(model_code(DEVICE_BYTES, 200, 2), 2, 250, t + 1),
        # the voucher's reference named as a code
        m.emit(pr.TOPUP, t + 2, m.balance, m.balance + 100_000, sequence=3,
               voucher=voucher_ref, amount=100, form=pr.FORM_CODE),
        # a code never issued
        m.apply_code(model_code(DEVICE_BYTES, 300, 9), 9, 300, t + 3),
    ]
    m.window.mark(3)
    _import(codes, raws, tmp_path)
    r = codes("reconcile")
    assert r.exit_code == 1
    conn = _conn(codes)
    try:
        kinds = sorted((k, s) for k, s in conn.execute("SELECT kind, sequence FROM anomalies"))
    finally:
        conn.close()
    assert kinds == [("amount_mismatch", 2), ("form_mismatch", 1), ("form_mismatch", 3),
                     ("not_issued", 9)], r.stdout
    assert "applied a keypad code with sequence 9 for £3.00, which was never issued" in r.stdout


# --- verify -----------------------------------------------------------------------------

def test_verify_explains_a_code(codes):
    codes.ok("code", DEVICE, "7.25", "-n", "2")
    good = model_code(DEVICE_BYTES, 725, 2)
    r = codes.ok("verify", grouped(good).replace(" ", "-"))        # device from the database
    assert "amount     £7.25 (725 p)" in r.stdout and "sequence   2 " in r.stdout
    assert "issued by this database" in r.stdout and "outstanding" in r.stdout
    assert "ACCEPTED by device %s" % DEVICE in r.stdout
    assert codes.ok("verify", *grouped(good).split()).stdout == r.stdout    # unquoted groups
    assert "give one voucher" in one_line_error(codes("verify", "a", "b"))
    # a typo: the issued code one swap away is named
    typo = good[:7] + good[8] + good[7] + good[9:] if good[7] != good[8] else \
        good[:7] + str((int(good[7]) + 1) % 10) + good[8:]
    r = codes("verify", typo, "--device", DEVICE)
    assert r.exit_code == 1 and "CODE_TYPO (20)" in r.stdout
    assert "did you mean %s" % grouped(good) in r.stdout
    r = codes("verify", good[:-2], "--device", DEVICE)
    assert r.exit_code == 1 and "CODE_INCOMPLETE (21)" in r.stdout and "not 18" in r.stdout
    # a code with a good check digit that this meter's key did not make
    body = "%019d" % (int(good[:19]) ^ 4)
    forged = body + next(str(c) for c in range(10) if damm_ok(body + str(c)))
    r = codes("verify", forged, "--device", DEVICE)
    assert r.exit_code == 1 and "CODE_WRONG (19)" in r.stdout and "lockout" in r.stdout
    # a code this database did not issue needs a meter to check against
    assert "give --device" in one_line_error(codes("verify", forged))
    # a code made with the meter's key but never recorded (a sequence not issued)
    made = model_code(DEVICE_BYTES, 100, 5)
    r = codes("verify", made, "--device", DEVICE)
    assert r.exit_code == 0 and "not issued by this database" in r.stdout
    assert "sequence   5 " in r.stdout


def test_verify_a_code_for_another_meter(codes):
    conn = _conn(codes)
    try:
        registry.add_device(conn, bytes.fromhex(OTHER.replace("-", "")),
                            public_key=Meter(bytes(8), 1).public, ka_public=METER_KA,
                            code_kid=keystore.active_code_key(conn).kid)
    finally:
        conn.close()
    codes.ok("code", DEVICE, "1")
    r = codes("verify", model_code(DEVICE_BYTES, 100, 1), "--device", OTHER)
    assert r.exit_code == 1 and "CODE_WRONG" in r.stdout
    assert "issued for meter %s (sequence 1), not %s" % (DEVICE, OTHER) in r.stdout


# --- the issuer's encoder against the protocol's reference, many fields ----------------

def test_encoder_matches_protocol_keycode_for_many_fields():
    """host.issuer.CodeEncoder (the fast path) against protocol.keycode.encode, and the
    meter's check (protocol.keycode.verify) accepts each at its sequence."""
    from hypothesis import given, settings, strategies as st
    from protocol import keycode
    key = bytes(range(32))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=8, max_size=8), st.integers(1, 65535),
           st.integers(1, 0xFFFFFFFF - 3), st.integers(1, 3))
    def check(device, amount, first, n):
        got = issuer.CodeEncoder(key, device).encode_run(first, n, amount)
        for i, (seq, ref, digits) in enumerate(got):
            assert seq == first + i
            assert digits == keycode.encode(key, device, amount, seq)
            assert ref == keycode.reference(digits) and damm_ok(digits)
            c = keycode.verify(digits, key, device, max(0, seq - 1))
            assert (c.sequence, c.amount) == (seq, amount)
    check()


def test_what_counts_as_a_typed_code(tmp_path, monkeypatch):
    from host.delivery import looks_like_code
    monkeypatch.chdir(tmp_path)
    for text in ("1234 5678 9012 3456 7890", "1234-5678-9012-3456-7890", "12345",
                 "1234 5678 9012 3456 789O", "l234 5678 9012 3456 7890"):
        assert looks_like_code(text), text
    (tmp_path / "12345").write_text("")
    for text in ("12345", "OTU1:6BFOXN*TS0BI$ZD", "", "   ", "- -", "hello",
                 "see 1234 5678 9012 3456 7890 please"):
        assert not looks_like_code(text), text


def test_verify_a_code_with_a_letter_in_it(codes):
    r = codes("verify", "1234 5678 9012 3456 789O", "--device", DEVICE)
    assert r.exit_code == 1 and "CODE_INCOMPLETE (21)" in r.stdout and "only digits" in r.stdout


def test_verify_a_code_at_or_below_the_meters_floor_is_stale(codes):
    codes.ok("code", DEVICE, "1", "-n", "2")
    conn = _conn(codes)
    try:     # provisioned again with the same key pair (a new receipt key), floor 1
        registry.set_public_key(conn, DEVICE_BYTES, Meter(DEVICE_BYTES, 5).public,
                                first_index=0, floor=1, ka_public=METER_KA,
                                code_kid=keystore.active_code_key(conn).kid)
    finally:
        conn.close()
    r = codes("verify", model_code(DEVICE_BYTES, 100, 1))
    assert r.exit_code == 1 and "STALE (8)" in r.stdout and "floor 1" in r.stdout
    r = codes("verify", model_code(DEVICE_BYTES, 100, 2))
    assert r.exit_code == 0 and "ACCEPTED" in r.stdout


@pytest.mark.parametrize("extra", [{"form": 3}, {"supply": 3}, {"form": 0}])
def test_a_receipt_with_a_bad_form_or_supply_state_refuses_the_file(codes, tmp_path, extra):
    m = codes.meter
    good = m.apply_code(model_code(DEVICE_BYTES, 200, 1), 1, 200, 1_800_000_000)
    from protocol import cbor, cose
    fields = {pr.K_DEVICE: DEVICE_BYTES, pr.K_INDEX: 1, pr.K_KIND: pr.TOPUP,
              pr.K_TIME: 1_800_000_001, pr.K_PREV: pr.chain_hash(good),
              pr.K_BEFORE: m.balance, pr.K_AFTER: m.balance + 1000, pr.K_SEQUENCE: 2,
              pr.K_VOUCHER: bytes(16), pr.K_AMOUNT: 1}
    fields[{"form": pr.K_FORM, "supply": pr.K_SUPPLY}[next(iter(extra))]] = \
        next(iter(extra.values()))
    bad = cose.encode(m.kid, cbor.encode(fields), m._sign)     # signed, but not a receipt
    path = tmp_path / "bad.cbor"
    receipts_io.write_receipts(path, [good, bad])
    before = snapshot(codes.db_path)
    r = codes("receipts", "import", path)
    assert r.exit_code == 1 and "item 2" in r.stderr and "Traceback" not in r.output
    assert snapshot(codes.db_path) == before


def test_a_version_4_database_with_vouchers_is_upgraded_in_place(tmp_path):
    """Schema 5 rebuilds the vouchers table (codes beside vouchers): every voucher keeps
    its fields, batch and cancellation, and is form 1; receipts gain form and supply."""
    import sqlite3
    from protocol import voucher as pv
    path = str(tmp_path / "v4.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for stmt in db._statements(db.SCHEMA):
        conn.execute(stmt)
    for version in (1, 2, 3):
        db._run_migration(conn, version)
    conn.execute("PRAGMA application_id = %d" % db.APPLICATION_ID)
    conn.execute("PRAGMA user_version = 4")
    conn.execute("COMMIT")
    conn.close()
    # a v4 database with a key, a meter and two vouchers (one cancelled), through the code of
    # the time: the same statements host/ ran before schema 5
    conn = sqlite3.connect(path, isolation_level=None)
    import nacl.signing
    sk = nacl.signing.SigningKey(bytes(32))
    from protocol.cose import kid_for
    kid = kid_for(bytes(sk.verify_key))
    conn.execute("INSERT INTO keys (kid, public_key, salt, sealed_seed, opslimit, memlimit, "
                 "created, active) VALUES (?, ?, x'00', x'00', 1, 1, 5, 1)",
                 (kid, bytes(sk.verify_key)))
    conn.execute("INSERT INTO devices (device, max_voucher, max_credit, next_sequence, "
                 "created) VALUES (?, 1000, 5000, 3, 5)", (DEVICE_BYTES,))
    raws = [pv.encode(kid, lambda m: sk.sign(m).signature, DEVICE_BYTES, s, 100 * s, 7, None)
            for s in (1, 2)]
    for s, raw in zip((1, 2), raws):
        conn.execute("INSERT INTO vouchers (device, sequence, kid, amount, issued, expires, "
                     "ref, cose, batch, voided, void_note) VALUES (?, ?, ?, ?, 7, NULL, ?, ?, "
                     "1, ?, ?)", (DEVICE_BYTES, s, kid, 100 * s, pv.reference(raw), raw,
                                  None if s == 1 else 9, None if s == 1 else "lost"))
    conn.close()
    conn = db.open_db(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        got = [(v.sequence, v.form, v.cose, v.amount, v.code) for v in issuer.stored(conn)]
        assert got == [(1, 1, raws[0], 100, None), (2, 1, raws[1], 200, None)]
        assert list(conn.execute("SELECT sequence, batch, voided, void_note FROM vouchers")) == [
            (1, 1, None, None), (2, 1, 9, "lost")]
        cols = {r[1] for r in conn.execute("PRAGMA table_info(receipts)")}
        assert {"form", "supply"} <= cols
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
