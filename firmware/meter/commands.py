# Signed commands at the meter (SPEC.md §10): the supplier's administration of a provisioned
# meter -- issuer keys added and revoked, the code key replaced, the tariff and limits
# changed from an effective time, the command key rotated, the supplier changed -- each
# applied once, in number order, with a signed receipt (kind 5).
#
# Loaded only when a command arrives (Ledger.submit_command), with protocol/command.py, and
# dropped after it: the boot, metering and voucher paths never carry either in their heap.
#
# The order of a command's checks (SPEC.md §10):
#   0. the exact bytes of a command already applied (its reference in one of the last
#      commands' receipts): the original receipt, before any check, whatever the key;
#   -. a meter with no command key: NOT_PROVISIONED;
#   1-4. MALFORMED, BAD_HEADER, UNKNOWN_KEY (not the command key: an issuer key's signature
#      is refused here), BAD_SIGNATURE (under the vouchers' back-off, SPEC.md §5.2);
#   5-6. MALFORMED payload, WRONG_DEVICE;
#   7. COMMAND_REPLAYED (number at or below the last applied), COMMAND_OUT_OF_ORDER;
#   8-9. COMMAND_REFUSED: values out of bounds, or the meter's state does not allow it.
# Then the commit (Ledger._commit with the new config): the receipt first, then the config
# (two copies: the first whole one is the commit point, naming the command's reference),
# then the state. meter/recovery.py takes a command receipt whose state record is missing
# as committed exactly when the config names it: applied once or not at all.
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from protocol import command as fmt, cose, errors, receipt as receipt_format
from protocol.errors import Rejected
from meter import admin, backoff, config as cfg, records

# Bounds on what the config holds, so that a command's commit (receipt, two config copies,
# state) always fits the half block the store writes together (meter/store.py); a command
# that would still not fit is refused COMMAND_REFUSED, nothing written.
MAX_ISSUER_KEYS = const(4)        # issuer keys a meter trusts at most
MAX_REVOKED = const(8)            # revoked kids kept (an older one is then UNKNOWN_KEY)
MAX_RETIRED = const(4)            # the previous suppliers' issuer kids kept (STALE)
MAX_PENDING = const(2)            # tariff changes waiting for their time
KEEP_RECEIPTS = const(4)          # the last commands whose bytes get their receipt back

# command tariff argument -> config key
_TARIFF = ((fmt.A_UNIT_RATE, cfg.C_UNIT_RATE), (fmt.A_STANDING, cfg.C_STANDING),
           (fmt.A_EC_AMOUNT, cfg.C_EC_AMOUNT), (fmt.A_EC_THRESHOLD, cfg.C_EC_THRESHOLD),
           (fmt.A_MAX_VOUCHER, cfg.C_MAX_VOUCHER), (fmt.A_MAX_CREDIT, cfg.C_MAX_CREDIT))


def original(ledger, data):
    """The receipt of these exact command bytes if they were applied, else None."""
    ref = fmt.reference(data)
    store = ledger.store
    for index in ledger.admin[admin.RECEIPTS]:
        raw = store.receipt(index)
        if raw is not None and ref in raw:
            r = receipt_format.parse(raw)
            if r.kind == receipt_format.COMMAND and r.voucher == ref:
                return raw
    return None


def submit(ledger, data):
    """A signed command (HAN request 7). Return (receipt, duplicate); raise Rejected:
    nothing changed. The ledger is provisioned."""
    a = ledger.admin
    if a is None:
        raise Rejected(errors.NOT_PROVISIONED, "no command key installed: this meter takes no commands")
    raw = original(ledger, data)
    if raw is not None:
        return raw, True
    now = ledger.clock()
    st = ledger._state
    try:
        msg = cose.decode(data)
        if msg.kid != a[admin.KID]:
            raise Rejected(errors.UNKNOWN_KEY, "kid %s is not this meter's command key" % _hex(msg.kid))
        backoff.check(st, now)
        try:
            c = fmt.verify(data, {a[admin.KID]: a[admin.KEY]}, ledger.device)
        except Rejected as e:
            if e.reason == errors.BAD_SIGNATURE:
                backoff.failed(st, now)
            elif backoff.passed(st):
                ledger._dirty = True
            raise
        if backoff.passed(st):
            ledger._dirty = True
        last = a[admin.LAST]
        if c.number <= last:
            raise Rejected(errors.COMMAND_REPLAYED, "command %d: %d is already applied" % (c.number, last))
        if c.number > last + 1:
            raise Rejected(errors.COMMAND_OUT_OF_ORDER, "command %d: the next is %d" % (c.number, last + 1))
        fmt.check_args(c.kind, c.args, now)
        r = _apply(ledger, c, now)
    except Rejected as e:
        if e.reason != errors.BUSY and e.reason != errors.STORAGE:
            ledger._count_rejection(e.reason)
        raise
    return r, False


def _refuse(why):
    raise Rejected(errors.COMMAND_REFUSED, why)


