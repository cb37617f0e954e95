# `topup`: the supplier's command line, in the conventions of esptool and mpremote.
#
#   topup [--db PATH] init
#   topup key new [--activate] [--code] | key list | key activate KID | key revoke KID
#   topup key rotate-commands
#   topup device add EUI64 [--max-voucher £] [--max-credit £] [--public-key HEX]
#                          [--ka-key HEX] [--label T]
#   topup device list | device show EUI64
#   topup issue EUI64 AMOUNT [--count N] [--expires-in DAYS] [--format F] [--out PATH] [--force]
#   topup code EUI64 AMOUNT [--count N] [--format text|json|csv] [--out PATH] [--force]
#   topup vouchers list|export [--device EUI64] [--seq N-M] [--batch N] [--status S]
#                              [--form voucher|code] [--undelivered] [--format F]
#                              [--out PATH] [--force]
#   topup vouchers void REF | --device EUI64 --seq N [--note TEXT] [--yes]
#   topup verify VOUCHER_OR_FILE_OR_CODE [--device EUI64] [--now UNIX]
#   topup show VOUCHER_OR_FILE [--format F] [--out PATH]     (deliver again: QR, PNG, ...)
#   topup receipts import FILE... | receipts export PATH [--device EUI64] [--format F]
#   topup reconcile [--now UNIX] [--expired refund|void]
#   topup report [--csv PATH] [--html PATH] [--force]
#   topup headend --port PORT [--idle-exit SECONDS] [--to URL [--token-env NAME]]
#   topup tariff set (--device EUI64 | --all) [--unit-rate P] [--standing P] [--ec-amount £]
#                    [--ec-threshold £] [--max-voucher £] [--max-credit £] --effective WHEN
#   topup supplier change EUI64 --to NEW_DB [--floor N] | supplier adopt EUI64 --from OLD_DB
#   topup commands list|export [--device EUI64] [--pending] [--format text|qr|json]
#   topup serve [--host H] [--port P] [--workers N] [--pool-size N]
#   topup token new --scope S [--scope S...] [--label T] | token list | token revoke ID
#
# Global options (--db) work before or after the subcommand and fall back to environment
# variables (TOPUP_DB, TOPUP_PASSPHRASE). A user's mistake is one line on stderr and exit
# code 2, never a traceback; `verify` exits 1 when a voucher would be rejected, `reconcile`
# exits 1 when it finds anomalies, `receipts import` exits 1 for a corrupt file (of which
# nothing is imported), and a write that fails part-way exits 1 after saying exactly what
# was stored and what was written where. `main(argv=None)` returns the exit code.
#
# This module is the supplier's side only: it never imports hil/. The `topup` command an
# engineer runs is composed in topup_cli/ (`compose`, below), which adds hil's commands.
import errno
import os
import sqlite3
import sys
import time

import click

from protocol import errors as perr
from protocol import keycode
from protocol.voucher import parse as pv_parse

from . import commands as cmds, db, delivery, issuer, keystore, reconcile as recon, registry
from .errors import TopupError
from .money import format_pence, parse_pence
from .output import Interrupts
from .sinks import CODE_FORMAT_HELP, CODE_FORMATS, FORMAT_HELP, FORMATS, Sink
from .verify import explain

EXIT_USER = 2
PASSPHRASE_ENV = "TOPUP_PASSPHRASE"
DB_ENV = "TOPUP_DB"


def _err(message):
    click.echo("topup: error: %s" % message, err=True)


def _silence_stdout():
    """After standard output failed (full, gone): point it at /dev/null, so that nothing
    is left to fail (and be reported) when the interpreter flushes it at exit."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        try:
            sys.stdout = None
        except Exception:  # pragma: no cover
            pass


class TopupGroup(click.Group):
    """A click group whose errors are one line on stderr with a meaningful exit code."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name or "topup",
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.NoArgsIsHelpError as e:
            # `topup` or `topup key` alone: the help is what was asked for.
            click.echo(e.ctx.get_help())
            code = 0
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
        except KeyboardInterrupt:
            _err("interrupted")
            code = 130
        except BrokenPipeError:
            code = 141  # reader went away (e.g. `| head`); not an error worth a message
            _silence_stdout()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG,
                               errno.EROFS, errno.EBADF):
                raise
            _err("cannot write standard output: %s" % (e.strerror or e))
            _silence_stdout()
            code = 1
        except sqlite3.DatabaseError as e:  # locked past the busy timeout, disk full, damage
            _err("database: %s" % e)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


class State:
    def __init__(self, db_path, from_command_line=False):
        self.db_path = db_path
        self.from_command_line = from_command_line
        self._conn = None
        self._writable = None

    @property
    def conn(self):
        """The database, for a command that writes to it."""
        if self._conn is None or not self._writable:
            self.close()
            self._conn = db.open_db(self.db_path)
            self._writable = True
        return self._conn

    @property
    def reader(self):
        """The database, for a command that only reads it (works on a read-only mount)."""
        if self._conn is None:
            self._conn = db.open_db(self.db_path, write=False)
            self._writable = db._read_only_why(self.db_path) is None
        return self._conn

    @property
    def writable(self):
        self.reader
        return self._writable

    def db_option(self):
        """`--db PATH ` when the database was named on the command line (a command to
        suggest must name it too), else ''."""
        if not self.from_command_line:
            return ""
        import shlex
        return "--db %s " % shlex.quote(self.db_path)

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
        interactive = sys.stdin.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        # No terminal to type on: take one line from standard input (a pipe), with no
        # prompt and no getpass warning, or say in one line how to give it.
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError, AttributeError):
            line = ""
        value = line.rstrip("\r\n")
        if not value:
            raise TopupError("no passphrase: set %s, or run topup on a terminal to type it"
                             % PASSPHRASE_ENV)
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
    if stream is None:  # closed (`>&-`): what would go there goes nowhere
        return Console(file=open(os.devnull, "w"), highlight=False, soft_wrap=True, width=1000)
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


# --- global options, before or after the subcommand ------------------------------------

def _db_here(ctx, param, value):
    if value is not None:
        state = ctx.find_object(State)
        if state is not None:
            state.close()
            state.db_path = value
            state.from_command_line = True
    return value


def add_global_options(command):
    """Give `command` and every subcommand under it the global --db option too, so that
    `topup issue --db s.db DEV 10` works as `topup --db s.db issue DEV 10` does."""
    if not any(p.name == "db_here" for p in command.params):
        command.params.append(click.Option(
            ["--db", "db_here"], metavar="PATH", expose_value=False, callback=_db_here,
            help="Supplier database (env %s; also before the command)." % DB_ENV))
    for sub in getattr(command, "commands", {}).values():
        add_global_options(sub)
    return command


@click.group(name="topup", cls=TopupGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "db_path", envvar=DB_ENV, default="./topup.db", show_default=True,
              metavar="PATH", help="Supplier database (env TOPUP_DB).")
@click.version_option(package_name="offline-topup", prog_name="topup")
@click.pass_context
def cli(ctx, db_path):
    """Issue and check signed offline top-up vouchers (the supplier side).

    The passphrase of the issuer keys comes from $TOPUP_PASSPHRASE or a prompt.
    """
    source = ctx.get_parameter_source("db_path")
    state = State(db_path, source == click.core.ParameterSource.COMMANDLINE)
    ctx.obj = state
    ctx.call_on_close(state.close)


# --- init ---------------------------------------------------------------------------------

@cli.command()
@click.pass_obj
def init(state):
    """Create a new, empty supplier database."""
    conn = db.create(state.db_path)
    conn.close()
    click.echo("created topup database %s (schema v%d, %s)" % (
        db.pg.describe(state.db_path) if db.pg.is_url(state.db_path) else state.db_path,
        db.SCHEMA_VERSION, "PostgreSQL" if db.pg.is_url(state.db_path) else "WAL"))
    click.echo("next: `topup key new` to make an issuer key (and the keypad-code key with "
               "the first one), `topup device add EUI64` to register a meter", err=True)


# --- keys ---------------------------------------------------------------------------------

@cli.group()
def key():
    """Issuer keys and keypad-code keys: new, list, activate, revoke."""


@key.command("new")
@click.option("--activate", is_flag=True, help="Make the new key the active one.")
@click.option("--code", "code_only", is_flag=True,
              help="Make a keypad-code key (X25519) instead of an issuer key: the one "
                   "`topup provision` installs on meters (SPEC §8).")
