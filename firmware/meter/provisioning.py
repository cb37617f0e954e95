# Provisioning: the engineer's tool calls this over the REPL (see hil/). It gives the
# meter its identity, trust list, limits, tariff and opening credit, and makes the meter's
# own receipt key from the board's random source. It runs once: a second run needs an
# explicit factory reset, which wipes the ledger and makes a new key.
from protocol import ed25519, receipt as receipt_format
from meter import config as cfg


class ProvisioningError(Exception):
    pass


def _check(cond, why):
    if not cond:
        raise ProvisioningError(why)


def provision(store, board, device, trust, limits=None, initial_credit=0, now=None):
    """Provision a blank meter. Return its receipt public key (32 bytes).

    device: 8-byte EUI-64; trust: list of issuer public keys (32 bytes each);
    limits: optional {config key: value} overriding config.DEFAULT_LIMITS;
    initial_credit: opening balance in pence.
    """
    if store.config is not None:
        raise ProvisioningError("already provisioned: factory reset first")
    _check(isinstance(device, bytes) and len(device) == 8, "device must be an 8-byte EUI-64")
    _check(isinstance(trust, (list, tuple)) and len(trust) > 0, "trust list must name at least one issuer key")
    for key in trust:
        _check(isinstance(key, bytes) and len(key) == 32, "issuer keys must be 32-byte Ed25519 public keys")
    values = dict(cfg.DEFAULT_LIMITS)
    for k, v in (limits or {}).items():
        _check(k in cfg.DEFAULT_LIMITS, "unknown limit %r" % (k,))
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, "limit %d must be a positive integer" % k)
        values[k] = v
    _check(isinstance(initial_credit, int) and 0 <= initial_credit <= values[cfg.C_MAX_CREDIT],
           "initial credit must be 0..maximum credit pence")
    if now is None:
        now = board.time()
    seed = bytes(board.random(32))
    _check(len(seed) == 32 and seed != bytes(32), "board random source failed")
    public = ed25519.public_key(seed)

    config = {cfg.C_DEVICE: device, cfg.C_SEED: seed, cfg.C_PUBLIC: public, cfg.C_TRUST: list(trust),
              cfg.C_PROVISIONED_AT: now}
    config.update(values)
    state = {cfg.S_BALANCE: initial_credit * 1000, cfg.S_EC: 0, cfg.S_HIGHEST: 0, cfg.S_BITMAP: 0,
             cfg.S_LAST_HASH: receipt_format.GENESIS, cfg.S_CHARGED_TO: now, cfg.S_ENERGY_REM: 0,
             cfg.S_STANDING_REM: 0, cfg.S_WH_TOTAL: 0, cfg.S_REJECTIONS: {}, cfg.S_REJ_RECEIPT_AT: now,
             cfg.S_UPLOADED: 0}
    # The config record is the commit point: a cut before it leaves a blank meter.
    store.format()
    store.commit(cfg.encode(state))
    store.write_config(cfg.encode(config))
    return public


def factory_reset(store):
    """Wipe the ledger and the meter key. Provisioning may run again afterwards."""
    store.format()


def provision_board(device_hex, trust_hex, limits=None, initial_credit=0, board=None):
    """The REPL entry point for `topup provision`: provision this board and print
    `PUBLIC <hex>` — the meter's receipt key — for the engineer's tool to register.

    device_hex: 16 hex digits; trust_hex: list of 64-hex-digit issuer public keys.
    """
    import binascii
    from meter.store import Store
    if board is None:
        import boards
        board = boards.load().Board()
    store = Store(board.flash)
    store.mount()
    public = provision(store, board, binascii.unhexlify(device_hex),
                       [binascii.unhexlify(k) for k in trust_hex], limits, initial_credit)
    print("PUBLIC", binascii.hexlify(public).decode())
    return public


def factory_reset_board(board=None):
    """The REPL entry point for `topup provision --factory-reset`."""
    from meter.store import Store
    if board is None:
        import boards
        board = boards.load().Board()
    store = Store(board.flash)
    store.mount()
    factory_reset(store)
    print("RESET")
