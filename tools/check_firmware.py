#!/usr/bin/env python3
"""Static check of the meter firmware against MicroPython's API, not CPython's.

    python tools/check_firmware.py [--root DIR] [--port esp32|rp2]... [--verbose]

Runs pyright over firmware/ and protocol/ with MicroPython 1.27 stubs *in place of*
CPython's standard library (pyright's typeshedPath), so an import of a module MicroPython
lacks (itertools, pathlib, ...), a CPython-only function (os.makedirs, time.monotonic,
sys.getsizeof, ...) or a CPython-only method or argument (str.format_map,
bytes.hex(sep, bytes_per_sep), int.from_bytes(..., signed=True)) is an error.

Ports: everything is checked against the ESP32 stubs except firmware/boards/pico.py,
which is checked against the rp2 stubs (it imports `rp2`).

What it needs is installed idempotently under .stubs/ (gitignored) from the pinned
requirements in tools/firmware_check/: pyright from PyPI (it bundles its JavaScript and
runs on the machine's Node.js), and the micropython-<port>-stubs packages.  The stubs'
standard library is a copy of CPython's typeshed, so after installing, this script prunes
what MicroPython 1.27 does not have (see PRUNE below: names taken from MicroPython's
py/objstr.c, py/objint.c, extmod/modos.c, ...).  A pruning rule that no longer matches
the stubs is an error, so a stub upgrade cannot silently disable it.

--root checks another tree laid out like this repository (the tests point it at a copy
with a deliberately bad file); the tools are still installed under this repository.
Exit status: 0 clean, 1 findings, 2 set-up failure.
"""
import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "tools", "firmware_check")
STUBS = os.path.join(REPO, ".stubs")

# Which files each port's stubs check (globs relative to the checked root).
PORTS = {
    "esp32": {"include": ["firmware", "protocol"], "exclude": ["firmware/boards/pico.py"]},
    "rp2": {"include": ["firmware/boards/pico.py"], "exclude": []},
}
# Not firmware: CPython-only generators, and the manifests (run by MicroPython's build
# tools on the host).
SKIP = ["protocol/vectors"]

# --- what MicroPython 1.27 has, where the stubs' typeshed copy says CPython -------------
_STR = {"find", "rfind", "index", "rindex", "join", "split", "splitlines", "rsplit",
        "startswith", "endswith", "strip", "lstrip", "rstrip", "format", "replace", "count",
        "partition", "rpartition", "center", "lower", "upper", "isspace", "isalpha",
        "isdigit", "isupper", "islower"}
# (file under stdlib/, class or None for module level, public names kept, replacements)
PRUNE = [
    ("builtins.pyi", "str", _STR | {"encode"}, {}),
    ("builtins.pyi", "bytes", _STR | {"decode", "hex", "fromhex"}, {
        # MicroPython: hex([sep]) only (py/objstr.c bytes_hex_as_str takes 1..2 args).
        "hex": "def hex(self, sep: str | bytes = ..., /) -> str: ...",
    }),
    # (bytearray keeps `insert`: it is abstract in MutableSequence, and removing it would
    # make every bytearray() call an error.)
    ("builtins.pyi", "bytearray", _STR | {"decode", "hex", "fromhex", "append", "extend",
                                          "insert"}, {
        "hex": "def hex(self, sep: str | bytes = ..., /) -> str: ...",
    }),
    ("builtins.pyi", "int", {"from_bytes", "to_bytes"}, {
        # py/objint.c: positional only, and no `signed` (an extra argument is ignored).
        "to_bytes": 'def to_bytes(self, length: SupportsIndex = 1, byteorder: Literal["little", "big"] = "big", /) -> bytes: ...',
        "from_bytes": '@classmethod\ndef from_bytes(cls, bytes: ReadableBuffer, byteorder: Literal["little", "big"] = "big", /) -> Self: ...',
    }),
    # extmod/modos.c
    ("os/__init__.pyi", None, {"getenv", "putenv", "unsetenv", "sync", "system", "uname",
                               "urandom", "chdir", "getcwd", "listdir", "mkdir", "remove",
                               "rename", "rmdir", "unlink", "stat", "statvfs", "dupterm",
                               "dupterm_notify", "errno", "ilistdir", "mount", "umount"}, {}),
    # py/modsys.c (functions only; attributes such as sys.path are left alone)
    ("sys/__init__.pyi", None, {"exit", "print_exception", "atexit", "settrace",
                                "exc_info", "intern"}, {}),
    # py/modstruct.c: no Struct class, no iter_unpack
    ("struct.pyi", None, {"calcsize", "pack", "pack_into", "unpack", "unpack_from"}, {"Struct": None}),
]