@click.pass_obj
def key_new(state, activate, code_only):
    """Generate an issuer key (Ed25519: signs vouchers), sealed with the passphrase.

    The first key becomes active; later keys only with --activate. With no active
    keypad-code key yet, a code key (X25519, sealed the same way) is made too: provisioning
    installs it on meters, and `topup code` derives each meter's code key from it. --code
    makes only a code key (for a database that has issuer keys from an older version).
    """
    conn = state.conn
    first = not keystore.list_keys(conn) and not keystore.list_code_keys(conn)
    passphrase = _passphrase(confirm=first)
    had_code_key = keystore.active_code_key(conn)
    had_command_key = keystore.active_command_key(conn)
    made = []
    if not code_only:
        import nacl.utils
        seed = nacl.utils.random(32)
        signer = keystore.Signer(seed)
        # An active key must be trusted by every meter: ADD_ISSUER_KEY for each that takes
        # commands, stored with the key in one transaction (SPEC.md §10).
        will_be_active = activate or not any(x.active for x in keystore.list_keys(conn))
        plan = (cmds.plan_add_key(conn, signer.kid, signer.public_key)
                if will_be_active else [])

        def within(insert):
            made.extend(cmds.make(conn, passphrase, plan, also=insert))
        k = keystore.new_key(conn, passphrase, activate=activate, seed=seed,
                             within=within if plan else None)
        click.echo("new key %s (%s)" % (k.kid.hex(), k.status))
        click.echo("public key %s" % k.public_key.hex(), err=True)
        _say_made(made, "add issuer key %s" % k.kid.hex())
        if will_be_active:
            _say_untrusting(conn)
        cmd = keystore.active_command_key(conn)
        if had_command_key is None and cmd is not None:
            click.echo("new command key %s: signs commands to meters (key changes, tariffs), "
                       "installed on meters at provisioning" % cmd.kid.hex())
    c = None
    code_made = []
    if code_only:
        import nacl.utils
        secret = nacl.utils.random(32)
        pending = keystore.CodeKey(secret)
        # An active code key is the one meters derive codes with: SET_CODE_KEY for each
        # that takes commands and codes, stored with the key in one transaction (SPEC §10).
        will_be_active = activate or keystore.active_code_key(conn) is None
        plan = (cmds.plan_code_key(conn, pending.kid, pending.public_key)
                if will_be_active else [])

        def within_code(insert):
            code_made.extend(cmds.make(conn, passphrase, plan, also=insert))
        c = keystore.new_code_key(conn, passphrase, activate=activate, secret=secret,
                                  within=within_code if plan else None)
    elif had_code_key is None:
        c = keystore.active_code_key(conn)      # made with it, in the same transaction
    if c is not None:
        click.echo("new code key %s (%s): keypad codes, installed on meters at provisioning"
                   % (c.kid.hex(), c.status))
        click.echo("code public key %s" % c.public_key.hex(), err=True)
    if code_made:
        _say_made(code_made, "set code key %s" % c.kid.hex())
        click.echo("note: codes for those meters are derived with their old code key until "
                   "a receipt confirms the change (`topup han sync` or the head end, then "
                   "`topup receipts import`/`reconcile`)", err=True)


@key.command("rotate-commands", short_help="Replace the command key on every meter.")
@click.pass_obj
def key_rotate_commands(state):
    """Make a new command key (the one `topup provision` installs from now on) and a
    ROTATE_COMMAND_KEY command for every meter that takes commands, each signed by the key
    that meter holds (SPEC §10). Commands made after it for a meter are signed by the new
    key: the meter applies them strictly in order, so it holds the new key by then. The
    old key stays in the database (re-signing, meters not yet rotated).
    """
    import nacl.utils
    conn = state.conn
    if keystore.active_command_key(conn) is None:
        raise TopupError("this database has no command key yet (run `topup key new`)")
    passphrase = _passphrase()
    seed = nacl.utils.random(32)
    signer = keystore.Signer(seed)
    plan = cmds.plan_rotate(conn, signer.kid, signer.public_key)
    made = []

    def within(insert):
        made.extend(cmds.make(conn, passphrase, plan, also=insert))
    k = keystore.new_command_key(conn, passphrase, seed=seed, within=within)
    click.echo("new command key %s (active): installed on meters at provisioning from now on"
               % k.kid.hex())
    click.echo("command public key %s" % k.public_key.hex(), err=True)
    _say_made(made, "rotate the command key to %s" % k.kid.hex())
    _say_untrusting(conn)
    return 0


@key.command("list")
@click.pass_obj
def key_list(state):
    """List keys: kid, created, active, revoked, public key, and what each is for (issuer:
    signs vouchers; codes: the keypad-code key meters are given at provisioning)."""
    keys = [(k, "issuer") for k in keystore.list_keys(state.reader)]
    keys += [(k, "codes") for k in keystore.list_code_keys(state.reader)]
    keys += [(k, "commands") for k in keystore.list_command_keys(state.reader)]
    if not keys:
        click.echo("no keys (run `topup key new`)", err=True)
        return 0
    from rich.table import Table
    t = Table(box=None, pad_edge=False)
    for col in ("kid", "created", "active", "revoked", "public key", "use"):
        t.add_column(col)
    for k, use in keys:
        t.add_row(k.kid.hex(), delivery.utc(k.created), "yes" if k.active else "no",
                  delivery.utc(k.revoked) if k.revoked is not None else "no",
                  k.public_key.hex(), use)
    _console().print(t)
    if not any(use == "codes" for _, use in keys):
        click.echo("no keypad-code key: `topup key new --code` makes one", err=True)
    return 0


@key.command("activate")
@click.argument("kid")
@click.pass_obj
def key_activate(state, kid):
    """Make key KID (hex, or a unique prefix) the one `issue` signs with."""
    conn = state.conn
    k = keystore.find_key(conn, kid)
    plan = cmds.plan_add_key(conn, k.kid, k.public_key) if k.revoked is None else []
    made = []
    if plan:
        passphrase = _passphrase()

        def within(fn):
            made.extend(cmds.make(conn, passphrase, plan, also=fn))
        k = keystore.activate(conn, k.kid, within=within)
    else:
        k = keystore.activate(conn, k.kid)
    click.echo("key %s is now active" % k.kid.hex())
    _say_made(made, "add issuer key %s" % k.kid.hex())
    _say_untrusting(conn)


@key.command("revoke")
@click.argument("kid")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def key_revoke(state, kid, yes):
    """Revoke key KID: it can no longer issue, and its vouchers are void."""
    conn = state.conn
    k = keystore.find_key(conn, kid)
    if k.revoked is not None:
        raise TopupError("key %s is already revoked" % k.kid.hex())
    plan = cmds.plan_revoke_key(conn, k.kid)     # refuses to leave a meter with no key
    if not yes:
        try:
            sure = click.confirm("Revoke key %s? Every voucher it signed becomes void"
                                 % k.kid.hex(), err=True)
        except click.Abort:  # no answer (end of input)
            click.echo("", err=True)
            sure = False
        if not sure:
            click.echo("key %s not revoked" % k.kid.hex(), err=True)
            return 1
    made = []
    if plan:
        passphrase = _passphrase()

        def within(fn):
            made.extend(cmds.make(conn, passphrase, plan, also=fn))
        k = keystore.revoke(conn, k.kid, within=within)
    else:
        k = keystore.revoke(conn, k.kid)
    click.echo("key %s revoked" % k.kid.hex())
    _say_made(made, "revoke issuer key %s" % k.kid.hex())
    exposed = [e for e in cmds.exposure(conn) if e.kid == k.kid]
    if exposed:
        click.echo("note: %d meter(s) still trust it until their revocation is confirmed "
                   "by a receipt (`topup han sync`, then `topup reconcile` shows the "
                   "exposure)" % len(exposed), err=True)
    return 0


def _say_made(made, what):
    if made:
        click.echo("%d command(s) to %s made, pending delivery to %d meter(s): "
                   "`topup commands list --pending`, `topup han sync --port P`"
                   % (len(made), what, len({m.device for m in made})))


def _say_untrusting(conn):
    _, no = cmds.commandable(conn)
    if no:
        click.echo("note: %d meter(s) take no signed commands (provisioned without a command "
                   "key) and keep their trust list until provisioned again: %s"
                   % (len(no), ", ".join(registry.format_eui64(d) for d in no[:5])
                      + (", ..." if len(no) > 5 else "")), err=True)


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
@click.option("--ka-key", metavar="HEX",
              help="The meter's X25519 key-agreement public key (64 hex), for a meter "
                   "provisioned elsewhere with this database's active code key: it can then "
                   "take keypad codes (needs --public-key).")
@click.option("--label", help="A free-text note (address, customer reference).")
@click.pass_obj
def device_add(state, eui64, max_voucher, max_credit, public_key, ka_key, label):
    """Register meter EUI64 (00-11-22-33-44-55-66-77, 00:11:…:77 or 16 hex digits)."""
    pub = registry.parse_public_key(public_key) if public_key is not None else None
    ka = code_kid = None
    if ka_key is not None:
        if pub is None:
            raise TopupError("--ka-key goes with --public-key: a meter's key-agreement key "
                             "belongs to one provisioning, as its receipt key does")
        ka = registry.parse_public_key(ka_key)
        active = keystore.active_code_key(state.conn)
        if active is None:
            raise TopupError("no keypad-code key in this database (make one with `topup key "
                             "new --code`) for the meter's key-agreement key to pair with")
        code_kid = active.kid
    mv = registry.DEFAULT_MAX_VOUCHER if max_voucher is None else max_voucher
    mc = registry.DEFAULT_MAX_CREDIT if max_credit is None else max_credit
    if max_credit is None and mc < mv:
        mc = mv
    d = registry.add_device(state.conn, eui64, max_voucher=mv, max_credit=mc, public_key=pub,
                            label=label, ka_public=ka, code_kid=code_kid)
    click.echo("registered device %s (per-voucher maximum %s, maximum credit %s)"
               % (d.name, format_pence(d.max_voucher), format_pence(d.max_credit)))


