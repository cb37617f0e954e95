"""Generate protocol/vectors/*.json from fixed seeds (CPython; run `make vectors`).

Signatures come from PyNaCl (libsodium), not from protocol/ed25519.py, so the vectors
check our verifier against an independent signer. Malformed inputs are assembled byte by
byte here, because the protocol's own encoder cannot produce them. Every invalid vector
names the reason code SPEC.md §2.1 says a verifier must report. Output is deterministic:
running this twice gives identical files.
"""
import json
import os
import random
import sys

import nacl.signing

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from protocol import cbor, cose, errors, han, receipt, voucher  # noqa: E402
from protocol.sha512 import sha512  # noqa: E402

L = 2**252 + 27742317777372353535851937790883648493


def seed(label):
    return sha512(b"offline-topup test vector " + label.encode())[:32]


ISSUER = nacl.signing.SigningKey(seed("issuer 1"))
STRANGER = nacl.signing.SigningKey(seed("untrusted issuer"))
METER = nacl.signing.SigningKey(seed("meter 70b3d5f0000000a1"))
ISSUER_PUB = bytes(ISSUER.verify_key)
STRANGER_PUB = bytes(STRANGER.verify_key)
METER_PUB = bytes(METER.verify_key)
KID = cose.kid_for(ISSUER_PUB)
STRANGER_KID = cose.kid_for(STRANGER_PUB)
METER_KID = cose.kid_for(METER_PUB)
DEVICE = bytes.fromhex("70b3d5f0000000a1")
OTHER_DEVICE = bytes.fromhex("70b3d5f0000000a2")
NOW = 1790000000
ISSUED = NOW - 3600
MAX_AMOUNT = 10000  # the context's per-voucher maximum, pence

CONTEXT = {
    "trusted": {KID.hex(): ISSUER_PUB.hex()},
    "device": DEVICE.hex(),
    "now": NOW,
    "max_amount": MAX_AMOUNT,
}


def head(major, arg):
    return cbor._head(major, arg)


def bstr(b):
    return head(2, len(b)) + b


def sign_raw(key, protected, payload):
    return key.sign(cose.sig_structure(protected, payload)).signature


def assemble(protected, payload, signature, unprotected=b"\xa0", tag=True, array_head=b"\x84"):
    body = array_head + bstr(protected) + unprotected + bstr(payload) + bstr(signature)
    return (b"\xd2" + body) if tag else body


def signed(payload, key=ISSUER, protected=None, **kw):
    protected = protected if protected is not None else cose.protected_header(KID)
    return assemble(protected, payload, sign_raw(key, protected, payload), **kw)


def payload(**fields):
    base = {1: DEVICE, 2: 1, 3: 1000, 4: ISSUED}
    base.update({int(k[1:]): v for k, v in fields.items()})
    return cbor.encode({k: v for k, v in base.items() if v is not None})


