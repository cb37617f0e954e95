"""The engineer's commands of `topup`: flash and provision a board, run a virtual board,
and play the PPMID over the HAN. topup_cli/ composes them with the supplier's commands
(host/cli.py) into the `topup` group."""
import sys
import tempfile
import time

import click

from host import delivery, keystore, receipts_io, reconcile, registry
from host.errors import TopupError
from host.money import format_mp, parse_pence
from protocol import errors, receipt as receipt_format

PORT_ENV = "TOPUP_PORT"
HAN_PORT_ENV = "TOPUP_HAN_PORT"


def _progress_bar(label):
    """A rich progress callback on a terminal; silence elsewhere (scripts, CI logs)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
    bar = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TextColumn("{task.description}"),
                   transient=True)
    bar.start()
    task = bar.add_task("", total=1)

    def update(done, total, name):
        bar.update(task, completed=done, total=total, description=name)
    return update, bar.stop


def _required_port(env, what):
    """An option callback: the port, or a one-line error naming --port and `env`."""
    def check(ctx, param, value):
        if not value:
            raise TopupError("no %s: give --port PORT or set %s" % (what, env))
        return value
    return check


def _board_errors(fn, *args, **kwargs):
    from hil.flashing import FlashError
    try:
        return fn(*args, **kwargs)
    except FlashError as e:
        raise TopupError(str(e)) from None


@click.command(short_help="Put the meter firmware on a board (mpy-cross, mpremote, SHA-256).")
@click.option("--port", "-p", envvar=PORT_ENV, metavar="PORT",
              callback=_required_port(PORT_ENV, "board port (the REPL's serial port)"),
              help="The board's REPL serial port (env %s)." % PORT_ENV)
@click.option("--source", is_flag=True, help="Copy .py sources instead of compiled .mpy files.")
@click.option("--no-reset", is_flag=True,
              help="Leave the board at its REPL afterwards: the meter application does not run "
                   "(and the HAN does not answer) until the board is reset.")
def flash(port, source, no_reset):
    """Put the meter firmware on a board: compile with mpy-cross for the board's MicroPython,
    copy with mpremote, check every file by SHA-256, soft-reset."""
    from hil.flashing import flash as do_flash
    progress, done = _progress_bar("flashing")
    try:
        r = _board_errors(do_flash, port, progress=progress, source=source, reset=not no_reset)
    finally:
        done()
    click.echo("flashed %d files (%d bytes, .mpy %s) to MicroPython %s on %s in %.1f s; all verified"
               % (r["files"], r["bytes"], r["bytecode"], r["version"], r["platform"], r["seconds"]))


@click.command(short_help="Provision a flashed board as a registered meter.")
@click.option("--port", "-p", envvar=PORT_ENV, metavar="PORT",
              callback=_required_port(PORT_ENV, "board port (the REPL's serial port)"),
              help="The board's REPL serial port (env %s)." % PORT_ENV)
@click.option("--device", "device", required=True, metavar="EUI64", help="The meter's EUI-64.")
@click.option("--initial-credit", default="0", metavar="AMOUNT", help="Opening balance, e.g. 5.00.")
@click.option("--ec-amount", metavar="AMOUNT", help="Emergency credit a button press grants (default £5).")
@click.option("--ec-threshold", metavar="AMOUNT", help="Offered below this balance (default £1).")
@click.option("--unit-rate", type=click.IntRange(1, 10**7), metavar="MP_PER_KWH",
              help="Unit rate in milli-pence per kWh (default 24500 = 24.5 p/kWh).")
@click.option("--standing-charge", type=click.IntRange(0, 10**8), metavar="MP_PER_DAY",
              help="Standing charge in milli-pence per day (default 60000).")
@click.option("--factory-reset", is_flag=True,
              help="Wipe a provisioned board's ledger and key first (it keeps its sequence "
                   "floor and receipt count; receipts the supplier lacks are read out first).")
@click.pass_obj
def provision(state, port, device, initial_credit, ec_amount, ec_threshold, unit_rate,
              standing_charge, factory_reset):
    """Provision a flashed board as a registered device: identity, trust list (this
    database's issuer keys), limits, tariff and clock; register the meter's new receipt key
    as a new key epoch (its first receipt index and sequence floor).

    The meter is told the highest sequence issued for it (every voucher up to it is then
    refused: `topup reconcile` counts the unredeemed ones stale, refund due) and the next
    receipt index; it keeps the larger of each and of what a factory reset carried."""
    from hil.flashing import provision as do_provision
    eui = registry.parse_eui64(device)
    conn = state.conn
    dev = registry.get_device(conn, eui)
    keys = list(keystore.trusted(conn).values())
    if not keys:
        raise TopupError("no issuer key to trust: create one with `topup key new`")
    limits = {5: dev.max_voucher, 6: dev.max_credit}   # firmware/meter/config.py C_MAX_*
    if ec_amount:
        limits[7] = parse_pence(ec_amount, what="emergency credit")
    if ec_threshold:
        limits[8] = parse_pence(ec_threshold, what="emergency threshold")
    if unit_rate:
        limits[9] = unit_rate
    if standing_charge:
        limits[10] = standing_charge
    initial = 0 if initial_credit in ("0", "0.00") else parse_pence(initial_credit, what="initial credit")
    if initial > dev.max_credit:
        raise TopupError("initial credit is over the device's maximum credit")
    now = int(time.time())
    floor = registry.issued_floor(conn, eui)

    def rescue(raws, why):
        """Before the factory reset: store what the meter holds that the supplier may not."""
        if why is not None:
            click.echo("topup: warning: could not read the meter's receipts before the reset "
                       "(%s); any it had not uploaded are lost" % why, err=True)
            return None
        mine, skipped = [], 0
        for raw in raws:
            try:
                r = receipts_io.parse(raw)
            except errors.Rejected:
                skipped += 1
                continue
            if r.device == eui:
                mine.append(raw)
            else:
                skipped += 1
        new = 0
        if mine:
            new = reconcile.import_raw(conn, mine, "%s: read out before a factory reset" % port).new
        if raws:
            click.echo("read out %d receipt(s) before the factory reset: %d new, stored%s"
                       % (len(mine), new, "; %d not this meter's or not receipts, left"
                          % skipped if skipped else ""))
        return registry.next_first_index(conn, eui)

    public = _board_errors(do_provision, port, eui, keys, limits, initial, factory_reset,
                           now=now, floor=floor, first_index=registry.next_first_index(conn, eui),
                           before_reset=rescue if factory_reset else None)
    if public.reset is not None:
        click.echo("factory reset: the meter carried sequence floor %d and receipt index %d"
                   % public.reset)
    try:
        record = registry.set_public_key(conn, eui, public, now=now)
    except TopupError as e:
        raise TopupError("the board is provisioned but its key could not be registered: %s"
                         % e) from None
    epoch = registry.device_keys(conn, eui)[-1]
    click.echo("provisioned %s on %s; trusts %d issuer key(s); receipt key %s registered "
               "(key epoch %d: receipts from #%d; sequences up to %d refused, next issued %d)"
               % (registry.format_eui64(eui), port, len(keys), public.hex(), epoch.epoch,
                  public.first_index, public.floor, record.next_sequence))
    if public.floor:
        click.echo("note: vouchers up to sequence %d can no longer be applied on this meter; "
                   "`topup reconcile` counts those never redeemed stale (refund due)"
                   % public.floor, err=True)


@click.command(short_help="Run a virtual meter board, driven from the console.")
@click.option("--workdir", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep the board's filesystem and flash here (default: a temporary folder).")
@click.option("--wan/--no-wan", default=False, help="Initial WAN status (default down).")
@click.option("--flash-firmware", is_flag=True, help="Flash the meter firmware once it is up.")
@click.option("--no-rtc", is_flag=True,
              help="The board's clock restarts from 2000-01-01 at every power-on, as on an ESP32 "
                   "without a battery-backed RTC (default: it keeps time through a power cut).")
def sim(workdir, wan, flash_firmware, no_rtc):
    """Start a virtual meter board, print its ports, and take console commands on standard
    input (`help` lists them: WAN, button, pulses, time, power) until `quit` or Ctrl-C."""
    from hil import sim_console
    from hil.virtual import VirtualBoard, VirtualBoardError
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="topup-sim-")
        workdir = tmp.name
    board = VirtualBoard(workdir, wan=wan, clock_survives=not no_rtc)
    try:
        board.start()
    except VirtualBoardError as e:
        raise TopupError(str(e)) from None
    try:
        if flash_firmware:
            from hil.flashing import flash as do_flash
            _board_errors(do_flash, board.repl_port)
        click.echo("REPL port  %s" % board.repl_port)
        click.echo("HAN port   %s" % board.han_port)
        click.echo("WAN port   %s" % board.wan_port)
        click.echo("workdir    %s" % workdir)
        click.echo("try:       topup han status --port %s" % board.han_port)
        click.echo("           topup headend --port %s" % board.wan_port)
        # An mpremote session interrupts the meter application (as on any board); its
        # `reset` at the end starts it again.
        click.echo("           mpremote connect %s exec \"print(1)\" reset" % board.repl_port)
        click.echo("console:   wan up|down, button, pulses N, advance SECONDS, power off|on, "
                   "status, help, quit", err=True)
        click.echo("Ctrl-C stops the board.", err=True)
        if sim_console.run(board, _stdin_lines(), click.echo):
            return 0
        while board.running:          # input closed: run until Ctrl-C
            time.sleep(0.5)
        raise TopupError("the virtual board stopped unexpectedly")
    except KeyboardInterrupt:
        return 0
    finally:
        board.stop()
        if tmp is not None:
            tmp.cleanup()


def _stdin_lines():
    """Console lines from standard input; none if it is closed or not readable."""
    stream = click.get_text_stream("stdin")
    try:
        if stream is None or stream.closed:
            return
        for line in stream:
            yield line
    except (OSError, ValueError):
        return


@click.group()
def han():
    """Play the PPMID: talk to a meter over its HAN port."""


def _client(port, timeout):
    from hil.han_client import HanClient, HanTimeout
    try:
        return HanClient.open(port, timeout=timeout)
    except HanTimeout as e:
        raise TopupError(str(e)) from None


def _han_call(fn, *args):
    from hil.han_client import HanError, HanTimeout
    try:
        return fn(*args)
    except HanTimeout as e:
        raise TopupError("%s on the HAN port: is the meter application running? (an mpremote "
                         "session, or `topup flash --no-reset`, leaves the board at its REPL; "
                         "`mpremote connect REPL_PORT reset` starts it again)" % e) from None
    except HanError as e:
        refused = TopupError(str(e))
        refused.exit_code = 1  # the meter said no: not a usage mistake
        raise refused from None


_port = click.option("--port", "-p", envvar=HAN_PORT_ENV, metavar="PORT",
                     callback=_required_port(HAN_PORT_ENV, "HAN port"),
                     help="The meter's HAN serial port (env %s)." % HAN_PORT_ENV)
_timeout = click.option("--timeout", type=click.FloatRange(0, 3600, min_open=True), default=5.0,
                        show_default=True, help="Seconds to wait for the meter.")


@han.command("status")
@_port
@_timeout
def han_status(port, timeout):
    """The meter's identity, balance, supply and WAN state, window, receipt count, clock,
    sequence floor and flash health."""
    from protocol import han as han_format
    with _client(port, timeout) as c:
        raw = _han_call(c.request, han_format.STATUS, {})
    for line in status_lines(raw):
        click.echo(line)


def status_lines(raw):
    """A status response (SPEC.md §5, {field: value}) in plain words, one line per field;
    fields an older meter does not send are left out."""
    from host.reconcile import describe_faults
    g = raw.get
    out = [
        ("device", registry.format_eui64(g(1)) if g(1) else "(not provisioned)"),
        ("firmware", g(2)),
        ("balance", _mp(g(3) or 0)),
        ("emergency credit", "in use (%s)" % _mp(g(8)) if g(8) else "not in use"),
        ("supply", "on" if g(4) else "OFF"),
        ("WAN", "up" if g(5) else "down"),
        ("highest sequence", "%d" % (g(6) or 0)),
        ("receipts", "%d" % (g(7) or 0)),
    ]
    if g(12) is not None:
        out.append(("sequence floor", "%d (every voucher up to it is refused as stale)" % g(12)
                    if g(12) else "0"))
    if g(10) is not None:
        out.append(("meter time", "%s (%d)%s" % (delivery.utc(g(10)), g(10),
                                                 ", resumed from its floor at start-up: the "
                                                 "board clock was not believable" if g(11)
                                                 else "")))
    if g(9) is not None:
        out.append(("flash faults", "none" if not any((g(9) or {}).values())
                    else "found at start-up: %s" % describe_faults(g(9))))
    if g(13) is not None:
        out.append(("ledger", "DAMAGED: every credit change is refused until an engineer "
                              "provisions the meter again" if g(13) else "ok"))
    return ["%-17s %s" % (k, v) for k, v in out]


@han.command("submit")
@_port
@_timeout
@click.argument("voucher")
def han_submit(port, timeout, voucher):
    """Hand a voucher (text form or file) to the meter; print its receipt."""
    try:
        raw, _ = delivery.load(voucher)
    except errors.Rejected as e:
        raise TopupError("not a voucher: %s" % e) from None
    with _client(port, timeout) as c:
        receipt, duplicate = _han_call(c.submit, raw)
    r = receipt_format.parse(receipt)
    click.echo("%s: receipt %d, sequence %d, %s added, balance %s → %s"
               % ("ALREADY APPLIED (original receipt)" if duplicate else "APPLIED", r.index,
                  r.sequence, _mp(r.amount * 1000), _mp(r.balance_before), _mp(r.balance_after)))


@han.command("receipts")
@_port
@_timeout
@click.option("--from", "start", type=click.IntRange(0), default=0, help="First receipt index.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write them to FILE (CBOR sequence, for `topup receipts import`).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def han_receipts(port, timeout, start, out, force):
    """Read the meter's receipts (the engineer's read-out)."""
    if out:
        from host.output import check_target
        check_target(out, force)            # refuse before talking to the meter
    with _client(port, timeout) as c:
        raws = _han_call(c.receipts, start)
    for raw in raws:
        click.echo(receipt_line(receipt_format.parse(raw)))
    if out:
        from host.receipts_io import write_receipts
        write_receipts(out, raws, force=force)
        click.echo("wrote %d receipts to %s" % (len(raws), out))


_KINDS = {1: "top-up", 2: "emergency", 3: "rejections", 4: "faults"}


def receipt_line(r):
    """One receipt (protocol.receipt.Receipt) as a line of `topup han receipts`."""
    from host.reconcile import describe_faults
    if r.kind == 1:
        what = "seq %s, %s" % (r.sequence, _mp((r.amount or 0) * 1000))
    elif r.kind == 2:
        what = _mp((r.amount or 0) * 1000)
    elif r.kind == 3:
        what = ", ".join("%s×%d" % (errors.name(k), v) for k, v in sorted((r.rejections or {}).items()))
    else:
        what = "flash: %s" % describe_faults(r.faults or {})
    return "%4d  %-10s  %-28s balance %s → %s" % (r.index, _KINDS.get(r.kind, "kind %d" % r.kind),
                                                   what, _mp(r.balance_before), _mp(r.balance_after))


def _mp(mp):
    """A balance in milli-pence as pounds and pence, the sub-penny remainder stated apart
    (host.money.format_mp: `£12.49 + 0.999p`)."""
    return format_mp(mp)


COMMANDS = (flash, provision, sim, han)