@device.command("list")
@click.pass_obj
def device_list(state):
    """List registered meters with their limits and issuance counts."""
    devices = registry.list_devices(state.reader)
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
    conn = state.reader
    d = registry.get_device(conn, eui64)
    total, last, codes = conn.execute(
        "SELECT coalesce(sum(amount), 0), max(issued), "
        "coalesce(sum(CASE WHEN form = 2 THEN 1 ELSE 0 END), 0) FROM vouchers "
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
        rows.append(("    keypad codes", "yes: key-agreement key %s, code key %s"
                     % (e.ka_public.hex(), e.code_kid.hex()) if e.takes_codes else
                     "no: no key-agreement key registered (firmware older than keypad "
                     "codes); vouchers only"))
    if epochs:
        cur = epochs[-1]
        trusted = sorted(k.hex() for k in cmds.trust(conn, eui64))
        confirmed = cmds.trust(conn, eui64, confirmed=True)
        pending = len(cmds.pending_for(conn, eui64))
        held = cmds.signing_kid(conn, eui64, confirmed=True)
        heading = cmds.signing_kid(conn, eui64)
        rows.append(("signed commands", "yes: command key %s%s, %d pending (`topup commands "
                     "list --device %s`)" % (
                         held.hex() if held else "", "" if heading == held else
                         " (rotating to %s)" % heading.hex(), pending, d.name)
                     if cur.takes_commands else
                     "no: provisioned without a command key; its trust list and tariff "
                     "change only by provisioning it again"))
        rows.append(("issuer keys trusted", ", ".join(
            k + ("" if bytes.fromhex(k) in confirmed else " (pending)") for k in trusted)
            or "-"))
    rows += [
        ("per-voucher maximum", format_pence(d.max_voucher)),
        ("maximum credit", format_pence(d.max_credit)),
        ("registered", delivery.utc(d.created)),
        ("next sequence", str(d.next_sequence)),
        ("vouchers issued", "%d, total %s%s" % (d.issued_count, format_pence(total),
                                                 " (of which %d keypad codes)" % codes
                                                 if codes else "")),
        ("last issued", delivery.utc(last) if last is not None else "-"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo("%-*s  %s" % (w, k, v))
    return 0


# --- issue --------------------------------------------------------------------------------

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


_OUT_HELP = ("Output file (several vouchers in text/json/qr, or one), or folder (png/svg/"
             "cbor, several; one file each); default stdout (png/svg: the current folder). "
             "Files appear whole, via a temporary file renamed into place; an existing file "
             "is refused unless --force; a device or FIFO (e.g. /dev/null) is written in "
             "place, never replaced.")
_FORCE_HELP = "Replace existing output files (never a device or FIFO: those are written in place)."


def _note(message):
    click.echo("topup: %s" % message, err=True)


def _rest_path(path):
    root, ext = os.path.splitext(path)
    return "%s-rest%s" % (root, ext)


def _export_command(state, sink, selection, fmt, nothing_written):
    """The one command that writes what `selection` (e.g. `--batch 7`) left undelivered."""
    import shlex
    cmd = "topup %svouchers export %s --undelivered -f %s" % (state.db_option(), selection, fmt)
    if sink.dir is not None:
        cmd += " -o %s" % shlex.quote(os.path.join(sink.dir, ""))
    elif sink.destination != "-":
        out = sink.label if nothing_written and not os.path.lexists(sink.label) \
            else _rest_path(sink.label)
        if sink.out is not None and sink.out.in_place:
            out = sink.label
        cmd += " -o %s" % shlex.quote(out)
    return cmd


def _say_what_happened(state, conn, batch_id, requested, sink, why, noun="voucher"):
    """After an issue that did not finish: what is stored, what was written where, and
    the command that exports the rest — all read back from the database."""
    from . import vouchers as vq
    if batch_id is None:
        _note("%s before any %s was stored: nothing was issued" % (why, noun))
        return
    stored, delivered, undelivered, amount = vq.batch_summary(conn, batch_id)
    n = vq.count(stored)
    _note("%s — %d of %d %s%s stored (batch %d)" % (
        why, n, requested, noun, "" if requested == 1 else "s", batch_id))
    _note("stored in the database: %d %s%s, %s, %s in all" % (
        n, noun, "" if n == 1 else "s", vq.format_ranges(stored), format_pence(amount)))
    for dest, rs in sorted(delivered.items(), key=lambda kv: kv[0] or ""):
        _note("written whole to %s: %d, %s" % (
            sink.label if dest == sink.destination else vq.describe_destination(dest),
            vq.count(rs), vq.format_ranges(rs)))
    if not delivered:
        _note("written to %s: none" % sink.label)
    if undelivered:
        extra = ""
        if getattr(sink.out, "partial", False):
            extra = " (the first of them reached %s in part: a write failed mid-way there)" \
                % sink.label
        _note("stored but not written: %d, %s%s; write them with:" % (
            vq.count(undelivered), vq.format_ranges(undelivered), extra))
        click.echo("  %s" % _export_command(state, sink, "--batch %d" % batch_id, sink.fmt,
                                            not delivered), err=True)
    else:
        _note("every stored %s was written; nothing is missing" % noun)


@cli.command(context_settings={"ignore_unknown_options": True},
             short_help="Issue COUNT vouchers of AMOUNT for meter EUI64.")
@click.argument("eui64", callback=_device_arg)
@click.argument("amount")
@click.option("-n", "--count", type=click.IntRange(1, 10_000_000), default=1, show_default=True,
              help="How many vouchers (bulk issuance).")
@click.option("--expires-in", type=click.IntRange(1, 36500), metavar="DAYS",
              help="Vouchers expire this many days after issue (default: never).")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="text",
              show_default=True, help=FORMAT_HELP + ".")
@click.option("-o", "--out", metavar="PATH", help=_OUT_HELP)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=issuer.DEFAULT_BATCH,
              show_default=True, help="Vouchers per durable transaction.")
@click.pass_obj
def issue(state, eui64, amount, count, expires_in, fmt, out, force, batch_size):
    """Issue COUNT vouchers of AMOUNT (10.50, £10.50 or 50p) for meter EUI64.

    Each transaction's sequence numbers are reserved durably (committed) before its
    vouchers are written out, and what was written where is recorded once it is written
    whole. If the run stops early (Ctrl-C, SIGTERM, a full disk, a write error) it says
    exactly which vouchers are stored, which were written where, and the one command that
    writes the rest (`topup vouchers export --batch N --undelivered`); after a kill -9,
    `topup vouchers list --undelivered` finds them.
    """
    conn = state.conn
    dev = registry.get_device(conn, eui64)
    pence = parse_pence(amount, maximum=dev.max_voucher,
                        limit_name="device %s's per-voucher maximum" % dev.name)
    signer = keystore.unlock_active(conn, _passphrase())
    predicted = None
    if fmt in ("png", "svg", "cbor"):  # one file each: refuse clashes before issuing
        nxt = dev.next_sequence
        predicted = [(eui64, s) for s in range(nxt, nxt + min(count, 100_000))]
    sink = Sink(fmt, out, count, force, predicted=predicted)

    def batches(progress):
        return issuer.issue_batches(conn, signer, eui64, pence, count,
                                    expires_in=None if expires_in is None
                                    else expires_in * 86400, batch_size=batch_size,
                                    progress=progress, fmt=fmt,
                                    destination=sink.destination, delivered=sink.delivered,
                                    also=_audited("voucher"))
    code, batch_id = _run_issue(state, conn, count, fmt, sink, batches, "voucher")
    if code is not None:
        return code
    _say_issued(conn, batch_id, count, pence, dev, "voucher", "key %s" % signer.kid.hex(),
                sink)
    return 0


def _audited(action):
    """The issuer's `also` hook writing each transaction's audit row (token 'cli'), as the
    HTTP service does with the token that asked (schema v7)."""
    from .api.auth import audit

    def also(conn, batch):
        audit(conn, "cli", action, batch.device, batch.rows[0][0], batch.rows[-1][0],
              batch.amount, "batch %s; %d %ss" % (batch.batch, len(batch.rows), action),
              at=batch.issued)
    return also


def _run_issue(state, conn, count, fmt, sink, batches_of, noun):
    """Write what `batches_of(progress)` issues to `sink`, stopping cleanly at a signal or
    a write error, and record what was written where. Returns (exit code, batch id): the
    exit code is None when everything was issued and written; otherwise what happened has
    been said (what is stored, what was written where, the command that writes the rest)."""
    bar, progress = _progress_bar(count, "issuing")
    batch_id, failure = None, None
    with Interrupts() as stop:
        batches = batches_of(progress)
        try:
            if bar is not None:
                bar.start()
            for batch in batches:
                batch_id = batch.batch
                sink.write(batch)
                if stop:
                    break
        except TopupError as e:  # a write error, or the issuer refused to go on
            failure = e
        except sqlite3.Error as e:
            failure = TopupError("database: %s" % e)
            failure.exit_code = 1
        except KeyboardInterrupt:
            stop.signal = stop.signal or "SIGINT"
        finally:
            batches.close()
            if bar is not None:
                bar.stop()
        # Put the output file in place (whole records only) and record what it holds.
        try:
            sink.finish()
        except TopupError as e:
            failure = failure or e
        finally:
            sink.abort()
            if batch_id is not None and sink.pending:
                issuer.record_deliveries(conn, sink.pending, batch_id, fmt, sink.destination)
                sink.pending.clear()
        if batch_id is None and failure is not None:
            raise failure  # refused before anything was stored: a plain one-line error
        if failure is not None or stop:
            why = ("stopped: %s" % failure.message if failure is not None
                   else "interrupted by %s" % stop.description)
            _say_what_happened(state, conn, batch_id, count, sink, why, noun)
            if failure is not None:
                return (failure.exit_code if failure.exit_code != EXIT_USER else 1), batch_id
            return stop.exit_code, batch_id
    return None, batch_id


def _say_issued(conn, batch_id, count, pence, dev, noun, key, sink):
    from . import vouchers as vq
    stored, _, _, _ = vq.batch_summary(conn, batch_id)
    click.echo("issued %d %s%s of %s for %s, %s, %s (batch %d)" % (
        count, noun, "" if count == 1 else "s", format_pence(pence), dev.name,
        vq.format_ranges(stored), key, batch_id), err=True)
    if sink.out is not None and sink.destination != "-":
        click.echo("wrote %s" % sink.label, err=True)
    for path in sink.files[:5]:
        click.echo("wrote %s" % path, err=True)
    if len(sink.files) > 5:
        click.echo("wrote %d more files in %s" % (len(sink.files) - 5, sink.dir), err=True)


# --- keypad codes (SPEC.md §8) ------------------------------------------------------------

_NO_EXPIRY = ("keypad codes carry no expiry: 20 digits leave no room for a date beside the "
              "31-bit MAC (SPEC §8), so a code stays good until it is applied or its sequence "
              "falls below the meter's window; for a top-up that expires, issue a voucher "
              "(`topup issue EUI64 AMOUNT --expires-in DAYS`)")


def _no_expiry(ctx, param, value):
    if value is not None:
        raise TopupError(_NO_EXPIRY)
    return value


@cli.command(context_settings={"ignore_unknown_options": True},
             short_help="Issue COUNT keypad codes of AMOUNT for meter EUI64.")
@click.argument("eui64", callback=_device_arg)
@click.argument("amount")
@click.option("-n", "--count", type=click.IntRange(1, 10_000_000), default=1, show_default=True,
              help="How many codes (bulk issuance).")
@click.option("-f", "--format", "fmt", type=click.Choice(CODE_FORMATS), default="text",
              show_default=True, help=CODE_FORMAT_HELP + ".")
@click.option("-o", "--out", metavar="PATH",
              help="Output file (default stdout). It appears whole, via a temporary file "
                   "renamed into place; an existing file is refused unless --force; a device "
                   "or FIFO (e.g. /dev/null) is written in place, never replaced.")
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=issuer.DEFAULT_BATCH,
              show_default=True, help="Codes per durable transaction.")
