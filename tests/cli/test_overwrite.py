"""Issue 9, items 4 and 5: nothing overwrites a file silently (--force replaces), and
nothing ever replaces a file that is not a regular file. Through the real `topup`."""
import os

from protocol import voucher as pv

from .conftest import DEVICE, one_line_error


def test_issue_refuses_an_existing_file_before_issuing_anything(store, tmp_path):
    out = tmp_path / "batch.txt"
    out.write_text("last week's batch\n")
    msg = one_line_error(store("issue", DEVICE, "1", "-n", "3", "-o", out))
    assert msg == "%s already exists; use --force to replace it" % out
    assert out.read_text() == "last week's batch\n"
    assert store.count("SELECT count(*) FROM vouchers") == 0
    store.ok("issue", DEVICE, "1", "-n", "3", "-o", out, "--force")
    assert [pv.parse(pv.from_text(t)).sequence for t in out.read_text().splitlines()] == [1, 2, 3]


def test_one_file_per_voucher_clashes_are_refused_up_front(store, tmp_path):
    qr = tmp_path / "qr"
    qr.mkdir()
    (qr / ("%s-2.png" % DEVICE)).write_bytes(b"not mine")
    msg = one_line_error(store("issue", DEVICE, "1", "-n", "2", "-f", "png", "-o", qr))
    assert "%s-2.png already exists; use --force" % DEVICE in msg
    assert store.count("SELECT count(*) FROM vouchers") == 0
    store.ok("issue", DEVICE, "1", "-n", "2", "-f", "png", "-o", qr, "--force")
    assert (qr / ("%s-2.png" % DEVICE)).read_bytes()[:4] == b"\x89PNG"


def test_show_report_and_receipts_export_refuse_to_overwrite(store, tmp_path):
    text = store.ok("issue", DEVICE, "1").stdout.strip()
    store("reconcile")
    for args in (["show", text, "-f", "svg", "-o"], ["report", "--csv"], ["report", "--html"],
                 ["receipts", "export"]):
        path = tmp_path / "existing"
        path.write_text("keep me")
        assert "already exists; use --force" in one_line_error(store(*args, path))
        assert path.read_text() == "keep me"
        store.ok(*args, path, "--force")
        assert path.read_text() != "keep me"
        path.unlink()
    # the anomalies file beside a CSV counts too, checked before either is written
    (tmp_path / "f-anomalies.csv").write_text("keep")
    assert "f-anomalies.csv already exists" in one_line_error(
        store("report", "--csv", tmp_path / "f.csv"))
    assert not (tmp_path / "f.csv").exists()


def test_a_device_is_written_in_place_never_replaced(store, tmp_path):
    store.ok("issue", DEVICE, "1", "-n", "2", "-o", os.devnull)
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)
    store("reconcile")
    store.ok("report", "--csv", os.devnull)  # and no /dev/null-anomalies.csv beside it
    assert not os.path.exists(os.devnull + "-anomalies.csv")


def test_a_symbolic_link_to_a_file_replaces_the_file_not_the_link(store, tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    store.ok("issue", DEVICE, "1", "-o", link, "--force")
    assert link.is_symlink() and target.read_text().startswith("OTU1:")