def _apply(ledger, c, now):
    conf = cfg.decode(ledger.store.config)
    kind = c.kind
    args = c.args
    revoked = list(conf.get(admin.C_REVOKED, ()))
    extra = {}
    floor = 0
    if kind == fmt.ADD_ISSUER_KEY:
        key = args[fmt.A_KEY]
        if cose.kid_for(key) in revoked:
            _refuse("that issuer key was revoked")
        trust = list(conf[cfg.C_TRUST])
        if key not in trust:
            if len(trust) >= MAX_ISSUER_KEYS:
                _refuse("the meter trusts %d issuer keys already" % MAX_ISSUER_KEYS)
            trust.append(key)
        conf[cfg.C_TRUST] = trust
    elif kind == fmt.REVOKE_ISSUER_KEY:
        kid = args[fmt.A_KEY]
        trust = [k for k in conf[cfg.C_TRUST] if cose.kid_for(k) != kid]
        if not trust:
            _refuse("revoking it would leave no issuer key")
        conf[cfg.C_TRUST] = trust
        if kid not in revoked:
            revoked.append(kid)
        conf[admin.C_REVOKED] = revoked[-MAX_REVOKED:]
    elif kind == fmt.SET_CODE_KEY:
        _code_key(conf, ledger.device, args[fmt.A_KEY])
    elif kind == fmt.SET_TARIFF:
        extra["tariff"] = _tariff(ledger, conf, args, now)
    elif kind == fmt.ROTATE_COMMAND_KEY:
        conf[admin.C_COMMAND_KEY] = args[fmt.A_KEY]
    elif kind == fmt.CHANGE_SUPPLIER:
        retired = list(conf.get(admin.C_RETIRED, ()))
        for k in conf[cfg.C_TRUST]:
            kid = cose.kid_for(k)
            if kid not in retired:
                retired.append(kid)
        issuers = list(args[fmt.A_ISSUERS])
        for k in issuers:
            kid = cose.kid_for(k)
            if kid in revoked or kid in retired:
                _refuse("a new issuer key is a revoked or previous one")
        conf[admin.C_RETIRED] = retired[-MAX_RETIRED:]
        conf[cfg.C_TRUST] = issuers
        if fmt.A_CODE_KEY in args:
            _code_key(conf, ledger.device, args[fmt.A_CODE_KEY])
        else:
            conf.pop(cfg.C_CODE_SUPPLIER, None)
            conf.pop(cfg.C_CODE_KEY, None)
        floor = args[fmt.A_FLOOR]
        for f in (ledger.floor, ledger.highest):
            if f > floor:
                floor = f
        conf[admin.C_FLOOR] = floor
        conf[admin.C_COMMAND_KEY] = args[fmt.A_KEY]
    st = ledger._state
    ledger._accrue(0, now)     # metering up to now, at the rates in force before it
    index = ledger.store.receipt_count
    conf[admin.C_COMMAND_LAST] = 0 if kind == fmt.CHANGE_SUPPLIER else c.number
    conf[admin.C_COMMAND_REF] = c.ref
    kept = list(conf.get(admin.C_COMMAND_RECEIPTS, ()))
    kept.append(index)
    conf[admin.C_COMMAND_RECEIPTS] = kept[-KEEP_RECEIPTS:]
    balance = st[cfg.S_BALANCE]
    r = ledger.signer.make(index, receipt_format.COMMAND, now, st[cfg.S_LAST_HASH], balance,
                           balance, sequence=c.number, voucher=c.ref, command_kind=kind, **extra)
    new = dict(st)
    new[cfg.S_LAST_HASH] = receipt_format.chain_hash(r)
    if floor > new.get(cfg.S_FLOOR, 0):
        new[cfg.S_FLOOR] = floor
    blob = cfg.encode(conf)
    state = cfg.encode(new)
    if (records.size(len(r)) + 2 * records.size(len(blob)) + records.size(len(state))
            > ledger.store._bs // 2):
        _refuse("the meter's configuration would not fit its flash records")
    try:
        ledger._commit(new, now, r, 0, config=blob)
    except Rejected:
        # A failed write may have left the config (the commit point) on the flash: what is
        # there counts. Read it again; a retry of these bytes then gets the receipt if so.
        ledger._unsynced = True
        try:
            ledger._resync()
        except Rejected:
            pass
        raise
    return r


def _code_key(conf, device, supplier):
    from protocol import keycode, x25519
    ka_seed = conf[cfg.C_KA_SEED]
    try:
        shared = x25519.x25519(ka_seed, supplier)
    except ValueError:
        _refuse("the code key is not a usable X25519 public key")
    conf[cfg.C_CODE_SUPPLIER] = supplier
    conf[cfg.C_CODE_KEY] = keycode.derive_key(shared, device, supplier, conf[cfg.C_KA_PUBLIC])


def _tariff(ledger, conf, args, now):
    # In force from max(effective, now). Changes due by the time of the state on the flash
    # are folded into the config's base values (a roll-forward starts from that state).
    effective = args[fmt.A_EFFECTIVE]
    if effective < now:
        effective = now
    values = {}
    applied = {fmt.A_EFFECTIVE: effective}
    for a, k in _TARIFF:
        if a in args:
            values[k] = args[a]
            applied[a] = args[a]
    base_to = cfg.decode(ledger.store.state)[cfg.S_CHARGED_TO]   # the state on the flash
    pending = []
    for entry in conf.get(admin.C_TARIFFS, ()):
        if entry[0] <= base_to:
            conf.update(entry[1])
        else:
            pending.append(entry)
    at = len(pending)
    while at and pending[at - 1][0] > effective:
        at -= 1
    pending.insert(at, [effective, values])
    if len(pending) > MAX_PENDING:
        _refuse("%d tariff changes are pending already" % MAX_PENDING)
    conf[admin.C_TARIFFS] = pending
    return applied


def _hex(b):
    return "".join("%02x" % x for x in b)
