"""pytest plugin for the HIL rig (registered under `pytest11`): board options, markers, and
the fixtures that hand a test a flashed, provisioned board.  Board set-up lives here, in one
place; the tests only say what they need.

Options (each with an environment-variable fallback):

    --board virtual|PORT   the board under test (TOPUP_BOARD; default: virtual)
    --han-port PORT        a real board's HAN serial port (TOPUP_HAN_PORT)
    --rig FILE             a bench's rig description file (TOPUP_RIG; docs/bench-rig.md)

Markers:

    @pytest.mark.hil                      runs against the board under test
    @pytest.mark.rig("power_cut", ...)    skip unless the bench has these controls
                                          (hil.transport: power_cut flash_cut wan button
                                          pulses clock relay reboot flash_edit)
    @pytest.mark.meter(initial_credit=..., max_voucher=..., max_credit=..., ec_amount=...,
                       ec_threshold=..., unit_rate=..., standing=...)
                                          how the `board` fixture provisions the meter
                                          (pence, and milli-pence for the tariff)

Fixtures:

    hil_transport   (session) the transport, started and flashed once per session
    issuer          a throwaway supplier database: an active issuer key, the test meter
                    registered; issues through host.issuer (at the rig's time, where the rig
                    has a clock) or the real `topup` CLI
    board_clock     how the board's clock behaves in a power cut: None (the default: as the
                    bench has it; the virtual board has a battery-backed RTC), "rtc" or
                    "no-rtc" (the clock restarts from 2000-01-01 at power-on, as on an ESP32
                    without a battery).  Override it with a parametrized fixture to run
                    tests both ways (tests/hil/test_integrity.py does); a bench board that
                    cannot do what is asked is skipped (its rig file's "rtc" says which it is)
    board           the transport, factory-reset and provisioned for this test through the
                    engineer's path (the supplier's sequence floor and next receipt index, the
                    rig's time; the meter key registered with `issuer`, with the first index
                    and floor the meter reported), WAN down, clock frozen (virtual board)
    han             a HAN client on the board's HAN port

The meter carries its highest sequence, receipt count and meter time through the factory
reset each test starts with (SPEC.md §2.2): `board.public_key.first_index` and `.floor` say
where this test's meter starts.

A control the bench lacks (hil.transport.Unsupported) skips the test with the reason.
"""
import contextlib
import os
import time

import pytest

BOARD_ENV = "TOPUP_BOARD"
HAN_PORT_ENV = "TOPUP_HAN_PORT"
RIG_ENV = "TOPUP_RIG"

TEST_DEVICE = bytes.fromhex("70b3d5f0000000a1")   # the meter the suite provisions
OTHER_DEVICE = bytes.fromhex("70b3d5f0000000a2")  # a neighbour's meter (wrong-device vouchers)
PASSPHRASE = "hil rig passphrase"

# The meter's set-up unless a test's `meter` marker says otherwise (pence; tariff in mp).
DEFAULT_METER = {
    "initial_credit": 1000,      # £10.00
    "max_voucher": 5000,         # £50.00
    "max_credit": 20000,         # £200.00
    "ec_amount": 500,            # £5.00
    "ec_threshold": 100,         # £1.00
    "unit_rate": 24500,          # 24.5 p/kWh
    "standing": 60000,           # 60 p/day (a bench without clock control: 1 mp/day, below)
}
# firmware/meter/config.py keys
_LIMIT_KEYS = {"max_voucher": 5, "max_credit": 6, "ec_amount": 7, "ec_threshold": 8,
               "unit_rate": 9, "standing": 10}


def pytest_addoption(parser):
    group = parser.getgroup("offline-topup rig")
    group.addoption("--board", default=None, metavar="virtual|PORT",
                    help="board under test: 'virtual' or a serial port (env TOPUP_BOARD; default virtual)")
    group.addoption("--han-port", default=None, metavar="PORT",
                    help="the HAN serial port of a real board (env TOPUP_HAN_PORT)")
    group.addoption("--rig", default=None, metavar="FILE",
                    help="rig description file for a bench board (env TOPUP_RIG)")