@click.option("--expires-in", metavar="DAYS", expose_value=False, is_eager=True,
              callback=_no_expiry, help="Refused: codes carry no expiry (SPEC §8); use "
                                        "`topup issue` for a voucher that expires.")
@click.pass_obj
def code(state, eui64, amount, count, fmt, out, force, batch_size):
    """Issue COUNT keypad codes of AMOUNT (10.50, £10.50 or 50p) for meter EUI64: 20
    digits a customer types on the in-home display (SPEC §8), printed in groups of four.

    A code carries 1p to £655.35 (and no more than the meter's per-voucher maximum), never
    expires, and shares the meter's sequences with vouchers: it is stored, listed, exported,
    voided and reconciled like one. It is derived from the supplier code key the meter was
    given at provisioning and the meter's key-agreement key, so the meter must have been
    provisioned by firmware that takes codes. As with `topup issue`, each transaction's
    sequences are reserved durably before its codes are written out, and a run that stops
    early says exactly what is stored and written where.
    """
    conn = state.conn
    dev = registry.get_device(conn, eui64)
    top = min(keycode.MAX_AMOUNT, dev.max_voucher)
    pence = parse_pence(amount, maximum=top, limit_name=(
        "device %s's per-voucher maximum" % dev.name if top < keycode.MAX_AMOUNT
        else "the most a keypad code carries (SPEC §8; issue a voucher for more)"))
    epoch, _ = issuer._check_code_request(conn, dev, pence, count)
    code_key = keystore.unlock_code_key(conn, _passphrase(), epoch.code_kid)
    sink = Sink(fmt, out, count, force)

    def batches(progress):
        return issuer.issue_code_batches(conn, code_key, eui64, pence, count,
                                         batch_size=batch_size, progress=progress, fmt=fmt,
                                         destination=sink.destination,
                                         delivered=sink.delivered, also=_audited("code"))
    rc, batch_id = _run_issue(state, conn, count, fmt, sink, batches, "code")
    if rc is not None:
        return rc
    _say_issued(conn, batch_id, count, pence, dev, "code", "code key %s" % code_key.kid.hex(),
                sink)
    return 0


# --- show ---------------------------------------------------------------------------------

@cli.command(short_help="Deliver an existing voucher again in another format.")
@click.argument("voucher", metavar="VOUCHER_OR_FILE")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="qr",
              show_default=True, help=FORMAT_HELP + ".")
@click.option("-o", "--out", metavar="PATH", help="Output file (default stdout; png/svg: "
              "DEVICE-SEQUENCE.png/.svg in the current directory). An existing file is "
              "refused unless --force.")
@click.option("--force", is_flag=True, help=_FORCE_HELP)
def show(voucher, fmt, out, force):
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
    sink = Sink(fmt, out, 1, force, predicted=[(v.device, v.sequence)])
    try:
        sink.write([item])
        sink.finish()
    finally:
        sink.abort()
    for path in sink.files:
        click.echo("wrote %s" % path, err=True)
    if sink.out is not None and sink.destination != "-":
        click.echo("wrote %s" % sink.label, err=True)
    return 0


# --- verify -------------------------------------------------------------------------------

@cli.command(short_help="Check vouchers or a keypad code; exit 0 if acceptable.")
@click.argument("words", metavar="VOUCHER_OR_FILE_OR_CODE", nargs=-1, required=True)
@click.option("--device", "eui64", callback=_device_arg, metavar="EUI64",
              help="Check acceptance by this registered meter (default: the voucher's own, "
                   "or the meter this database issued the code for).")
@click.option("--now", type=click.IntRange(0), metavar="UNIX",
              help="Meter time for the expiry check (default: now).")
@click.pass_obj
def verify(state, words, eui64, now):
    """Decode vouchers and explain them; exit 0 if every one is acceptable, 1 if not.

    VOUCHER_OR_FILE is a text form (OTU1:…) or a file: text forms (one a line), JSON or
    JSON Lines (what `topup issue -f json` writes), or CBOR (one voucher, or a CBOR
    sequence). Only the signed bytes count: a JSON voucher whose other fields (amount,
    sequence, device, …) disagree with them is reported and makes the exit code 1.

    A keypad code (20 digits; spaces and dashes allowed) is explained for meter --device:
    incomplete, a typo (with the issued codes one typo away), issued for another meter, or
    its amount and sequence under that meter's code key (the passphrase unlocks the
    supplier code key), and its status here (outstanding, redeemed, stale, void). A code
    may be given unquoted, in its five groups.
    """
    voucher = " ".join(words)
    if len(words) > 1 and not delivery.looks_like_code(voucher):
        raise TopupError("give one voucher or file (or one keypad code) to verify")
    conn = state.reader
    if eui64 is not None:
        registry.get_device(conn, eui64)  # unknown device is a user error, before anything
    if delivery.looks_like_code(voucher):
        return _verify_code(state, conn, voucher, eui64)
    items = delivery.load_items(voucher)
    when = int(time.time()) if now is None else now
    con = _console()
    if len(items) == 1:
        item = items[0]
        if item.error is not None:
            code = _print_rejection(con, item.error.reason, item.error.detail, item.source)
        else:
            rep = explain(conn, item.raw, device=eui64, now=when)
            code = _print_report(con, rep, item.source, when)
        return max(code, _print_disagreements(con, item))
    from .verify import Cache
    cache = Cache(conn)
    bad = odd = 0
    out = []
    for item in items:
        if item.error is not None:
            line = "REJECTED: %s (%d)%s" % (
                perr.name(item.error.reason), item.error.reason,
                ": " + item.error.detail if item.error.detail else "")
            bad += 1
            v = None
        else:
            rep = explain(conn, item.raw, device=eui64, now=when, cache=cache)
            v = rep.voucher
            what = ("%s seq %d %s " % (registry.format_eui64(v.device), v.sequence,
                                       format_pence(v.amount)) if v is not None else "")
            if rep.accepted:
                line = "%sACCEPTED" % what
            else:
                bad += 1
                line = "%sREJECTED: %s (%d)%s" % (
                    what, perr.name(rep.reason), rep.reason,
                    ": " + rep.detail if rep.detail else "")
        out.append("%s: %s\n" % (item.source, line))
        if item.claims is not None and item.raw is not None:
            wrong = delivery.json_disagreements(item.claims, item.raw, v)
            out.extend("  %s\n" % _disagreement(*w) for w in wrong)
            odd += bool(wrong)
        if len(out) > 2000:
            click.echo("".join(out), nl=False)
            out = []
    click.echo("".join(out), nl=False)
    click.echo("%d voucher%s: %d accepted, %d rejected%s (at %s)" % (
        len(items), "" if len(items) == 1 else "s", len(items) - bad, bad,
        ", %d whose JSON fields disagree with the signed bytes" % odd if odd else "",
        delivery.utc(when)))
    return 1 if bad or odd else 0


