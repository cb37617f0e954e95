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
@click.option("--ppmid", is_flag=True,
              help="Put the PPMID firmware (firmware/ppmid/: the customer's keypad and display) "
                   "on the board instead of the meter's.")
def flash(port, source, no_reset, ppmid):
    """Put the meter firmware (or with --ppmid the in-home device's) on a board: compile with
    mpy-cross for the board's MicroPython, copy with mpremote, check every file by SHA-256,
    soft-reset."""
    if ppmid:
        from hil.two_board import flash_ppmid as do_flash
    else:
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
    database's issuer keys), the keypad-code key (this database's active one), limits,
    tariff and clock; register the meter's new receipt key as a new key epoch (its first
    receipt index and sequence floor) with its key-agreement key, for `topup code`.

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
    code_key = keystore.active_code_key(conn)     # keypad codes (SPEC.md §8), if there is one
    command_key = keystore.active_command_key(conn)   # signed commands (SPEC.md §10)

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
                           before_reset=rescue if factory_reset else None,
                           code_key=None if code_key is None else code_key.public_key,
                           command_key=None if command_key is None else command_key.public_key)
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
    if public.ka is not None:
        click.echo("keypad codes: yes (the meter's key-agreement key %s, code key %s "
                   "registered; `topup code %s AMOUNT`)" % (public.ka.hex(), public.code_kid.hex(),
                                                         registry.format_eui64(eui)))
    else:
        why = public.codes_note or "the meter takes no codes"
        if code_key is None:
            why = ("this database has no keypad-code key (`topup key new --code` makes one): "
                   "the meter takes no codes, vouchers only")
        click.echo("note: keypad codes: no — %s" % why, err=True)
    if getattr(public, "command_kid", None) is not None:
        click.echo("signed commands: yes (command key %s registered; `topup han sync` "
                   "delivers key changes and tariffs)" % public.command_kid.hex())
    else:
        why = getattr(public, "commands_note", None) or "the meter takes no signed commands"
        if command_key is None:
            why = ("this database has no command key (the next `topup key new` makes one): "
                   "the meter takes no signed commands")
        click.echo("note: signed commands: no — %s" % why, err=True)
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
@click.option("--ppmid", is_flag=True,
              help="Also a PPMID on a second virtual board (flashed), its HAN joined to the "
                   "meter's like a cable; the console presses its keys (`key 1234#`) and shows "
                   "its display (`display`).")
def sim(workdir, wan, flash_firmware, no_rtc, ppmid):
    """Start a virtual meter board, print its ports, and take console commands on standard
    input (`help` lists them: WAN, button, pulses, time, power) until `quit` or Ctrl-C.
    With --ppmid, a PPMID board too (hil/two_board.py)."""
    if ppmid:
        from hil import two_board
        from hil.flashing import FlashError
        from hil.virtual import VirtualBoardError
        try:
            return two_board.run_sim(workdir, wan, flash_firmware, no_rtc, click.echo, _stdin_lines())
        except (VirtualBoardError, FlashError, RuntimeError) as e:
            raise TopupError(str(e)) from None
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


def _han_call(fn, *args, new=None):
    """`new`: what the request needs, named when a meter answers UNKNOWN_REQUEST (its
    firmware predates it)."""
    from hil.han_client import HanError, HanTimeout
    try:
        return fn(*args)
    except HanTimeout as e:
        raise TopupError("%s on the HAN port: is the meter application running? (an mpremote "
                         "session, or `topup flash --no-reset`, leaves the board at its REPL; "
                         "`mpremote connect REPL_PORT reset` starts it again)" % e) from None
    except HanError as e:
        text = str(e)
        if new and e.reason == errors.UNKNOWN_REQUEST:
            text += ": the meter's firmware predates %s (`topup flash` current firmware)" % new
        refused = TopupError(text)
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
@click.option("--json", "as_json", is_flag=True,
              help="Print the status fields as one JSON object (balances in milli-pence, "
                   "integers), for scripts.")
def han_status(port, timeout, as_json):
    """The meter's identity, balance, supply (on, armed, interrupted) and WAN state,
    window, receipt count, clock, sequence floor, flash health and keypad-code lockout."""
    from protocol import han as han_format
    with _client(port, timeout) as c:
        raw = _han_call(c.request, han_format.STATUS, {})
    if as_json:
        import json
        click.echo(json.dumps(status_json(raw), sort_keys=True))
        return
    for line in status_lines(raw):
        click.echo(line)


