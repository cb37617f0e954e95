"""Issue 9, items 6 and 16: `topup verify` checks every voucher of the file `issue -f json`
writes (and text and CBOR sequences); a JSON voucher whose informative fields disagree
with its signed bytes is warned about and makes the exit code 1; a voucher whose times are
beyond any calendar date is explained, not a crash. Through the real `topup`."""
import json

from host import db, keystore
from protocol import voucher as pv

from .conftest import DEVICE, DEVICE_BYTES, PASSPHRASE


def test_verify_a_json_lines_batch(store, tmp_path):
    batch = tmp_path / "batch.jsonl"
    store.ok("issue", DEVICE, "20", "-n", "4", "-f", "json", "-o", batch)
    r = store.ok("verify", batch)
    lines = r.stdout.splitlines()
    assert lines[:4] == ["line %d of %s: %s seq %d £20.00 ACCEPTED" % (n, batch, DEVICE, n)
                         for n in range(1, 5)]
    assert lines[4].startswith("4 vouchers: 4 accepted, 0 rejected")
    # a CBOR sequence (what `issue -f cbor` writes to stdout) and a file of text forms
    cbor = tmp_path / "b.cbor"
    with open(cbor, "wb") as f:
        store.ok("issue", DEVICE, "1", "-n", "2", "-f", "cbor", stdout=f)
    assert store.ok("verify", cbor).stdout.splitlines()[-1].startswith("2 vouchers: 2 accepted")
    texts = tmp_path / "b.txt"
    texts.write_text(store.ok("issue", DEVICE, "1", "-n", "2").stdout)
    assert store.ok("verify", texts).stdout.splitlines()[-1].startswith("2 vouchers: 2 accepted")


def test_json_fields_that_disagree_with_the_signed_bytes_are_reported(store, tmp_path):
    batch = tmp_path / "batch.jsonl"
    store.ok("issue", DEVICE, "10", "-n", "2", "-f", "json", "-o", batch)
    objs = [json.loads(ln) for ln in batch.read_text(encoding="utf-8").splitlines()]
    objs[1]["amount_pence"] = 100000
    objs[1]["amount"] = "£1,000.00"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs),
                      encoding="utf-8")
    r = store("verify", edited)
    assert r.returncode == 1, r.stdout
    assert ("  WARNING: JSON field amount_pence says 100000, but the signed voucher says 1000 "
            "(a meter goes by the signed bytes)") in r.stdout
    assert "JSON field amount says '£1,000.00'" in r.stdout
    assert r.stdout.splitlines()[-1].startswith(
        "2 vouchers: 2 accepted, 0 rejected, 1 whose JSON fields disagree with the signed bytes")
    one = tmp_path / "one.json"
    one.write_text(json.dumps(objs[1]), encoding="utf-8")
    r = store("verify", one)
    assert r.returncode == 1 and "ACCEPTED by device" in r.stdout
    assert "WARNING: JSON field amount_pence says 100000" in r.stdout


def test_times_beyond_any_calendar_date(store):
    conn = db.open_db(store.db_path)
    try:
        signer = keystore.unlock_active(conn, PASSPHRASE)
    finally:
        conn.close()
    for issued, expires in ((2 ** 40, None), (1_800_000_000, 2 ** 40), (2 ** 48 - 2, 2 ** 48 - 1)):
        raw = pv.encode(signer.kid, signer.sign, DEVICE_BYTES, 77, 500, issued, expires)
        r = store("verify", pv.to_text(raw), "--now", "1800000000")
        assert "Traceback" not in r.stderr and r.returncode == 0, (r.stdout, r.stderr)
        big = issued if expires is None or issued > 2 ** 39 else expires
        assert "%d (Unix seconds; no calendar date)" % big in r.stdout
        assert "ACCEPTED" in r.stdout
        r = store("show", pv.to_text(raw), "-f", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["issued"] == issued
