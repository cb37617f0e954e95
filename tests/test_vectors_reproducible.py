"""The checked-in vectors are exactly what the generator writes from its fixed seeds."""
import filecmp
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_vectors_reproduces_the_checked_in_files(tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "protocol"), work / "protocol",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (work / "tests").mkdir()
    for name in ("__init__.py", "oracle.py"):     # the fuzz corpus's verdicts come from the oracle
        shutil.copy(os.path.join(ROOT, "tests", name), work / "tests" / name)
    subprocess.run([sys.executable, str(work / "protocol" / "vectors" / "make_vectors.py")],
                   check=True, capture_output=True)
    for name in ("vouchers.json", "receipts.json", "han.json", "fuzz_corpus.json"):
        assert filecmp.cmp(work / "protocol" / "vectors" / name,
                           os.path.join(ROOT, "protocol", "vectors", name), shallow=False), name