def voucher_vectors():
    valid = []

    def ok(name, raw, **ctx):
        v = voucher.verify(raw, {KID: ISSUER_PUB}, DEVICE, ctx.get("now", NOW),
                           MAX_AMOUNT, verify_sig=_nacl_verify)
        valid.append({"name": name, "hex": raw.hex(), "text": voucher.to_text(raw),
                      "fields": {"device": v.device.hex(), "sequence": v.sequence,
                                 "amount": v.amount, "issued": v.issued, "expires": v.expires,
                                 "kid": v.kid.hex(), "ref": v.ref.hex()}})

    sign = lambda m: ISSUER.sign(m).signature  # noqa: E731
    ok("basic", voucher.encode(KID, sign, DEVICE, 1, 1000, ISSUED))
    ok("with expiry", voucher.encode(KID, sign, DEVICE, 2, 2550, ISSUED, NOW + 86400))
    ok("untagged", signed(payload(k2=3), tag=False))
    ok("largest sequence", voucher.encode(KID, sign, DEVICE, 0xFFFFFFFF, 1, ISSUED))
    ok("amount at the device maximum", voucher.encode(KID, sign, DEVICE, 4, MAX_AMOUNT, ISSUED))
    ok("one second before expiry", voucher.encode(KID, sign, DEVICE, 5, 100, ISSUED, NOW + 1))

    invalid = []

    def bad(name, raw, reason, **ctx):
        invalid.append({"name": name, "hex": raw.hex(), "reason": errors.name(reason),
                        "context": ctx})

    good = bytes.fromhex(valid[0]["hex"])
    M, H, U, S = (errors.MALFORMED, errors.BAD_HEADER, errors.UNKNOWN_KEY, errors.BAD_SIGNATURE)
    prot = cose.protected_header(KID)
    pay = payload()
    sig = sign_raw(ISSUER, prot, pay)

    # 1. structure
    bad("empty input", b"", M)
    bad("not CBOR (break byte)", b"\xff", M)
    bad("truncated by one byte", good[:-1], M)
    bad("trailing byte", good + b"\x00", M)
    bad("tag 17 (COSE_Mac0) instead of 18", b"\xd1" + good[1:], M)
    bad("tag 98 (COSE_Sign)", b"\xd8\x62" + good[1:], M)
    bad("array of three", b"\xd2\x83" + bstr(prot) + b"\xa0" + bstr(pay), M)
    bad("indefinite-length array", b"\xd2\x9f" + bstr(prot) + b"\xa0" + bstr(pay) + bstr(sig) + b"\xff", M)
    bad("signature of 63 bytes", assemble(prot, pay, sig[:63]), M)
    bad("signature of 65 bytes", assemble(prot, pay, sig + b"\x00"), M)
    bad("payload is a map, not a byte string", b"\xd2\x84" + bstr(prot) + b"\xa0" + pay + bstr(sig), M)
    bad("payload is nil (detached)", b"\xd2\x84" + bstr(prot) + b"\xa0\xf6" + bstr(sig), M)
    bad("protected header as a map, not a byte string", b"\xd2\x84" + prot + b"\xa0" + bstr(pay) + bstr(sig), M)
    bad("protected header bytes are an array", signed(pay, protected=cbor.encode([1, -8])), M)
    bad("non-shortest length of the protected header", b"\xd2\x84\x58" + bytes([len(prot)]) + prot + b"\xa0" + bstr(pay) + bstr(sig), M)
    bad("unsorted protected header, signed", signed(pay, protected=b"\xa2\x04\x48" + KID + b"\x01\x27"), M)
    bad("float in the unprotected header", assemble(prot, pay, sig, unprotected=b"\xa1\x01\xf9\x3c\x00"), M)
    # 2. headers
    bad("alg ES256 (-7)", signed(pay, protected=cbor.encode({1: -7, 4: KID})), H)
    bad("alg Ed25519 (-19, RFC 9864) not accepted in v1", signed(pay, protected=cbor.encode({1: -19, 4: KID})), H)
    bad("crit header present", signed(pay, protected=cbor.encode({1: -8, 2: [99], 4: KID})), H)
    bad("extra protected label", signed(pay, protected=cbor.encode({1: -8, 4: KID, 99: 0})), H)
    bad("kid of 7 bytes", signed(pay, protected=cbor.encode({1: -8, 4: KID[:7]})), H)
    bad("kid as text", signed(pay, protected=cbor.encode({1: -8, 4: KID.hex()})), H)
    bad("kid missing", signed(pay, protected=cbor.encode({1: -8})), H)
    bad("kid only in the unprotected header",
        signed(pay, protected=cbor.encode({1: -8}), unprotected=cbor.encode({4: KID})), H)
    bad("unprotected header not empty", assemble(prot, pay, sig, unprotected=cbor.encode({4: KID})), H)
    # 3. trust
    bad("signed by a key the meter does not trust",
        signed(pay, key=STRANGER, protected=cose.protected_header(STRANGER_KID)), U)
    # 4. signature
    tampered = bytearray(good)
    tampered[tampered.index(bytes([0x03, 0x19, 0x03, 0xE8])) + 3] = 0xE9  # 1000 p -> 1001 p
    bad("amount changed after signing", bytes(tampered), S)
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    bad("signature bit flipped", bytes(flipped), S)
    s_int = int.from_bytes(sig[32:], "little")
    bad("S + L (non-canonical scalar)", assemble(prot, pay, sig[:32] + (s_int + L).to_bytes(32, "little")), S)
    bad("S = L", assemble(prot, pay, sig[:32] + L.to_bytes(32, "little")), S)
    bad("all-zero signature", assemble(prot, pay, bytes(64)), S)
    bad("trusted kid but signed by another key", signed(pay, key=STRANGER), S)
    bad("signature over a re-encoded protected header",
        assemble(b"\xa2\x01\x27\x04\x48" + KID, pay, sign_raw(ISSUER, b"\xa2\x04\x48" + KID + b"\x01\x27", pay)), S)
    bad("valid signature over a different payload", assemble(prot, payload(k3=100000), sig), S)
    # 5. payload (validly signed, so only the payload rules can refuse them)
    bad("unknown payload field 6", signed(payload(k6=1)), M)
    bad("amount missing", signed(payload(k3=None)), M)
    bad("device missing", signed(payload(k1=None)), M)
    bad("issued missing", signed(payload(k4=None)), M)
    bad("amount zero", signed(payload(k3=0)), M)
    bad("amount negative", signed(payload(k3=-5)), M)
    bad("amount above the protocol ceiling", signed(payload(k3=voucher.MAX_AMOUNT + 1)), M)
    bad("sequence zero", signed(payload(k2=0)), M)
    bad("sequence 2^32", signed(payload(k2=2**32)), M)
    bad("device of 7 bytes", signed(payload(k1=DEVICE[:7])), M)
    bad("device as text", signed(payload(k1=DEVICE.hex())), M)
    bad("expires not after issued", signed(payload(k5=ISSUED)), M)
    bad("amount as a boolean", signed(payload(k3=True)), M)
    bad("payload is an array", signed(cbor.encode([DEVICE, 1, 1000, ISSUED])), M)
    bad("payload with unsorted keys", signed(b"\xa4\x02\x01\x01\x48" + DEVICE + b"\x03\x19\x03\xe8\x04" + cbor.encode(ISSUED)), M)
    bad("payload with a non-shortest integer", signed(b"\xa4\x01\x48" + DEVICE + b"\x02\x18\x01\x03\x19\x03\xe8\x04" + cbor.encode(ISSUED)), M)
    bad("payload with trailing bytes", signed(pay + b"\x00"), M)
    bad("payload with a float amount", signed(b"\xa4\x01\x48" + DEVICE + b"\x02\x01\x03\xfb\x40\x8f\x40\x00\x00\x00\x00\x00\x04" + cbor.encode(ISSUED)), M)
    # 6-8. this meter's rules
    bad("voucher for another meter", signed(payload(k1=OTHER_DEVICE)), errors.WRONG_DEVICE)
    bad("amount over the per-voucher maximum", signed(payload(k3=MAX_AMOUNT + 1)), errors.OVER_VOUCHER_LIMIT)
    bad("expired (meter time equals expiry)", signed(payload(k5=NOW)), errors.EXPIRED)
    bad("expired a day ago", signed(payload(k4=NOW - 7 * 86400, k5=NOW - 86400)), errors.EXPIRED)
    bad("expired at another meter time", signed(payload(k5=NOW + 10)), errors.EXPIRED, now=NOW + 10)
    # order: the first failing check is the one reported
    bad("wrong device and expired: device is checked first", signed(payload(k1=OTHER_DEVICE, k5=NOW - 1)), errors.WRONG_DEVICE)
    bad("over limit and expired: limit is checked first", signed(payload(k3=MAX_AMOUNT + 1, k5=NOW - 1)), errors.OVER_VOUCHER_LIMIT)
    bad("unknown key and tampered: trust is checked first",
        bytes(tampered).replace(KID, STRANGER_KID), U)
    bad("bad header and bad signature: header first", assemble(cbor.encode({1: -7, 4: KID}), pay, bytes(64)), H)

    # A mislabelled vector would test nothing: check each against libsodium-backed verify.
    for vec in invalid:
        ctx = dict(CONTEXT, **vec["context"])
        try:
            voucher.verify(bytes.fromhex(vec["hex"]), {KID: ISSUER_PUB}, DEVICE, ctx["now"],
                           MAX_AMOUNT, verify_sig=_nacl_verify)
        except errors.Rejected as e:
            assert errors.name(e.reason) == vec["reason"], (vec["name"], str(e))
        else:
            raise AssertionError("vector accepted: " + vec["name"])

    texts = {
        "valid": [
            {"text": valid[0]["text"], "hex": valid[0]["hex"]},
            {"text": "  otu1:" + valid[0]["text"][5:] + "\n", "hex": valid[0]["hex"]},
        ],
        "invalid": [
            {"name": "no prefix", "text": valid[0]["text"][5:]},
            {"name": "other version prefix", "text": "OTU2:" + valid[0]["text"][5:]},
            {"name": "character outside base45", "text": valid[0]["text"][:20] + "#" + valid[0]["text"][21:]},
            {"name": "dangling character", "text": valid[0]["text"][:-1]},
            {"name": "triple above 65535", "text": "OTU1:GGW"},
        ],
    }
    return {"context": CONTEXT, "valid": valid, "invalid": invalid, "text": texts}


