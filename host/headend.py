"""The supplier's head end for the meters' WAN uplink (SPEC.md §5.1): receive the receipts a
meter pushes once its WAN is back, store them as `topup receipts import` would, and answer
with a signed acknowledgement of what the supplier holds, so the meter can let those go.

Rules:
- Every structurally valid receipt of a push is stored, whatever its signature: a receipt
  that does not verify is evidence for reconciliation (`bad_signature`), never "held".
- A receipt is held when a stored copy's signature verified with the meter key of its
  index's span (host/registry.py key epochs): sig_ok = 1 and checked_kid = that key's kid.
- The answer is {1: next, 2: ack}: `next` is the lowest index at or after the push's first
  index that is not held (never below it: receipts below it are acknowledged already, or
  gone from the meter's ring for good, and reconciliation names the gap). `ack` is
  protocol.ack signed with the database's active issuer key, naming the device, the kid
  of the meter key whose span holds next - 1, `next` and SHA-256 of the held receipt
  next - 1; it is absent when next equals the push's first index (nothing to let go).
  A forged push therefore moves nothing: its receipts are stored and not held.
- The answer also carries field 3 = the meter's pending signed commands (SPEC.md §5.1,
  §10; host/commands.py pending_for: its current provisioning's), in number order, at
  most 4. They are signed for that meter
  alone, so sending them to whoever pushes in its name gives nothing away; the meter
  applies them one per main-loop step and their receipts (kind 5) come back with its next
  push, whose import marks them applied (commands.settle_from_receipts), so the next
  answer no longer carries them.
"""
import hashlib
import time

from protocol import ack as ack_format, errors, han

from . import receipts_io, registry
from .reconcile import import_raw, recheck

_READ = 512
_MAX_READ_PER_POLL = 8192  # so that a flood of frames cannot keep poll() from returning
MAX_COMMANDS = 4           # per answer: what a meter takes from one (firmware/meter/uplink.py)


def _held(conn, device, first):
    """{index: [hash of each held copy]} for indices >= first, and the device's keys."""
    epochs = registry.device_keys(conn, device)
    held = {}
    if not epochs:
        return held, epochs
    for idx, h, kid in conn.execute(
            "SELECT idx, hash, checked_kid FROM receipts WHERE device = ? AND idx >= ? AND "
            "sig_ok = 1 ORDER BY idx, hash", (device, first)):
        key = registry.span_key(epochs, idx)
        if key is not None and kid == key.kid:
            held.setdefault(idx, []).append(bytes(h))
    return held, epochs


def next_needed(conn, device, first):
    """The lowest receipt index at or after `first` that `device`'s meter has not had
    stored here with a signature verified by the key of its span."""
    held, _ = _held(conn, device, first)
    index = first
    while index in held:
        index += 1
    return index


def acknowledgement(conn, signer, device, first, pushed=()):
    """(next index needed, signed acknowledgement bytes or None) for a push of `device`
    from index `first`. `pushed`: the pushed receipts' hashes, preferred when two held
    receipts share index next - 1 (a fork: the meter holds the one it pushed)."""
    held, epochs = _held(conn, device, first)
    nxt = first
    while nxt in held:
        nxt += 1
    if nxt == first:
        return nxt, None
    copies = held[nxt - 1]
    last = next((h for h in copies if h in pushed), copies[0])
    key = registry.span_key(epochs, nxt - 1)
    return nxt, ack_format.encode(signer.kid, signer.sign, device, key.kid, nxt, last)


def push_fields(payload):
    """(device, first index, [receipt bytes]) of a push, or Rejected(BAD_REQUEST)."""
    device, first, raws = payload.get(1), payload.get(2), payload.get(3)
    if (not isinstance(device, bytes) or len(device) != 8 or not isinstance(first, int)
            or isinstance(first, bool) or not 0 <= first <= 0xFFFFFFFF
            or not isinstance(raws, list) or not all(isinstance(r, bytes) for r in raws)):
        raise errors.Rejected(errors.BAD_REQUEST, "push needs {1: device, 2: first index, 3: [receipts]}")
    return device, first, raws


