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