def status_json(raw):
    """A status response (SPEC.md §5) as JSON-ready names and values: money in milli-pence
    as integers (`balance_mp`, `emergency_mp`), the device as EUI-64 text, the supply state
    as a word and its number, the fault counts with string keys. Fields an older meter does
    not send are null; a field this tool does not know is kept as `field_N`."""
    from hil.han_client import STATUS_FIELDS, SUPPLY_NAMES
    out = {}
    for key, name in STATUS_FIELDS.items():
        v = raw.get(key)
        if key >= 19 and v is None:
            continue     # signed commands: only a meter with a command key sends these
        if isinstance(v, (bytes, bytearray)):
            v = (registry.format_eui64(bytes(v)) if len(v) == 8 and key == 1
                 else bytes(v).hex())
        elif isinstance(v, dict):
            v = {str(k): n for k, n in sorted(v.items())}
        out[name] = v
    st = raw.get(15)
    out["supply"] = (SUPPLY_NAMES.get(st, "state %d" % st) if isinstance(st, int)
                     else None if raw.get(4) is None else "on" if raw.get(4) else "off")
    for key in sorted(k for k in raw if k not in STATUS_FIELDS and isinstance(k, int)):
        v = raw[key]
        out["field_%d" % key] = bytes(v).hex() if isinstance(v, (bytes, bytearray)) else v
    return out


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
        ("supply", supply_words(g(15), g(4))),
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
    if g(18) is not None:
        out.append(("keypad codes", code_words(g(18), g(16), g(17))))
    if g(19) is not None:
        out.append(("signed commands", "%d applied (command key %s)%s" % (
            g(19), bytes(g(20) or b"").hex() or "?",
            "; a tariff change waits until %s" % delivery.utc(g(21)) if g(21) else "")))
    return ["%-17s %s" % (k, v) for k, v in out]


def supply_words(state, on=None):
    """The supply state (status field 15, SPEC.md §9) in words; an older meter sends only
    field 4 (on or not)."""
    if state == 2:
        return "on"
    if state == 1:
        return ("ARMED: credit is back; it switches on when the customer confirms (meter "
                "button, PPMID, or `topup han confirm`)")
    if state == 0:
        return "INTERRUPTED (off): no credit left"
    if state is not None:
        return "state %r" % (state,)
    return "on" if on else "OFF"


def code_words(takes, locked_s, tries_left):
    """Status fields 18, 16, 17: whether the meter takes codes and its lockout."""
    from hil.han_client import minutes
    if not takes:
        return "not taken (no supplier code key installed at provisioning)"
    if locked_s:
        return "LOCKED for %s more after too many wrong codes (vouchers still accepted)" % (
            minutes(locked_s))
    if tries_left is None:
        return "accepted"
    return "accepted (%d wrong code%s allowed before a lockout)" % (
        tries_left, "" if tries_left == 1 else "s")


