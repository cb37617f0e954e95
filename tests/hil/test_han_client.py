"""The PPMID's HAN client against the meter's HAN server, in one process: every request,
the reason codes, and a meter that does not answer."""
import pytest

from hil.han_client import HanClient, HanError, HanTimeout
from protocol import errors, receipt
from tests.firmware._meterkit import Kit, issue, DEVICE
from meter.han_server import HanServer


class Loopback:
    """Client side of a HAN link whose far end is a HanServer polled on every read."""

    def __init__(self, server_pipe, server):
        self.pipe = server_pipe
        self.server = server

    def write(self, data):
        self.pipe.incoming.extend(data)

    def read(self, n):
        self.server.poll()
        out = bytes(self.pipe.outgoing[:n])
        del self.pipe.outgoing[:n]
        return out


class Pipe:
    def __init__(self):
        self.incoming = bytearray()
        self.outgoing = bytearray()

    def read(self, n):
        data = bytes(self.incoming[:n])
        del self.incoming[:n]
        return data

    def write(self, data):
        self.outgoing.extend(data)


@pytest.fixture
def meter():
    kit = Kit(initial=1000)
    pipe = Pipe()
    server = HanServer(kit.ledger, pipe)
    return kit, HanClient(Loopback(pipe, server), timeout=1.0)


def test_status_submit_and_receipts(meter):
    kit, client = meter
    st = client.status()
    assert st["device"] == DEVICE and st["balance_mp"] == 1000000 and st["receipt_count"] == 0
    raws = []
    for seq in range(1, 7):
        raw, dup = client.submit(issue(seq, 10))
        assert not dup
        raws.append(raw)
    again, dup = client.submit(issue(3, 10))
    assert dup and again == raws[2]
    assert client.receipts() == raws
    assert client.receipts(start=5) == raws[5:]
    assert [receipt.verify(r, kit.meter_keys()).index for r in raws] == list(range(6))
    assert client.status()["balance_mp"] == 1060000


def test_refusal_carries_the_reason_code(meter):
    kit, client = meter
    with pytest.raises(HanError) as e:
        client.submit(issue(1, 10, device=b"\x00" * 8))
    assert e.value.reason == errors.WRONG_DEVICE
    assert "WRONG_DEVICE" in str(e.value)


def test_silent_meter_times_out():
    client = HanClient(Pipe(), timeout=0.2)
    with pytest.raises(HanTimeout):
        client.status()


# --- keypad codes and customer actions (issue 11) ------------------------------------------
# A meter provisioned with a supplier code key, and codes the supplier's real issuer makes
# for it (host.issuer with a code key sealed in a real database): what the supplier issues,
# this meter's firmware takes, over the client's requests 5 and 6.

