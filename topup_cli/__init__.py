"""The `topup` command as an engineer or a supplier runs it: the supplier's commands
(host/) and the engineer's (hil/: flash, provision, sim, han) in one group.

This is the one place that depends on both host and hil; host never imports hil, and hil
takes nothing from here. `topup_cli.cli` is the click group, `topup_cli.main(argv=None)`
returns the exit code (the console script `topup` calls it; so does `python -m topup_cli`).
"""
import sys

from hil.commands import COMMANDS
from host.cli import compose, main as _main

cli = compose(*COMMANDS, help="""Offline top-up vouchers and keypad codes: the supplier's commands
(keys, meters, issue, code, vouchers, verify, receipts, reconcile, report, headend, and
signed commands to meters: tariff, supplier, commands) and the engineer's (flash,
provision, sim, han; `han sync` delivers pending commands).

The passphrase of the issuer keys comes from $TOPUP_PASSPHRASE or a prompt; the database
from --db or $TOPUP_DB; board ports from --port or $TOPUP_PORT / $TOPUP_HAN_PORT.
""")


def main(argv=None):
    """Run `topup` with `argv` (default sys.argv[1:]); return the exit code."""
    return _main(argv, group=cli)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
