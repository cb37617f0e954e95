# The PPMID: the customer's in-home device. A keypad and a small display; it talks to the
# meter over the HAN (SPEC.md §5) and relays vouchers and codes given on its USB serial.
#
# Keys (4x4 matrix, boards/keypad.py):  digits type a 20-digit code (grouped as typed),
# * backspace, D clear, # send (with nothing typed: refresh), A take emergency credit,
# B confirm an armed supply, C show the balance.
#
# The main loop's `step` is bounded and never raises: keys, the USB relay, one HAN request
# at a time (Link), the status refreshed every STATUS_MS when idle, the typed code cleared
# after ENTRY_TIMEOUT_MS without a key, and the screen redrawn only when its text changed.
# Memory is bounded: at most 20 digits typed, one USB line (LINE_MAX bytes), one request.
import gc
import time

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from protocol import errors, han, receipt as receipt_format
from ppmid import screen
from ppmid.link import ANSWER, SIGNED_TIMEOUT_MS, Link

CODE = const(5)              # HAN request: submit keypad code (SPEC.md §5, §8)
ACTION = const(6)            # HAN request: customer action (§9)
ACTION_CONFIRM = const(1)
ACTION_EMERGENCY = const(2)
SUPPLY_OFF = const(0)
SUPPLY_ARMED = const(1)
SUPPLY_ON = const(2)

DIGITS = const(20)
ENTRY_TIMEOUT_MS = const(60000)
STATUS_MS = const(10000)
STATUS_RETRY_MS = const(2000)    # while the meter has not answered (yet)
LINE_MAX = const(512)
_USB_READ = const(256)
_IDLE_MS = const(5)
NOT_ANSWERING = "Meter not answering"

