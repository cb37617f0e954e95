# `topup`: the supplier's command line, in the conventions of esptool and mpremote.
#
#   topup [--db PATH] init
#   topup key new [--activate] | key list | key activate KID | key revoke KID
#   topup device add EUI64 [--max-voucher £] [--max-credit £] [--public-key HEX] [--label T]
#   topup device list | device show EUI64
#   topup issue EUI64 AMOUNT [--count N] [--expires-in DAYS] [--format F] [--out PATH]
#   topup verify VOUCHER_OR_FILE [--device EUI64] [--now UNIX]
#   topup show VOUCHER_OR_FILE [--format F] [--out PATH]     (deliver again: QR, PNG, ...)
#   topup receipts import FILE... | receipts export PATH [--device EUI64] [--format F]
#   topup reconcile [--now UNIX] [--expired refund|void]
#   topup report [--csv PATH] [--html PATH]
#   topup headend --port PORT [--idle-exit SECONDS]
#
# Global options fall back to environment variables (TOPUP_DB, TOPUP_PASSPHRASE). A user's
# mistake is one line on stderr and exit code 2, never a traceback; `verify` exits 1 when
# the voucher would be rejected, `reconcile` exits 1 when it finds anomalies, and
# `receipts import` exits 1 for a corrupt file (of which nothing is imported).
# `main(argv=None)` returns the exit code.
import os
import sqlite3
import sys
import time

import click

from protocol import errors as perr
from protocol.voucher import parse as pv_parse

from . import db, delivery, issuer, keystore, reconcile as recon, registry
from .errors import TopupError
from .money import format_pence, parse_pence
from .verify import explain

EXIT_USER = 2
PASSPHRASE_ENV = "TOPUP_PASSPHRASE"
FORMATS = ("text", "json", "cbor", "qr", "png", "svg")


def _err(message):
    click.echo("topup: error: %s" % message, err=True)