def receipt_vectors():
    sign = lambda m: METER.sign(m).signature  # noqa: E731
    ref = voucher.reference(bytes.fromhex(voucher_vectors_cache["valid"][0]["hex"]))
    chain = []
    prev = receipt.GENESIS
    events = [
        {3: receipt.TOPUP, 6: 0, 7: 1000000, 8: 1, 9: ref, 10: 1000},
        {3: receipt.EMERGENCY, 6: -1500, 7: 498500, 10: 500},
        {3: receipt.REJECTIONS, 6: 498500, 7: 498500, 11: {errors.BAD_SIGNATURE: 3, errors.STALE: 1}},
    ]
    for index, event in enumerate(events):
        fields = {1: DEVICE, 2: index, 4: NOW + 60 * index, 5: prev}
        fields.update(event)
        raw = receipt.encode(METER_KID, sign, fields)
        chain.append({"hex": raw.hex(), "hash": receipt.chain_hash(raw).hex(),
                      "kind": event[3], "index": index})
        prev = receipt.chain_hash(raw)

    good_fields = {1: DEVICE, 2: 0, 3: receipt.TOPUP, 4: NOW, 5: receipt.GENESIS, 6: 0, 7: 1000000,
                   8: 1, 9: ref, 10: 1000}
    prot = cose.protected_header(METER_KID)

    def forged(fields):
        return signed(cbor.encode(fields), key=METER, protected=prot)

    def without(key):
        return {k: v for k, v in good_fields.items() if k != key}

    flipped = bytearray(bytes.fromhex(chain[0]["hex"]))
    flipped[-1] ^= 1
    invalid = [
        {"name": "signature bit flipped", "hex": bytes(flipped).hex(), "reason": "BAD_SIGNATURE"},
        {"name": "signed by an unregistered meter key",
         "hex": signed(cbor.encode(good_fields), key=STRANGER, protected=cose.protected_header(STRANGER_KID)).hex(),
         "reason": "UNKNOWN_KEY"},
        {"name": "kind 9", "hex": forged({**good_fields, 3: 9}).hex(), "reason": "MALFORMED"},
        {"name": "top-up without a voucher reference", "hex": forged(without(9)).hex(), "reason": "MALFORMED"},
        {"name": "prev of 31 bytes", "hex": forged({**good_fields, 5: bytes(31)}).hex(), "reason": "MALFORMED"},
        {"name": "rejection counts in a top-up", "hex": forged({**good_fields, 11: {}}).hex(), "reason": "MALFORMED"},
        {"name": "truncated", "hex": chain[0]["hex"][:-2], "reason": "MALFORMED"},
    ]
    return {"meter_public": METER_PUB.hex(), "meter_kid": METER_KID.hex(), "device": DEVICE.hex(),
            "chain": chain, "invalid": invalid}


