# What the ledger does at load after the store's mount: roll forward from receipts whose
# state record was torn or damaged, and record flash faults in a receipt (SPEC.md §4.1).
#
# Every credit-changing commit writes its signed receipt first and the state record last. A
# receipt that is whole, is the next in the chain and has no state record after it is an
# orphan: its commit either was cut before the state record landed (the PPMID got no answer)
# or its state record was damaged later (the PPMID may have been told "applied"). Taking it
# as committed is right in both cases -- the balance after it and the voucher it applied are
# in it -- so a top-up that was acknowledged can never be lost to a damaged state record.
#
# Metering between the last state record and the receipt is in the receipt too, as the
# drop from the last balance to its balance_before. The ledger charges by exact integer
# rules (meter.metering) with carried remainders, and the receipt's time is the time it
# charged the standing charge to, so the standing charge of that interval and then the Wh
# that make up the rest are worked out exactly, remainders included: the rolled-forward
# state is the one the torn commit would have written. If the figures do not fit those
# rules (a unit rate under 1 mp per Wh makes Wh ambiguous), the remainders and the Wh
# counter keep their older values: less than 1 mp, in the customer's favour.
#
# A signed command's receipt (kind 5, meter/commands.py) is followed by the new config and
# then the state; the config's first whole copy is its commit point. Its orphan receipt is
# taken as committed exactly when the config on the flash names it (its reference), and
# breaks the roll-forward otherwise (the command was not applied; the next commit
# supersedes the receipt). What a command changes is in the config (a change of
# supplier's floor too: Ledger.floor is the larger of the state's and the config's). A
# tariff change between the state and the receipt splits the standing charge at its time,
# as the ledger does.
from protocol import receipt as receipt_format, window as replay
from protocol.errors import Rejected
from meter import config as cfg, lockout, metering

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

# Ledger.admin's layout (meter/admin.py: RECEIPTS, REF, PENDING)
_RECEIPTS = const(3)
_REF = const(4)
_PENDING = const(8)


def _metering_between(ledger, st, drop, until):
    """Charge `drop` mp of metering up to meter time `until` into the state dict st."""
    if drop <= 0 and until <= st[cfg.S_CHARGED_TO]:
        return
    seconds = until - st[cfg.S_CHARGED_TO] if until > st[cfg.S_CHARGED_TO] else 0
    rate = ledger.unit_rate
    a = ledger.admin
    if a is not None and a[_PENDING]:
        from meter import admin      # (the ledger drops it after its load)
        standing, srem, rate = admin.split(ledger, st, until)
    else:
        standing, srem = metering.standing_cost(seconds, ledger.standing, st[cfg.S_STANDING_REM])
    energy = drop - standing
    erem = st[cfg.S_ENERGY_REM]
    wh = 0
    if energy > 0 and rate > 0:
        wh = (energy * 1000 - erem + rate - 1) // rate
        if wh < 0:
            wh = 0
    cost, new_erem = metering.energy_cost(wh, rate, erem)
    if energy >= 0 and cost == energy:
        st[cfg.S_ENERGY_REM] = new_erem
        st[cfg.S_STANDING_REM] = srem
        st[cfg.S_WH_TOTAL] += wh
    if seconds:
        st[cfg.S_CHARGED_TO] = until


def roll_forward(ledger):
    """Take as committed the whole orphan receipts that follow the last state record."""
    store = ledger.store
    st = dict(ledger._state)
    kid = ledger.signer.kid
    adopted = 0
    for index, tag, raw in store.pending_receipts():
        try:
            r = receipt_format.parse(raw)
        except Rejected:
            break
        if (r.device != ledger.device or r.kid != kid or r.index != index
                or r.prev != st[cfg.S_LAST_HASH] or r.balance_before > st[cfg.S_BALANCE]):
            break
        if r.kind == receipt_format.TOPUP:
            w = replay.ReplayWindow(st[cfg.S_HIGHEST], st[cfg.S_BITMAP])
            try:
                if tag != r.sequence or w.is_used(r.sequence):
                    break
            except Rejected:
                break
        elif r.kind == receipt_format.COMMAND and (ledger.admin is None
                                                   or r.voucher != ledger.admin[_REF]
                                                   or index not in ledger.admin[_RECEIPTS]):
            break                          # its config never landed: not applied
        _metering_between(ledger, st, st[cfg.S_BALANCE] - r.balance_before, r.time)
        if r.kind == receipt_format.TOPUP:
            w.mark(r.sequence)
            st[cfg.S_HIGHEST] = w.highest
            st[cfg.S_BITMAP] = w.bitmap
            if r.balance_after >= 0:
                st[cfg.S_EC] = 0
            if r.form == receipt_format.FORM_CODE:
                lockout.clear(st)          # a good code ended the lockout series
        elif r.kind == receipt_format.EMERGENCY:
            st[cfg.S_EC] = r.amount
        elif r.kind == receipt_format.REJECTIONS:
            st[cfg.S_REJECTIONS] = {}
            st[cfg.S_REJ_RECEIPT_AT] = r.time
        elif r.kind == receipt_format.FAULT:
            st[cfg.S_FAULTS_SEEN] = dict(r.faults)
        if r.supply is not None:
            st[cfg.S_SUPPLY] = r.supply    # the supply state after a top-up or emergency credit
        st[cfg.S_BALANCE] = r.balance_after
        st[cfg.S_LAST_HASH] = r.hash
        adopted += 1
    if not adopted:
        return 0
    try:
        ledger._commit(st, st[cfg.S_CHARGED_TO], adopt=adopted)
    except Rejected as e:
        ledger.log("offline-topup: roll forward not saved (%s); tried again at the next start" % (e,))
        return 0
    ledger.log("offline-topup: %d receipt(s) whose state record was lost taken as committed" % adopted)
    return adopted


def record_faults(ledger):
    """Log what the store reported, and put it in a fault receipt unless the last one said
    the same. Never raises: a receipt refused here is tried at the next start."""
    faults = ledger.faults
    if not faults:
        return
    ledger.log("offline-topup: flash faults found at start %r (code: count; SPEC.md §4.1)" % (faults,))
    if faults == ledger._state.get(cfg.S_FAULTS_SEEN):
        return
    try:
        ledger.record_faults(faults)
    except Rejected as e:
        ledger.log("offline-topup: fault receipt not written: %s" % (e,))