@pytest.fixture
def code_meter(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPUP_INSECURE_FAST_KDF", "1")
    from boards.nor import NorFlash
    from meter import config as cfg, provisioning
    from meter.ledger import Ledger
    from meter.store import Store
    from tests.firmware._meterkit import Clock, T0, _ProvisioningBoard, public, ISSUER_SEED
    from host import db, issuer as host_issuer, keystore, registry
    conn = db.create(str(tmp_path / "s.db"))
    keystore.new_key(conn, "pw")
    info = keystore.active_code_key(conn)
    clock = Clock(T0)
    flash = NorFlash(blocks=16)
    store = Store(flash)
    store.mount()
    meter_public = provisioning.provision(store, _ProvisioningBoard(clock), DEVICE,
                                          [public(ISSUER_SEED)], None, 0, T0,
                                          code_key=info.public_key)
    ka = cfg.decode(store.config)[cfg.C_KA_PUBLIC]
    registry.add_device(conn, DEVICE, public_key=meter_public, ka_public=ka, code_kid=info.kid)
    code_key = keystore.unlock_code_key(conn, "pw", info.kid)
    store = Store(flash)                  # the meter starts, as after provisioning
    store.mount()
    ledger = Ledger(store, clock)
    pipe = Pipe()
    server = HanServer(ledger, pipe)
    client = HanClient(Loopback(pipe, server), timeout=1.0)

    def codes(amount, n=1):
        return [c.code for c in host_issuer.issue_codes(conn, code_key, DEVICE, amount, n,
                                                        now=T0)]
    yield client, codes, meter_public
    conn.close()


def _grouped(digits, sep=" "):
    return sep.join(digits[i:i + 4] for i in range(0, 20, 4))


def test_supplier_codes_credit_the_meter_once_then_arm_and_confirm(code_meter):
    client, codes, meter_public = code_meter
    st = client.status()
    assert st["takes_codes"] is True and st["supply_state"] == 0      # no opening credit
    assert st["code_tries_left"] == 5 and st["code_locked_s"] == 0
    a, b = codes(250, 2)
    raw, dup = client.submit_code(_grouped(a))
    from protocol.cose import kid_for
    r = receipt.verify(raw, {kid_for(meter_public): meter_public})
    assert not dup and r.form == receipt.FORM_CODE and r.sequence == 1 and r.amount == 250
    assert r.supply == 1 and r.balance_after == 250000               # armed, not on
    again, dup = client.submit_code(_grouped(a, "-"))                 # typed with dashes
    assert dup and again == raw
    assert client.status()["balance_mp"] == 250000
    assert client.confirm() == 2 and client.status()["supply_state"] == 2
    raw_b, _ = client.submit_code(b)
    assert receipt.parse(raw_b).sequence == 2 and client.status()["balance_mp"] == 500000


def test_code_refusals_carry_tries_left_and_lockout(code_meter):
    client, codes, _ = code_meter
    (good,) = codes(100)
    with pytest.raises(HanError) as e:
        client.submit_code(good[:-1])
    assert e.value.reason == errors.CODE_INCOMPLETE and "20 digits" in str(e.value)
    typo = good[:5] + str((int(good[5]) + 1) % 10) + good[6:]
    with pytest.raises(HanError) as e:
        client.submit_code(typo)
    assert e.value.reason == errors.CODE_TYPO and "does not count" in str(e.value)
    assert client.status()["code_tries_left"] == 5
    # a code with a fitting check digit and a wrong MAC: four more tries, then none
    from protocol import keycode
    body = "%019d" % ((int(good[:19]) ^ 1))
    wrong = body + str(next(c for c in range(10) if keycode.damm(body + str(c)) == 0))
    for left in (4, 3, 2, 1, 0):
        with pytest.raises(HanError) as e:
            client.submit_code(wrong)
        assert e.value.reason == errors.CODE_WRONG and e.value.tries_left == left
    assert "code entry is now locked" in str(e.value)
    with pytest.raises(HanError) as e:
        client.submit_code(good)                                      # even a good one
    assert e.value.reason == errors.CODE_LOCKED and 3500 < e.value.locked_s <= 3600
    assert "60 min more" in str(e.value) and "vouchers are still accepted" in str(e.value)
    st = client.status()
    assert st["code_locked_s"] == e.value.locked_s and st["code_tries_left"] == 0
    # a signed voucher is never locked out
    raw, dup = client.submit(issue(2, 100))
    assert not dup and receipt.parse(raw).sequence == 2
    assert client.status()["balance_mp"] == 100000


def test_emergency_credit_switches_an_interrupted_supply_on(code_meter):
    client, _, _ = code_meter
    state, raw = client.emergency()
    r = receipt.parse(raw)
    assert state == 2 and r.kind == receipt.EMERGENCY and r.supply == 2
    assert client.status()["supply_state"] == 2


def test_error_fields_are_read_and_explained():
    from hil.han_client import minutes
    assert HanError(errors.CODE_LOCKED, 3541).locked_s == 3541
    assert "60 min more" in str(HanError(errors.CODE_LOCKED, 3541))
    assert minutes(61) == "2 min" and minutes(7200) == "2 h 00 min"
    assert HanError(errors.CODE_WRONG, None, True).tries_left is None   # a bool is no count
    assert str(HanError(errors.STALE)) == "meter refused: STALE (8)"