def pytest_configure(config):
    config.addinivalue_line("markers", "hil: runs against the board under test (virtual or real)")
    config.addinivalue_line("markers", "rig(*capabilities): skip unless the bench has these controls "
                                       "(power_cut flash_cut wan button pulses clock relay reboot "
                                       "flash_edit)")
    config.addinivalue_line("markers", "meter(**settings): how the board fixture provisions the meter "
                                       "(initial_credit, max_voucher, max_credit, ec_amount, "
                                       "ec_threshold in pence; unit_rate mp/kWh; standing mp/day)")


def board_option(config):
    """(board, han_port, rig path) from the options or their environment variables."""
    board = config.getoption("--board") or os.environ.get(BOARD_ENV) or "virtual"
    han_port = config.getoption("--han-port") or os.environ.get(HAN_PORT_ENV)
    rig = config.getoption("--rig") or os.environ.get(RIG_ENV)
    return board, han_port, rig


def pytest_report_header(config):
    board, han_port, rig = board_option(config)
    if board == "virtual":
        return "board under test: the virtual board"
    return "board under test: %s (HAN %s, rig %s)" % (board, han_port or "?", rig or "none")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    from hil.transport import Unsupported
    try:
        return (yield)
    except Unsupported as e:
        pytest.skip(str(e))


# --- the transport, once per session ------------------------------------------------------------
@pytest.fixture(scope="session")
def hil_transport(request, tmp_path_factory):
    """The board under test, started and flashed once for the session."""
    from hil.transport import TransportError, open_transport
    board, han_port, rig = board_option(request.config)
    if board == "virtual":
        import shutil
        from hil import virtual
        if not shutil.which("node") or not virtual._package_entry().exists():
            pytest.skip("the virtual board needs Node.js and the MicroPython npm package (make setup)")
    try:
        t = open_transport(board, han_port=han_port, rig=rig,
                           workdir=tmp_path_factory.mktemp("virtual-board"))
        t.start()
    except TransportError as e:
        pytest.fail("board under test: %s" % e, pytrace=False)
    try:
        t.flash()
        yield t
    finally:
        t.close()


