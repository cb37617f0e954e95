# What the PPMID shows, as text: money, code grouping, the meter's answers in words, and
# word-wrapping to the display's 16 columns. Pure functions (both VMs, CPython).
from protocol import errors

COLS = 16
EN_DASH = "\u2013"
POUND = "\u00a3"


def money_pence(p):
    """'£10.00', '-£0.50' from pence."""
    sign = "-" if p < 0 else ""
    if p < 0:
        p = -p
    return "%s%s%d.%02d" % (sign, POUND, p // 100, p % 100)


def money_mp(mp):
    """A balance in milli-pence, truncated towards zero to whole pence."""
    if mp < 0:
        return money_pence(-((-mp) // 1000))
    return money_pence(mp // 1000)


def group(digits):
    """'1234 5678 9012 3456 7890'."""
    return " ".join(digits[i:i + 4] for i in range(0, len(digits), 4))


def entry_lines(digits):
    """The typed digits on two display lines: three groups, then the rest."""
    if len(digits) <= 12:
        return group(digits), ""
    return group(digits[:12]), group(digits[12:])


def minutes(seconds):
    """Whole minutes, rounded up (never says less time than is left)."""
    return (seconds + 59) // 60


def locked(seconds):
    m = minutes(seconds)
    if m >= 120:
        h = m // 60
        m = m % 60
        return "Locked %d h %d min" % (h, m) if m else "Locked %d h" % h
    return "Locked %d min" % m


def tries(n):
    return "1 try left" if n == 1 else "%d tries left" % n


def refusal(reason, seconds=None, left=None):
    """A meter's refusal of a code, voucher or action, in the customer's words."""
    if reason == errors.CODE_WRONG:
        if isinstance(left, int) and left > 0:
            return "Wrong code %s %s" % (EN_DASH, tries(left))
        return "Wrong code %s code entry locked" % EN_DASH
    if reason == errors.CODE_LOCKED:
        return locked(seconds if isinstance(seconds, int) and seconds > 0 else 60)
    if reason == errors.CODE_TYPO:
        return "Typo %s check the code" % EN_DASH
    if reason == errors.CODE_INCOMPLETE:
        return "Incomplete"
    if reason == errors.SEQUENCE_REUSED or reason == errors.RECEIPT_LOST:
        return "Already used"
    if reason == errors.STALE:
        return "Code too old %s call your supplier" % EN_DASH
    if reason == errors.OVER_CREDIT_LIMIT:
        return "Credit limit reached"
    if reason == errors.OVER_VOUCHER_LIMIT:
        return "Amount too large"
    if reason == errors.EXPIRED:
        return "Voucher expired"
    if reason == errors.BUSY:
        return "Meter busy %s try again" % EN_DASH
    if reason == errors.NOT_PROVISIONED:
        return "Meter not set up"
    if reason == errors.DAMAGED or reason == errors.STORAGE:
        return "Meter fault %s call your supplier" % EN_DASH
    if reason == errors.EC_UNAVAILABLE:
        return "Emergency credit not available"
    if reason in (errors.WRONG_DEVICE, errors.UNKNOWN_KEY, errors.BAD_SIGNATURE, errors.MALFORMED,
                  errors.BAD_HEADER):
        return "Not valid for this meter"
    return "Refused (%s)" % errors.name(reason) if isinstance(reason, int) else "Refused"


def wrap(text, cols=COLS):
    """Word-wrap to lines of at most `cols` characters (a long word is cut)."""
    out = []
    line = ""
    for word in text.split(" "):
        while len(word) > cols:
            if line:
                out.append(line)
                line = ""
            out.append(word[:cols])
            word = word[cols:]
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= cols:
            line = line + " " + word
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    return out
