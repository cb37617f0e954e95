#!/usr/bin/env python3
"""The supplier side of offline-topup, end to end, narrated for a newcomer (`make demo`).

Every step runs the real `topup` command line (host.cli.main) in a temporary directory:
create a database, make an issuer key, register a meter, issue a voucher, deliver it as
text and QR code, verify it, and watch a tampered copy and a wrong meter get refused.
"""
import argparse
import os
import shlex
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from rich.console import Console  # noqa: E402
from rich.panel import Panel  # noqa: E402

from host.cli import main as topup  # noqa: E402
from protocol import voucher as pv  # noqa: E402

METER = "00-11-22-33-44-55-66-77"
NEIGHBOUR = "00-11-22-33-44-55-66-88"
con = Console(highlight=False)


class DemoFailed(Exception):
    pass


def step(title, words):
    con.print()
    con.rule("[bold cyan]%s" % title, align="left")
    con.print(words)


def run(*args, expect=0):
    """Show the command, run it through the real CLI, check its exit code."""
    con.print("[bold green]$[/] topup %s" % " ".join(shlex.quote(str(a)) for a in args),
              soft_wrap=True)
    sys.stdout.flush()
    code = topup([str(a) for a in args])
    sys.stdout.flush()
    sys.stderr.flush()
    if code != expect:
        raise DemoFailed("`topup %s` exited %d, expected %d" % (" ".join(args), code, expect))
    return code


def demo(work):
    os.environ["TOPUP_DB"] = os.path.join(work, "supplier.db")
    os.environ["TOPUP_PASSPHRASE"] = "demo passphrase - use a real one"
    os.chdir(work)

    con.print(Panel.fit(
        "A prepayment meter whose smart-metering WAN is down cannot be topped up remotely. "
        "The supplier issues a [bold]signed offline voucher[/] instead: a short code or QR "
        "the customer types or scans into the in-home display, which hands it to the meter. "
        "The meter checks the Ed25519 signature, the meter id, the limits and the sequence "
        "number, and adds the credit with no network at all. This is the supplier's side.",
        title="offline-topup: the supplier side", border_style="cyan"))
    con.print("Working in %s; the database is $TOPUP_DB, the key passphrase "
              "$TOPUP_PASSPHRASE (or a prompt)." % work)

    step("1. Create the supplier database",
         "One SQLite file (WAL, synchronous=FULL) holds keys, meters and every voucher issued.")
    run("init")

    step("2. Make an issuer key",
         "An Ed25519 key pair. The private half is sealed with the passphrase (argon2id + "
         "secret box); the meter trusts the public half, named by its 8-byte kid.")
    run("key", "new")
    run("key", "list")

    step("3. Register a meter",
         "Meters are known by their EUI-64. The limits are the meter's own: a larger voucher "
         "would be refused by the meter, so the issuer refuses to make one.")
    run("device", "add", METER, "--max-voucher", "50", "--max-credit", "250",
        "--label", "Demo flat")
    run("device", "show", METER)

    step("4. Issue a £10.50 voucher, valid for 30 days",
         "The sequence number is reserved and the voucher stored (committed to disk) before "
         "it is handed out, so no crash can ever issue the same sequence twice.")
    run("issue", METER, "10.50", "--expires-in", "30", "--out", "voucher.txt")
    text = open("voucher.txt").read().strip()
    raw = pv.from_text(text)
    con.print("\nThe text form (prefix OTU1: and base45 of the %d-byte COSE_Sign1), ready for "
              "SMS or print:" % len(raw))
    con.print("[bold yellow]%s[/]" % text, soft_wrap=True)

    step("5. Deliver it as a QR code",
         "On the terminal, and as PNG and SVG files for letters, apps and web pages.")
    run("show", "voucher.txt", "--format", "qr")
    run("show", "voucher.txt", "--format", "png", "--out", "voucher.png")
    run("show", "voucher.txt", "--format", "svg", "--out", "voucher.svg")

    step("6. Verify it as the meter would",
         "`topup verify` decodes any voucher and runs the meter's checks (SPEC.md §2.1) "
         "with that meter's limits.")
    run("verify", "voucher.txt", "--device", METER)

    step("7. A tampered copy is refused",
         "Flip one bit of the amount (£10.50 becomes something else): the signature no "
         "longer matches.")
    at = raw.index(b"\x03\x19")  # the amount field: key 3, a 16-bit unsigned integer
    tampered = bytearray(raw)
    tampered[at + 3] ^= 0x01
    with open("tampered.cbor", "wb") as f:
        f.write(tampered)
    con.print("amount %d p in the copy, %d p as signed"
              % (pv.parse(bytes(tampered)).amount, pv.parse(raw).amount))
    run("verify", "tampered.cbor", "--device", METER, expect=1)

    step("8. The right voucher on the wrong meter is refused",
         "Each voucher names its meter; the neighbour's meter will not take it.")
    run("device", "add", NEIGHBOUR, "--label", "Next door")
    run("verify", "voucher.txt", "--device", NEIGHBOUR, expect=1)

    step("9. Mistakes are one clear line, and change nothing",
         "Amounts are parsed exactly into pence; a bad one is refused before anything is "
         "issued.")
    run("issue", METER, "1.234", expect=2)
    run("issue", METER, "60", expect=2)

    con.print()
    con.print(Panel.fit(
        "Issued, delivered, verified; tampering and the wrong meter refused. "
        "Files: %s "
        "Next: `topup --help`, protocol/SPEC.md for the formats." % ", ".join(
            sorted(f for f in os.listdir(work) if not f.startswith("supplier.db"))),
        title="done", border_style="green"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="topup-demo-")
    cwd = os.getcwd()
    try:
        demo(work)
    except DemoFailed as e:
        con.print("[bold red]demo failed:[/] %s" % e)
        return 1
    finally:
        os.chdir(cwd)
        if args.keep:
            con.print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