def handle_push(conn, payload, source, signer):
    """Store one push; return (next index needed, acknowledgement or None, ImportResult or
    None). Raises Rejected(BAD_REQUEST) for a push that is not of the right shape or holds
    something that is not a receipt (then nothing of it is stored)."""
    device, first, raws = push_fields(payload)
    result = None
    if raws:
        try:
            result = import_raw(conn, raws, source)
        except receipts_io.ReceiptFileError as e:
            # Not a receipt at all: keep nothing of this push; the meter will send it again.
            raise errors.Rejected(errors.BAD_REQUEST, str(e)) from None
    if result is not None and result.new < len(raws):
        # Some were stored before, maybe checked with another key than their span's (the
        # meter's new key was registered since): check those again.
        recheck(conn, device, first)
    pushed = {hashlib.sha256(r).digest() for r in raws}
    nxt, ack = acknowledgement(conn, signer, device, first, pushed)
    return nxt, ack, result


def pending_commands(conn, device, limit=MAX_COMMANDS):
    """The bytes of `device`'s pending commands for its current provisioning (each signed
    by the command key in force at its number: host/commands.py signing_kid), in number
    order, at most `limit`: field 3 of the answer to its push."""
    from . import commands
    return [row.raw for row in commands.pending_for(conn, device)[:limit]]


class HeadEnd:
    """Serve one WAN link (a serial port or any byte stream with read/write).

    signer: the issuer key that signs acknowledgements (keystore.unlock_active)."""

    def __init__(self, conn, stream, source, signer, log=None):
        self.conn = conn
        self.stream = stream
        self.source = source
        self.signer = signer
        self.log = log or (lambda message: None)
        self.deframer = han.Deframer()
        self.pushes = 0
        self.stored = 0
        self.acks = 0
        self.refused = 0
        self.commands = 0         # command bytes sent in answers (repeats counted)

    def poll(self):
        """Handle what has arrived (a bounded amount per call); return the number of frames
        answered."""
        answered = 0
        read = 0
        while read < _MAX_READ_PER_POLL:
            data = self.stream.read(_READ)
            if not data:
                break
            read += len(data)
            for body in self.deframer.feed(data):
                answered += self._answer(body)
        return answered

    def _answer(self, body):
        try:
            msg_type, msg_id, payload = han.decode_message(body)
        except errors.Rejected:
            return 0
        if msg_type != han.PUSH:
            reply_type, reply = han.ERROR, {1: errors.UNKNOWN_REQUEST}
        else:
            try:
                next_index, ack, result = handle_push(self.conn, payload, self.source,
                                                      self.signer)
                reply_type = han.PUSH | han.RESPONSE
                reply = _answered(self, payload[1], payload[2], len(payload[3]), next_index,
                                  ack, pending_commands(self.conn, payload[1]),
                                  result.new if result else 0, result.bad if result else 0)
            except errors.Rejected as e:
                reply_type, reply = han.ERROR, {1: e.reason}
                self.refused += 1
                self.log("refused a push: %s" % e)
        self.stream.write(han.encode_message(reply_type, msg_id, reply))
        return 1

    def serve(self, idle_exit=None, stop=None, sleep=0.01):
        """Serve until `stop()` is true or, with idle_exit, until idle_exit seconds pass in
        which no new receipt was stored (traffic alone does not keep it running). Returns
        the seconds served."""
        t0 = last = time.monotonic()
        stored = self.stored
        while stop is None or not stop():
            now = time.monotonic()
            if idle_exit is not None and now - last >= idle_exit:
                break
            if self.poll():
                if self.stored != stored:
                    stored = self.stored
                    last = time.monotonic()
            else:
                time.sleep(sleep)
        return time.monotonic() - t0