# --- the supplier ---------------------------------------------------------------------------------
class Issuer:
    """A throwaway supplier database with an active key and the test meter registered.

    issue(amount)      vouchers through host.issuer (the issuer's own checks and reservation)
    issue_cli(amount)  vouchers through the real `topup issue` command (text form, parsed back)
    cli(*args)         any `topup` command on this database (click's CliRunner; .exit_code, .stdout)
    sign(seq, amount)  a voucher signed with the real key OUTSIDE the issuer (bad-input tests)
    verify_receipt(r)  a receipt checked against the meter key registered here
    """

    def __init__(self, path, device=TEST_DEVICE, max_voucher=None, max_credit=None):
        from host import db, keystore, registry
        self.path = str(path)
        self.device = device
        self.clock = None            # the rig's clock (a callable), if it has one: issue time
        self.eui = registry.format_eui64(device)
        # A throwaway key: argon2id at its minimum, for the rig's key and every `topup` the
        # rig runs (otherwise each unlock would re-seal it at MODERATE, about 1 s each).
        self.env = {"TOPUP_DB": self.path, "TOPUP_PASSPHRASE": PASSPHRASE, keystore.FAST_KDF_ENV: "1"}
        self.conn = db.create(self.path)
        with _fast_kdf():
            keystore.new_key(self.conn, PASSPHRASE)
            self.signer = keystore.unlock_active(self.conn, PASSPHRASE)
            # the supplier's keypad-code key (host.keystore.CodeKey)
            info = keystore.new_code_key(self.conn, PASSPHRASE)
            self.code_key = keystore.unlock_code_key(self.conn, PASSPHRASE, info.kid)
        kw = {}
        if max_voucher is not None:
            kw["max_voucher"] = max_voucher
        if max_credit is not None:
            kw["max_credit"] = max_credit
        registry.add_device(self.conn, device, **kw)

    def close(self):
        self.conn.close()

    def reload_signer(self):
        """Sign with the database's active issuer key (after `topup key new --activate`)."""
        from host import keystore
        with _fast_kdf():
            self.signer = keystore.unlock_active(self.conn, PASSPHRASE)

    # the registry
    @property
    def record(self):
        from host import registry
        return registry.get_device(self.conn, self.device)

    def trust(self):
        """The issuer public keys a meter provisioned from this database trusts."""
        from host import keystore
        return list(keystore.trusted(self.conn).values())

    def register_meter_key(self, public):
        """Register a provisioning's meter key (a MeterKey: its first receipt index and the
        meter's sequence floor go with it)."""
        from host import registry
        registry.set_public_key(self.conn, self.device, public)

    def meter_keys(self):
        """{kid: public key} of every meter key the device has had."""
        from host import registry
        from protocol import cose
        return {cose.kid_for(k.public_key): k.public_key
                for k in registry.device_keys(self.conn, self.device)}

    def verify_receipt(self, raw):
        """Verify a receipt with the meter key registered for its index's span (SPEC.md §4:
        each key signs the receipts from its first index to the next key's), with libsodium;
        return it parsed."""
        from host import registry
        from host.verify import nacl_verify
        from protocol import cose, receipt
        index = receipt.parse(raw).index
        key = registry.span_key(registry.device_keys(self.conn, self.device), index)
        keys = {cose.kid_for(key.public_key): key.public_key} if key is not None else {}
        return receipt.verify(raw, keys, nacl_verify)

    def floor(self):
        """The highest sequence issued for the meter: what a provisioning asks it to refuse."""
        from host import registry
        return registry.issued_floor(self.conn, self.device)

    def next_first_index(self):
        from host import registry
        return registry.next_first_index(self.conn, self.device)

    # issuing
    def _now(self):
        t = self.clock() if self.clock is not None else None
        return int(time.time()) if t is None else int(t)

    def issue(self, amount, count=1, expires_in=None, device=None):
        """[voucher bytes] of `amount` pence, through the issuer (sequence reserved first),
        issued at the rig's time if it has a clock."""
        from host import issuer
        now = self.clock() if self.clock is not None else None
        return [v.cose for v in issuer.issue(self.conn, self.signer, device or self.device, amount,
                                              count, expires_in=expires_in, now=now)]

    def issue_codes(self, amount, count=1):
        """[20-digit code] of `amount` pence through the issuer (sequences reserved first, the
        same sequence space as vouchers: SPEC.md §8), under the code key the meter has."""
        from host import issuer
        now = self.clock() if self.clock is not None else None
        return [c.code for c in issuer.issue_codes(self.conn, self.code_key, self.device, amount,
                                                   count, now=now)]

    def code_cli(self, amount):
        """One code from `topup code EUI64 AMOUNT` (its 20 digits, as printed, unspaced)."""
        r = self.cli("code", self.eui, amount)
        if r.exit_code:
            raise AssertionError("topup code failed (%d): %s" % (r.exit_code, r.stderr))
        digits = "".join(ch for ch in r.stdout if ch.isdigit())
        assert len(digits) == 20, r.stdout
        return digits

    def cli(self, *args, input=None):
        from click.testing import CliRunner
        try:
            from topup_cli import cli           # the whole `topup`: supplier's and engineer's
        except ImportError:
            from host.cli import cli
        return CliRunner().invoke(cli, [str(a) for a in args], env=self.env, input=input,
                                  catch_exceptions=False)

    def issue_cli(self, amount, count=1, *extra):
        """[voucher bytes] from `topup issue EUI64 AMOUNT --count N` (text form on stdout)."""
        from protocol import voucher
        r = self.cli("issue", self.eui, amount, "--count", count, *extra)
        if r.exit_code:
            raise AssertionError("topup issue failed (%d): %s" % (r.exit_code, r.stderr))
        lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
        assert len(lines) == count, r.stdout
        return [voucher.from_text(ln) for ln in lines]

    def sign(self, sequence, amount, device=None, expires=None, issued=None):
        from protocol import voucher
        return voucher.encode(self.signer.kid, self.signer.sign, device or self.device, sequence,
                              amount, self._now() if issued is None else issued, expires)


