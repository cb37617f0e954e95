# Money as integer pence, parsed exactly from text and formatted as pounds. No floats.
import re

from protocol.voucher import MAX_AMOUNT

from .errors import TopupError

# "10", "10.5", "10.50", "£10.50", "1,234.50" (correct thousands groups only), or "50p".
_POUNDS = re.compile(r"(?:0|[1-9][0-9]{0,2}(?:,[0-9]{3})+|[1-9][0-9]*)(?:\.([0-9]{1,2}))?\Z")
_PENCE = re.compile(r"(0|[1-9][0-9]*)p\Z")


def parse_pence(text, maximum=MAX_AMOUNT, what="amount", limit_name="the protocol maximum"):
    """Integer pence from text like `10.50`, `£10.50`, `10` (pounds) or `50p` (pence).

    Raises TopupError with a message saying what is wrong: not a plain amount, more than
    two decimal places, zero or negative, or over `maximum` pence.
    """
    raw = text if isinstance(text, str) else str(text)
    s = raw.strip()
    if s.startswith("-") or s.startswith("−"):
        raise TopupError("%s %r must be positive" % (what, raw))
    if s.startswith("£"):
        s = s[1:].strip()
    elif s.startswith("GBP"):
        s = s[3:].strip()
    m = _PENCE.match(s)
    if m:
        if len(m.group(1)) > 17:
            raise TopupError("%s %r is far too large" % (what, raw))
        pence = int(m.group(1))
    else:
        m = _POUNDS.match(s)
        if not m:
            if re.fullmatch(r"[0-9,]*\.[0-9]{3,}", s):
                raise TopupError("%s %r has more than two decimal places (pence are the "
                                 "smallest unit)" % (what, raw))
            raise TopupError("%s %r is not an amount; write pounds like 10 or 10.50 "
                             "(or pence like 50p)" % (what, raw))
        pounds_text = s.split(".", 1)[0].replace(",", "")
        if len(pounds_text) > 15:  # far over any limit; keep int() on short strings
            raise TopupError("%s %r is far too large" % (what, raw))
        frac = (m.group(1) or "").ljust(2, "0")
        pence = int(pounds_text) * 100 + int(frac)
    if pence < 1:
        raise TopupError("%s %r must be at least 1p" % (what, raw))
    if maximum is not None and pence > maximum:
        raise TopupError("%s %s is over %s of %s" % (what, format_pence(pence), limit_name,
                                                     format_pence(maximum)))
    return pence


def format_pence(pence):
    """`£10.50`, `£1,000.00`, `-£0.05`."""
    sign = "-" if pence < 0 else ""
    pounds, p = divmod(abs(int(pence)), 100)
    return "%s£%s.%02d" % (sign, "{:,}".format(pounds), p)


def format_mp(mp):
    """A meter balance in milli-pence (SPEC.md: 1 p = 1000 mp) for a reader: pounds and
    pence, truncated towards zero, with a sub-penny remainder stated separately so that
    nothing is rounded away: `£12.50`, `£12.49 + 0.999p`, `-£0.01 - 0.5p`, `-0.5p`."""
    mp = int(mp)
    sign = -1 if mp < 0 else 1
    pence, milli = divmod(abs(mp), 1000)
    if pence == 0 and milli:
        return "%s%sp" % ("-" if sign < 0 else "", ("0.%03d" % milli).rstrip("0"))
    text = format_pence(sign * pence)
    if milli:
        text += " %s %sp" % ("-" if sign < 0 else "+", ("0.%03d" % milli).rstrip("0"))
    return text
