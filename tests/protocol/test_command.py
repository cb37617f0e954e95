# Signed command v1 (SPEC.md §10) on both VMs and CPython: the payload bytes against a
# hand-written deterministic CBOR encoding, the domain separation from vouchers (external
# AAD), the text form, and every stateless check with its reason code.
import binascii
from hashlib import sha256

from protocol import base45, command, cose, ed25519, errors, receipt, voucher
from tests.protocol._support import expect_rejected

DEVICE = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa1"
OTHER = b"\x70\xb3\xd5\xf0\x00\x00\x00\xa2"
CMD_SEED = bytes(range(41, 73))
ISSUER_SEED = bytes(range(1, 33))
T = 1790000000
_pub = {}


def pub(seed):
    if seed not in _pub:
        _pub[seed] = ed25519.public_key(seed)
    return _pub[seed]


def signer(seed):
    return lambda msg: ed25519.sign(seed, msg)


def make(number=1, kind=command.ADD_ISSUER_KEY, args=None, device=DEVICE, seed=CMD_SEED,
         strict=True):
    if args is None:
        args = {1: bytes(range(32))}
    return command.encode(cose.kid_for(pub(seed)), signer(seed), device, number, kind, T, args,
                          strict)


def keys():
    return {cose.kid_for(pub(CMD_SEED)): pub(CMD_SEED)}


def test_payload_is_the_deterministic_cbor_written_out_by_hand():
    args = {1: T + 60, 2: 30000, 3: 0}
    payload = command.encode_payload(DEVICE, 7, command.SET_TARIFF, T, args)
    # a5: map(5); 01 48 <8 bytes>; 02 07; 03 04; 04 1a <T BE>; 05 a3 {01 1a <T+60>, 02 19 7530, 03 00}
    want = (b"\xa5" + b"\x01\x48" + DEVICE + b"\x02\x07" + b"\x03\x04" + b"\x04\x1a"
            + T.to_bytes(4, "big") + b"\x05\xa3" + b"\x01\x1a" + (T + 60).to_bytes(4, "big")
            + b"\x02\x19\x75\x30" + b"\x03\x00")
    assert payload == want


def test_signature_is_over_the_sig_structure_with_the_command_aad():
    raw = make()
    msg = cose.decode(raw)
    aad = b"OTU1 command v1"
    assert command.AAD == aad and len(aad) == 15
    tbs = b"\x84\x6aSignature1" + b"\x4d" + msg.protected + b"\x4f" + aad + b"\x58" + bytes(
        [len(msg.payload)]) + msg.payload
    assert ed25519.verify(pub(CMD_SEED), tbs, msg.signature)
    assert not ed25519.verify(pub(CMD_SEED), msg.to_be_signed(b""), msg.signature)
    c = command.verify(raw, keys(), DEVICE)
    assert (c.device, c.number, c.kind, c.issued, c.args) == (DEVICE, 1, 1, T, {1: bytes(range(32))})
    assert c.kid == cose.kid_for(pub(CMD_SEED)) == sha256(pub(CMD_SEED)).digest()[:8]
    assert c.ref == sha256(raw).digest()[:16] == command.reference(raw)


def test_a_voucher_signature_never_passes_for_a_command_nor_the_other_way():
    # The same key signs a voucher: as a command it is refused (its payload is not a
    # command's, and its signature is over another AAD).
    v = voucher.encode(cose.kid_for(pub(CMD_SEED)), signer(CMD_SEED), DEVICE, 1, 100, T)
    expect_rejected(errors.BAD_SIGNATURE, command.verify, v, keys(), DEVICE)
    # A command's bytes under a trusted issuer kid are not a voucher.
    c = make(seed=ISSUER_SEED)
    trusted = {cose.kid_for(pub(ISSUER_SEED)): pub(ISSUER_SEED)}
    expect_rejected(errors.BAD_SIGNATURE, voucher.verify, c, trusted, DEVICE)


