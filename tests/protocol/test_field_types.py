# Every payload field has exactly the type SPEC.md gives it, on every verifier (both VMs):
# a validly signed voucher or receipt with a field of another type (null included) is
# MALFORMED, never read as "absent". And signed messages of different kinds cannot stand
# in for each other (the acknowledgement's external AAD, SPEC.md §5.1).
from protocol import ack, cbor, cose, ed25519, errors, receipt, voucher
from tests.protocol._support import expect_rejected

SEED = bytes(range(1, 33))
PUBLIC = ed25519.public_key(SEED)
KID = cose.kid_for(PUBLIC)
TRUST = {KID: PUBLIC}
DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa1"
T0 = 1790000000
WRONG = [None, True, False, -1, "7", b"\x07", [7], {1: 7}]


def _sign(m):
    return ed25519.sign(SEED, m)


def _voucher(fields):
    return cose.encode(KID, cbor.encode(fields), _sign)


def _good():
    return {1: DEVICE, 2: 5, 3: 100, 4: T0, 5: T0 + 3600}


def test_the_well_typed_voucher_verifies():
    v = voucher.verify(_voucher(_good()), TRUST, DEVICE, T0, 10000)
    assert (v.sequence, v.amount, v.expires) == (5, 100, T0 + 3600)


def test_a_null_expiry_is_malformed_not_absent():
    fields = _good()
    fields[5] = None
    data = _voucher(fields)
    expect_rejected(errors.MALFORMED, voucher.verify, data, TRUST, DEVICE, T0, 10000)
    expect_rejected(errors.MALFORMED, voucher.parse, data)


def test_every_voucher_field_of_another_type_is_malformed():
    for key in (1, 2, 3, 4, 5):
        for value in WRONG:
            fields = _good()
            fields[key] = value
            try:
                data = _voucher(fields)
            except Exception:
                continue      # the encoder cannot encode it deterministically: not a voucher
            expect_rejected(errors.MALFORMED, voucher.verify, data, TRUST, DEVICE, T0, 10000)


def test_time_fields_are_capped_at_2_to_the_48():
    fields = _good()
    fields[4] = (1 << 48) - 1
    del fields[5]
    voucher.verify(_voucher(fields), TRUST, DEVICE, T0, 10000)
    fields[4] = 1 << 48
    expect_rejected(errors.MALFORMED, voucher.verify, _voucher(fields), TRUST, DEVICE, T0, 10000)


def _receipt_fields():
    return {1: DEVICE, 2: 0, 3: receipt.TOPUP, 4: T0, 5: receipt.GENESIS, 6: 0, 7: 100000,
            8: 5, 9: bytes(16), 10: 100}


def test_every_receipt_field_of_another_type_is_malformed():
    good = cose.encode(KID, cbor.encode(_receipt_fields()), _sign)
    assert receipt.verify(good, TRUST).amount == 100
    for key in range(1, 11):
        for value in (None, True, "7", [7]):
            fields = _receipt_fields()
            fields[key] = value
            data = cose.encode(KID, cbor.encode(fields), _sign)
            expect_rejected(errors.MALFORMED, receipt.parse, data)


def test_a_fault_receipt_carries_a_map_of_counts():
    fields = {1: DEVICE, 2: 3, 3: receipt.FAULT, 4: T0, 5: receipt.GENESIS, 6: 5, 7: 5, 12: {1: 2, 5: 1}}
    r = receipt.parse(cose.encode(KID, cbor.encode(fields), _sign))
    assert r.kind == receipt.FAULT and r.faults == {1: 2, 5: 1}
    for bad in ({1: -1}, {1: None}, [1], None):
        fields[12] = bad
        expect_rejected(errors.MALFORMED, receipt.parse, cose.encode(KID, cbor.encode(fields), _sign))


def test_acknowledgement_round_trip_and_refusals():
    h = bytes(range(32))
    data = ack.encode(KID, _sign, DEVICE, b"\x01" * 8, 7, h)
    a = ack.verify(data, TRUST, DEVICE)
    assert (a.device, a.meter_kid, a.next_index, a.last_hash) == (DEVICE, b"\x01" * 8, 7, h)
    expect_rejected(errors.WRONG_DEVICE, ack.verify, data, TRUST, b"\x00" * 8)
    expect_rejected(errors.UNKNOWN_KEY, ack.verify, data, {}, DEVICE)
    tampered = bytearray(data)
    tampered[-1] ^= 1
    expect_rejected(errors.BAD_SIGNATURE, ack.verify, bytes(tampered), TRUST, DEVICE)
    expect_rejected(errors.MALFORMED, ack.verify, b"\xa0", TRUST, DEVICE)
    expect_rejected(errors.MALFORMED, ack.verify, None, TRUST, DEVICE)


def test_an_acknowledgement_signature_never_passes_for_a_voucher_nor_back():
    payload = cbor.encode(_good())
    as_ack = cose.encode(KID, payload, _sign, ack.AAD)          # a voucher payload, ack AAD
    expect_rejected(errors.BAD_SIGNATURE, voucher.verify, as_ack, TRUST, DEVICE, T0, 10000)
    ack_payload = cbor.encode({1: DEVICE, 2: b"\x01" * 8, 3: 7, 4: bytes(32)})
    as_voucher = cose.encode(KID, ack_payload, _sign)          # an ack payload, voucher AAD
    expect_rejected(errors.BAD_SIGNATURE, ack.verify, as_voucher, TRUST, DEVICE)


def _signed(fields):
    return cose.encode(KID, cbor.encode(fields), _sign)


def test_receipt_form_and_supply_fields_have_their_kinds_and_values():
    # SPEC.md §4: 13 form (kind 1 only: 1 voucher, 2 keypad code), 14 supply state
    # (kinds 1 and 2: 0 interrupted, 1 armed, 2 on); both optional.
    top_up = _receipt_fields()
    assert receipt.parse(_signed(top_up)).form is None and receipt.parse(_signed(top_up)).supply is None
    for form in (1, 2):
        for state in (0, 1, 2):
            fields = _receipt_fields()
            fields[13], fields[14] = form, state
            r = receipt.parse(_signed(fields))
            assert (r.form, r.supply) == (form, state)
    emergency = {1: DEVICE, 2: 1, 3: receipt.EMERGENCY, 4: T0, 5: receipt.GENESIS, 6: -5, 7: -5,
                 10: 500, 14: 2}
    assert receipt.parse(_signed(emergency)).supply == 2
    for key, value in ((13, 0), (13, 3), (14, 3), (14, -1), (13, True), (14, False), (13, None),
                       (14, None), (13, "2"), (14, b"\x01")):
        fields = _receipt_fields()
        fields[key] = value
        expect_rejected(errors.MALFORMED, receipt.parse, _signed(fields))
    fields = dict(emergency)
    fields[13] = 2                       # a form on an emergency-credit receipt
    expect_rejected(errors.MALFORMED, receipt.parse, _signed(fields))
    rejections = {1: DEVICE, 2: 2, 3: receipt.REJECTIONS, 4: T0, 5: receipt.GENESIS, 6: 0, 7: 0,
                  11: {19: 5}}
    assert receipt.parse(_signed(rejections)).rejections == {19: 5}
    for key in (13, 14):                 # neither on a rejections receipt
        fields = dict(rejections)
        fields[key] = 1
        expect_rejected(errors.MALFORMED, receipt.parse, _signed(fields))