def _verify_code(state, conn, text, eui64):
    from rich.markup import escape
    from .verify import explain_code

    def unlock(kid):
        return keystore.unlock_code_key(conn, _passphrase(), kid)
    rep = explain_code(conn, text, device=eui64, unlock=unlock)
    con = _console()

    def line(k, val):
        con.print("  %-10s %s" % (k, val))
    con.print("[bold]Keypad code[/] %s" % escape(keycode.grouped(rep.digits) if rep.digits
                                                  else repr(text.strip())))
    for g, dev, seq in rep.near:
        line("did you mean", "%s (issued for %s, sequence %d)" % (g, registry.format_eui64(dev),
                                                                 seq))
    if rep.kind is not None:
        line("kind", "add credit" if rep.kind == keycode.KIND_ADD else "%d (reserved)" % rep.kind)
        line("amount", "%s (%d p)" % (format_pence(rep.amount), rep.amount))
    if rep.sequence is not None:
        line("sequence", "%d (low 14 bits %d)" % (rep.sequence, rep.low))
    if rep.digits and rep.reason not in (perr.CODE_TYPO, perr.CODE_INCOMPLETE):
        line("ref", rep.ref.hex())
    if rep.db_match is not None:
        r = rep.row
        if rep.db_match == "same":
            note = "issued by this database (batch %s, %s)" % (
                "-" if r.batch is None else r.batch, delivery.utc(r.issued))
        elif rep.db_match == "different":
            note = ("[red]a different %s holds sequence %d in this database[/]"
                    % (r.form_name, rep.sequence))
        else:
            note = ("[yellow]not issued by this database[/] (yet it fits this meter's code "
                    "key: it was made with the supplier code key)")
        line("records", note)
        if rep.status is not None:
            extra = ""
            if rep.status == "redeemed":
                used = _vq.redeemed_by(conn, r)
                if used is not None:
                    extra = ": receipt %d, meter time %s" % (used[0], delivery.utc(used[1]))
                extra += "; the meter answers with the original receipt, no credit"
            elif rep.status == "void":
                extra = ": cancelled%s; a meter would still apply it" % (
                    " (%s)" % escape(r.void_note) if r.void_note else "")
            line("status", rep.status + ("" if r.reconciled or rep.status == "void"
                                         else " (not reconciled yet)") + extra)
    d = rep.device
    if d is not None:
        con.print("[bold]Device[/] %s (per-voucher maximum %s%s)" % (
            d.name, format_pence(d.max_voucher),
            "; key epoch %d, code key %s" % (rep.epoch.epoch, rep.epoch.code_kid.hex())
            if rep.epoch is not None else ""))
    if rep.accepted and rep.status in ("redeemed", "void", "stale"):
        con.print("[bold red]%s[/]: the meter %s" % (
            rep.status.upper(), {"redeemed": "applied it already: no more credit",
                                 "void": "would apply it, but it was cancelled here",
                                 "stale": "refuses it (STALE)"}[rep.status]))
        return 1
    if rep.accepted:
        con.print("[bold green]ACCEPTED[/] by device %s (SPEC §8 checks 2-6; the lockout, "
                  "replay and credit checks depend on the meter's state)" % d.name)
        return 0
    con.print("[bold red]REJECTED[/]: %s (%d)%s" % (perr.name(rep.reason), rep.reason,
                                                    ": " + escape(rep.detail) if rep.detail
                                                    else ""))
    return 1


def _disagreement(field, given, truth):
    return ("WARNING: JSON field %s says %r, but the signed voucher says %r (a meter goes "
            "by the signed bytes)" % (field, given, truth))


def _print_disagreements(con, item):
    """Warn about the informative JSON fields of `item` that disagree with its signed
    bytes; 1 if there are any, else 0."""
    from rich.markup import escape
    if item.claims is None or item.raw is None:
        return 0
    wrong = delivery.json_disagreements(item.claims, item.raw)
    for w in wrong:
        text = _disagreement(*w)
        con.print("[bold yellow]WARNING[/]" + escape(text[len("WARNING"):]))
    return 1 if wrong else 0


def _when(ts):
    """A Unix time as a date and the number, or the number alone where no calendar date
    can show it (a voucher may carry any time up to 2^48 - 1)."""
    iso = delivery.utc_or_none(ts)
    return "%s (%d)" % (iso, ts) if iso else "%d (Unix seconds; no calendar date)" % ts


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
        line("issued", _when(v.issued))
        line("expires", "never" if v.expires is None else "%s%s" % (
            _when(v.expires), " — expired" if now >= v.expires else ""))
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
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.pass_obj
def receipts_export(state, out, eui64, fmt, force):
    """Write stored receipts to an export file, in (device, index) order.

    The file appears whole (a temporary file renamed into place); an existing file is
    refused unless --force; a device or FIFO is written in place, never replaced.
    """
    from .receipts_io import write_receipts
    sql = "SELECT raw FROM receipts"
    args = ()
    if eui64 is not None:
        sql += " WHERE device = ?"
        args = (eui64,)
    raws = [bytes(r[0]) for r in state.reader.execute(sql + " ORDER BY device, idx, hash",
                                                      args)]
    n = write_receipts(out, raws, fmt, force=force)
    click.echo("wrote %d receipt%s to %s" % (n, "" if n == 1 else "s", out), err=True)
    return 0


@cli.command("reconcile", short_help="Match receipts to issued vouchers; exit 1 on anomalies.")
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


@cli.command("report", short_help="Report the last reconciliation: summary, CSV, HTML.")
@click.option("--csv", "csv_path", metavar="PATH",
              help="One row per voucher with its status (anomalies go to PATH-anomalies.csv).")
@click.option("--html", "html_path", metavar="PATH",
              help="A self-contained HTML report with charts (no network needed).")
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.pass_obj
def report_cmd(state, csv_path, html_path, force):
    """Report the last reconciliation: terminal summary, CSV for finance, HTML.

    Files appear whole or not at all (a temporary file renamed into place); existing files
    are refused unless --force.
    """
    from . import report
    s = report.load(state.reader)
    if csv_path is None and html_path is None:
        report.print_summary(_console(), s)
        return 0
    report.check_outputs(csv_path, html_path, force)
    if csv_path is not None:
        for path in report.write_csv(s, csv_path, force=force):
            click.echo("wrote %s" % path, err=True)
    if html_path is not None:
        click.echo("wrote %s" % report.write_html(s, html_path, force=force), err=True)
    if s.imported_since:
        click.echo("topup: note: %d receipts were imported after this reconciliation; run "
                   "`topup reconcile` again" % s.imported_since, err=True)
    return 0


def required_port(env, what):
    """An option callback: the port, or a one-line error naming the option and `env`."""
    def check(ctx, param, value):
        if not value:
            raise TopupError("no %s: give --port PORT or set %s" % (what, env))
        return value
    return check


@cli.command("headend", short_help="Receive the receipts meters push over the WAN.")
@click.option("--port", "-p", envvar="TOPUP_WAN_PORT", metavar="PORT",
              callback=required_port("TOPUP_WAN_PORT", "WAN port"),
              help="The meters' WAN link: a serial port or pyserial URL (env TOPUP_WAN_PORT).")
@click.option("--idle-exit", type=click.FloatRange(0, min_open=True), metavar="SECONDS",
              help="Stop once this long has passed with no new receipt stored (traffic alone "
                   "does not keep it running; default: run until Ctrl-C).")
@click.option("--to", "service", envvar="TOPUP_SERVICE_URL", metavar="URL",
              help="Relay the pushes to the vending service at URL (`topup serve`: POST "
                   "/v1/receipts) instead of a local database (env TOPUP_SERVICE_URL).")
@click.option("--token-env", default="TOPUP_API_TOKEN", show_default=True, metavar="NAME",
              help="With --to: the environment variable holding an API token with scope "
                   "'ingest' (`topup token new --scope ingest`).")