# --- relaying to the vending service (`topup headend --to URL`, issue 13) -----------------
# The head end needs no database of its own: each push goes to the service's
# POST /v1/receipts?device=EUI64&first=N (host/api/receipts.py), which stores it exactly as
# handle_push above does and answers `next`, the signed `ack` and the pending `commands`;
# the relay passes those to the meter unchanged. So only what the service stored and holds
# verified is ever acknowledged, and commands reach meters through a relay too (the
# service has the database). When the service cannot be reached (connection refused or
# reset, a timeout, 502/503/504, 429), the push is tried again a few times within a budget
# below the meter's own resend interval (firmware/meter/uplink.py RETRY_MS); if it still
# fails the meter is answered ERROR BUSY, acknowledges nothing, keeps its receipts and
# pushes them again later. Nothing is held in the relay, so nothing can be lost in it.

SERVICE_TIMEOUT_S = 2.0    # one attempt
SERVICE_BUDGET_S = 3.5     # all attempts at one push: below the meter's RETRY_MS (5 s)


class ServiceUnavailable(Exception):
    """The service could not be reached, or said it is unavailable: try again later."""


class ServiceRefused(Exception):
    """The service refused the push (a problem answer that retrying will not change)."""

    def __init__(self, status, detail):
        super().__init__("HTTP %d: %s" % (status, detail))
        self.status = status


class ServiceLink:
    """POST a meter's pushes to the vending service. `url`: the service's base URL
    (https://topup.example) or its receipts endpoint; `token`: an API token with scope
    'ingest'. `client`: anything with httpx.Client's post(url, content=, params=,
    headers=) (tests pass one); by default the standard library's HTTP client, so the
    head end needs no HTTP package (TLS certificates checked against the system's store)."""

    RETRY_STATUSES = (429, 502, 503, 504)

    def __init__(self, url, token, timeout=SERVICE_TIMEOUT_S, budget=SERVICE_BUDGET_S,
                 client=None, sleep=time.sleep):
        import http.client
        url = url.rstrip("/")
        self.url = url if url.endswith("/v1/receipts") else url + "/v1/receipts"
        self.budget = budget
        self.sleep = sleep
        self.headers = {"Authorization": "Bearer %s" % token,
                        "Content-Type": "application/cbor-seq",
                        "User-Agent": "topup-headend"}
        self.client = client or _StdlibClient(timeout)
        unreachable = [OSError, http.client.HTTPException]
        try:
            import httpx
            unreachable.append(httpx.TransportError)
        except ImportError:  # pragma: no cover - httpx is only what tests pass in
            pass
        self._unreachable = tuple(unreachable)

    def push(self, device, first, raws):
        """The service's answer (a dict: next, ack, commands, new, ...) to one push, or
        ServiceUnavailable after retrying within the budget, or ServiceRefused."""
        body = receipts_io.encode_cbor(raws)
        params = {"device": registry.format_eui64(device), "first": first}
        deadline = time.monotonic() + self.budget
        delay = 0.1
        why = None
        while True:
            try:
                r = self.client.post(self.url, content=body, params=params,
                                     headers=self.headers)
            except self._unreachable as e:
                why = "%s (%s)" % (type(e).__name__, e or "no detail")
            else:
                if r.status_code == 200:
                    try:
                        answer = r.json()
                        int(answer["next"])
                        return answer
                    except (ValueError, KeyError, TypeError):
                        raise ServiceRefused(r.status_code, "not a push answer") from None
                detail = _detail(r)
                if r.status_code not in self.RETRY_STATUSES:
                    raise ServiceRefused(r.status_code, detail)
                why = "HTTP %d: %s" % (r.status_code, detail)
            if time.monotonic() + delay > deadline:
                raise ServiceUnavailable(why)
            self.sleep(delay)
            delay = min(delay * 2, 1.0)

    def close(self):
        self.client.close()


