# Runs in every fresh VM of the virtual board (hil/vboard/worker.mjs) before boot.py, in a
# private namespace.  It makes the wasm VM look like a board to its own code and to mpremote:
#  - the board filesystem (MEMFS /board, mirrored to a host folder by the worker) is mounted at
#    "/" through a thin VFS that gives MicroPython errno numbers (VfsPosix raises Emscripten's:
#    ENOENT is 44 there) and 4-tuples from ilistdir (mpremote wants the size);
#  - a `machine` module (the build has none) with reset, soft_reset, RTC, unique_id, freq, ...;
#  - `run_file`, with which the worker runs boot.py and main.py as a board's start-up does.
import sys
import os
import time
import _vboard

# Emscripten errno -> MicroPython (Linux) errno.
_ERRNO = {63: 1, 44: 2, 29: 5, 8: 9, 6: 11, 48: 12, 2: 13, 10: 16, 20: 17, 75: 18, 43: 19,
          54: 20, 31: 21, 28: 22, 41: 23, 33: 24, 22: 27, 51: 28, 70: 29, 69: 30, 55: 39,
          37: 36, 138: 95}


def _mp_error(e):
    n = e.errno if isinstance(e.errno, int) else (e.args[0] if e.args else 5)
    return OSError(_ERRNO.get(n, n))


class BoardVfs:
    """VfsPosix rooted at the board folder, with board errno numbers and ilistdir sizes."""

    def __init__(self, root):
        self._v = os.VfsPosix(root)
        self._cwd = "/"

    def __repr__(self):
        return "<VfsBoard>"

    def _abs(self, path):
        if not path:
            path = self._cwd
        elif path[0] != "/":
            path = self._cwd.rstrip("/") + "/" + path
        parts = []
        for p in path.split("/"):
            if p == "..":
                if parts:
                    parts.pop()
            elif p and p != ".":
                parts.append(p)
        return "/" + "/".join(parts)

    def _call(self, name, *args):
        try:
            return getattr(self._v, name)(*args)
        except OSError as e:
            raise _mp_error(e)

    def mount(self, readonly, mkfs):
        pass

    def umount(self):
        pass

    def open(self, path, mode):
        return self._call("open", self._abs(path), mode)

    def ilistdir(self, path):
        d = self._abs(path)
        out = []
        for ent in self._call("ilistdir", d):
            name, typ, ino = ent[0], ent[1], ent[2]
            size = 0
            if typ == 0x8000:
                try:
                    size = self._v.stat(d.rstrip("/") + "/" + name)[6]
                except OSError:
                    pass
            out.append((name, typ, ino, size))
        return iter(out)

    def chdir(self, path):
        p = self._abs(path)
        if not self._call("stat", p)[0] & 0x4000:
            raise OSError(20)  # ENOTDIR
        self._cwd = p

    def getcwd(self):
        return self._cwd

    def mkdir(self, path):
        return self._call("mkdir", self._abs(path))

    def remove(self, path):
        return self._call("remove", self._abs(path))

    def rmdir(self, path):
        return self._call("rmdir", self._abs(path))

    def rename(self, old, new):
        return self._call("rename", self._abs(old), self._abs(new))

    def stat(self, path):
        return self._call("stat", self._abs(path))

    def statvfs(self, path):
        return self._call("statvfs", self._abs(path))


class _RTC:
    """machine.RTC on the meter clock (the rig's clock; host time unless set)."""

    def __init__(self, *args):
        pass

    def datetime(self, dt=None):
        if dt is None:
            y, mo, d, h, mi, s, wd, _ = time.gmtime(int(_vboard.clock()))
            return (y, mo, d, wd, h, mi, s, 0)
        y, mo, d, _wd, h, mi, s = dt[:7]
        _vboard.clock_set(str(time.mktime((y, mo, d, h, mi, s, 0, 0))))

    def init(self, dt):
        self.datetime(dt)


class _Pin:
    """Enough of machine.Pin for code that probes it; the virtual board has no GPIO."""
    IN, OUT, OPEN_DRAIN = 0, 1, 2
    PULL_UP, PULL_DOWN = 1, 2
    IRQ_RISING, IRQ_FALLING = 1, 2

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self._id, self._v = id, value or 0

    def value(self, v=None):
        if v is None:
            return self._v
        self._v = 1 if v else 0

    def on(self):
        self._v = 1

    def off(self):
        self._v = 0

    def irq(self, handler=None, trigger=0):
        return None


class machine:
    PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5
    RTC = _RTC
    Pin = _Pin

    @staticmethod
    def reset():
        _vboard.reset()          # does not return: the worker boots a fresh VM

    @staticmethod
    def soft_reset():
        raise SystemExit         # as on a board: the start-up code soft-resets

    @staticmethod
    def bootloader(*args):
        print("virtual board: no bootloader; hard reset instead")
        _vboard.reset()

    @staticmethod
    def reset_cause():
        return _vboard.reset_cause()

    @staticmethod
    def unique_id():
        return b"\x76\x62\x6f\x61\x72\x64"   # "vboard"

    @staticmethod
    def freq(*args):
        return 240000000

    @staticmethod
    def idle():
        _vboard.sleep_ms(1)

    @staticmethod
    def lightsleep(ms=None):
        _vboard.sleep_ms(ms or 0)

    @staticmethod
    def deepsleep(ms=None):
        _vboard.sleep_ms(ms or 0)
        _vboard.reset()

    @staticmethod
    def disable_irq():
        return 0

    @staticmethod
    def enable_irq(state=0):
        pass


_main = __import__("__main__").__dict__


class _Rt:
    last = 0   # 1 if the last script asked for a soft reset (SystemExit)


def run_file(name):
    """Run a start-up script in __main__ as a board does."""
    _Rt.last = 0
    try:
        os.stat(name)
    except OSError:
        return
    try:
        with open(name) as f:
            src = f.read()
        exec(compile(src, name, "exec"), _main)
    except SystemExit:
        _Rt.last = 1
    except BaseException as e:
        sys.print_exception(e)


_Rt.run_file = run_file


os.umount("/")
os.mount(BoardVfs("/board"), "/")
os.chdir("/")
sys.modules["machine"] = machine
sys.modules["_vboard_rt"] = _Rt
