# Output files that are whole or absent: never a partial line, never a silent overwrite,
# never a device node replaced.
#
# - A new or replaced regular file is written into a temporary file beside it
#   (`.NAME.XXXX.tmp`), synced, and only then renamed to NAME: a reader, a crash or a
#   kill -9 never sees half a file under NAME (an abandoned temporary file may be left).
#   An existing regular file is replaced only with force=True (`--force`); without it the
#   rename is a link that fails if NAME appeared meanwhile.
# - A file that is not a regular file (a device such as /dev/null or /dev/full, a FIFO, a
#   terminal) is written in place and never replaced: there is nothing to rename over it.
# - Every write hands over whole records; if one fails (a full disk, an I/O error) the
#   file is cut back to the end of the last whole record before the error is raised.
#   Standard output is written the same way (cut back too when it is a regular file).
# - `Interrupts` turns SIGINT, SIGTERM and SIGHUP into a flag that long runs check between
#   records, so that they stop at a clean boundary and can say exactly what happened. A
#   second signal raises at once (KeyboardInterrupt).
import errno
import io
import os
import signal
import stat
import sys
import tempfile

from .errors import TopupError


class WriteError(TopupError):
    """Writing an output failed part-way; what was written before is whole. Exit code 1."""

    exit_code = 1

    def __init__(self, where, error):
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        super().__init__("cannot write %s: %s" % (where, why))
        self.where = where
        self.errno = getattr(error, "errno", None)