def han_vectors():
    valid = []
    for msg_type, msg_id, body in [
        (han.STATUS, 1, {}),
        (han.SUBMIT, 2, {1: bytes.fromhex(voucher_vectors_cache["valid"][0]["hex"])}),
        (han.RECEIPTS, 65535, {1: 0, 2: 4}),
        (han.ERROR, 7, {1: errors.STALE}),
    ]:
        frame = han.encode_message(msg_type, msg_id, body)
        valid.append({"frame": frame.hex(), "type": msg_type, "id": msg_id,
                      "payload": cbor.encode(body).hex()})
    good = bytes.fromhex(valid[0]["frame"])
    invalid = [
        {"name": "CRC changed", "frame": (good[:-2] + bytes([good[-2] ^ 0x40]) + b"\x00").hex()},
        {"name": "COBS code runs past the end", "frame": "0a010200"},
        {"name": "too short to hold a CRC", "frame": "020100"},
    ]
    return {"valid": valid, "invalid": invalid}


def _nacl_verify(public, msg, sig):
    try:
        nacl.signing.VerifyKey(public).verify(msg, sig)
        return True
    except Exception:
        return False


def _verdict(raw):
    # The recorded verdict comes from tests/oracle.py, an independent statement of the SPEC
    # on PyNaCl (it imports nothing from protocol/), so the corpus does not test the code
    # against itself; the code must agree with it (checked here and in the tests).
    from tests import oracle
    expected = oracle.voucher_verdict(raw, {KID: ISSUER_PUB}, DEVICE, NOW, MAX_AMOUNT)
    try:
        voucher.verify(raw, {KID: ISSUER_PUB}, DEVICE, NOW, MAX_AMOUNT, verify_sig=_nacl_verify)
        got = "OK"
    except errors.Rejected as e:
        got = errors.name(e.reason)
    if got != expected:
        raise SystemExit("protocol.voucher says %s, the oracle %s, for %s" % (got, expected, raw.hex()))
    return expected


