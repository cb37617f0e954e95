# What a meter provisioned with a command key (SPEC.md §10) holds beside the ledger, and
# the arithmetic of its tariff changes. Ledger.admin is a plain list laid out by the indices
# below (None on a meter without a command key): the command key and its numbering, the
# revoked and retired issuer keys, and the tariff changes still to come, which the ledger
# puts in force as meter time passes them. This module is loaded only to read the config
# into that list (Ledger._apply_config), to put a due tariff change in force, for a
# roll-forward across one, and with a command -- and dropped after each on MicroPython, so
# that no meter carries it on its heap between those moments. The commands themselves are
# decided in meter/commands.py.
from protocol import cose
from meter import config as cfg, metering

# Config keys (meter/config.py has 1-16)
C_COMMAND_KEY = 17    # the supplier's command key (Ed25519 public): the meter's root of trust
C_COMMAND_LAST = 18   # number of the last command applied under it (0: none yet)
C_COMMAND_REF = 19    # reference of the last command applied: names its receipt (the commit point)
C_COMMAND_RECEIPTS = 20  # [receipt index, ...] of the last commands applied (duplicates)
C_REVOKED = 21        # [kid, ...] revoked issuer keys: their vouchers are KEY_REVOKED
C_RETIRED = 22        # [kid, ...] the previous suppliers' issuer keys: their vouchers are STALE
C_TARIFFS = 23        # [[effective, {config key: value}], ...] tariff changes to come, by time
C_FLOOR = 24          # sequence floor set by a change of supplier (the state's is raised too)

# Ledger.admin, a list (the ledger, recovery and HAN server use these as private consts)
KEY = 0               # the command key (Ed25519 public)
KID = 1               # its kid
LAST = 2              # number of the last command applied
RECEIPTS = 3          # receipt indices of the last commands applied
REF = 4               # reference of the last command applied
REVOKED = 5           # revoked kids
RETIRED = 6           # the previous suppliers' issuer kids
FLOOR = 7             # a change of supplier's sequence floor
PENDING = 8           # [(effective, {config key: value})] tariff changes to come, in time order


def load(ledger, c, charged_to):
    """Ledger.admin from the config c: tariff changes due by meter time charged_to are put
    in force on the ledger (over the config's base values), later ones stay pending."""
    key = c[C_COMMAND_KEY]
    pending = []
    for effective, values in c.get(C_TARIFFS, ()):
        if effective <= charged_to:
            set_values(ledger, values)
        else:
            pending.append((effective, values))
    return [key, cose.kid_for(key), c.get(C_COMMAND_LAST, 0), c.get(C_COMMAND_RECEIPTS, ()),
            c.get(C_COMMAND_REF), c.get(C_REVOKED, ()), c.get(C_RETIRED, ()), c.get(C_FLOOR, 0),
            pending]


def set_values(ledger, values):
    for k in values:
        v = values[k]
        if k == cfg.C_UNIT_RATE:
            ledger.unit_rate = v
        elif k == cfg.C_STANDING:
            ledger.standing = v
        elif k == cfg.C_EC_AMOUNT:
            ledger.ec_amount = v
        elif k == cfg.C_EC_THRESHOLD:
            ledger.ec_threshold = v
        elif k == cfg.C_MAX_VOUCHER:
            ledger.max_voucher = v
        elif k == cfg.C_MAX_CREDIT:
            ledger.max_credit = v


def changes(ledger, now):
    """Put in force the tariff changes due by `now`, in time order: the standing charge up
    to each at the rate before it (the remainder carried across), then its values. Return
    the milli-pence charged. Energy metered at `now` is charged after, at the rate then in
    force."""
    st = ledger._state
    pending = ledger.admin[PENDING]
    cost = 0
    while pending and pending[0][0] <= now:
        effective, values = pending.pop(0)
        if effective > st[cfg.S_CHARGED_TO]:
            sc, st[cfg.S_STANDING_REM] = metering.standing_cost(
                effective - st[cfg.S_CHARGED_TO], ledger.standing, st[cfg.S_STANDING_REM])
            st[cfg.S_CHARGED_TO] = effective
            cost += sc
        set_values(ledger, values)
    return cost


def split(ledger, st, until):
    """For a roll-forward (meter/recovery.py): the standing charge from the state st's time
    to `until` across the pending tariff changes, its remainder, and the unit rate in force
    just before `until`. Return (milli-pence, remainder, unit rate); changes nothing."""
    t = st[cfg.S_CHARGED_TO]
    rem = st[cfg.S_STANDING_REM]
    rate = ledger.unit_rate
    daily = ledger.standing
    total = 0
    for effective, values in ledger.admin[PENDING]:
        if effective >= until:
            break
        if effective > t:
            c, rem = metering.standing_cost(effective - t, daily, rem)
            total += c
            t = effective
        rate = values.get(cfg.C_UNIT_RATE, rate)
        daily = values.get(cfg.C_STANDING, daily)
    if until > t:
        c, rem = metering.standing_cost(until - t, daily, rem)
        total += c
    return total, rem, rate
