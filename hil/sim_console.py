"""The console of `topup sim`: one line a command, to drive a running virtual board's
inputs by hand -- the WAN coming back, the customer's button, energy pulses, time passing,
a power cut -- as an engineer would on a bench. Reads lines until end of input (then the
board keeps running until Ctrl-C); every command answers with one line."""
import shlex

HELP = """commands (one a line):
  status                  relay, WAN, clock, power, flash counters
  wan up|down             the WAN-status input
  button [N]              press the customer button (N times)
  pulses N                N energy pulses (1 Wh each)
  advance SECONDS         move the meter clock (and ticks) forward
  clock [UNIX_SECONDS]    show, or set, the board's clock
  power off|on            cut the power / power on again
  reset                   a hard reset
  help                    this text
  quit                    stop the board"""


PPMID_HELP = """
the PPMID (topup sim --ppmid):
  key KEYS                press keypad keys: 0-9, * backspace, # send, D clear,
                          A emergency credit, B confirm the supply, C balance
                          (spaces and dashes are ignored: key 1234 5678 9012 3456 7890 #)
  display                 what the PPMID's display shows"""


class ConsoleError(Exception):
    pass


def _count(text, what, lo=1, hi=10 ** 7):
    try:
        n = int(text)
    except ValueError:
        raise ConsoleError("%s must be a whole number, not %r" % (what, text)) from None
    if not lo <= n <= hi:
        raise ConsoleError("%s must be %d..%d" % (what, lo, hi))
    return n


def execute(board, line, ppmid=None):
    """Run one console line on the board (the meter); return the line to print (None for
    nothing).  `ppmid` (a hil.two_board.Ppmid) adds `key` and `display`.  Raises
    ConsoleError for a line it cannot run, StopIteration for `quit`."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ConsoleError(str(e)) from None
    if not words:
        return None
    cmd, args = words[0].lower(), words[1:]
    if cmd in ("quit", "exit"):
        raise StopIteration
    if cmd in ("help", "?"):
        return HELP + (PPMID_HELP if ppmid is not None else "")
    if cmd in ("key", "keys") and ppmid is not None:
        keys = "".join(args).replace("-", "")
        if not keys or any(k not in "0123456789*#ABCDabcd" for k in keys):
            raise ConsoleError("keys are 0-9, *, #, A, B, C, D (e.g. key 1234#)")
        gen = ppmid.display()["gen"]
        ppmid.press(keys.upper())
        ppmid.board.display_wait(gen, 1.0)
        return _screen(ppmid)
    if cmd == "display" and not args and ppmid is not None:
        return _screen(ppmid)
    if cmd == "status":
        s = board.status()
        relay = {None: "not driven yet", True: "closed (supply on)", False: "open (supply off)"}[s.get("relay")]
        return ("power %s, relay %s, WAN %s, clock %d, flash %d erases %d programs"
                % ("on" if s.get("powered") else "OFF", relay, "up" if s.get("wan") else "down",
                   int(s.get("clock") or 0), s.get("erases") or 0, s.get("programs") or 0))
    if cmd == "wan" and len(args) == 1 and args[0] in ("up", "down"):
        board.set_wan(args[0] == "up")
        return "WAN %s" % args[0]
    if cmd == "button" and len(args) <= 1:
        n = _count(args[0], "presses", hi=100) if args else 1
        board.press_button(n)
        return "button pressed %d time(s)" % n
    if cmd == "pulses" and len(args) == 1:
        n = _count(args[0], "pulses")
        board.add_pulses(n)
        return "%d pulse(s) = %d Wh" % (n, n)
    if cmd == "advance" and len(args) == 1:
        n = _count(args[0], "seconds", hi=10 * 365 * 86400)
        board.advance_clock(n)
        return "clock advanced %d s" % n
    if cmd == "clock" and len(args) <= 1:
        if args:
            board.set_clock(_count(args[0], "clock", lo=0, hi=2 ** 48 - 1))
        return "clock %d" % int(board.status().get("clock") or 0)
    if cmd == "power" and len(args) == 1 and args[0] in ("off", "on"):
        if args[0] == "off":
            board.power_off()
            return "power off"
        if board.powered:
            return "already on"
        board.power_on()
        return "power on"
    if cmd == "reset" and not args:
        board.hard_reset()
        return "reset"
    raise ConsoleError("unknown command %r (try `help`)" % line.strip())


def _screen(ppmid):
    """The PPMID's display, framed: 8 lines of 16 characters."""
    rows = (ppmid.text.split("\n") + [""] * 8)[:8]
    return "\n".join(["+" + "-" * 16 + "+"] + ["|%-16s|" % r for r in rows] + ["+" + "-" * 16 + "+"])


def run(board, lines, echo, ppmid=None):
    """Run console lines (an iterable, e.g. sys.stdin) until `quit` or the end of them.
    Return True if `quit` was asked."""
    for line in lines:
        try:
            out = execute(board, line, ppmid)
        except StopIteration:
            return True
        except ConsoleError as e:
            echo("error: %s" % e)
            continue
        except Exception as e:  # noqa: BLE001 - the board may have stopped: say so, keep the console
            echo("error: %s" % e)
            continue
        if out:
            echo(out)
    return False
