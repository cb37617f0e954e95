#!/usr/bin/env python3
"""offline-topup end to end, narrated for a newcomer (`make demo`).

Every step runs the real `topup` command line (topup_cli.main): a supplier database and
issuer key; a virtual meter board (the official MicroPython VM, see hil/) flashed and
provisioned exactly as an engineer does a real one; the WAN down; a voucher issued, shown
as a QR code, handed to the meter over the HAN; credit applied; the receipt read back;
the WAN back, receipts pushed to the head end; and the supplier's reconciliation. Then the
customer's own path: credit runs out, the supplier reads a 20-digit code out over the phone
(`topup code`), the customer types it on the in-home device (a PPMID on a second virtual
board, its HAN wired to the meter's), the credit comes back armed and the customer switches
the supply on.
Everything is left in ./demo-out/ (the HTML report among it).
"""
import argparse
import os
import shlex
import shutil
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from rich.console import Console  # noqa: E402
from rich.panel import Panel  # noqa: E402

from hil.two_board import Cable, Ppmid, flash_ppmid  # noqa: E402
from hil.virtual import VirtualBoard, VirtualBoardError  # noqa: E402
try:                                    # the `topup` command: the supplier's and the engineer's
    from topup_cli import main as topup  # noqa: E402
except ImportError:
    from host.cli import main as topup  # noqa: E402
from protocol import voucher as pv  # noqa: E402

METER = "70-B3-D5-F0-00-00-00-A1"
OUT = os.path.join(ROOT, "demo-out")
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
        raise DemoFailed("`topup %s` exited %d, expected %d" % (" ".join(map(str, args)), code, expect))
    return code


def show_display(ppmid, title="the PPMID's display"):
    rows = (ppmid.text.split("\n") + [""] * 8)[:8]
    con.print(Panel("\n".join(r.ljust(16) for r in rows), title=title, expand=False,
                    border_style="magenta"))


def press(ppmid, keys, expect):
    con.print("[bold magenta]keys:[/] %s" % keys)
    ppmid.type(keys, expect=expect, timeout=15)