@contextlib.contextmanager
def _fast_kdf():
    """argon2id at its minimum while the rig unseals its throwaway keys."""
    from host import keystore
    saved = os.environ.get(keystore.FAST_KDF_ENV)
    os.environ[keystore.FAST_KDF_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[keystore.FAST_KDF_ENV]
        else:
            os.environ[keystore.FAST_KDF_ENV] = saved


@pytest.fixture
def issuer(tmp_path, request):
    m = request.node.get_closest_marker("meter")
    settings = dict(DEFAULT_METER, **(m.kwargs if m else {}))
    iss = Issuer(tmp_path / "supplier.db", max_voucher=settings["max_voucher"],
                 max_credit=settings["max_credit"])
    yield iss
    iss.close()


# --- the board ------------------------------------------------------------------------------------
class BoardUnderTest:
    """The session's transport, provisioned for one test.  Everything the transport offers
    (han(), rig controls, power cuts, capabilities …) plus what this meter was given:
    device, public_key, settings (DEFAULT_METER merged with the `meter` marker), opening_mp.
    `reprovision()` starts the meter afresh (factory reset, same settings): the model-based
    test calls it once per example."""

    def __init__(self, transport, issuer, settings):
        self.transport = transport
        self.issuer = issuer
        self.settings = settings
        self.device = issuer.device
        self.public_key = None       # a MeterKey: .first_index, .floor as the meter reported
        self.provisioned_now = None  # the time provisioning asked the meter for
        self.commands = False        # install the supplier's command key (SPEC.md §10)
        self.supplier_floor = 0      # the supplier's figures it was provisioned with
        self.supplier_first = 0

    def __getattr__(self, name):
        return getattr(self.transport, name)

    @property
    def opening_mp(self):
        return self.settings["initial_credit"] * 1000

    @property
    def limits(self):
        return {_LIMIT_KEYS[k]: v for k, v in self.settings.items() if k in _LIMIT_KEYS}

    def reprovision(self, initial_credit=None):
        """Factory reset and provision through the engineer's path: the supplier's highest
        issued sequence and next receipt index, the rig's time (the host's on a bench)."""
        from hil.transport import WAN
        t = self.transport
        if hasattr(t, "ensure_up"):
            t.ensure_up()
        if t.has(WAN):
            t.set_wan(False)
        credit = self.settings["initial_credit"] if initial_credit is None else initial_credit
        now = t.clock()
        self.provisioned_now = int(time.time()) if now is None else now
        self.supplier_floor = self.issuer.floor()
        self.supplier_first = self.issuer.next_first_index()
        code_key = getattr(self.issuer, "code_key", None)
        if code_key is None:
            self.public_key = t.provision(self.device, self.issuer.trust(), self.limits, credit,
                                          factory_reset=True, now=self.provisioned_now,
                                          floor=self.supplier_floor, first_index=self.supplier_first)
        else:
            # The engineer's path with the supplier's code key (SPEC.md §8): the meter makes
            # its key-agreement key, registered below with the receipt key.
            from hil.flashing import provision
            from host import keystore
            command = keystore.active_command_key(self.issuer.conn) if self.commands else None
            self.public_key = provision(t.repl_port, bytes(self.device), list(self.issuer.trust()),
                                        self.limits, credit, True, now=self.provisioned_now,
                                        floor=self.supplier_floor, first_index=self.supplier_first,
                                        code_key=code_key.public_key,
                                        command_key=command and command.public_key)
            t.wait_meter(device=bytes(self.device))
        self.issuer.register_meter_key(self.public_key)
        return self


def meter_settings(request, transport):
    from hil.transport import CLOCK
    m = request.node.get_closest_marker("meter")
    settings = dict(DEFAULT_METER)
    if not transport.has(CLOCK):
        # The board's clock runs: 1 mp/day accrues nothing within a test, so the figures a
        # test expects stay exact.  A test that sets `standing` itself needs the clock.
        settings["standing"] = 1
    if m:
        unknown = set(m.kwargs) - set(DEFAULT_METER)
        if unknown:
            raise pytest.UsageError("meter marker: unknown settings %s" % sorted(unknown))
        settings.update(m.kwargs)
    return settings


@pytest.fixture
def board_clock():
    """None: the bench's own clock (the virtual board: a battery-backed RTC); "rtc" or
    "no-rtc" to ask for one (override this fixture, parametrized, to run tests both ways)."""
    return None


@pytest.fixture
def board(request, hil_transport, issuer, board_clock):
    """A flashed board, factory-reset and provisioned as this test's meter; WAN down."""
    from hil.transport import CLOCK, Unsupported, VirtualTransport
    rig = request.node.get_closest_marker("rig")
    m = request.node.get_closest_marker("meter")
    try:
        if rig:
            hil_transport.require(*rig.args)
        if m and "standing" in m.kwargs:
            hil_transport.require(CLOCK)
        if board_clock is not None:
            if board_clock not in ("rtc", "no-rtc"):
                raise pytest.UsageError("board_clock must be None, 'rtc' or 'no-rtc'")
            hil_transport.set_clock_survives(board_clock == "rtc")
        elif isinstance(hil_transport, VirtualTransport):
            hil_transport.set_clock_survives(True)       # the virtual board's default
    except Unsupported as e:
        pytest.skip(str(e))
    if hil_transport.has(CLOCK):
        issuer.clock = hil_transport.clock
    b = BoardUnderTest(hil_transport, issuer, meter_settings(request, hil_transport))
    b.reprovision()
    return b


@pytest.fixture
def han(board):
    client = board.han()
    yield client
    client.close()


# --- the PPMID: a second virtual board on the meter's HAN ----------------------------------------
@pytest.fixture(scope="session")
def hil_ppmid(request, tmp_path_factory, hil_transport):
    """A virtual PPMID board (firmware/ppmid/), started and flashed once for the session.
    The two-board rig needs the virtual meter (its HAN's second port is the cable's end)."""
    from hil.transport import VirtualTransport
    if not isinstance(hil_transport, VirtualTransport):
        pytest.skip("the two-board rig (a PPMID on the meter's HAN) needs the virtual board")
    from hil.two_board import Ppmid, flash_ppmid
    from hil.virtual import VirtualBoard
    vb = VirtualBoard(tmp_path_factory.mktemp("virtual-ppmid"), clock=hil_transport.clock(),
                      freeze=True)
    vb.start()
    try:
        flash_ppmid(vb.repl_port)
        yield Ppmid(vb)
    finally:
        vb.stop()


@pytest.fixture
def ppmid(board, hil_ppmid):
    """The session's PPMID, freshly booted, joined to this test's meter by a cable (the rig
    presses its keys and reads its display: hil.two_board.Ppmid); `ppmid.cable` unplugs."""
    from hil.two_board import Cable
    vb = hil_ppmid.board
    if not vb.running:
        vb.start()
    cable = Cable(board.transport.board.link_port, vb.han_port)
    hil_ppmid.cable = cable
    try:
        gen = vb.display()["gen"]
        vb.hard_reset()
        hil_ppmid.wait_for("Credit \u00a3", timeout=15, since=gen)     # its own first status
        yield hil_ppmid
    finally:
        cable.close()
        hil_ppmid.cable = None
