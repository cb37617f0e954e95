import nacl.signing
import pytest
from hypothesis import given, settings, strategies as st

from host import db, issuer, keystore, registry
from host.errors import TopupError
from host.issuer import VoucherEncoder
from protocol import voucher as pv
from protocol.cose import kid_for

from .conftest import PASSPHRASE, snapshot

SK = nacl.signing.SigningKey(bytes(range(32)))
KID = kid_for(bytes(SK.verify_key))
ENC = VoucherEncoder(KID, bytes(range(32)) + bytes(SK.verify_key))


def _reference_encode(device, seq, amount, issued, expires):
    return pv.encode(KID, lambda m: SK.sign(m).signature, device, seq, amount, issued, expires)


@settings(max_examples=300, deadline=None)
@given(device=st.binary(min_size=8, max_size=8),
       seq=st.integers(1, pv.MAX_SEQUENCE),
       amount=st.integers(1, pv.MAX_AMOUNT),
       issued=st.integers(0, 0xFFFFFFFFFFFF - 1),
       life=st.none() | st.integers(1, 2**40),
       count=st.integers(1, 3))
def test_fast_encoder_is_byte_identical_to_the_protocol_encoder(device, seq, amount, issued,
                                                                 life, count):
    expires = None if life is None else min(issued + life, 0xFFFFFFFFFFFF)
    if expires is not None and expires <= issued:
        expires = None
    seq = min(seq, pv.MAX_SEQUENCE - count + 1)
    run = ENC.encode_run(device, seq, count, amount, issued, expires)
    for s, raw in run:
        assert raw == _reference_encode(device, s, amount, issued, expires)
    assert ENC.encode(device, seq, amount, issued, expires) == run[0][1]


@pytest.fixture
def conn(db_target):
    c = db.create(db_target)
    keystore.new_key(c, PASSPHRASE)
    registry.add_device(c, b"\x00\x11\x22\x33\x44\x55\x66\x77", max_voucher=10000,
                        max_credit=50000)
    yield c
    c.close()


DEV = b"\x00\x11\x22\x33\x44\x55\x66\x77"


def test_bulk_issue_in_batches_with_progress(conn):
    signer = keystore.unlock_active(conn, PASSPHRASE)
    calls = []
    batches = list(issuer.issue_batches(conn, signer, DEV, 1050, 25, batch_size=10,
                                        now=1_700_000_000, expires_in=86400,
                                        progress=lambda d, t: calls.append((d, t))))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert calls == [(0, 25), (10, 25), (20, 25), (25, 25)]
    vs = [v for b in batches for v in b]
    assert [v.sequence for v in vs] == list(range(1, 26))
    trusted = keystore.trusted(conn)
    for v in vs:
        got = pv.verify(v.cose, trusted, device=DEV, now=1_700_000_000)
        assert (got.sequence, got.amount, got.expires, got.ref) == (
            v.sequence, 1050, 1_700_086_400, v.ref)
    assert issuer.stored(conn, DEV) == vs
    assert registry.get_device(conn, DEV).next_sequence == 26


def test_each_batch_is_committed_before_it_is_handed_out(conn, db_target):
    signer = keystore.unlock_active(conn, PASSPHRASE)
    gen = issuer.issue_batches(conn, signer, DEV, 100, 30, batch_size=10)
    first = next(gen)
    # Another connection (another process, after a crash) already sees it on disk.
    other = db.open_db(db_target)
    seqs = [r[0] for r in other.execute("SELECT sequence FROM vouchers ORDER BY sequence")]
    assert seqs == [v.sequence for v in first]
    assert other.execute("SELECT next_sequence FROM devices").fetchone()[0] == 11
    other.close()
    gen.close()  # the caller stops: what was not handed out was never reserved
    assert registry.get_device(conn, DEV).next_sequence == 11


@pytest.mark.parametrize("amount,count,words", [
    (10001, 1, "per-voucher maximum"), (0, 1, "1p"), (100, 0, "count")])
def test_refused_requests_change_nothing(conn, db_target, amount, count, words):
    signer = keystore.unlock_active(conn, PASSPHRASE)
    before = snapshot(db_target)[1]
    with pytest.raises(TopupError, match=words):
        issuer.issue(conn, signer, DEV, amount, count)
    assert snapshot(db_target)[1] == before


def test_unknown_device(conn):
    signer = keystore.unlock_active(conn, PASSPHRASE)
    with pytest.raises(TopupError, match="unknown device 00-00-00-00-00-00-00-01"):
        issuer.issue(conn, signer, bytes(7) + b"\x01", 100)


def test_revoking_the_key_stops_a_bulk_run_at_a_batch_boundary(conn):
    signer = keystore.unlock_active(conn, PASSPHRASE)
    gen = issuer.issue_batches(conn, signer, DEV, 100, 30, batch_size=10)
    next(gen)
    keystore.revoke(conn, signer.kid)
    with pytest.raises(TopupError, match="no longer the active key; stopped after 10"):
        next(gen)
    assert registry.get_device(conn, DEV).next_sequence == 11


def test_sequence_space_exhaustion_is_refused(conn):
    conn.execute("UPDATE devices SET next_sequence = ?", (pv.MAX_SEQUENCE,))
    signer = keystore.unlock_active(conn, PASSPHRASE)
    with pytest.raises(TopupError, match="only 1 sequence numbers left"):
        issuer.issue(conn, signer, DEV, 100, 2)
    (v,) = issuer.issue(conn, signer, DEV, 100, 1)
    assert v.sequence == pv.MAX_SEQUENCE