def demo(work, board, ppmid_board=None):
    os.environ["TOPUP_DB"] = os.path.join(work, "supplier.db")
    os.environ["TOPUP_PASSPHRASE"] = "demo passphrase - use a real one"
    os.chdir(work)

    con.print(Panel.fit(
        "A prepayment meter whose smart-metering WAN is down cannot be topped up remotely. "
        "The supplier issues a [bold]signed offline voucher[/] instead: a short code or QR "
        "the customer types or scans into the in-home device (PPMID), which hands it to the "
        "meter over the Home Area Network. The meter checks the Ed25519 signature, its own "
        "id, the limits and the sequence number, adds the credit with no network at all, "
        "and signs a receipt that the supplier reconciles later.",
        title="offline-topup, end to end", border_style="cyan"))
    con.print("Working in %s; the database is $TOPUP_DB, the key passphrase "
              "$TOPUP_PASSPHRASE (or a prompt)." % work)

    step("1. The supplier: a database, an issuer key, a registered meter",
         "One SQLite file holds keys, meters, vouchers and receipts. The private key is "
         "sealed with the passphrase (argon2id + secret box); meters trust its public half.")
    run("init")
    run("key", "new")
    run("device", "add", METER, "--max-voucher", "50", "--max-credit", "250", "--label", "Demo flat")

    step("2. A meter board on the bench",
         "A virtual board: the official MicroPython VM behind a USB-serial-like REPL port, a "
         "HAN port for the in-home device and a WAN port for the head end, and a raw flash "
         "partition kept in a file. The same firmware files go onto an ESP32.")
    con.print("REPL %s   HAN %s   WAN %s" % (board.repl_port, board.han_port, board.wan_port))

    step("3. The engineer flashes and provisions it",
         "`topup flash` compiles the firmware with mpy-cross for the board's MicroPython, "
         "copies it with mpremote and checks every file by SHA-256. `topup provision` runs the "
         "firmware's own provisioning: identity, trusted issuer keys, limits, tariff, opening "
         "credit; the meter makes its receipt key from its random source, and the public half "
         "is registered here.")
    run("flash", "--port", board.repl_port)
    run("provision", "--port", board.repl_port, "--device", METER, "--initial-credit", "2.00")
    time.sleep(0.5)  # the meter application starts after the soft reset
    cable = None
    if ppmid_board is not None:
        con.print("The customer's in-home device (PPMID) is a second board: a 4x4 keypad and a "
                  "128x64 display; its HAN UART is wired to the meter's. Its firmware "
                  "(firmware/ppmid/) goes on the same way.")
        r = flash_ppmid(ppmid_board.repl_port)
        con.print("flashed %d files (%d bytes) to the PPMID on %s; all verified"
                  % (r["files"], r["bytes"], ppmid_board.repl_port))
        cable = Cable(board.link_port, ppmid_board.han_port)

    step("4. The WAN is down",
         "The meter has £2.00 and no way to be topped up remotely.")
    board.set_wan(False)
    run("han", "status", "--port", board.han_port)

    step("5. The supplier issues a £10.50 voucher and sends it as a QR code",
         "The sequence number is reserved and the voucher stored (committed to disk) before "
         "it is handed out, so no crash can ever issue the same sequence twice.")
    run("issue", METER, "10.50", "--expires-in", "30", "--out", "voucher.txt")
    raw = pv.from_text(open("voucher.txt").read().strip())
    run("show", "voucher.txt", "--format", "qr")
    run("show", "voucher.txt", "--format", "png", "--out", "voucher.png")

    step("6. The in-home device hands it to the meter over the HAN",
         "The meter verifies it (pure-Python Ed25519 on MicroPython), commits the credit and "
         "its signed receipt to flash together, and answers with the receipt.")
    run("han", "submit", "--port", board.han_port, "voucher.txt")
    run("han", "status", "--port", board.han_port)

    step("7. The reply was lost, so the device tries again",
         "A resubmission is idempotent: the same receipt comes back and nothing changes.")
    run("han", "submit", "--port", board.han_port, "voucher.txt")

    step("8. A tampered voucher is refused",
         "One bit of the amount flipped: the signature no longer holds; no credit moves.")
    at = raw.index(b"\x03\x19", 17)  # the amount field (key 3, 16-bit), past the random kid
    tampered = bytearray(raw)
    tampered[at + 3] ^= 0x01
    with open("tampered.cbor", "wb") as f:
        f.write(tampered)
    run("han", "submit", "--port", board.han_port, "tampered.cbor", expect=1)

    step("9. The customer uses energy",
         "The meter counts 1 Wh pulses at the unit rate (24.5 p/kWh) plus the standing "
         "charge, in exact milli-pence. Here 2 kWh (49 p) and, the board's clock standing "
         "still for the demo, no standing charge.")
    board.add_pulses(2000)
    deadline = time.monotonic() + 10
    while board.status()["pulses_pending"] and time.monotonic() < deadline:
        time.sleep(0.02)              # the meter takes the pulses in its next pass
    time.sleep(0.2)
    run("han", "status", "--port", board.han_port)

    if ppmid_board is not None:
        customer(board, Ppmid(ppmid_board))

    step("10. An engineer reads the receipts out over the HAN",
         "Signed by the meter's own key and hash-chained; written to a file the supplier can "
         "import.")
    run("han", "receipts", "--port", board.han_port, "--out", "receipts.cbor")
    run("receipts", "import", "receipts.cbor")

    step("11. The WAN is back: the meter pushes its receipts to the head end",
         "Receipts queued while the WAN was down go up on their own; the head end stores "
         "them and acknowledges. Importing the same receipt twice changes nothing.")
    # The head end is listening when the link comes up, as a real one always is.
    threading.Timer(1.0, board.set_wan, [True]).start()
    run("headend", "--port", board.wan_port, "--idle-exit", "3")

    step("12. The supplier reconciles",
         "Every receipt's signature and chain checked, every voucher matched: redeemed, "
         "outstanding (a liability), stale or expired (a refund), void; anything that should "
         "never happen is an anomaly.")
    if cable is not None:
        cable.close()
    run("reconcile")
    run("report", "--html", os.path.join(work, "report.html"), "--csv", os.path.join(work, "vouchers.csv"))

    con.print()
    con.print(Panel.fit(
        "Issued, delivered over the HAN with the WAN down, applied once, receipted, pushed to "
        "the head end and reconciled. The HTML report: %s\n"
        "Next: `topup --help`, README.md, protocol/SPEC.md." % os.path.join(work, "report.html"),
        title="done", border_style="green"))