def check_target(path, force=False, option="--out"):
    """How `path` would be written: "new", "replace" (an existing regular file, only with
    force) or "in place" (an existing file that is not a regular file). Raises TopupError
    (nothing written) for a directory, a missing parent folder, a dangling link, or an
    existing file without force."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise TopupError("%s is a symbolic link to nothing; refusing to write through it"
                             % path) from None
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise TopupError("cannot write %s: no directory %s" % (path, parent)) from None
        return "new"
    except OSError as e:
        raise TopupError("cannot write %s: %s" % (path, e.strerror or e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise TopupError("%s is a directory" % path)
    if stat.S_ISREG(st.st_mode):
        if not force:
            raise TopupError("%s already exists; use --force to replace it" % path)
        return "replace"
    return "in place"


def _umask_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class OutputFile:
    """A file written whole: write(bytes) per whole record, then commit() (or abort()).

    Constructing it checks the target and opens the temporary file (or, for a non-regular
    file, the file itself), so that problems show before anything is issued.
    """

    def __init__(self, path, force=False, option="--out"):
        self.path = os.fspath(path)
        self.how = check_target(self.path, force, option)
        self.size = 0          # bytes written whole
        self.partial = False   # a failed write left part of a record where it cannot be cut
        self.tmp = None
        self.closed = False
        if self.how == "in place":
            try:
                self.fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                raise TopupError("cannot write %s: %s" % (self.path, e.strerror or e)) from None
            self.final = self.path
            return
        # A symbolic link to a regular file: the file it points to is what gets replaced.
        self.final = os.path.realpath(self.path) if self.how == "replace" else self.path
        parent = os.path.dirname(os.path.abspath(self.final))
        try:
            fd, self.tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.final) + ".",
                                            suffix=".tmp", dir=parent)
        except OSError as e:
            raise TopupError("cannot write %s: no temporary file can be made beside it in %s "
                             "(%s)" % (self.path, parent, e.strerror or e)) from None
        try:
            os.fchmod(fd, _umask_mode())
        except OSError:
            pass
        self.fd = fd

    @property
    def in_place(self):
        return self.how == "in place"

    def write(self, data):
        """Write all of `data` (whole records) or raise WriteError, the file cut back to
        what was whole before."""
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as e:
            if not self._cut_back() and done:
                self.partial = True
            raise WriteError(self.path, e) from None
        self.size += done

    def _cut_back(self):
        """Cut a regular file back to its whole records; False if it cannot be."""
        try:
            if stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
                return True
        except OSError:
            pass
        return False

    def commit(self):
        """Make the file visible under its name (rename), synced. WriteError if it cannot
        be: then nothing is there (the temporary file is removed)."""
        if self.closed:
            return
        if self.tmp is None:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError as e:
                raise WriteError(self.path, e) from None
            return
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.closed = True
            if self.how == "replace":
                os.replace(self.tmp, self.final)
            else:
                try:
                    os.link(self.tmp, self.final)  # fails if something appeared meanwhile
                    os.unlink(self.tmp)
                except FileExistsError:
                    raise TopupError("%s appeared while it was being written; left it as it "
                                     "was (use --force to replace it)" % self.path) from None
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS,
                                       errno.EXDEV, errno.EACCES):
                        raise
                    if os.path.lexists(self.final):  # no hard links here (vfat, ...)
                        raise TopupError("%s appeared while it was being written; left it "
                                         "as it was" % self.path) from None
                    os.rename(self.tmp, self.final)
            self.tmp = None
        except OSError as e:
            self.abort()
            raise WriteError(self.path, e) from None
        except BaseException:
            self.abort()
            raise
        _sync_dir(os.path.dirname(os.path.abspath(self.final)))

    def abort(self):
        """Give up: the temporary file is removed; a file written in place stays as it is."""
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


def _sync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_whole(path, data, force=False, option="--out"):
    """Write `data` (bytes) to `path` whole (OutputFile); returns the path."""
    out = OutputFile(path, force, option)
    try:
        out.write(data)
        out.commit()
    except BaseException:
        out.abort()
        raise
    return path


class StandardOutput:
    """Standard output as a destination of whole records (bytes). Writes go straight to
    file descriptor 1 (no buffer left to fail at exit); a failed write cuts a regular file
    back to the last whole record. Off a real descriptor (tests), through sys.stdout."""

    path = "standard output"
    in_place = True

    def __init__(self):
        self.fd = None
        self.size = 0
        self.start = None
        self.partial = False
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            fd = None
        if fd is not None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            self.fd = fd
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    self.start = os.lseek(fd, 0, os.SEEK_CUR)
            except OSError:
                self.start = None

    def isatty(self):
        try:
            return sys.stdout.isatty()
        except (AttributeError, ValueError):
            return False

    def write(self, data):
        if self.fd is None:
            if sys.stdout is None:  # closed (`>&-`)
                raise WriteError(self.path, OSError(errno.EBADF, "it is closed"))
            try:
                sys.stdout.buffer.write(bytes(data))
                sys.stdout.buffer.flush()
            except OSError as e:
                raise WriteError(self.path, e) from None
            self.size += len(data)
            return
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as e:
            cut = False
            if self.start is not None:
                try:
                    os.ftruncate(self.fd, self.start + self.size)
                    os.lseek(self.fd, self.start + self.size, os.SEEK_SET)
                    cut = True
                except OSError:
                    pass
            if done and not cut:
                self.partial = True
            raise WriteError(self.path, e) from None
        self.size += done

    def commit(self):
        pass

    def abort(self):
        pass


class Interrupts:
    """`with Interrupts() as stop:` — SIGINT, SIGTERM and SIGHUP set `stop.signal` (its
    name) instead of ending the process at an arbitrary instruction; the work checks
    `stop` between records. A second signal raises KeyboardInterrupt at once. Outside the
    main thread it changes nothing."""

    NAMES = {"SIGINT": "Ctrl-C (SIGINT)", "SIGTERM": "SIGTERM", "SIGHUP": "SIGHUP"}

    def __init__(self):
        self.signal = None
        self._saved = {}

    def __bool__(self):
        return self.signal is not None

    @property
    def description(self):
        return self.NAMES.get(self.signal, self.signal)

    @property
    def exit_code(self):
        number = getattr(signal, self.signal or "", None)
        return 128 + int(number) if number is not None else 1

    def _handler(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        for name in self.NAMES:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._saved[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._saved.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        self._saved = {}
        return False