def fuzz_corpus(count=400):
    """Random and mutated inputs with the verdict CPython+libsodium gives; MicroPython
    must give the same verdict for each and never raise anything but Rejected."""
    rng = random.Random(20261128)
    seeds = [bytes.fromhex(v["hex"]) for v in voucher_vectors_cache["valid"]]
    seeds += [bytes.fromhex(v["hex"]) for v in voucher_vectors_cache["invalid"][:20]]
    corpus = []
    for i in range(count):
        if i % 5 == 0:
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 160)))
        else:
            raw = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(4)
                if op == 0 and raw:
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                elif op == 1 and raw:
                    raw[rng.randrange(len(raw))] = rng.getrandbits(8)
                elif op == 2 and raw:
                    pos = rng.randrange(len(raw))
                    del raw[pos:pos + rng.randrange(1, 8)]
                else:
                    pos = rng.randrange(len(raw) + 1)
                    raw[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4)))
            raw = bytes(raw)
        corpus.append({"hex": raw.hex(), "verdict": _verdict(raw)})
    return {"context": CONTEXT, "inputs": corpus}


voucher_vectors_cache = None


def write(name, data):
    with open(os.path.join(HERE, name), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def main():
    global voucher_vectors_cache
    voucher_vectors_cache = voucher_vectors()
    write("vouchers.json", voucher_vectors_cache)
    write("receipts.json", receipt_vectors())
    write("han.json", han_vectors())
    write("fuzz_corpus.json", fuzz_corpus())
    print("wrote vouchers.json (%d valid, %d invalid), receipts.json, han.json, fuzz_corpus.json"
          % (len(voucher_vectors_cache["valid"]), len(voucher_vectors_cache["invalid"])))


if __name__ == "__main__":
    main()
