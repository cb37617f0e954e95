# The meter's two persisted records, as deterministic CBOR maps with small integer keys:
# the config (written once at provisioning) and the ledger state (every commit).
from protocol import cbor

FIRMWARE_VERSION = "0.1.0"

# Config keys
C_DEVICE = 1          # 8-byte EUI-64
C_SEED = 2            # the meter's Ed25519 private seed (made on the device)
C_PUBLIC = 3          # its public key, cached: deriving it costs a scalar multiplication
C_TRUST = 4           # [issuer public key, ...]: the vouchers' signers this meter trusts
C_MAX_VOUCHER = 5     # pence, per voucher
C_MAX_CREDIT = 6      # pence, the maximum credit threshold
C_EC_AMOUNT = 7       # pence of emergency credit a button press grants
C_EC_THRESHOLD = 8    # pence: emergency credit is offered below this balance
C_UNIT_RATE = 9       # milli-pence per kWh
C_STANDING = 10       # milli-pence per day
C_PROVISIONED_AT = 11  # Unix seconds
C_FIRST_RECEIPT = 12  # index of the first receipt signed with this key (a reset continues the count)
C_KA_SEED = 13        # the meter's X25519 key-agreement private key (made on the device: SPEC.md §8)
C_KA_PUBLIC = 14      # its public key, registered with the supplier
C_CODE_SUPPLIER = 15  # the supplier's code key (X25519 public), if codes are taken
C_CODE_KEY = 16       # the per-meter keypad-code key derived from the two (SPEC.md §8)
# Keys 17-24: a meter with a command key (signed commands, SPEC.md §10), defined in
# meter/admin.py so that a meter without one holds none of them.

# State keys
S_BALANCE = 1         # milli-pence, may be negative while emergency credit is in use
S_EC = 2              # pence of emergency credit in use (0 if none)
S_HIGHEST = 3         # highest voucher sequence applied
S_BITMAP = 4          # replay window below it
S_LAST_HASH = 5       # chain hash of the latest receipt
S_CHARGED_TO = 6      # meter time up to which the standing charge is accounted
S_ENERGY_REM = 7      # energy cost remainder, 1/1000 milli-pence
S_STANDING_REM = 8    # standing charge remainder, milli-pence-seconds / 86400
S_WH_TOTAL = 9        # Wh metered since provisioning
S_REJECTIONS = 10     # {reason: count} not yet put in a receipt
S_REJ_RECEIPT_AT = 11  # meter time of the latest rejections receipt
S_UPLOADED = 12       # receipts acknowledged by the head end (WAN queue)
S_FLOOR = 13          # every sequence <= floor is STALE (set at provisioning: SPEC.md §2.2)
S_BAD_SIGNATURES = 14  # consecutive vouchers refused BAD_SIGNATURE (signature back-off)
S_BACKOFF_UNTIL = 15  # meter time before which no signature is checked (BUSY)
S_FAULTS_SEEN = 16    # the flash faults last recorded in a fault receipt {code: count}
S_SUPPLY = 17         # supply state (SPEC.md §9): 0 interrupted, 1 armed, 2 on (meter/supply.py)
S_CODE_WRONG = 18     # wrong keypad codes since the last lockout or good code (meter/lockout.py)
S_CODE_LOCKOUTS = 19  # lockouts in the current series (each doubles the next)
S_CODE_UNTIL = 20     # meter time before which code entry is locked

# The carry a factory reset keeps (meter.store `format(carry)`): what must survive a reset
# so that nothing before it can apply again and receipt numbers never restart.
K_FLOOR = 1           # highest sequence the old ledger closed (applied, or below its floor)
K_NEXT_RECEIPT = 2    # next receipt index
K_CLOCK = 3           # meter time at the reset: meter time never goes back past it

DEFAULT_LIMITS = {
    C_MAX_VOUCHER: 10000,     # £100
    C_MAX_CREDIT: 50000,      # £500
    C_EC_AMOUNT: 500,         # £5
    C_EC_THRESHOLD: 100,      # £1
    C_UNIT_RATE: 24500,       # 24.50 p/kWh
    C_STANDING: 60000,        # 60.00 p/day
}


def encode(fields):
    return cbor.encode(fields)


def decode(blob):
    fields = cbor.decode(blob)
    if not isinstance(fields, dict):
        raise ValueError("record is not a map")
    return fields