# Where the stubs lag behind MicroPython 1.27 (checked against its source): added members.
AUGMENT = {
    "rp2": [
        # ports/rp2/rp2_flash.c: rp2.Flash(*, start=-1, len=-1), since MicroPython 1.20.
        ("rp2/__init__.pyi", "Flash", "def __init__(self, *, start: int = -1, len: int = -1) -> None: ..."),
    ],
}


def augment(text, cls, code):
    """Append `code` (a method) to the body of class `cls`."""
    tree = ast.parse(text)
    found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
    if len(found) != 1:
        raise SystemExit("check_firmware: stub class %s not found once" % cls)
    node = found[0]
    lines = text.split("\n")
    first = node.body[0]
    line = lines[first.lineno - 1]
    indent = line[: len(line) - len(line.lstrip())]
    lines[node.end_lineno:node.end_lineno] = [indent + part for part in code.split("\n")]
    out = "\n".join(lines)
    ast.parse(out)
    return out


def _is_public(name):
    return not (name.startswith("__") and name.endswith("__"))


def _defs(body):
    """Function and class definitions in `body`, looking inside `if` blocks (version checks)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, ast.If):
            yield from _defs(node.body)
            yield from _defs(node.orelse)


def prune(text, cls, keep, replace):
    """Remove public defs not in `keep` from class `cls` (or the module); swap `replace`d ones."""
    tree = ast.parse(text)
    lines = text.split("\n")
    if cls is None:
        scope = tree.body
    else:
        found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        if len(found) != 1:
            raise SystemExit("check_firmware: stub class %s not found once" % cls)
        scope = found[0].body
    edits = []  # (first, last, new lines), 1-based inclusive
    replaced = set()
    removed = 0
    for node in _defs(scope):
        if not _is_public(node.name):
            continue
        if isinstance(node, ast.ClassDef) and cls is None and node.name not in replace:
            continue  # module level: classes are kept unless named in `replace`
        if node.name in keep and node.name not in replace:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
        new = [indent + "..."]
        if replace.get(node.name) and node.name not in replaced:
            new = [indent + part for part in replace[node.name].split("\n")]
            replaced.add(node.name)
        edits.append((first, node.end_lineno, new))
        removed += 1
    missing = [n for n, r in replace.items() if r and n not in replaced]
    if missing or not removed:
        raise SystemExit("check_firmware: pruning rule for %s no longer matches the stubs (%s)"
                         % (cls or "module", ", ".join(missing) or "nothing to prune"))
    for first, last, new in sorted(edits, reverse=True):
        lines[first - 1:last] = new
    out = "\n".join(lines)
    ast.parse(out)  # still a valid stub
    return out


def _digest(*paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _pip_target(requirements, target, extra_digest=""):
    """Install `requirements` into `target` unless the stamp says it is already there."""
    stamp = os.path.join(target, ".stamp")
    # Reinstall when the pins or the pruning rules change.
    rules = hashlib.sha256(repr((PRUNE, AUGMENT)).encode()).hexdigest()[:16]
    want = _digest(requirements) + rules + extra_digest
    if os.path.exists(stamp):
        with open(stamp) as f:
            if f.read() == want:
                return False
    if os.path.exists(target):
        shutil.rmtree(target)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-compile", "--target", target, "-r", requirements]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(2)
    return want


def ensure_tools():
    """Install pyright and the stubs under .stubs/ (idempotent); return their paths."""
    os.makedirs(STUBS, exist_ok=True)
    pyright = os.path.join(STUBS, "pyright")
    want = _pip_target(os.path.join(HERE, "requirements-pyright.txt"), pyright)
    if want:
        with open(os.path.join(pyright, ".stamp"), "w") as f:
            f.write(want)
    os.makedirs(os.path.join(STUBS, "no-host-python", "lib", "python3.12", "site-packages"),
                exist_ok=True)
    ports = {}
    for port in PORTS:
        target = os.path.join(STUBS, port)
        want = _pip_target(os.path.join(HERE, "requirements-%s.txt" % port), target)
        if want:
            for relpath, cls, keep, replace in PRUNE:
                path = os.path.join(target, "stdlib", relpath)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(prune(text, cls, keep, replace))
            for relpath, cls, code in AUGMENT.get(port, []):
                path = os.path.join(target, relpath)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(augment(text, cls, code))
            with open(os.path.join(target, ".stamp"), "w") as f:
                f.write(want)
        ports[port] = target
    return pyright, ports


def pyright_config(root, stubs):
    return {
        # The stubs' stdlib/ replaces CPython's typeshed; the port modules (machine,
        # esp32, rp2, time, ...) come from the stubs' top level.
        "typeshedPath": stubs,
        "stubPath": stubs,
        # firmware/ is /lib on a board (meter, boards); protocol/ sits at the root, and
        # its modules also import each other as top-level modules (a fallback).
        "extraPaths": [os.path.join(root, "firmware"), root, os.path.join(root, "protocol")],
        # An empty "virtual environment", so that pyright does not fall back to the host
        # Python's search path (which would resolve e.g. functools to CPython's source).
        "venvPath": STUBS,
        "venv": "no-host-python",
        "pythonVersion": "3.12",
        "pythonPlatform": "Linux",
        # API availability is the point; type precision is not enforced here.
        "typeCheckingMode": "basic",
        "reportMissingModuleSource": "none",
        "reportMissingImports": "error",
        "reportAttributeAccessIssue": "error",
        "reportCallIssue": "error",
        "reportUndefinedVariable": "error",
        "reportOptionalMemberAccess": "none",
        "reportOptionalCall": "none",
        "reportOptionalOperand": "none",
        "reportOptionalIterable": "none",
        "reportAbstractUsage": "none",
        "reportOptionalSubscript": "none",
        "reportArgumentType": "none",
        "reportIndexIssue": "none",
        "reportOperatorIssue": "none",
        "reportReturnType": "none",
        "reportAssignmentType": "none",
        "reportRedeclaration": "none",
        "reportTypedDictNotRequiredAccess": "none",
    }


def files_for(root, port):
    """The .py files a port checks, after its excludes (passed to pyright explicitly)."""
    spec = PORTS[port]
    skip = {os.path.join(root, p) for p in spec["exclude"] + SKIP}
    out = []
    for inc in spec["include"]:
        top = os.path.join(root, inc)
        if os.path.isfile(top):
            out.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if os.path.join(dirpath, d) not in skip
                                 and d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and name != "manifest.py" and path not in skip:
                    out.append(path)
    return out


def run_pyright(pyright, config, files, verbose):
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pyrightconfig-",
                                     dir=STUBS, delete=False) as f:
        json.dump(config, f, indent=1)
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = pyright + os.pathsep + env.get("PYTHONPATH", "")
        env["PYRIGHT_PYTHON_CACHE_DIR"] = os.path.join(STUBS, "pyright-cache")
        cmd = [sys.executable, "-m", "pyright", "--outputjson", "-p", f.name] + files
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        os.unlink(f.name)
    try:
        report = json.loads(r.stdout)
    except ValueError:
        sys.stderr.write(r.stdout + r.stderr)
        raise SystemExit(2)
    if verbose:
        sys.stderr.write(r.stderr)
    return report


# Findings about type precision rather than API availability (pyright's inference of
# lists and dicts built up at run time), not reported.
NOT_API = ("No overloads for ",)
GUARDED_RULES = ("reportMissingImports", "reportAttributeAccessIssue")


def guarded_import_lines(path):
    """Lines of import statements inside a `try:` that catches ImportError (or broader):
    the code has a fallback for a module or name this port lacks."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):
        return set()
    lines = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for h in node.handlers:
            types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            for t in types:
                caught.add(getattr(t, "id", None) if t is not None else "BaseException")
        if not caught & {"ImportError", "Exception", "BaseException"}:
            continue
        for stmt in node.body:
            for sub in ast.walk(stmt):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    lines.update(range(sub.lineno, sub.end_lineno + 1))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--root", default=REPO, help="tree to check (default: this repository)")
    ap.add_argument("--port", action="append", choices=sorted(PORTS),
                    help="check only this port's files (repeatable; default: all)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    t0 = time.monotonic()
    pyright, stubs = ensure_tools()
    findings = 0
    checked = 0
    guarded = {}
    for port in args.port or sorted(PORTS):
        files = files_for(root, port)
        if not files:
            continue
        report = run_pyright(pyright, pyright_config(root, stubs[port]), files, args.verbose)
        checked += report.get("summary", {}).get("filesAnalyzed", 0)
        for d in report.get("generalDiagnostics", []):
            if d.get("severity") != "error" or d.get("message", "").startswith(NOT_API):
                continue
            path = d.get("file", "?")
            line = d.get("range", {}).get("start", {}).get("line", -1) + 1
            if d.get("rule") in GUARDED_RULES:
                if path not in guarded:
                    guarded[path] = guarded_import_lines(path)
                if line in guarded[path]:
                    continue
            findings += 1
            where = os.path.relpath(path, root)
            print("%s:%d: [%s] %s (%s)" % (where, line, port, d.get("message", "").split("\n")[0],
                                           d.get("rule", "")))
    status = "%d finding%s" % (findings, "" if findings == 1 else "s")
    print("check-firmware: %d files against MicroPython 1.27 stubs (%s), %s, %.1f s"
          % (checked, "+".join(args.port or sorted(PORTS)), status, time.monotonic() - t0))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