@click.pass_obj
def headend_cmd(state, port, idle_exit, service, token_env):
    """Receive the receipts meters push when their WAN is back; store them and send a
    signed acknowledgement of those held with a verified signature. Each answer also
    carries that meter's pending signed commands (at most 4, in number order: `topup
    commands list`); their receipts come back with its next push and mark them applied.

    Acknowledgements are signed with the active issuer key (the meters trust it), so the
    passphrase comes from $TOPUP_PASSPHRASE or a prompt.

    With --to URL the head end needs no database and no passphrase: it relays each push to
    the service, which stores it, signs the acknowledgement and adds the pending commands;
    the answer goes back to the meter unchanged, so only what the service holds is
    acknowledged. If the service cannot be reached the push is tried again for a few
    seconds, then the meter is told BUSY: it keeps its receipts and pushes them again.
    """
    import serial
    from . import headend
    if service:
        token = os.environ.get(token_env)
        if not token:
            raise TopupError("no API token: set %s to a token with scope 'ingest' (`topup "
                             "token new --scope ingest` on the service's database)" % token_env)
        if not service.startswith(("http://", "https://")):
            raise TopupError("--to needs the service's http:// or https:// URL, not %r"
                             % service)
        conn = signer = None
    else:
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
    log = lambda message: con.print(escape(message))  # noqa: E731
    until = ("Ctrl-C stops" if idle_exit is None
             else "stops after %g s with no new receipt" % idle_exit)
    if service:
        uplink = headend.ServiceLink(service, token)
        server = headend.RelayHeadEnd(link, "wan:%s" % port, uplink, log=log)
        con.print("head end listening on %s, relaying to %s (%s)" % (port, uplink.url, until))
    else:
        uplink = None
        server = headend.HeadEnd(conn, link, "wan:%s" % port, signer, log=log)
        con.print("head end listening on %s, acknowledging with key %s (%s)" % (
            port, signer.kid.hex(), until))
    try:
        server.serve(idle_exit=idle_exit)
        why = "no new receipt for %g s" % idle_exit
    except KeyboardInterrupt:
        why = "interrupted"
    except (serial.SerialException, OSError) as e:
        raise TopupError("WAN port %s failed: %s" % (port, e)) from None
    finally:
        link.close()
        if uplink is not None:
            uplink.close()
    if uplink is not None:
        con.print("head end stopped (%s): %d push(es) relayed, %d new receipt(s) stored by "
                  "the service, %d acknowledgement(s) passed on, %d push(es) refused, %d "
                  "while the service was unavailable, %d command(s) sent" % (
                      why, server.pushes, server.stored, server.acks, server.refused,
                      server.unavailable, server.commands))
        return
    con.print("head end stopped (%s): %d push(es), %d new receipt(s) stored, %d "
              "acknowledgement(s) signed, %d push(es) refused, %d command(s) sent" % (
                  why, server.pushes, server.stored, server.acks, server.refused,
                  server.commands))


# --- vouchers: find, export again, cancel ------------------------------------------------

from . import vouchers as _vq  # noqa: E402


@cli.group()
def vouchers():
    """Stored vouchers and keypad codes: list, export (again), void."""


def _selection(fn):
    """The options that select stored vouchers."""
    for opt in reversed([
            click.option("--device", "eui64", callback=_device_arg, metavar="EUI64",
                         help="Only this meter's vouchers."),
            click.option("--seq", "seq", metavar="N-M",
                         help="Only these sequences (N, N-M, N- or -M)."),
            click.option("--batch", type=click.IntRange(1), metavar="N",
                         help="Only issue batch N (one `topup issue`; it prints the number)."),
            click.option("--status", type=click.Choice(_vq.STATUSES),
                         help="Only vouchers with this status (the last reconciliation's, "
                              "with cancellations, revocations and expiry since)."),
            click.option("--form", "form", type=click.Choice(tuple(_vq.FORMS)),
                         help="Only vouchers (signed) or only keypad codes."),
            click.option("--undelivered", "delivered_", flag_value="undelivered",
                         help="Only vouchers stored but never written whole anywhere."),
            click.option("--delivered", "delivered_", flag_value="delivered",
                         help="Only vouchers written whole somewhere.")]):
        fn = opt(fn)
    return fn


def _selected(conn, eui64, seq, batch, status, form, delivery_, with_bytes=True):
    return _vq.select(conn, device=eui64, seq=_vq.parse_range(seq) if seq else None,
                      batch=batch, status=status, delivery=delivery_, with_bytes=with_bytes,
                      form=form)


@vouchers.command("list")
@_selection
@click.pass_obj
def vouchers_list(state, eui64, seq, batch, status, form, delivered_):
    """List stored vouchers and keypad codes: device, sequence, form (voucher or code),
    amount, status, batch, where written."""
    from rich.markup import escape
    from rich.table import Table
    t = Table(box=None, pad_edge=False)
    for col in ("device", "seq", "form", "amount", "status", "issued", "expires", "batch",
                "written to", "ref"):
        t.add_column(col, justify="right" if col in ("seq", "amount", "batch") else "left")
    n = total = unreconciled = codes = 0
    per = {}
    for r in _selected(state.reader, eui64, seq, batch, status, form, delivered_,
                       with_bytes=False):
        n += 1
        codes += r.is_code
        total += r.amount
        c, p = per.get(r.status, (0, 0))
        per[r.status] = (c + 1, p + r.amount)
        if r.delivery == "delivered":
            where = _vq.describe_destination(*r.delivered_to[:2])
        else:
            where = "NOT WRITTEN" if r.delivery == "undelivered" else "(not recorded)"
        st = r.status + ("" if r.reconciled or r.status == "void" else "*")
        unreconciled += st.endswith("*")
        t.add_row(registry.format_eui64(r.device), str(r.sequence), r.form_name,
                  format_pence(r.amount), st, delivery.utc(r.issued),
                  delivery.utc(r.expires) or "never",
                  "-" if r.batch is None else str(r.batch), escape(where), r.ref.hex())
    if not n:
        click.echo("no vouchers match", err=True)
        return 0
    _console().print(t)
    vouchers_ = n - codes
    what = "%d voucher%s" % (vouchers_, "" if vouchers_ == 1 else "s")
    if codes:
        what = ("%s and %d code%s" % (what, codes, "" if codes == 1 else "s") if vouchers_
                else "%d code%s" % (codes, "" if codes == 1 else "s"))
    click.echo("%s, %s: %s" % (
        what, format_pence(total),
        ", ".join("%s %d (%s)" % (st, per[st][0], format_pence(per[st][1]))
                  for st in _vq.STATUSES if st in per)))
    if unreconciled:
        click.echo("(* issued since the last `topup reconcile`: status from its expiry alone)",
                   err=True)
    return 0


@vouchers.command("export")
@_selection
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="text",
              show_default=True, help=FORMAT_HELP + ".")
@click.option("-o", "--out", metavar="PATH", help=_OUT_HELP)
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.option("--include-void", is_flag=True, help="Export cancelled (void) vouchers too.")
@click.pass_obj
def vouchers_export(state, eui64, seq, batch, status, form, delivered_, fmt, out, force,
                    include_void):
    """Write stored vouchers and codes again, in any format `topup issue` has, and record
    where (keypad codes: text, json or csv only).

    With --undelivered (and --batch N), writes exactly what an interrupted `topup issue`
    or `topup code` stored but did not write. Writing a voucher twice is harmless: it is the
    same voucher, and a meter applies it once. Void ones are left out unless --include-void.
    """
    conn = state.reader
    rows = list(_selected(conn, eui64, seq, batch, status, form, delivered_))
    if fmt not in CODE_FORMATS:
        n_codes = sum(r.is_code for r in rows)
        if n_codes:
            raise TopupError("%d of the %d selected are keypad codes, which have no %s form: "
                             "use -f text, json or csv, or --form voucher"
                             % (n_codes, len(rows), fmt))
    skipped = 0
    if not include_void:
        kept = [r for r in rows if r.status != "void"]
        skipped, rows = len(rows) - len(kept), kept
    if skipped:
        _note("left out %d void voucher%s (--include-void to export them)"
              % (skipped, "" if skipped == 1 else "s"))
    if not rows:
        _note("no vouchers match; nothing written")
        return 0
    predicted = [(r.device, r.sequence) for r in rows] if fmt in ("png", "svg", "cbor") else None
    sink = Sink(fmt, out, len(rows), force, predicted=predicted)
    failure = None
    with Interrupts() as stop:
        try:
            for i in range(0, len(rows), issuer.DEFAULT_BATCH):
                sink.write([r.issued_voucher() for r in rows[i:i + issuer.DEFAULT_BATCH]])
                if stop:
                    break
        except TopupError as e:
            failure = e
        except KeyboardInterrupt:
            stop.signal = stop.signal or "SIGINT"
        try:
            sink.finish()
        except TopupError as e:
            failure = failure or e
        finally:
            sink.abort()
        written = list(sink.pending)
        if written:
            if state.writable:
                issuer.record_deliveries(conn, written, None, fmt, sink.destination)
            else:
                _note("the database is read-only: this export is not recorded as a delivery")
    n = _vq.count(written)
    if failure is not None or stop:
        why = ("stopped: %s" % failure.message if failure is not None
               else "interrupted by %s" % stop.description)
        _note("%s: wrote %d of %d %s to %s (%s)" % (
            why, n, len(rows), _nouns(rows, len(rows)), sink.label,
            _vq.format_ranges(written)))
        if n < len(rows):
            rest = rows[n:]  # written in order, whole vouchers only
            _note("the rest were not written: %d, %s; write them with:" % (
                len(rest), _vq.format_ranges(issuer.ranges((r.device, r.sequence)
                                                            for r in rest))))
            click.echo("  %s" % _rest_command(state, sink, rest, eui64, batch, status,
                                              delivered_, fmt, include_void, n == 0, form),
                       err=True)
        if failure is not None:
            return failure.exit_code if failure.exit_code != EXIT_USER else 1
        return stop.exit_code
    _note("exported %d %s (%s) to %s" % (n, _nouns(rows, n), _vq.format_ranges(written),
                                        sink.label))
    return 0


def _nouns(rows, n):
    """'voucher(s)', 'code(s)' or 'vouchers and codes', for what `rows` holds."""
    codes = sum(r.is_code for r in rows)
    if codes and codes < len(rows):
        return "vouchers and codes"
    return ("code" if codes else "voucher") + ("" if n == 1 else "s")


