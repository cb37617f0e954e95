"""Issue 9: the composed `topup` (host never imports hil), money a person reads without
milli-pence digits (item 10), the engineer commands' help and errors (item 14)."""
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, TOPUP


def test_host_never_imports_hil():
    code = ("import sys, host.cli, host.report, host.headend, host.vouchers; "
            "print(sorted(m for m in sys.modules if m == 'hil' or m.startswith('hil.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(ROOT), check=True)
    assert r.stdout.strip() == "[]"
    for path in sorted((ROOT / "host").glob("*.py")):
        for line in path.read_text().splitlines():
            words = line.split()
            assert not (words[:2] in (["import", "hil"], ["from", "hil"]) or
                        (words and words[0] in ("import", "from") and len(words) > 1 and
                         words[1].startswith("hil."))), (path, line)


def test_topup_is_composed_in_one_place():
    from topup_cli import cli
    names = set(cli.commands)
    assert {"issue", "vouchers", "verify", "report", "flash", "provision", "sim", "han"} <= names
    import host.cli
    assert "han" not in host.cli.cli.commands  # the supplier's group stays the supplier's
    assert Path(TOPUP).read_text().count("from topup_cli import main") == 1
    r = subprocess.run([sys.executable, "-m", "topup_cli", "--help"], capture_output=True,
                       text=True, cwd="/")
    assert r.returncode == 0 and "flash" in r.stdout and "vouchers" in r.stdout


def test_balances_read_in_pounds_and_pence_with_the_remainder_apart():
    from hil.commands import receipt_line, status_lines
    from protocol import receipt as pr
    text = "\n".join(status_lines({1: bytes.fromhex("70b3d5f0000000a1"), 2: "0.2.0",
                                   3: 12499999, 4: True, 5: False, 6: 3, 7: 4, 8: 1500}))
    assert "balance           £124.99 + 0.999p" in text
    assert "emergency credit  in use (£0.01 + 0.5p)" in text
    assert "device            70-B3-D5-F0-00-00-00-A1" in text
    from tests.host.test_reconcile_data import Meter
    m = Meter(bytes.fromhex("70b3d5f0000000a1"), 0xA1)
    m.balance = 23799898
    line = receipt_line(pr.parse(m.emergency(5, 1_800_000_000)))
    assert line.endswith("balance £237.99 + 0.898p → £237.99 + 0.898p")