class TopupGroup(click.Group):
    """A click group whose errors are one line on stderr with a meaningful exit code."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name or "topup",
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except TopupError as e:
            _err(e.message)
            code = e.exit_code
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx is not None else "topup"
            _err("%s (see `%s --help`)" % (e.format_message(), cmd))
            code = EXIT_USER
        except click.ClickException as e:
            _err(e.format_message())
            code = e.exit_code
        except click.Abort:
            _err("aborted")
            code = 130
        except BrokenPipeError:
            code = 141  # reader went away (e.g. `| head`); not an error worth a message
            try:
                sys.stdout = None
            except Exception:
                pass
        except sqlite3.DatabaseError as e:  # locked past the busy timeout, disk full, damage
            _err("database: %s" % e)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


class State:
    def __init__(self, db_path):
        self.db_path = db_path
        self._conn = None

    @property
    def conn(self):
        if self._conn is None:
            self._conn = db.open_db(self.db_path)
        return self._conn

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _passphrase(confirm=False):
    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        if not value:
            raise TopupError("%s is set but empty" % PASSPHRASE_ENV)
        return value
    try:
        return click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm,
                            err=True)
    except click.Abort:
        raise TopupError("no passphrase given (type it at the prompt or set %s)"
                         % PASSPHRASE_ENV) from None


def _console(stderr=False):
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal (pipes, files, tests) never wrap or truncate: scripts read this.
    width = None if stream.isatty() else 1000
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def _device_arg(ctx, param, value):
    if value is None:
        return None
    return registry.parse_eui64(value)


def _money_opt(what, maximum=None, limit="the protocol maximum"):
    def convert(ctx, param, value):
        if value is None:
            return None
        kw = {} if maximum is None else {"maximum": maximum}
        return parse_pence(value, what=what, limit_name=limit, **kw)
    return convert


@click.group(name="topup", cls=TopupGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "db_path", envvar="TOPUP_DB", default="./topup.db", show_default=True,
              metavar="PATH", help="Supplier database (env TOPUP_DB).")
@click.version_option(package_name="offline-topup", prog_name="topup")
@click.pass_context
def cli(ctx, db_path):
    """Issue and check signed offline top-up vouchers (the supplier side).

    The passphrase of the issuer keys comes from $TOPUP_PASSPHRASE or a prompt.
    """
    state = State(db_path)
    ctx.obj = state
    ctx.call_on_close(state.close)


# --- init ---------------------------------------------------------------------------------

@cli.command()
@click.pass_obj
def init(state):
    """Create a new, empty supplier database."""
    conn = db.create(state.db_path)
    conn.close()
    click.echo("created topup database %s (schema v%d, WAL)" % (state.db_path, db.SCHEMA_VERSION))
    click.echo("next: `topup key new` to make an issuer key, `topup device add EUI64` to "
               "register a meter", err=True)


# --- keys ---------------------------------------------------------------------------------

@cli.group()
def key():
    """Issuer keys: new, list, activate, revoke."""


@key.command("new")
@click.option("--activate", is_flag=True, help="Make the new key the active one.")
@click.pass_obj
def key_new(state, activate):
    """Generate an issuer key, sealed with the passphrase.

    The first key becomes active; later keys only with --activate.
    """
    conn = state.conn
    first = not keystore.list_keys(conn)
    k = keystore.new_key(conn, _passphrase(confirm=first), activate=activate)
    click.echo("new key %s (%s)" % (k.kid.hex(), k.status))
    click.echo("public key %s" % k.public_key.hex(), err=True)


@key.command("list")
@click.pass_obj
def key_list(state):
    """List issuer keys: kid, created, active, revoked."""
    keys = keystore.list_keys(state.conn)
    if not keys:
        click.echo("no issuer keys (run `topup key new`)", err=True)
        return 0
    from rich.table import Table
    t = Table(box=None, pad_edge=False)
    for col in ("kid", "created", "active", "revoked", "public key"):
        t.add_column(col)
    for k in keys:
        t.add_row(k.kid.hex(), delivery.utc(k.created), "yes" if k.active else "no",
                  delivery.utc(k.revoked) if k.revoked is not None else "no",
                  k.public_key.hex())
    _console().print(t)
    return 0


@key.command("activate")
@click.argument("kid")
@click.pass_obj
def key_activate(state, kid):
    """Make key KID (hex, or a unique prefix) the one `issue` signs with."""
    k = keystore.activate(state.conn, keystore.find_key(state.conn, kid).kid)
    click.echo("key %s is now active" % k.kid.hex())


@key.command("revoke")
@click.argument("kid")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def key_revoke(state, kid, yes):
    """Revoke key KID: it can no longer issue, and its vouchers are void."""
    k = keystore.find_key(state.conn, kid)
    if not yes:
        click.confirm("Revoke key %s? Every voucher it signed becomes void" % k.kid.hex(),
                      abort=True, err=True)
    k = keystore.revoke(state.conn, k.kid)
    click.echo("key %s revoked" % k.kid.hex())


# --- devices ------------------------------------------------------------------------------

@cli.group()
def device():
    """Registered meters: add, list, show."""


@device.command("add")
@click.argument("eui64", callback=_device_arg)
@click.option("--max-voucher", callback=_money_opt("per-voucher maximum"), metavar="AMOUNT",
              help="Largest single voucher, e.g. 100 or 100.00 (default £%.2f)."
              % (registry.DEFAULT_MAX_VOUCHER / 100))
@click.option("--max-credit", callback=_money_opt("maximum credit", maximum=10**12,
                                                  limit="the largest allowed"),
              metavar="AMOUNT", help="The meter's maximum credit (default £%.2f)."
              % (registry.DEFAULT_MAX_CREDIT / 100))
@click.option("--public-key", metavar="HEX", help="The meter's Ed25519 public key (64 hex).")
@click.option("--label", help="A free-text note (address, customer reference).")
@click.pass_obj
def device_add(state, eui64, max_voucher, max_credit, public_key, label):
    """Register meter EUI64 (00-11-22-33-44-55-66-77, 00:11:…:77 or 16 hex digits)."""
    pub = registry.parse_public_key(public_key) if public_key is not None else None
    mv = registry.DEFAULT_MAX_VOUCHER if max_voucher is None else max_voucher
    mc = registry.DEFAULT_MAX_CREDIT if max_credit is None else max_credit
    if max_credit is None and mc < mv:
        mc = mv
    d = registry.add_device(state.conn, eui64, max_voucher=mv, max_credit=mc, public_key=pub,
                            label=label)
    click.echo("registered device %s (per-voucher maximum %s, maximum credit %s)"
               % (d.name, format_pence(d.max_voucher), format_pence(d.max_credit)))


@device.command("list")
@click.pass_obj
def device_list(state):
    """List registered meters with their limits and issuance counts."""
    devices = registry.list_devices(state.conn)
    if not devices:
        click.echo("no devices (run `topup device add EUI64`)", err=True)
        return 0
    from rich.table import Table
    t = Table(box=None, pad_edge=False)
    for col in ("device", "max voucher", "max credit", "next seq", "issued", "public key",
                "keys", "label"):
        t.add_column(col)
    for d in devices:
        t.add_row(d.name, format_pence(d.max_voucher), format_pence(d.max_credit),
                  str(d.next_sequence), str(d.issued_count),
                  d.public_key.hex()[:16] + "…" if d.public_key else "-", str(d.key_count),
                  d.label or "")
    _console().print(t)
    return 0


@device.command("show")
@click.argument("eui64", callback=_device_arg)
@click.pass_obj
def device_show(state, eui64):
    """Show one meter: limits, keys, sequence and what was issued to it."""
    conn = state.conn
    d = registry.get_device(conn, eui64)
    total, last = conn.execute("SELECT coalesce(sum(amount), 0), max(issued) FROM vouchers "
                               "WHERE device = ?", (eui64,)).fetchone()
    epochs = registry.device_keys(conn, eui64)
    rows = [
        ("device", d.name),
        ("label", d.label or "-"),
        ("public key", d.public_key.hex() if d.public_key else "- (none registered)"),
        ("meter keys", "%d (one per provisioning; each verifies the receipts of its span)"
         % len(epochs) if epochs else "0"),
    ]
    for i, e in enumerate(epochs):
        span = ("receipts %d-%d" % (e.first_index, epochs[i + 1].first_index - 1)
                if i + 1 < len(epochs) else "receipts from %d" % e.first_index)
        if i + 1 < len(epochs) and epochs[i + 1].first_index == e.first_index:
            span = "no receipts"
        rows.append(("  key epoch %d" % e.epoch, "kid %s, %s, sequence floor %d, registered %s"
                     % (e.kid.hex(), span, e.floor, delivery.utc(e.provisioned))))
    rows += [
        ("per-voucher maximum", format_pence(d.max_voucher)),
        ("maximum credit", format_pence(d.max_credit)),
        ("registered", delivery.utc(d.created)),
        ("next sequence", str(d.next_sequence)),
        ("vouchers issued", "%d, total %s" % (d.issued_count, format_pence(total))),
        ("last issued", delivery.utc(last) if last is not None else "-"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo("%-*s  %s" % (w, k, v))
    return 0


# --- issue --------------------------------------------------------------------------------

class _Output:
    """Where issued vouchers go, set up (and checked) before anything is issued."""

    def __init__(self, fmt, out, count, device):
        self.fmt = fmt
        self.count = count
        self.device = device
        self.stream = None
        self.dir = None
        self.file = None
        self.written = []
        if fmt in ("text", "json", "qr"):
            if out is None or out == "-":
                self.stream = sys.stdout
            else:
                self.stream = self._open(out, "w")
                self.file = out
        elif fmt == "cbor" and (out is None or out == "-"):
            if sys.stdout.isatty():
                raise TopupError("refusing to write binary CBOR to a terminal; use --out PATH")
            self.stream = sys.stdout.buffer
        else:  # cbor / png / svg to files
            if out is None:
                out = "."
            # One voucher to a file; a trailing "/" (or an existing folder) means a folder.
            if count == 1 and not os.path.isdir(out) and not out.endswith(os.sep):
                self.file = out
                self._check_parent(out)
            else:
                self.dir = out
                if os.path.exists(out) and not os.path.isdir(out):
                    raise TopupError("--out %s must be a directory for %d vouchers" % (out, count))
                try:
                    os.makedirs(out, exist_ok=True)
                except OSError as e:
                    raise TopupError("cannot create directory %s: %s" % (out, e.strerror)) from None

    def _check_parent(self, path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise TopupError("cannot write %s: no directory %s" % (path, parent))

    def _open(self, path, mode):
        try:
            return open(path, mode, encoding="utf-8" if "b" not in mode else None)
        except OSError as e:
            raise TopupError("cannot write %s: %s" % (path, e.strerror or e)) from None

    def write(self, batch):
        fmt = self.fmt
        if fmt == "text":
            self.stream.write("".join(delivery.to_text(v.cose) + "\n" for v in batch))
        elif fmt == "json":
            self.stream.write("".join(delivery.to_json(v) + "\n" for v in batch))
        elif fmt == "qr":
            for v in batch:
                self.stream.write("%s  seq %d  %s\n" % (registry.format_eui64(v.device),
                                                        v.sequence, format_pence(v.amount)))
                delivery.qr_terminal(v.cose, self.stream)
                self.stream.write(delivery.to_text(v.cose) + "\n\n")
        elif self.stream is not None:  # cbor to stdout: a CBOR sequence (RFC 8742)
            for v in batch:
                self.stream.write(v.cose)
        else:
            for v in batch:
                path = self.file or os.path.join(
                    self.dir, "%s-%d.%s" % (registry.format_eui64(v.device), v.sequence, fmt))
                try:
                    if fmt == "png":
                        delivery.write_png(v.cose, path)
                    elif fmt == "svg":
                        delivery.write_svg(v.cose, path)
                    else:
                        delivery.write_cbor(v.cose, path)
                except OSError as e:
                    # The voucher is issued and stored: say how to deliver it again.
                    raise TopupError("voucher %d issued and stored, but cannot write %s: %s "
                                     "(deliver it with `topup show`)"
                                     % (v.sequence, path, e.strerror or e)) from None
                self.written.append(path)
        if self.stream is not None:
            self.stream.flush()

    def close(self):
        if self.file and self.stream is not None:
            self.stream.close()


def _progress_bar(total, what="issuing"):
    """A rich progress bar on stderr when it is a terminal, else None."""
    if total < 2 or not sys.stderr.isatty():
        return None, None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=_console(stderr=True), transient=True)
    task = bar.add_task("issue", total=total)

    def progress(done, total):
        bar.update(task, completed=done, total=total)
    return bar, progress


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("eui64", callback=_device_arg)
@click.argument("amount")
@click.option("-n", "--count", type=click.IntRange(1, 10_000_000), default=1, show_default=True,
              help="How many vouchers (bulk issuance).")
@click.option("--expires-in", type=click.IntRange(1, 36500), metavar="DAYS",
              help="Vouchers expire this many days after issue (default: never).")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="text",
              show_default=True, help="text, json (JSON Lines), cbor, qr (terminal), png, svg.")
@click.option("-o", "--out", metavar="PATH",
              help="Output file (one voucher) or directory (png/svg/cbor, several); "
                   "default stdout (png/svg: the current directory).")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=issuer.DEFAULT_BATCH,
              show_default=True, help="Vouchers per durable transaction.")
@click.pass_obj
def issue(state, eui64, amount, count, expires_in, fmt, out, batch_size):
    """Issue COUNT vouchers of AMOUNT (e.g. 10.50 or £10.50) for meter EUI64.

    Each batch's sequence numbers are reserved durably (committed) before its vouchers
    are written out.
    """
    conn = state.conn
    dev = registry.get_device(conn, eui64)
    pence = parse_pence(amount, maximum=dev.max_voucher,
                        limit_name="device %s's per-voucher maximum" % dev.name)
    signer = keystore.unlock_active(conn, _passphrase())
    output = _Output(fmt, out, count, eui64)
    bar, progress = _progress_bar(count)
    first = last = None
    done = 0
    try:
        if bar is not None:
            bar.start()
        for batch in issuer.issue_batches(conn, signer, eui64, pence, count,
                                          expires_in=None if expires_in is None
                                          else expires_in * 86400,
                                          batch_size=batch_size, progress=progress):
            if first is None:
                first = batch[0].sequence
            last = batch[-1].sequence
            done += len(batch)
            output.write(batch)
    finally:
        if bar is not None:
            bar.stop()
        output.close()
        if done and done < count:
            click.echo("topup: %d of %d vouchers were issued and recorded before the stop "
                       "(sequences %d-%d)" % (done, count, first, last), err=True)
    seqs = "sequence %d" % first if first == last else "sequences %d-%d" % (first, last)
    click.echo("issued %d voucher%s of %s for %s, %s, key %s" % (
        count, "" if count == 1 else "s", format_pence(pence), dev.name, seqs,
        signer.kid.hex()), err=True)
    if output.file and fmt in ("text", "json", "qr"):
        click.echo("wrote %s" % output.file, err=True)
    for path in output.written[:5]:
        click.echo("wrote %s" % path, err=True)
    if len(output.written) > 5:
        click.echo("wrote %d more files in %s" % (len(output.written) - 5, output.dir), err=True)
    return 0


# --- show ---------------------------------------------------------------------------------

@cli.command()
@click.argument("voucher", metavar="VOUCHER_OR_FILE")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="qr",
              show_default=True, help="text, json, cbor, qr (terminal), png, svg.")
@click.option("-o", "--out", metavar="PATH", help="Output file (default stdout; png/svg: "
              "DEVICE-SEQUENCE.png/.svg in the current directory).")
def show(voucher, fmt, out):
    """Deliver an existing voucher again in another format (no database needed).

    Decodes VOUCHER_OR_FILE (text form, or a file with text, raw CBOR or JSON) without
    checking its signature (`topup verify` does that) and writes it as FORMAT.
    """
    try:
        raw, _ = delivery.load(voucher)
        v = pv_parse(raw)
    except perr.Rejected as e:
        raise TopupError("not a voucher: %s" % e) from None
    item = issuer.Issued(v.device, v.sequence, v.amount, v.issued, v.expires, v.kid, v.ref, raw)
    output = _Output(fmt, out, 1, v.device)
    try:
        output.write([item])
    finally:
        output.close()
    for path in output.written:
        click.echo("wrote %s" % path, err=True)
    if output.file and fmt in ("text", "json", "qr"):
        click.echo("wrote %s" % output.file, err=True)
    return 0


# --- verify -------------------------------------------------------------------------------

@cli.command()
@click.argument("voucher", metavar="VOUCHER_OR_FILE")
@click.option("--device", "eui64", callback=_device_arg, metavar="EUI64",
              help="Check acceptance by this registered meter (default: the voucher's own).")
@click.option("--now", type=click.IntRange(0), metavar="UNIX",
              help="Meter time for the expiry check (default: now).")
@click.pass_obj
def verify(state, voucher, eui64, now):
    """Decode a voucher and explain it; exit 0 if acceptable, 1 if rejected.

    VOUCHER_OR_FILE is a text form (OTU1:…) or a file holding one, raw CBOR, or JSON.
    """
    conn = state.conn
    if eui64 is not None:
        registry.get_device(conn, eui64)  # unknown device is a user error, before anything
    try:
        raw, source = delivery.load(voucher)
    except perr.Rejected as e:
        return _print_rejection(_console(), e.reason, e.detail, "text form")
    when = int(time.time()) if now is None else now
    rep = explain(conn, raw, device=eui64, now=when)
    return _print_report(_console(), rep, source, when)


def _print_rejection(con, reason, detail, source):
    from rich.markup import escape
    con.print("[bold]Voucher[/] (%s)" % source)
    con.print("[bold red]REJECTED[/]: %s (%d)%s" % (perr.name(reason), reason,
                                                    ": " + escape(detail) if detail else ""))
    return 1


def _print_report(con, rep, source, now):
    from rich.markup import escape
    con.print("[bold]Voucher[/] (%s, %d bytes%s)" % (
        source, len(rep.raw), "" if rep.tagged is None else
        ", tagged COSE_Sign1" if rep.tagged else ", untagged COSE_Sign1"))
    if rep.kid is None:  # did not even decode
        return _verdict(con, rep, now)
    v = rep.voucher

    def line(k, val):
        con.print("  %-10s %s" % (k, val))
    if v is not None:
        line("device", registry.format_eui64(v.device))
        line("sequence", v.sequence)
        line("amount", "%s (%d p)" % (format_pence(v.amount), v.amount))
        line("issued", "%s (%d)" % (delivery.utc(v.issued), v.issued))
        line("expires", "never" if v.expires is None else "%s (%d)%s" % (
            delivery.utc(v.expires), v.expires, " — expired" if now >= v.expires else ""))
        line("ref", v.ref.hex())
    else:
        line("payload", "[red]does not decode[/]: %s" % escape(str(rep.payload_error)))
    con.print("[bold]Signer[/]")
    if rep.key is None:
        line("kid", "%s — [yellow]not in this database[/]" % rep.kid.hex())
        line("signature", "not checked (no such key here)")
    else:
        status = {"active": "[green]active key[/]", "inactive": "inactive key",
                  "revoked": "[red]revoked key[/] (since %s)" % delivery.utc(rep.key.revoked)}
        line("kid", "%s — in this database, %s" % (rep.kid.hex(), status[rep.key.status]))
        line("signature", "[green]valid[/] (Ed25519, libsodium)" if rep.signature
             else "[red]INVALID[/]")
    if v is not None and rep.signature:
        note = {"same": "issued by this database (same bytes)",
                "re-encoded": "issued by this database (same signature, different encoding)",
                "different": "[red]a different voucher holds this sequence in this database[/]",
                "not issued": "[yellow]not issued by this database[/]"}[rep.db_match]
        line("records", note)
    d = rep.device
    if d is not None:
        con.print("[bold]Device[/] %s (per-voucher maximum %s, maximum credit %s)" % (
            d.name, format_pence(d.max_voucher), format_pence(d.max_credit)))
    elif v is not None:
        con.print("[bold]Device[/] %s — %s" % (registry.format_eui64(v.device), rep.device_note))
    return _verdict(con, rep, now)


def _verdict(con, rep, now):
    from rich.markup import escape
    if rep.accepted:
        who = ("device %s" % rep.device.name if rep.device
               else "a meter trusting this database's keys")
        con.print("[bold green]ACCEPTED[/] by %s at %s (SPEC §2.1 checks 1-8; replay and "
                  "credit checks 9-11 depend on the meter's state)" % (who, delivery.utc(now)))
        return 0
    detail = ": " + escape(rep.detail) if rep.detail else ""
    con.print("[bold red]REJECTED[/]: %s (%d)%s" % (perr.name(rep.reason), rep.reason, detail))
    return 1


# --- receipts, reconcile, report -----------------------------------------------------

@cli.group()
def receipts():
    """Receipts back from meters: import (export files), export."""


@receipts.command("import")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.pass_obj
def receipts_import(state, files):
    """Import receipt export files (CBOR sequence, SPEC.md §6, or JSON Lines).

    All files are read and checked first; a truncated or corrupt file is reported (which
    item, which byte) and nothing is imported. Then every new receipt's signature is
    checked against its meter's registered key and all are stored in one transaction.
    Receipts already stored are skipped: importing twice changes nothing.
    """
    from .receipts_io import read_rows
    conn = state.conn
    batches = [(f, read_rows(f)) for f in files]
    bar, progress = _progress_bar(sum(len(b) for _, b in batches), "checking signatures")
    try:
        if bar is not None:
            bar.start()
        res = recon.import_rows(conn, batches, progress=progress)
    finally:
        if bar is not None:
            bar.stop()
    for source, total, new in res.files:
        click.echo("%s: %d receipt%s, %d new, %d already stored"
                   % (source, total, "" if total == 1 else "s", new, total - new))
    notes = []
    if res.bad:
        notes.append("%d with a bad signature" % res.bad)
    if res.unverified:
        notes.append("%d not verifiable yet (meter unknown or without a public key)"
                     % res.unverified)
    click.echo("imported %d new receipt%s%s; run `topup reconcile`" % (
        res.new, "" if res.new == 1 else "s", " (%s)" % ", ".join(notes) if notes else ""),
        err=True)
    return 0


@receipts.command("export")
@click.argument("out", metavar="PATH")
@click.option("--device", "eui64", callback=_device_arg, metavar="EUI64",
              help="Only this meter's receipts.")
@click.option("-f", "--format", "fmt", type=click.Choice(("cbor", "jsonl")), default="cbor",
              show_default=True, help="cbor (SPEC.md §6) or jsonl (JSON Lines, base64).")
@click.pass_obj
def receipts_export(state, out, eui64, fmt):
    """Write stored receipts to an export file, in (device, index) order."""
    from .receipts_io import write_receipts
    sql = "SELECT raw FROM receipts"
    args = ()
    if eui64 is not None:
        sql += " WHERE device = ?"
        args = (eui64,)
    raws = [bytes(r[0]) for r in state.conn.execute(sql + " ORDER BY device, idx, hash", args)]
    n = write_receipts(out, raws, fmt)
    click.echo("wrote %d receipt%s to %s" % (n, "" if n == 1 else "s", out), err=True)
    return 0


@cli.command("reconcile")
@click.option("--now", type=click.IntRange(0), metavar="UNIX",
              help="Judge expiry at this time (default: now).")
@click.option("--expired", "policy", type=click.Choice(recon.POLICIES), default="refund",
              show_default=True, help="Expired, never-redeemed vouchers: refund due, or void.")
@click.pass_obj
def reconcile_cmd(state, now, policy):
    """Verify stored receipts and match them to issued vouchers; store and show the result.

    Checks every receipt's signature against its meter's key, each meter's hash chain
    (gaps, forks) and balance continuity, and gives every issued voucher a status:
    outstanding, redeemed, stale, expired or void. Exit 0 if there are no anomalies, 1 if
    there are any.
    """
    from . import report
    res = recon.reconcile(state.conn, now=now, expired_policy=policy)
    report.print_summary(_console(), report.load(state.conn))
    return 1 if res.anomalies else 0


@cli.command("report")
@click.option("--csv", "csv_path", metavar="PATH",
              help="One row per voucher with its status (anomalies go to PATH-anomalies.csv).")
@click.option("--html", "html_path", metavar="PATH",
              help="A self-contained HTML report with charts (no network needed).")
@click.pass_obj
def report_cmd(state, csv_path, html_path):
    """Report the last reconciliation: terminal summary, CSV for finance, HTML."""
    from . import report
    s = report.load(state.conn)
    if csv_path is None and html_path is None:
        report.print_summary(_console(), s)
        return 0
    if csv_path is not None:
        for path in report.write_csv(s, csv_path):
            click.echo("wrote %s" % path, err=True)
    if html_path is not None:
        click.echo("wrote %s" % report.write_html(s, html_path), err=True)
    if s.imported_since:
        click.echo("topup: note: %d receipts were imported after this reconciliation; run "
                   "`topup reconcile` again" % s.imported_since, err=True)
    return 0


@cli.command("headend")
@click.option("--port", "-p", envvar="TOPUP_WAN_PORT", required=True, metavar="PORT",
              help="The meters' WAN link: a serial port or pyserial URL (env TOPUP_WAN_PORT).")
@click.option("--idle-exit", type=click.FloatRange(0, min_open=True), metavar="SECONDS",
              help="Stop once this long has passed with no new receipt stored (traffic alone "
                   "does not keep it running; default: run until Ctrl-C).")
@click.pass_obj
def headend_cmd(state, port, idle_exit):
    """Receive the receipts meters push when their WAN is back; store them and send a
    signed acknowledgement of those held with a verified signature.

    Acknowledgements are signed with the active issuer key (the meters trust it), so the
    passphrase comes from $TOPUP_PASSPHRASE or a prompt.
    """
    import serial
    from . import headend
    conn = state.conn
    if os.environ.get(PASSPHRASE_ENV) is None and not sys.stdin.isatty():
        raise TopupError("no passphrase: the head end signs its acknowledgements with the "
                         "active issuer key; set %s (or run it on a terminal to type it)"
                         % PASSPHRASE_ENV)
    signer = keystore.unlock_active(conn, _passphrase())
    try:
        link = serial.serial_for_url(port, baudrate=115200, timeout=0.05)
    except (serial.SerialException, OSError) as e:
        raise TopupError("cannot open WAN port %s: %s" % (port, e)) from None
    from rich.markup import escape
    con = _console()
    server = headend.HeadEnd(conn, link, "wan:%s" % port, signer,
                             log=lambda message: con.print(escape(message)))
    con.print("head end listening on %s, acknowledging with key %s (%s)" % (
        port, signer.kid.hex(), "Ctrl-C stops" if idle_exit is None
        else "stops after %g s with no new receipt" % idle_exit))
    try:
        server.serve(idle_exit=idle_exit)
        why = "no new receipt for %g s" % idle_exit
    except KeyboardInterrupt:
        why = "interrupted"
    except (serial.SerialException, OSError) as e:
        raise TopupError("WAN port %s failed: %s" % (port, e)) from None
    finally:
        link.close()
    con.print("head end stopped (%s): %d push(es), %d new receipt(s) stored, %d "
              "acknowledgement(s) signed, %d push(es) refused" % (
                  why, server.pushes, server.stored, server.acks, server.refused))


def _add_engineer_commands():
    # flash, provision, sim, han: the engineer's and the rig's side (hil/).
    from hil.commands import COMMANDS
    for command in COMMANDS:
        cli.add_command(command)


_add_engineer_commands()


def main(argv=None):
    """Run `topup` with `argv` (default sys.argv[1:]); return the exit code."""
    return cli.main(args=argv, prog_name="topup", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