# What a request was for (the Link's tag)
_T_STATUS = const(1)
_T_CODE = const(2)
_T_CONFIRM = const(3)
_T_EMERGENCY = const(4)
_T_BALANCE = const(5)
_T_USB_VOUCHER = const(6)
_T_USB_CODE = const(7)
_T_USB_STATUS = const(8)
_T_USB_COMMAND = const(9)


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class Ppmid:
    def __init__(self, board, log=None):
        self.board = board
        self.link = Link(board.han)
        self.display = board.display
        self.log = log
        self.entry = ""
        self.message = ""
        self.status = None           # the meter's last status answer {field: value}
        self.answering = None        # None: not asked yet; False: the last request timed out
        self._last_key = 0
        self._status_at = None       # ticks of the last status answer or try
        self._status_due = True
        self._shown = None
        self._line = bytearray(LINE_MAX)
        self._n = 0
        self._overflow = False
        self.errors = 0
        self.render()

    # -- the loop --------------------------------------------------------------------------
    def step(self):
        """One pass: never raises (a MemoryError frees what it can and carries on)."""
        try:
            now = self.board.ticks_ms()
            keys = self.board.keys()
            for k in keys:
                self.key(k, now)
            self.serial(now)
            got = self.link.poll(now)
            if got is not None:
                self.answer(got, now)
            if self.entry and now - self._last_key >= ENTRY_TIMEOUT_MS:
                self.entry = ""
                self.message = "Entry timed out"
            every = STATUS_MS if self.answering else STATUS_RETRY_MS
            if not self.link.busy and (self._status_due or self._status_at is None
                                       or now - self._status_at >= every):
                self._status_due = False
                self._status_at = now
                self.link.send(han.STATUS, {}, _T_STATUS, now)
            self.render()
        except MemoryError:
            self.errors += 1
            gc.collect()
        except Exception as e:  # noqa: BLE001 - nothing from the HAN, USB or keys may stop it
            self.errors += 1
            if self.log is not None:
                try:
                    self.log("ppmid: %r" % (e,))
                except Exception:  # noqa: BLE001
                    pass

    # -- keys ------------------------------------------------------------------------------
    def key(self, k, now):
        self._last_key = now
        if "0" <= k <= "9":
            if self._user_busy():
                return
            if len(self.entry) < DIGITS:
                self.entry += k
            self.message = ""
        elif k == "*":
            if not self._user_busy():
                self.entry = self.entry[:-1]
                self.message = ""
        elif k == "D":
            if not self._user_busy():
                self.entry = ""
                self.message = ""
        elif k == "#":
            if self._user_busy():
                return
            if self.entry:
                self.message = "Sending..."
                self.link.send(CODE, {1: screen.group(self.entry)}, _T_CODE, now)
            else:
                self._request(han.STATUS, {}, _T_BALANCE, now, "Asking the meter...")
        elif k == "A":
            self._request(ACTION, {1: ACTION_EMERGENCY}, _T_EMERGENCY, now, "Asking for emergency credit...")
        elif k == "B":
            self._request(ACTION, {1: ACTION_CONFIRM}, _T_CONFIRM, now, "Switching on...")
        elif k == "C":
            self._request(han.STATUS, {}, _T_BALANCE, now, "Asking the meter...")

    def _user_busy(self):
        tag = self.link.tag
        return self.link.busy and tag != _T_STATUS

    def _request(self, msg_type, payload, tag, now, message):
        if self._user_busy():
            return
        self.message = message
        self.link.send(msg_type, payload, tag, now)

    # -- answers -----------------------------------------------------------------------------
    def answer(self, got, now):
        kind, tag, rtype, payload, tries = got
        if kind != ANSWER:
            self.answering = False
            if tag == _T_STATUS:
                return
            if tag >= _T_USB_VOUCHER:
                self._usb_out("ERROR meter not answering")
            self.message = NOT_ANSWERING             # the typed code stays, to send again
            return
        self.answering = True
        if self.message == NOT_ANSWERING:
            self.message = ""                    # it answers again (the typed code stays)
        if not isinstance(payload, dict):
            payload = {}
        if rtype == han.ERROR:
            reason = payload.get(1)
            text = screen.refusal(reason, payload.get(2), payload.get(3))
            if tag >= _T_USB_VOUCHER:
                self._usb_refused(reason, payload)
                self.message = text
            elif tag != _T_STATUS:
                self.message = text
                if tag == _T_CODE and reason not in (errors.CODE_TYPO, errors.CODE_INCOMPLETE,
                                                     errors.BUSY, errors.CODE_LOCKED):
                    self.entry = ""
            self._status_due = True
            return
        if tag == _T_STATUS or tag == _T_BALANCE or tag == _T_USB_STATUS:
            self.status = payload
            self._status_at = now
            if tag == _T_BALANCE:
                self.message = self._balance_text()
            elif tag == _T_USB_STATUS:
                self._usb_out("STATUS " + self._status_line())
            return
        self._status_due = True
        if tag == _T_USB_COMMAND:
            self.message, line = self._command_applied(payload.get(1), payload.get(2))
            self._usb_out(line)
        elif tag == _T_CODE or tag == _T_USB_VOUCHER or tag == _T_USB_CODE:
            text, line = self._applied(payload.get(1), payload.get(2), tries)
            self.message = text
            if tag == _T_CODE:
                self.entry = ""
            else:
                self._usb_out(line)
        elif tag == _T_CONFIRM:
            state = payload.get(1)
            if _int(state) and self.status is not None:
                self.status[15] = state          # shown at once; the status follows
            if state == SUPPLY_ON:
                self.message = "Supply on"
            elif state == SUPPLY_ARMED:
                self.message = "Not switched on"
            else:
                self.message = "Nothing to switch on"
        elif tag == _T_EMERGENCY:
            amount = None
            try:
                amount = receipt_format.parse(payload.get(2)).amount
            except Exception:  # noqa: BLE001
                pass
            if _int(amount):
                self.message = "Emergency credit %s on" % screen.money_pence(amount)
            else:
                self.message = "Emergency credit on"

    def _applied(self, raw, duplicate, tries):
        """(display text, USB line) for a top-up's answer."""
        try:
            r = receipt_format.parse(raw)
            amount, index = r.amount, r.index
        except Exception:  # noqa: BLE001 - an answer we cannot read: say what we know
            return "Meter answered", "ERROR unreadable receipt"
        if not _int(amount):
            return "Meter answered", "ERROR unreadable receipt"
        if duplicate is True and tries <= 1:
            return "Already used", "OK already applied, receipt %d (the original)" % index
        # (a duplicate after a retry is our own first try, answered late: it was added)
        added = "%s added" % screen.money_pence(amount)
        return added, "OK %s, receipt %d" % (added, index)

    def _command_applied(self, raw, duplicate):
        """(display text, USB line) for a signed command's answer: its receipt."""
        try:
            r = receipt_format.parse(raw)
            number, index = r.sequence, r.index
        except Exception:  # noqa: BLE001
            return "Meter answered", "ERROR unreadable receipt"
        if not _int(number):
            return "Meter answered", "ERROR unreadable receipt"
        if duplicate is True:
            return "Meter updated", "OK command %d already applied, receipt %d (the original)" % (number, index)
        return "Meter updated", "OK command %d applied, receipt %d" % (number, index)

    def _balance_text(self):
        st = self.status or {}
        bal = st.get(3)
        return "Credit %s" % screen.money_mp(bal) if _int(bal) else "Credit unknown"

    def _status_line(self):
        st = self.status or {}
        parts = [self._balance_text().lower()]
        supply = st.get(15)
        parts.append("supply %s" % {SUPPLY_OFF: "off", SUPPLY_ARMED: "armed", SUPPLY_ON: "on"}.get(
            supply, "?") if _int(supply) else "supply ?")
        ec = st.get(8)
        if _int(ec) and ec:
            parts.append("emergency %s" % screen.money_mp(ec))
        lock = st.get(16)
        if _int(lock) and lock:
            parts.append(screen.locked(lock).lower())
        return ", ".join(parts)

    # -- USB serial: the voucher relay ----------------------------------------------------------
    def serial(self, now):
        usb = getattr(self.board, "usb", None)
        if usb is None:
            return
        data = usb.read(_USB_READ)
        if not data:
            return
        buf = self._line
        for b in data:
            if b == 10 or b == 13:
                if self._overflow:
                    self._usb_out("ERROR line too long (at most %d characters)" % LINE_MAX)
                elif self._n:
                    self._usb_line(bytes(buf[:self._n]), now)
                self._n = 0
                self._overflow = False
            elif self._overflow:
                continue
            elif self._n >= LINE_MAX:
                self._overflow = True
            else:
                buf[self._n] = b
                self._n += 1

    def _usb_line(self, raw, now):
        for b in raw:
            if b < 32 or b > 126:
                self._usb_out("ERROR not text: send a voucher (OTU1:...), a command (OTC1:...) or a 20-digit code")
                return
        text = raw.decode().strip()
        if not text:
            return
        if self.link.busy and self.link.tag != _T_STATUS:
            self._usb_out("ERROR busy: send it again")
            return
        low = text.lower()
        if low == "status":
            self.link.send(han.STATUS, {}, _T_USB_STATUS, now)
            return
        prefix = low[:5]
        if prefix == "otu1:" or prefix == "otc1:":
            # a signed voucher (SPEC.md §2) or command (§10), relayed as it came
            if prefix == "otu1:":
                from protocol import voucher as form
                what, msg_type, tag = "voucher", han.SUBMIT, _T_USB_VOUCHER
            else:
                from protocol import command as form
                what, msg_type, tag = "command", han.COMMAND, _T_USB_COMMAND
            try:
                raw = form.from_text(text)
            except Exception:  # noqa: BLE001
                self._usb_out("ERROR not a %s: its text form does not decode" % what)
                return
            self.message = "Voucher received..." if tag == _T_USB_VOUCHER else "Command received..."
            self.link.send(msg_type, {1: raw}, tag, now, SIGNED_TIMEOUT_MS)
            return
        digits = 0
        for ch in text:
            if "0" <= ch <= "9":
                digits += 1
            elif ch != " " and ch != "-":
                digits = -1
                break
        if digits > 0:
            self.message = "Code received..."
            self.link.send(CODE, {1: text}, _T_USB_CODE, now)
            return
        self._usb_out("ERROR not a voucher, command or code: send OTU1:..., OTC1:... or the 20 digits")

    def _usb_refused(self, reason, payload):
        extra = ""
        if reason == errors.CODE_WRONG and _int(payload.get(3)):
            extra = ", %s" % screen.tries(payload.get(3))
        elif reason == errors.CODE_LOCKED and _int(payload.get(2)):
            extra = ", %s" % screen.locked(payload.get(2)).lower()
        name = errors.name(reason) if _int(reason) else "?"
        self._usb_out("REFUSED %s (%s)%s" % (name, reason, extra))

    def _usb_out(self, line):
        usb = getattr(self.board, "usb", None)
        if usb is None:
            return
        try:
            usb.write((line + "\r\n").encode())
        except Exception:  # noqa: BLE001
            pass

    # -- the screen ---------------------------------------------------------------------------------
    def lines(self):
        st = self.status
        out = []
        if st is None:
            out.append("Credit ...")
            out.append("")
            out.append("")
        else:
            out.append(self._balance_text())
            supply = st.get(15)
            if supply == SUPPLY_ON:
                out.append("Supply on")
            elif supply == SUPPLY_ARMED:
                out.append("Supply armed")
            elif supply == SUPPLY_OFF:
                out.append("Supply off")
            else:
                out.append("Supply on" if st.get(4) is True else "")
            ec = st.get(8)
            lock = st.get(16)
            if _int(ec) and ec > 0:
                out.append("Emergency %s" % screen.money_mp(ec))
            elif _int(lock) and lock > 0:
                out.append(screen.locked(lock))
            else:
                out.append("")
        if self.entry:
            a, b = screen.entry_lines(self.entry)
            out.append(a)
            out.append(b)
        else:
            out.append("Type code, # OK")
            out.append("")
        msg = self.message
        if not msg and self.answering is False:
            msg = NOT_ANSWERING
        wrapped = screen.wrap(msg) if msg else []
        if st is not None and st.get(15) == SUPPLY_ARMED and self.answering is not False:
            # the customer's next step, always in view while armed
            wrapped = wrapped[:1] + screen.wrap("Press B to switch on")
        for i in range(3):
            out.append(wrapped[i] if i < len(wrapped) else "")
        return out

    def render(self):
        lines = self.lines()
        if lines != self._shown:
            self._shown = lines
            self.display.show(lines)


def run(board):
    p = Ppmid(board, log=print)
    while True:
        p.step()
        time.sleep_ms(_IDLE_MS)