def test_checks_in_order_with_their_reason_codes():
    expect_rejected(errors.MALFORMED, command.verify, b"\x00", keys())
    # Signed by an issuer key: not the command key.
    expect_rejected(errors.UNKNOWN_KEY, command.verify, make(seed=ISSUER_SEED), keys(), DEVICE)
    raw = bytearray(make())
    raw[-1] ^= 1
    expect_rejected(errors.BAD_SIGNATURE, command.verify, bytes(raw), keys(), DEVICE)
    expect_rejected(errors.WRONG_DEVICE, command.verify, make(device=OTHER), keys(), DEVICE)
    # device None skips the device check (display)
    assert command.verify(make(device=OTHER), keys()).device == OTHER


def _signed_payload(fields):
    from protocol import cbor
    return cose.encode(cose.kid_for(pub(CMD_SEED)), cbor.encode(fields), signer(CMD_SEED),
                       b"OTU1 command v1")


def test_payload_and_args_tables_are_malformed_when_broken():
    good = {1: DEVICE, 2: 1, 3: 1, 4: T, 5: {1: bytes(32)}}
    assert command.verify(_signed_payload(good), keys(), DEVICE).number == 1
    bad = []
    for k in (1, 2, 3, 4, 5):
        f = dict(good)
        del f[k]
        bad.append(f)                                   # a field missing
    bad.append(dict(good, **{}))
    bad[-1][6] = 0                                      # an unknown field
    for k, v in ((2, 0), (2, 1 << 32), (2, True), (3, 7), (3, 0), (4, -1), (5, []),
                 (1, DEVICE[:7])):
        f = dict(good)
        f[k] = v
        bad.append(f)
    for kind, args in ((1, {1: bytes(31)}), (1, {1: bytes(32), 2: 0}), (2, {1: bytes(32)}),
                       (3, {}), (4, {1: T}), (4, {2: 1}), (4, {1: T, 2: -1}),
                       (4, {1: T, 8: 1}), (4, {1: T, 2: True}), (5, {1: "k"}),
                       (6, {1: bytes(32), 2: [], 4: 0}), (6, {1: bytes(32), 2: [bytes(32)]}),
                       (6, {1: bytes(32), 2: [bytes(32)] * 5, 4: 0}),
                       (6, {1: bytes(32), 2: [bytes(32)], 3: bytes(8), 4: 0}),
                       (6, {1: bytes(32), 2: [bytes(31)], 4: 0})):
        bad.append(dict(good, **{}))
        bad[-1][3] = kind
        bad[-1][5] = args
    for f in bad:
        expect_rejected(errors.MALFORMED, command.verify, _signed_payload(f), keys(), DEVICE)


def test_value_bounds_are_refused_with_command_refused():
    def tariff(**kv):
        a = {1: T}
        for k, v in kv.items():
            a[int(k[1:])] = v
        return a
    refused = (tariff(a2=0), tariff(a2=1000001), tariff(a3=10000001), tariff(a4=0),
               tariff(a4=1000001), tariff(a5=1000001), tariff(a6=0), tariff(a7=0),
               tariff(a7=10 ** 7))
    for args in refused:
        expect_rejected(errors.COMMAND_REFUSED, command.check_args, command.SET_TARIFF, args)
        # the encoder refuses them too unless told not to (tests make refused commands)
        expect_rejected(errors.COMMAND_REFUSED, make, 1, command.SET_TARIFF, args)
        c = command.verify(make(1, command.SET_TARIFF, args, strict=False), keys(), DEVICE)
        assert c.args == args
    for args in (tariff(a2=1), tariff(a2=1000000), tariff(a3=0), tariff(a3=10000000),
                 tariff(a5=0), tariff(a2=24500, a3=60000, a4=500, a5=100, a6=10000, a7=50000)):
        command.check_args(command.SET_TARIFF, args)
    # effective: at most 7 days (604 800 s) behind meter time
    command.check_args(command.SET_TARIFF, {1: T, 2: 5}, T + 604800)
    expect_rejected(errors.COMMAND_REFUSED, command.check_args, command.SET_TARIFF,
                    {1: T, 2: 5}, T + 604801)
    command.check_args(command.SET_TARIFF, {1: T + 10 ** 6, 2: 5}, T)      # future: fine
    k = bytes(range(32))
    expect_rejected(errors.COMMAND_REFUSED, command.check_args, command.CHANGE_SUPPLIER,
                    {1: k, 2: [k, k], 4: 9})


