// Run the dual-VM test modules (tests/protocol, tests/firmware) inside the official
// MicroPython VM: every `test_*` function of every `test_*.py` module, no arguments.
// Usage: node tools/mpy_test.mjs [TEST_DIR ...]   (default: the dual-VM test folders)
import fs from "node:fs";
import path from "node:path";
import { loadVM, REPO } from "./mpy_vm.mjs";

const DEFAULT_DIRS = ["tests/protocol", "tests/firmware"];
const testDirs = (process.argv.length > 2 ? process.argv.slice(2) : DEFAULT_DIRS)
  .filter((d) => fs.existsSync(path.join(REPO, d)));
// tests/protocol holds the shared test helpers (_support.py), so it always goes in.
const copyDirs = [...new Set(["protocol", "firmware", "tests/protocol", ...testDirs])]
  .filter((d) => fs.existsSync(path.join(REPO, d)));

const modules = [];
for (const dir of testDirs) {
  for (const name of fs.readdirSync(path.join(REPO, dir)).sort()) {
    if (/^test_.*\.py$/.test(name)) modules.push(`${dir}/${name.slice(0, -3)}`.replaceAll("/", "."));
  }
}

if (modules.length === 0) {
  console.error("no dual-VM test modules found");
  process.exit(1);
}
const mp = await loadVM({ dirs: copyDirs });

const driver = `
import sys, time
_passed = 0
_failed = []
for _modname in ${JSON.stringify(modules)}:
    _mod = __import__(_modname, None, None, ["_"])
    for _name in sorted(dir(_mod)):
        if not _name.startswith("test_"):
            continue
        _fn = getattr(_mod, _name)
        if not callable(_fn):
            continue
        _t0 = time.ticks_ms()
        try:
            _fn()
        except Exception as _e:
            _failed.append(_modname + "::" + _name)
            print("FAILED", _modname + "::" + _name)
            sys.print_exception(_e)
        else:
            _passed += 1
            print("ok    ", _modname + "::" + _name, "(%d ms)" % time.ticks_diff(time.ticks_ms(), _t0))
print()
print("MicroPython %s: %d passed, %d failed" % (".".join(str(v) for v in sys.implementation.version[:3]), _passed, len(_failed)))
_ok = not _failed
`;
try {
  mp.runPython(driver);
} catch (err) {
  process.stderr.write(String(err.message || err) + "\n");
  process.exit(1);
}
process.exit(mp.globals.get("_ok") ? 0 : 1);