def _rest_command(state, sink, rest, eui64, batch, status, delivered_, fmt, include_void,
                  nothing_written, form=None):
    """The export command that writes `rest` (the tail of a selection, in order)."""
    import shlex
    words = ["topup", state.db_option().strip() or None, "vouchers", "export"]
    devices = {r.device for r in rest}
    if len(devices) == 1:
        words += ["--device", registry.format_eui64(rest[0].device),
                  "--seq", "%d-%d" % (rest[0].sequence, rest[-1].sequence)]
    elif eui64 is not None:
        words += ["--device", registry.format_eui64(eui64)]
    if batch is not None:
        words += ["--batch", str(batch)]
    if status:
        words += ["--status", status]
    if form:
        words += ["--form", form]
    if delivered_:
        words.append("--" + delivered_)
    if include_void:
        words.append("--include-void")
    words += ["-f", fmt]
    if sink.dir is not None:
        words += ["-o", shlex.quote(os.path.join(sink.dir, ""))]
    elif sink.destination != "-":
        out = sink.label if nothing_written and (sink.out.in_place or not os.path.lexists(
            sink.label)) else _rest_path(sink.label)
        words += ["-o", shlex.quote(out)]
    return " ".join(w for w in words if w)


@vouchers.command("void")
@click.argument("ref", required=False, metavar="[REF]")
@click.option("--device", "eui64", callback=_device_arg, metavar="EUI64",
              help="The meter (with --seq), instead of REF.")
@click.option("--seq", type=click.IntRange(1), metavar="N", help="The voucher's sequence.")
@click.option("--note", metavar="TEXT", help="Why (kept with it, shown in the report).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def vouchers_void(state, ref, eui64, seq, note, yes):
    """Cancel one voucher or keypad code: REF (its reference, 8 or more hex digits), or
    --device and --seq.

    Reconciliation then counts it void: not a liability, no refund due. The meter cannot
    be told (it has no WAN): if it applies the voucher all the same, the credit is on the
    meter, the voucher counts redeemed and reconciliation names it (`void_redeemed`).
    Refused for a voucher already redeemed or already void.
    """
    conn = state.conn
    if (ref is None) == (eui64 is None and seq is None):
        raise TopupError("name one voucher: REF, or --device EUI64 --seq N")
    if ref is None and (eui64 is None or seq is None):
        raise TopupError("--device and --seq go together")
    row = _vq.find(conn, ref=ref, device=eui64, sequence=seq)
    what = "%s %d of %s (%s, ref %s)" % (row.form_name, row.sequence,
                                        registry.format_eui64(row.device),
                                        format_pence(row.amount), row.ref.hex())
    if not yes:
        try:
            sure = click.confirm("Cancel %s?" % what, err=True)
        except click.Abort:  # no answer (end of input)
            click.echo("", err=True)
            sure = False
        if not sure:
            click.echo("%s not cancelled" % what, err=True)
            return 1
    when = _vq.void(conn, row, note=note)
    click.echo("cancelled %s at %s; `topup reconcile` counts it void" % (what, delivery.utc(when)))
    return 0


for _command in cli.commands.values():
    add_global_options(_command)


# --- signed commands (SPEC.md §10) ------------------------------------------------------

def _rate_mp(what):
    """An option callback: pence with up to three decimals (`24.5`, `24.567p`) as an exact
    integer of milli-pence."""
    import re

    def convert(ctx, param, value):
        if value is None:
            return None
        t = value.strip()
        if t.endswith("p"):
            t = t[:-1]
        m = re.fullmatch(r"(0|[1-9][0-9]{0,9})(?:\.([0-9]{1,3}))?", t)
        if not m:
            raise TopupError("%s %r is not pence (write e.g. 24.5 or 24.567: at most three "
                             "decimals, milli-pence)" % (what, value))
        return int(m.group(1)) * 1000 + int((m.group(2) or "").ljust(3, "0"))
    return convert


def _effective_opt(ctx, param, value):
    """--effective: `now`, Unix seconds, or a UTC date/time (2026-12-01, 2026-12-01T06:00,
    2026-12-01 06:00:00, a trailing Z allowed)."""
    import calendar
    import re
    if value is None:
        return None
    t = value.strip()
    if t == "now":
        return int(time.time())
    if re.fullmatch(r"[0-9]{1,12}", t):
        return int(t)
    m = re.fullmatch(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[T ]([0-9]{2}):([0-9]{2})"
                     r"(?::([0-9]{2}))?)?Z?", t)
    if m:
        parts = [int(g) if g else 0 for g in m.groups()]
        try:
            import datetime
            datetime.datetime(*parts)
        except ValueError:
            m = None
        else:
            return calendar.timegm(tuple(parts) + (0, 0, 0))
    raise TopupError("--effective %r is not a time: write now, Unix seconds, or a UTC date "
                     "and time like 2026-12-01T06:00Z" % value)


@cli.group()
def tariff():
    """Change the tariff and limits of meters offline (signed SET_TARIFF commands)."""


@tariff.command("set")
@click.option("--device", "eui64", callback=_device_arg, metavar="EUI64", help="One meter.")
@click.option("--all", "all_", is_flag=True, help="Every meter that takes commands.")
@click.option("--unit-rate", callback=_rate_mp("unit rate"), metavar="PENCE_PER_KWH",
              help="Unit rate in pence per kWh, e.g. 24.5 (exact to 0.001p).")
@click.option("--standing", callback=_rate_mp("standing charge"), metavar="PENCE_PER_DAY",
              help="Standing charge in pence per day, e.g. 60.1.")
@click.option("--ec-amount", callback=_money_opt("emergency credit"), metavar="AMOUNT",
              help="Emergency credit a customer may take, e.g. 5.00.")
@click.option("--ec-threshold", callback=_money_opt("emergency threshold"), metavar="AMOUNT",
              help="Emergency credit is offered below this balance, e.g. 1.00.")
@click.option("--max-voucher", callback=_money_opt("per-voucher maximum"), metavar="AMOUNT",
              help="Largest top-up the meter takes.")
@click.option("--max-credit", callback=_money_opt("maximum credit", maximum=10**9),
              metavar="AMOUNT", help="Most credit the meter holds.")
@click.option("--effective", callback=_effective_opt, required=True, metavar="WHEN",
              help="From when: now, Unix seconds, or UTC like 2026-12-01T00:00Z (at most 7 "
                   "days back).")
@click.pass_obj
def tariff_set(state, eui64, all_, unit_rate, standing, ec_amount, ec_threshold, max_voucher,
               max_credit, effective):
    """Make a signed SET_TARIFF command for one meter (--device) or every meter that takes
    commands (--all). The meter charges the old rates up to the effective time and the new
    ones after it, exactly. Deliver with `topup han sync`."""
    if bool(eui64) == bool(all_):
        raise TopupError("give --device EUI64 or --all (one of them)")
    conn = state.conn
    args = cmds.tariff_args(effective, unit_rate_mp=unit_rate, standing_mp=standing,
                            ec_amount=ec_amount, ec_threshold=ec_threshold,
                            max_voucher=max_voucher, max_credit=max_credit)
    if eui64:
        registry.get_device(conn, eui64)
        devices = [eui64]
    else:
        devices, no = cmds.commandable(conn)
        if not devices:
            raise TopupError("no meter takes signed commands (none provisioned with a command "
                             "key)")
        if no:
            _say_untrusting(conn)
    made = cmds.make(conn, _passphrase(), cmds.plan_tariff(conn, devices, args))
    click.echo("%d SET_TARIFF command(s) made (%s), pending delivery: `topup han sync --port P`"
               % (len(made), cmds.describe_tariff(args)))
    for m in made:
        click.echo("  %s command %d" % (registry.format_eui64(m.device), m.number))


@cli.group()
def supplier():
    """Change of supplier: hand a meter over to another supplier offline (SPEC.md §10)."""


@supplier.command("change")
@click.argument("eui64", callback=_device_arg)
@click.option("--to", "to", required=True, metavar="NEW_DB",
              help="The new supplier's database (read only): its command key, issuer keys "
                   "and code key are installed on the meter.")
@click.option("--floor", type=click.IntRange(0, 0xFFFFFFFF), default=0, metavar="N",
              help="A sequence floor above this supplier's highest issued (default: that).")
@click.pass_obj
def supplier_change(state, eui64, to, floor):
    """Make the signed CHANGE_SUPPLIER command that hands meter EUI64 to the supplier whose
    database is NEW_DB: the meter drops this supplier's issuer and code keys, trusts the new
    ones, raises its sequence floor (no voucher of ours applies after it) and takes commands
    only from the new command key. Deliver with `topup han sync`; once its receipt is back,
    `topup reconcile` counts our vouchers for the meter still outstanding as refunds due."""
    conn = state.conn
    registry.get_device(conn, eui64)
    keys = cmds.new_supplier_keys(conn, to)
    plan = cmds.plan_change_supplier(conn, eui64, *keys, floor=floor)
    (m,) = cmds.make(conn, _passphrase(), plan)
    n, pence = cmds.outstanding(conn, eui64)
    click.echo("CHANGE_SUPPLIER command %d made for %s (new command key %s, %d issuer key(s), "
               "sequence floor %d), pending delivery: `topup han sync --port P`"
               % (m.number, registry.format_eui64(eui64), m.args["command_kid"],
                  len(m.args["issuer_kids"]), m.args["floor"]))
    click.echo("once the meter confirms it, %d outstanding voucher(s) for it (%s) become "
               "refunds due in `topup reconcile`" % (n, format_pence(pence)))


@supplier.command("adopt")
@click.argument("eui64", callback=_device_arg)
@click.option("--from", "from_", required=True, metavar="OLD_DB",
              help="The old supplier's database (read only), holding the meter's confirmed "
                   "change of supplier.")
@click.pass_obj
def supplier_adopt(state, eui64, from_):
    """The new supplier's side: register meter EUI64 here once the old supplier's database
    OLD_DB holds the receipt of its CHANGE_SUPPLIER to this database's command key. The
    meter's receipts continue from that receipt (verified with its own key), vouchers are
    issued above the sequence floor the command set, and this ledger opens at the meter's
    balance that receipt confirms."""
    a = cmds.adopt(state.conn, eui64, from_)
    click.echo("adopted %s: receipts from #%d, sequences up to %d refused (next issued %d); "
               "ledger opens at %s, the meter's balance confirmed by receipt %d"
               % (registry.format_eui64(eui64), a.first_index, a.floor,
                  registry.get_device(state.conn, eui64).next_sequence,
                  recon._mp(a.balance_mp), a.receipt_index))


@cli.group("commands")
def commands_group():
    """Signed commands to meters: list them, export them (text, QR, JSON)."""


def _command_selection(fn):
    fn = click.option("--device", "eui64", callback=_device_arg, metavar="EUI64",
                      help="One meter's commands.")(fn)
    fn = click.option("--pending", is_flag=True,
                      help="Only those not yet confirmed by a receipt.")(fn)
    return fn


def _selected_commands(conn, eui64, pending):
    if eui64 is not None:
        registry.get_device(conn, eui64)
    return cmds.list_commands(conn, eui64, "pending" if pending else None)


@commands_group.command("list")
@_command_selection
@click.pass_obj
def commands_list(state, eui64, pending):
    """One line per command: meter, number, kind, what it changes, status (pending: not
    confirmed by the meter yet; applied: its receipt is stored; refused: the meter's
    reason; superseded: a later provisioning replaced it)."""
    rows = _selected_commands(state.reader, eui64, pending)
    if not rows:
        click.echo("no commands%s" % (" pending" if pending else ""), err=True)
        return 0
    for r in rows:
        status = r.status
        if r.status == "applied":
            status += " (receipt %d)" % r.receipt_index
        elif r.status == "refused":
            status += " (%s)" % perr.name(r.reason)
        click.echo("%s  #%-4d %-18s %-9s %s  made %s" % (
            registry.format_eui64(r.device), r.number, r.kind_name, status.split(" ")[0]
            if r.status == "pending" else status, r.describe(), delivery.utc(r.created)))
    n = sum(1 for r in rows if r.status == "pending")
    if n:
        click.echo("%d pending on %d meter(s)" % (n, len({r.device for r in rows
                                                          if r.status == "pending"})),
                   err=True)
    return 0


@commands_group.command("export")
@_command_selection
@click.option("-f", "--format", "fmt", type=click.Choice(("text", "qr", "json")),
              default="text", show_default=True,
              help="text: OTC1: lines; qr: QR codes on the terminal; json: one object a line.")
@click.option("-o", "--out", metavar="PATH", help="Write to PATH (text, json) instead of stdout.")
@click.option("--force", is_flag=True, help=_FORCE_HELP)
@click.pass_obj
def commands_export(state, eui64, pending, fmt, out, force):
    """Write commands in their text form (OTC1: + base45), as QR codes, or as JSON, for a
    PPMID or an engineer to deliver. Pending ones in number order, per meter."""
    import json
    rows = _selected_commands(state.reader, eui64, pending)
    if not rows:
        raise TopupError("no commands to export")
    if fmt == "qr":
        if out:
            raise TopupError("--format qr prints to the terminal; use text for a file")
        for r in rows:
            click.echo("%s command %d (%s):" % (registry.format_eui64(r.device), r.number,
                                                r.kind_name))
            import io
            import segno
            buf = io.StringIO()
            segno.make(cmds.to_text(r.raw), error="m").terminal(out=buf, compact=True)
            click.echo(buf.getvalue())
        return 0
    lines = []
    for r in rows:
        if fmt == "text":
            lines.append(cmds.to_text(r.raw))
        else:
            lines.append(json.dumps({"device": registry.format_eui64(r.device),
                                     "number": r.number, "kind": r.kind_name, "args": r.args,
                                     "status": r.status, "text": cmds.to_text(r.raw)},
                                    sort_keys=True))
    data = "".join(line + "\n" for line in lines)
    if out:
        from .output import write_whole
        write_whole(out, data.encode("utf-8"), force=force)
        click.echo("wrote %d command(s) to %s" % (len(rows), out), err=True)
    else:
        click.echo(data, nl=False)
    return 0


# --- the HTTP service ------------------------------------------------------------------------

@cli.command("serve", short_help="Run the HTTP API for payment channels.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (TLS is the reverse proxy's job: docs/deploy/).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (each with its own database pool).")
@click.option("--pool-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Idle database connections kept per process.")
@click.pass_obj
def serve(state, host, port, workers, pool_size):
    """Serve the HTTP API (FastAPI on uvicorn; OpenAPI at /docs): issue vouchers and codes
    (Idempotency-Key), look them up, void them, register devices, ingest receipts,
    reconciliation, /healthz and /metrics. Requests carry `Authorization: Bearer TOKEN`
    (`topup token new`). The issuer key is unsealed once at start-up with the passphrase
    ($TOPUP_PASSPHRASE). Several processes, on one host or several, may share one database.
    """
    import uvicorn
    from .api import app as api_app
    target = state.db_path
    if "://" not in target:
        target = os.path.abspath(target)
    passphrase = _passphrase()
    application = api_app.create_app(target, passphrase, pool_size)  # refuse early
    click.echo("topup: serving %s on http://%s:%d (API docs at /docs)%s"
               % (target if "://" not in target else target.split("@")[-1], host, port,
                  "" if workers == 1 else " with %d workers" % workers), err=True)
    if workers == 1:
        uvicorn.run(application, host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=10)
        return 0
    from .api import metrics
    cleanup = metrics.setup_multiprocess()
    os.environ[DB_ENV] = target
    os.environ[PASSPHRASE_ENV] = passphrase
    os.environ["TOPUP_POOL_SIZE"] = str(pool_size)
    try:
        api_app.run_workers(host, port, workers, log_level="warning",  # TCP_NODELAY
                            timeout_graceful_shutdown=10)
    finally:
        cleanup()
    return 0


@cli.group()
def token():
    """API tokens for `topup serve`: new, list, revoke."""


@token.command("new")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(("issue", "read", "ingest", "admin")),
              help="What the token may do (repeat): issue (vouchers, codes, void), read "
                   "(look up), ingest (receipts), admin (register devices).")
