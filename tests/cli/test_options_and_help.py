"""Issue 9, items 8 and 14: options after the subcommand, help and error rough edges.
Through the real `topup` executable."""
import csv
import json
import re

import pytest

from host.receipts_io import write_receipts
from tests.host.test_reconcile_data import Meter

from .conftest import DEVICE, DEVICE_BYTES, one_line_error


def test_db_after_the_subcommand(topup, tmp_path):
    other = tmp_path / "s.db"
    topup.ok("init", "--db", other)
    topup.ok("key", "new", "--db", other)
    topup.ok("device", "add", "--db", other, DEVICE)
    r = topup.ok("issue", "--db", other, DEVICE, "10")
    assert r.stdout.startswith("OTU1:")
    assert topup.ok("vouchers", "list", "--db", other).stdout.count(DEVICE) == 1
    assert not (tmp_path / "supplier.db").exists()  # $TOPUP_DB was not used
    # and the subcommand's --db wins over the group's
    r = topup("--db", tmp_path / "nowhere.db", "device", "list", "--db", other)
    assert r.returncode == 0 and DEVICE in r.stdout


def test_bare_topup_prints_the_help(topup):
    r = topup.ok()
    assert r.stdout.startswith("Usage: topup [OPTIONS] COMMAND [ARGS]...")
    assert r.stderr == "" and "error" not in r.stdout
    r = topup.ok("vouchers")
    assert r.stdout.startswith("Usage: topup vouchers") and r.stderr == ""


def test_command_summaries_are_whole_sentences(topup):
    out = topup.ok("--help").stdout
    line = [ln for ln in out.splitlines() if ln.strip().startswith("issue ")][0]
    assert line.split(None, 1)[1] == "Issue COUNT vouchers of AMOUNT for meter EUI64."
    assert "(e.g." not in out
    for name in ("flash", "provision", "verify", "report", "reconcile", "show", "headend",
                 "vouchers", "init", "key", "device", "receipts", "sim", "han"):
        summary = [ln for ln in out.splitlines() if ln.strip().startswith(name + " ")][0]
        assert not summary.rstrip().endswith("..."), summary


@pytest.mark.parametrize("args, env", [
    (["flash"], "TOPUP_PORT"), (["provision", "--device", DEVICE], "TOPUP_PORT"),
    (["han", "status"], "TOPUP_HAN_PORT"), (["han", "submit", "OTU1:X"], "TOPUP_HAN_PORT"),
    (["headend"], "TOPUP_WAN_PORT")])
def test_a_missing_port_names_the_option_and_the_environment_variable(store, args, env):
    msg = one_line_error(store(*args))
    assert "--port" in msg and env in msg, msg


def test_no_terminal_and_no_passphrase_is_one_clean_line(store):
    r = store("issue", DEVICE, "1", env={"TOPUP_PASSPHRASE": None})
    msg = one_line_error(r)
    assert "Warning" not in r.stderr and "TOPUP_PASSPHRASE" in msg
    assert store.count("SELECT count(*) FROM vouchers") == 0
    # a passphrase piped in still works, without a prompt or a warning
    r = store("issue", DEVICE, "1", env={"TOPUP_PASSPHRASE": None},
              input="correct horse battery staple\n")
    assert r.returncode == 0 and r.stdout.startswith("OTU1:") and "Warning" not in r.stderr


def test_answering_no_to_key_revoke(store):
    kid = store.ok("key", "list").stdout.splitlines()[1].split()[0]
    r = store("key", "revoke", kid, input="n\n")
    assert r.returncode == 1 and "key %s not revoked" % kid in r.stderr
    assert "aborted" not in r.stderr and "error" not in r.stderr
    r = store("key", "revoke", kid)  # no answer at all (end of input): not revoked either
    assert r.returncode == 1 and "not revoked" in r.stderr
    assert store.count("SELECT count(*) FROM keys WHERE revoked IS NOT NULL") == 0


@pytest.mark.parametrize("eui", ["00-00-00-00-00-00-00-00", "FF-FF-FF-FF-FF-FF-FF-FF",
                                 "ffffffffffffffff", "00:00:00:00:00:00:00:00"])
def test_reserved_eui64s_are_refused(store, eui):
    assert "not a meter's EUI-64" in one_line_error(store("device", "add", eui))


def test_headend_idle_exit_must_be_positive(store):
    assert "--idle-exit" in one_line_error(store("headend", "--port", "/dev/null",
                                                 "--idle-exit", "-1"))


def test_one_device_id_format_and_pounds_in_json(store, tmp_path):
    r = store.ok("issue", DEVICE, "7.25", "-f", "json")
    assert '"amount":"£7.25"' in r.stdout and "\\u00a3" not in r.stdout
    assert json.loads(r.stdout)["device"] == DEVICE
    m = Meter(DEVICE_BYTES, 0xA1)
    write_receipts(tmp_path / "r.cbor", [m.emergency(5, 1_800_000_000)])
    store.ok("receipts", "import", tmp_path / "r.cbor")
    store.ok("receipts", "export", tmp_path / "r.jsonl", "-f", "jsonl")
    assert json.loads((tmp_path / "r.jsonl").read_text())["device"] == DEVICE


def test_the_anomalies_csv_keeps_whole_hashes(store, tmp_path):
    """A fork's detail names the receipts by abbreviated hashes; the CSV writes them out."""
    m = Meter(DEVICE_BYTES, 0xA1)
    store.ok("device", "add", "70-B3-D5-F0-00-00-00-C3", "--public-key", m.public.hex())
    m.device = bytes.fromhex("70b3d5f0000000c3")
    a = m.emergency(5, 1_800_000_000)
    b = m.make(2, 1_800_000_001, 0, 0, index=0, amount=6)  # another receipt at index 0
    write_receipts(tmp_path / "r.cbor", [a, b])
    store.ok("receipts", "import", tmp_path / "r.cbor")
    assert store("reconcile").returncode == 1
    store.ok("report", "--csv", tmp_path / "f.csv")
    with open(tmp_path / "f-anomalies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fork = [r for r in rows if r["kind"] == "chain_fork"][0]
    import hashlib
    hashes = {hashlib.sha256(x).hexdigest() for x in (a, b)}
    found = set(re.findall(r"\b[0-9a-f]{64}\b", fork["detail"]))
    assert found == hashes, fork["detail"]
    assert "…" not in fork["detail"]
    assert fork["receipt_hash"] in hashes