def customer(board, ppmid):
    step("9a. The customer's own path: the credit runs out",
         "49 kWh later the credit is gone: the meter interrupts the supply and commits that at "
         "once, so a power cut cannot bring it back on. The WAN is still down.")
    board.add_pulses(49100)
    deadline = time.monotonic() + 10
    while board.status()["pulses_pending"] and time.monotonic() < deadline:
        time.sleep(0.02)
    ppmid.wait_for("Supply off", timeout=15)
    run("han", "status", "--port", board.han_port)
    show_display(ppmid)

    step("9b. The customer phones the supplier, who reads out a 20-digit code",
         "No voucher to scan, no WAN: a keypad code (SPEC §8) carries the amount, the low bits "
         "of the sequence and a 31-bit MAC under a key only this meter and the supplier can "
         "derive (X25519 at provisioning), with a Damm check digit that catches any one "
         "mistyped digit or swapped pair.")
    run("code", METER, "15.00", "--out", "code.txt")
    digits = "".join(ch for ch in open("code.txt").read() if ch.isdigit())
    con.print("the supplier reads out: [bold]%s[/]" % " ".join(digits[i:i + 4] for i in range(0, 20, 4)))

    step("9c. The customer types it on the PPMID",
         "A slip of one digit first: the PPMID says so at once, the meter does not count it "
         "against the lockout, and the digits stay to be corrected.")
    typo = digits[:9] + str((int(digits[9]) + 1) % 10) + digits[10:]
    press(ppmid, " ".join(typo[i:i + 4] for i in range(0, 20, 4)) + " #", "Typo")
    show_display(ppmid)
    press(ppmid, "D " + " ".join(digits[i:i + 4] for i in range(0, 20, 4)) + " #", "added")
    ppmid.wait_for("Press B to switch on")
    show_display(ppmid)
    con.print("The credit is back, but the supply is only [bold]armed[/]: a heater left on "
              "does not come back on unattended (as SMETS2 meters do it).")
    run("han", "status", "--port", board.han_port)

    step("9d. The customer confirms: B switches the supply on",
         "The PPMID asks the meter over the HAN (request 6, confirm); the meter commits the "
         "supply on and closes its relay. The meter's own button would do the same.")
    press(ppmid, "B", "Supply on")
    show_display(ppmid)
    deadline = time.monotonic() + 5
    while board.relay is not True and time.monotonic() < deadline:
        time.sleep(0.02)
    con.print("relay: %s" % ("closed, the supply is on" if board.relay else "open"))
    run("han", "status", "--port", board.han_port)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=OUT, help="folder for the demo's files (emptied first)")
    args = ap.parse_args(argv)
    work = os.path.abspath(args.out)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cwd = os.getcwd()
    # The board's clock is frozen, as the HIL rig freezes it: `topup provision` sets it to the
    # provisioning time and it stays there, so no standing charge (60 p a day) runs between
    # the steps however long they take, and every balance printed is exact and the same on
    # every run (a voucher issued a moment later moves meter time on, uncharged: SPEC.md §7).
    board = VirtualBoard(os.path.join(work, "board"), clock=int(time.time()), freeze=True)
    ppmid_board = VirtualBoard(os.path.join(work, "ppmid"))
    try:
        board.start()
        ppmid_board.start()
        demo(work, board, ppmid_board)
    except (DemoFailed, VirtualBoardError, AssertionError) as e:
        con.print("[bold red]demo failed:[/] %s" % e)
        return 1
    finally:
        ppmid_board.stop()
        board.stop()
        os.chdir(cwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
