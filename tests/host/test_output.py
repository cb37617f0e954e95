"""host/output.py: files appear whole or not at all, an existing file is replaced only when
asked, a device is written in place, and a failed write is cut back to whole records."""
import errno
import os
import stat

import pytest

from host import issuer, keystore, vouchers
from host.errors import TopupError
from host.output import OutputFile, WriteError, check_target, write_whole

from .test_reconcile_data import A, T0, World


def test_a_file_appears_only_when_committed(tmp_path):
    path = tmp_path / "out.txt"
    out = OutputFile(path)
    out.write(b"one\n")
    assert not path.exists() and len(os.listdir(tmp_path)) == 1  # the temporary file
    out.commit()
    assert path.read_bytes() == b"one\n" and os.listdir(tmp_path) == ["out.txt"]
    out = OutputFile(path, force=True)
    out.write(b"two\n")
    out.abort()
    assert path.read_bytes() == b"one\n" and os.listdir(tmp_path) == ["out.txt"]


def test_no_silent_overwrite_and_no_clobbering_race(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("precious")
    with pytest.raises(TopupError, match="already exists; use --force"):
        OutputFile(path)
    assert check_target(str(path), force=True) == "replace"
    path.unlink()
    out = OutputFile(path)
    path.write_text("someone else's")  # appears while we write
    out.write(b"mine")
    with pytest.raises(TopupError, match="appeared while it was being written"):
        out.commit()
    assert path.read_text() == "someone else's" and os.listdir(tmp_path) == ["out.txt"]


def test_a_device_is_written_in_place(tmp_path):
    assert check_target(os.devnull) == "in place"
    write_whole(os.devnull, b"x" * 10)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    with pytest.raises(TopupError, match="is a directory"):
        OutputFile(tmp_path)


def test_a_failed_write_is_cut_back_to_whole_records(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    out = OutputFile(path)
    out.write(b"record 1\n")
    real = os.write
    calls = []

    def failing(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data[:3]))  # part of the record lands ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full
    monkeypatch.setattr(os, "write", failing)
    with pytest.raises(WriteError, match="No space left on device"):
        out.write(b"record 2\n")
    monkeypatch.setattr(os, "write", real)
    out.commit()
    assert path.read_bytes() == b"record 1\n"


def test_vouchers_a_program_issues_are_recorded_as_handed_over(tmp_path):
    w = World(tmp_path / "topup.db", a_count=3, b_count=1)
    try:
        assert list(vouchers.select(w.conn, delivery="undelivered")) == []
        rows = list(vouchers.select(w.conn, device=A))
        assert [r.delivery for r in rows] == ["delivered"] * 3
        assert vouchers.describe_destination(*rows[0].delivered_to[:2]) == "handed to a program"
        # a batch that a caller writes somewhere: undelivered until it says it was written
        signer = keystore.unlock_active(w.conn, "reconcile test passphrase")
        pending = []
        batches = list(issuer.issue_batches(w.conn, signer, A, 100, 5, batch_size=2, now=T0,
                                            fmt="json", destination="/x/y.jsonl",
                                            delivered=lambda: pending))
        ids = {b.batch for b in batches}
        assert len(ids) == 1
        (batch,) = ids
        assert [r.sequence for r in vouchers.select(w.conn, batch=batch,
                                                    delivery="undelivered")] == [4, 5, 6, 7, 8]
        issuer.record_deliveries(w.conn, [(A, 4, 6)], batch, "json", "/x/y.jsonl")
        stored, delivered, undelivered, amount = vouchers.batch_summary(w.conn, batch)
        assert stored == [(A, 4, 8)] and delivered == {"/x/y.jsonl": [(A, 4, 6)]}
        assert undelivered == [(A, 7, 8)] and amount == 500
    finally:
        w.close()