class _StdlibClient:
    """The one call ServiceLink makes of an HTTP client, on urllib (a new connection per
    push: a meter pushes at most every few seconds)."""

    def __init__(self, timeout):
        self.timeout = timeout

    def post(self, url, content, params, headers):
        import urllib.error
        import urllib.parse
        import urllib.request
        request = urllib.request.Request(url + "?" + urllib.parse.urlencode(params),
                                         data=content, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return _Answer(r.status, r.read(), r.reason)
        except urllib.error.HTTPError as e:
            try:
                return _Answer(e.code, e.read(), e.reason)
            finally:
                e.close()

    def close(self):
        pass


class _Answer:
    def __init__(self, status, body, reason):
        self.status_code, self.content, self.reason_phrase = status, body, reason

    def json(self):
        import json
        return json.loads(self.content)


def _detail(response):
    try:
        return response.json().get("detail") or response.reason_phrase
    except (ValueError, AttributeError):
        return response.reason_phrase or "no detail"


class RelayHeadEnd(HeadEnd):
    """Serve one WAN link, relaying each push to the vending service (ServiceLink) and its
    answer back. Counts as HeadEnd does, plus `unavailable`: pushes the service could not
    take (the meter keeps those receipts and sends them again)."""

    def __init__(self, stream, source, link, log=None):
        super().__init__(None, stream, source, None, log)
        self.link = link
        self.unavailable = 0

    def _answer(self, body):
        import base64
        try:
            msg_type, msg_id, payload = han.decode_message(body)
        except errors.Rejected:
            return 0
        reply_type, reply = han.ERROR, {1: errors.UNKNOWN_REQUEST}
        if msg_type == han.PUSH:
            try:
                device, first, raws = push_fields(payload)
                answer = self.link.push(device, first, raws)
                nxt = int(answer["next"])
                ack = base64.b64decode(answer["ack"]) if answer.get("ack") else None
                sent = [base64.b64decode(c) for c in answer.get("commands") or ()]
                sent = sent[:MAX_COMMANDS]
                new = int(answer.get("new") or 0)
                bad = int(answer.get("bad_signature") or 0)
            except errors.Rejected as e:
                reply = {1: e.reason}
                self.refused += 1
                self.log("refused a push: %s" % e)
            except ServiceRefused as e:
                reply = {1: errors.BAD_REQUEST}
                self.refused += 1
                self.log("the service refused a push: %s" % e)
            except ServiceUnavailable as e:
                reply = {1: errors.BUSY}
                self.unavailable += 1
                self.log("service unavailable (%s): nothing acknowledged, the meter keeps its "
                         "receipts and pushes them again" % e)
            except (ValueError, TypeError, KeyError) as e:  # an answer of the wrong shape
                reply = {1: errors.BUSY}
                self.unavailable += 1
                self.log("the service's answer could not be relayed (%s): nothing "
                         "acknowledged" % e)
            else:
                reply_type = han.PUSH | han.RESPONSE
                reply = _answered(self, device, first, len(raws), nxt, ack, sent, new, bad)
        self.stream.write(han.encode_message(reply_type, msg_id, reply))
        return 1


def _answered(end, device, first, count, nxt, ack, sent, new, bad):
    """The answer to a push that was stored (by a head end or, through a relay, by the
    service): the next index wanted, the acknowledgement if any, the pending commands; the
    head end's counters and its log line follow."""
    reply = {1: nxt}
    end.pushes += 1
    end.stored += new
    if ack is not None:
        reply[2] = ack
        end.acks += 1
        held = "acknowledged #%d-#%d" % (first, nxt - 1)
    else:
        held = "nothing acknowledged (#%d not held verified)" % first
    if sent:
        reply[3] = sent
        end.commands += len(sent)
        held += "; %d pending command(s) sent" % len(sent)
    end.log("meter %s: %d receipt(s) from #%d, %d new%s; %s" % (
        registry.format_eui64(device), count, first, new,
        ", %d with a bad signature" % bad if bad else "", held))
    return reply