@click.option("--label", metavar="TEXT", help="Who holds it (e.g. the payment channel).")
@click.pass_obj
def token_new(state, scopes, label):
    """Make an API token. Its secret is printed once, on standard output, and stored only
    as a hash: hand it to the channel now."""
    from .api import auth
    token_id, secret = auth.new_token(state.conn, scopes, label)
    click.echo(secret)
    click.echo("made API token %s (scopes: %s); its secret above is shown only this once"
               % (token_id, " ".join(s for s in auth.SCOPES if s in scopes)), err=True)
    return 0


@token.command("list")
@click.pass_obj
def token_list(state):
    """Every API token: id, scopes, label, created, revoked (never the secret)."""
    from .api import auth
    rows = auth.list_tokens(state.reader)
    if not rows:
        click.echo("no API tokens (make one with `topup token new --scope issue`)", err=True)
        return 0

    def when(t):
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t is not None else "-"
    click.echo("%-19s  %-24s  %-16s  %-16s  %s" % ("ID", "SCOPES", "CREATED", "REVOKED",
                                                   "LABEL"))
    for t in rows:
        click.echo("%-19s  %-24s  %-16s  %-16s  %s" % (t.id, " ".join(t.scopes),
                                                       when(t.created), when(t.revoked),
                                                       t.label or ""))
    return 0


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@click.pass_obj
def token_revoke(state, token_id):
    """Revoke API token ID: requests carrying it are refused (401) from now on."""
    from .api import auth
    auth.revoke_token(state.conn, token_id)
    click.echo("revoked API token %s" % token_id.split(".", 1)[0].strip())
    return 0


def compose(*commands, name="topup", help=None):
    """A `topup` group with the supplier's commands and `commands` (e.g. hil's engineer
    commands), sharing the root's options and state; global options on every command."""
    group = TopupGroup(name=name, commands=dict(cli.commands), callback=cli.callback,
                       params=list(cli.params), help=help or cli.help,
                       context_settings=dict(cli.context_settings))
    for command in commands:
        group.add_command(add_global_options(command))
    return group


def main(argv=None, group=None):
    """Run `topup` with `argv` (default sys.argv[1:]); return the exit code."""
    return (group or cli).main(args=argv, prog_name="topup", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