def test_every_kind_round_trips():
    k = bytes(range(32))
    for kind, args in ((1, {1: k}), (2, {1: k[:8]}), (3, {1: k}), (4, {1: T, 2: 30000}),
                       (5, {1: k}), (6, {1: k, 2: [k, bytes(32)], 4: 100}),
                       (6, {1: k, 2: [k], 3: k, 4: 0})):
        raw = make(3, kind, args)
        c = command.parse(raw)
        assert (c.kind, c.args, c.number) == (kind, args, 3)
        assert command.KIND_NAMES[kind]


def test_text_form():
    raw = make()
    text = command.to_text(raw)
    assert text.startswith("OTC1:") and text[5:] == base45.encode(raw)
    assert command.from_text("  otc1:" + text[5:] + "\n") == raw
    expect_rejected(errors.MALFORMED, command.from_text, "OTU1:" + text[5:])
    expect_rejected(errors.MALFORMED, command.from_text, b"OTC1:")
    # a voucher's text prefix is not a command's
    assert command.TEXT_PREFIX != voucher.TEXT_PREFIX


def test_reason_codes_23_to_26():
    assert (errors.KEY_REVOKED, errors.COMMAND_OUT_OF_ORDER, errors.COMMAND_REPLAYED,
            errors.COMMAND_REFUSED) == (23, 24, 25, 26)
    assert errors.name(26) == "COMMAND_REFUSED" and errors.name(23) == "KEY_REVOKED"


def _receipt_fields(**extra):
    f = {receipt.K_DEVICE: DEVICE, receipt.K_INDEX: 4, receipt.K_KIND: receipt.COMMAND,
         receipt.K_TIME: T, receipt.K_PREV: bytes(32), receipt.K_BEFORE: 5000,
         receipt.K_AFTER: 5000, receipt.K_SEQUENCE: 2, receipt.K_VOUCHER: bytes(16),
         receipt.K_COMMAND_KIND: command.ADD_ISSUER_KEY}
    for k, v in extra.items():
        f[int(k[1:])] = v
    return f


def test_command_receipt_fields():
    seed = bytes(range(60, 92))
    kid = cose.kid_for(pub(seed))
    raw = receipt.encode(kid, signer(seed), _receipt_fields())
    r = receipt.verify(raw, {kid: pub(seed)})
    assert (r.kind, r.sequence, r.command_kind, r.tariff) == (5, 2, 1, None)
    t = receipt.parse(receipt.encode(kid, signer(seed), _receipt_fields(
        k15=command.SET_TARIFF, k16={1: T, 2: 30000})))
    assert t.tariff == {1: T, 2: 30000} and t.command_kind == 4
    for bad in (_receipt_fields(k7=4999),                     # a command moves no money
                _receipt_fields(k16={1: T}),                  # field 16 only with a tariff
                _receipt_fields(k15=command.SET_TARIFF),      # ... and then required
                _receipt_fields(k16={}), _receipt_fields(k15=4, k16={}),
                _receipt_fields(k15=4, k16={1: -1}), _receipt_fields(k15=4, k16=[1]),
                _receipt_fields(k8=0), _receipt_fields(k9=bytes(15)),
                _receipt_fields(k10=5)):
        expect_rejected(errors.MALFORMED, receipt.encode_payload, bad)


def test_han_command_request_type():
    from protocol import han
    assert han.COMMAND == 7
    assert binascii.hexlify(han.encode_message(7, 1, {1: b"x"}))