@han.command("submit")
@_port
@_timeout
@click.argument("words", metavar="VOUCHER_OR_CODE", nargs=-1, required=True)
def han_submit(port, timeout, words):
    """Hand a voucher (text form or file) or a keypad code (20 digits, spaces or dashes
    allowed: `1234 5678 9012 3456 7890`) to the meter, as the PPMID does; print its receipt.

    A code is sent as typed: the meter checks it (CODE_INCOMPLETE, CODE_TYPO and CODE_LOCKED
    do not count towards its lockout; CODE_WRONG does). A voucher or code already applied
    gets its original receipt back (ALREADY APPLIED). A code may be given unquoted, in its
    five groups."""
    voucher = " ".join(words)
    if voucher.strip()[:5].upper() == "OTC1:":
        # A signed command's text form (SPEC.md §10), relayed as a PPMID would.
        from protocol import command as pc
        try:
            raw = pc.from_text(voucher)
        except errors.Rejected as e:
            raise TopupError("not a signed command: %s" % e) from None
        with _client(port, timeout) as c:
            receipt, duplicate = _han_call(c.submit_command, raw, new="signed commands")
        r = receipt_format.parse(receipt)
        click.echo("%s: receipt %d, %s" % ("ALREADY APPLIED (original receipt)" if duplicate
                                           else "COMMAND APPLIED", r.index, receipt_line(r)
                                           .split("command", 1)[-1].strip()))
        return
    if len(words) > 1 and not delivery.looks_like_code(voucher):
        raise TopupError("give one voucher (text form or file), or one keypad code")
    if delivery.looks_like_code(voucher):
        with _client(port, timeout) as c:
            receipt, duplicate = _han_call(c.submit_code, voucher, new="keypad codes")
        what = "code"
    else:
        try:
            raw, _ = delivery.load(voucher)
        except errors.Rejected as e:
            raise TopupError("not a voucher or a keypad code: %s" % e) from None
        with _client(port, timeout) as c:
            receipt, duplicate = _han_call(c.submit, raw)
        what = "voucher"
    r = receipt_format.parse(receipt)
    form = "code" if r.form == receipt_format.FORM_CODE else "voucher"
    if form != what:       # the meter's receipt says what it applied: believe it, say so
        click.echo("note: the meter's receipt names a %s" % form, err=True)
    click.echo("%s%s: receipt %d, sequence %d, %s added, balance %s → %s%s"
               % ("ALREADY APPLIED (original receipt)" if duplicate else "APPLIED",
                  " (keypad code)" if form == "code" else "", r.index, r.sequence,
                  _mp(r.amount * 1000), _mp(r.balance_before), _mp(r.balance_after),
                  _supply_after(r.supply)))


def _supply_after(state):
    if state == 1:
        return "; supply ARMED: the customer confirms to switch it on (`topup han confirm`)"
    if state == 0:
        return "; supply still interrupted"
    if state == 2:
        return "; supply on"
    return ""


@han.command("confirm")
@_port
@_timeout
def han_confirm(port, timeout):
    """Confirm an armed supply, as the customer does on the PPMID (SPEC.md §9): the meter
    switches it on. A supply that is not armed is left as it is, and said so."""
    from hil.han_client import SUPPLY_NAMES
    with _client(port, timeout) as c:
        before = _han_call(c.status).get("supply_state")
        state = _han_call(c.confirm, new="supply arming")
    if state == 2 and before == 1:
        click.echo("supply on: the armed supply was confirmed")
    elif state == 2:
        click.echo("supply on (it was already on)")
    else:
        name = SUPPLY_NAMES.get(state, "state %r" % (state,))
        click.echo("supply %s: nothing to confirm%s" % (
            name, " (no credit: top up first, or take emergency credit)" if state == 0 else ""))


@han.command("emergency")
@_port
@_timeout
def han_emergency(port, timeout):
    """Take emergency credit, as the customer does on the PPMID (SPEC.md §9); print its
    receipt. Taking it while the supply is interrupted switches the supply on."""
    with _client(port, timeout) as c:
        state, receipt = _han_call(c.emergency, new="customer actions over the HAN")
    if not receipt:
        raise TopupError("the meter answered without a receipt (supply %r)" % (state,))
    r = receipt_format.parse(receipt)
    click.echo("EMERGENCY CREDIT: receipt %d, %s, balance %s%s"
               % (r.index, _mp((r.amount or 0) * 1000), _mp(r.balance_after),
                  _supply_after(state)))


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


REFUSAL_WORDS = {
    errors.KEY_REVOKED: "the meter has revoked the issuer key this was signed with",
    errors.COMMAND_OUT_OF_ORDER: "a command before it has not reached the meter yet (it "
                                 "applies them strictly in number order)",
    errors.COMMAND_REPLAYED: "the meter has already applied a different command with this "
                             "number (the database and the meter disagree: was the meter "
                             "provisioned from another database?)",
    errors.COMMAND_REFUSED: "the meter refused what it asks (a tariff out of bounds or "
                            "effective more than 7 days ago, a revoke that would leave no "
                            "issuer key, ...); nothing was changed",
    errors.UNKNOWN_KEY: "it is not signed by the meter's command key (the meter was "
                        "provisioned with another one, or changed supplier)",
    errors.WRONG_DEVICE: "it is for another meter",
    errors.NOT_PROVISIONED: "the meter has no command key (provisioned without one, or by "
                            "firmware older than commands)",
}


