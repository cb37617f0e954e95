# The checked-in vectors (protocol/vectors/*.json) on both VMs, with the pure-Python
# Ed25519 verifier: valid vouchers verify to their fields, every invalid one is refused
# with exactly the reason code SPEC.md §2.1 gives it.
from protocol import errors, han, receipt, voucher
from tests.protocol._support import load_vectors, unhex, expect_rejected

V = load_vectors("vouchers.json")


def _context(overrides=None):
    ctx = dict(V["context"])
    if overrides:
        ctx.update(overrides)
    trusted = {unhex(k): unhex(v) for k, v in ctx["trusted"].items()}
    return trusted, unhex(ctx["device"]), ctx["now"], ctx["max_amount"]


def test_valid_vouchers_verify_to_their_fields():
    trusted, device, now, max_amount = _context()
    for vec in V["valid"]:
        raw = unhex(vec["hex"])
        v = voucher.verify(raw, trusted, device, now, max_amount)
        f = vec["fields"]
        assert v.device == unhex(f["device"]), vec["name"]
        assert (v.sequence, v.amount, v.issued, v.expires) == (f["sequence"], f["amount"], f["issued"], f["expires"])
        assert v.kid == unhex(f["kid"]) and v.ref == unhex(f["ref"])
        assert voucher.from_text(vec["text"]) == raw
        assert voucher.to_text(raw) == vec["text"]


def test_every_invalid_voucher_gets_its_reason_code():
    trusted, device, now, max_amount = _context()
    seen = set()
    for vec in V["invalid"]:
        t, d, n, m = _context(vec["context"])
        reason = getattr(errors, vec["reason"])
        e = expect_rejected(reason, voucher.verify, unhex(vec["hex"]), t, d, n, m)
        assert e.detail, vec["name"]
        seen.add(reason)
    for code in (errors.MALFORMED, errors.BAD_HEADER, errors.UNKNOWN_KEY, errors.BAD_SIGNATURE,
                 errors.WRONG_DEVICE, errors.OVER_VOUCHER_LIMIT, errors.EXPIRED):
        assert code in seen, errors.name(code)


def test_stateless_checks_can_be_skipped_for_display():
    # parse() reads a voucher without a trust list, device or clock (topup verify uses it).
    for vec in V["invalid"]:
        if vec["reason"] in ("WRONG_DEVICE", "OVER_VOUCHER_LIMIT", "EXPIRED", "BAD_SIGNATURE", "UNKNOWN_KEY"):
            if vec["reason"] in ("BAD_SIGNATURE", "UNKNOWN_KEY") and "changed" not in vec["name"]:
                continue
            v = voucher.parse(unhex(vec["hex"]))
            assert v.amount >= 1


def test_text_form():
    for vec in V["text"]["valid"]:
        assert voucher.from_text(vec["text"]) == unhex(vec["hex"])
    for vec in V["text"]["invalid"]:
        expect_rejected(errors.MALFORMED, voucher.from_text, vec["text"])


def test_receipt_chain_verifies_and_links():
    R = load_vectors("receipts.json")
    keys = {unhex(R["meter_kid"]): unhex(R["meter_public"])}
    prev = receipt.GENESIS
    for i, vec in enumerate(R["chain"]):
        r = receipt.verify(unhex(vec["hex"]), keys)
        assert r.index == i and r.kind == vec["kind"] and r.device == unhex(R["device"])
        assert r.prev == prev
        assert r.hash == unhex(vec["hash"])
        prev = r.hash
    first = receipt.parse(unhex(R["chain"][0]["hex"]))
    assert (first.sequence, first.amount, first.balance_before, first.balance_after) == (1, 1000, 0, 1000000)
    third = receipt.parse(unhex(R["chain"][2]["hex"]))
    assert third.rejections == {errors.BAD_SIGNATURE: 3, errors.STALE: 1}


def test_invalid_receipts_are_refused():
    R = load_vectors("receipts.json")
    keys = {unhex(R["meter_kid"]): unhex(R["meter_public"])}
    for vec in R["invalid"]:
        expect_rejected(getattr(errors, vec["reason"]), receipt.verify, unhex(vec["hex"]), keys)


def test_han_vectors():
    H = load_vectors("han.json")
    for vec in H["valid"]:
        d = han.Deframer()
        bodies = d.feed(unhex(vec["frame"]))
        assert len(bodies) == 1
        msg_type, msg_id, payload = han.decode_message(bodies[0])
        assert (msg_type, msg_id) == (vec["type"], vec["id"])
        from protocol import cbor
        assert cbor.encode(payload) == unhex(vec["payload"])
    for vec in H["invalid"]:
        d = han.Deframer()
        assert d.feed(unhex(vec["frame"])) == [], vec["name"]
        assert d.dropped == 1


def test_fuzz_corpus_gives_the_recorded_verdicts():
    # Random and mutated inputs, verdicts recorded on CPython with libsodium: both VMs
    # must agree, and nothing but Rejected may escape the decoder.
    C = load_vectors("fuzz_corpus.json")
    trusted, device, now, max_amount = _context()
    for item in C["inputs"]:
        raw = unhex(item["hex"])
        try:
            voucher.verify(raw, trusted, device, now, max_amount)
            verdict = "OK"
        except errors.Rejected as e:
            verdict = errors.name(e.reason)
        assert verdict == item["verdict"], (item["hex"], verdict, item["verdict"])