@han.command("sync")
@_port
@_timeout
@click.pass_obj
def han_sync(state, port, timeout):
    """Deliver pending signed commands to the meter on PORT and read its receipts back, as
    an engineer visiting a no-WAN home does: asks its status (which meter it is, its last
    applied command), sends every pending command for it in number order over the HAN,
    then reads its receipts and imports them (command receipts mark commands applied).
    Exit 1 if the meter refused one."""
    from host import commands as cmds
    from hil.han_client import HanError
    conn = state.conn
    with _client(port, timeout) as c:
        st = _han_call(c.status)
        dev = st.get("device")
        if not dev:
            raise TopupError("the meter on %s is not provisioned" % port)
        dev = bytes(dev)
        registry.get_device(conn, dev)
        name = registry.format_eui64(dev)
        last = st.get("last_command")
        start = registry.next_first_index(conn, dev)   # before command receipts arrive
        pending = cmds.pending_for(conn, dev)
        if pending and last is None:
            click.echo("note: the meter reports no command key (provisioned without one, or "
                       "firmware older than commands): its %d pending command(s) cannot apply"
                       % len(pending), err=True)
        # Those the meter already applied (numbers up to its last): send them all the same;
        # a duplicate gets its original receipt back, a different one COMMAND_REPLAYED.
        sent = applied = 0
        refused = None
        passphrase = None
        i = 0
        while i < len(pending):
            row = pending[i]
            i += 1
            try:
                receipt, duplicate = _han_call_raw(c.submit_command, row.raw)
            except HanError as e:
                words = REFUSAL_WORDS.get(e.reason, "")
                click.echo("%s command %d (%s) REFUSED: %s (%d)%s" % (
                    name, row.number, row.kind_name, errors.name(e.reason), e.reason,
                    ": " + words if words else ""), err=True)
                refused = e.reason
                if e.reason == errors.COMMAND_REFUSED:
                    # It used no number: sign the ones after it again, one lower.
                    if passphrase is None:
                        from host.cli import _passphrase
                        passphrase = _passphrase()
                    cmds.mark_refused(conn, row.id, e.reason, passphrase)
                    pending = cmds.pending_for(conn, dev)
                    i = 0
                    continue
                break
            sent += 1
            r = receipt_format.parse(receipt)
            reconcile.import_raw(conn, [receipt], "%s: han sync" % port)
            applied += 1
            click.echo("%s command %d (%s) %s: receipt %d%s" % (
                name, row.number, row.kind_name,
                "ALREADY APPLIED (original receipt)" if duplicate else "APPLIED", r.index,
                " — %s" % cmds.describe_tariff(r.tariff) if getattr(r, "tariff", None) else ""))
        raws = _han_call(c.receipts, start)
    res = reconcile.import_raw(conn, raws, "%s: han sync" % port) if raws else None
    cmds.settle_from_receipts(conn)
    left = cmds.pending_for(conn, dev)
    click.echo("%s: %d command(s) applied, %d pending; %d receipt(s) read, %d new"
               % (name, applied, len(left), len(raws), res.new if res else 0))
    return 1 if refused is not None else 0


def _han_call_raw(fn, *args):
    """Like _han_call, but the meter's refusal (HanError) comes back to the caller."""
    from hil.han_client import HanError, HanTimeout
    try:
        return fn(*args)
    except HanError:
        raise
    except HanTimeout:
        return _han_call(fn, *args)


_KINDS = {1: "top-up", 2: "emergency", 3: "rejections", 4: "faults", 5: "command"}


def receipt_line(r):
    """One receipt (protocol.receipt.Receipt) as a line of `topup han receipts`."""
    from host.reconcile import describe_faults
    if r.kind == 1:
        what = "seq %s, %s%s" % (r.sequence, _mp((r.amount or 0) * 1000),
                                 " (code)" if r.form == receipt_format.FORM_CODE else "")
    elif r.kind == 2:
        what = _mp((r.amount or 0) * 1000)
    elif r.kind == 5:
        from host import commands as cmds
        what = "#%s %s" % (r.sequence, cmds.KIND_NAMES.get(getattr(r, "command_kind", None),
                                                          "command"))
        tariff = getattr(r, "tariff", None)
        if tariff:
            what += " (%s)" % cmds.describe_tariff(tariff)
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
