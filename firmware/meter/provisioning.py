# Provisioning: the engineer's tool calls this over the REPL (see hil/). It gives the
# meter its identity, trust list, limits, tariff, opening credit and clock, and makes the
# meter's own receipt key from the board's random source. It runs once: a second run needs
# an explicit factory reset, which wipes the ledger and the key but keeps a carry (SPEC.md
# §2.2): the highest sequence the old ledger closed, the next receipt index and the meter
# time, so that no voucher from before the reset applies after it, receipt numbers never
# restart, and meter time never goes back.
#
# Keypad codes (SPEC.md §8): provisioning also makes the meter's X25519 key-agreement key
# pair and, given the supplier's code key, derives the per-meter code key once, here --
# X25519 runs only at provisioning and is never imported by the meter's boot or apply path.
#
# Signed commands (SPEC.md §10): given the supplier's command key, provisioning installs it
# as the meter's root of trust (config C_COMMAND_KEY); a meter without one refuses every
# command NOT_PROVISIONED and is otherwise unchanged.
from protocol import cbor, ed25519, keycode, receipt as receipt_format, x25519
from meter import config as cfg, lockout, supply


_C_FLOOR = 24                   # meter.admin.C_FLOOR (a change of supplier's floor)


class ProvisioningError(Exception):
    pass


def _check(cond, why):
    if not cond:
        raise ProvisioningError(why)


def carried(store):
    """The carry a factory reset left: {K_FLOOR, K_NEXT_RECEIPT, K_CLOCK}, zeros if none."""
    out = {cfg.K_FLOOR: 0, cfg.K_NEXT_RECEIPT: 0, cfg.K_CLOCK: 0}
    if store.carry is not None:
        try:
            kept = cbor.decode(store.carry)
        except Exception:  # noqa: BLE001 - a carry that passed its CRC but not its format
            kept = {}
        if isinstance(kept, dict):
            for k in out:
                v = kept.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    out[k] = v
    return out


def provision(store, board, device, trust, limits=None, initial_credit=0, now=None, floor=0,
              first_index=0, code_key=None, command_key=None):
    """Provision a blank meter. Return its receipt public key (32 bytes).

    device: 8-byte EUI-64; trust: list of issuer public keys (32 bytes each);
    limits: optional {config key: value} overriding config.DEFAULT_LIMITS;
    initial_credit: opening balance in pence; now: Unix time, sets the meter clock;
    floor: the highest sequence the supplier has issued for this device (vouchers up to it
    will be STALE here); first_index: the next receipt index the supplier expects. The
    meter takes the larger of each and of what its own carry says. code_key: the supplier's
    code key (X25519 public, 32 bytes), or None for a meter that takes no keypad codes; the
    meter's key-agreement key pair is made either way (config C_KA_SEED, C_KA_PUBLIC).
    With no opening credit the supply starts interrupted (SPEC.md §9). command_key: the
    supplier's command key (Ed25519 public, 32 bytes), or None for a meter that takes no
    signed commands (SPEC.md §10).
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
    _check(isinstance(initial_credit, int) and not isinstance(initial_credit, bool)
           and 0 <= initial_credit <= values[cfg.C_MAX_CREDIT],
           "initial credit must be 0..maximum credit pence")
    for name, v in (("floor", floor), ("first_index", first_index)):
        _check(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFFFFFF,
               "%s must be 0..2^32-1" % name)
    _check(code_key is None or (isinstance(code_key, bytes) and len(code_key) == 32),
           "the supplier's code key must be a 32-byte X25519 public key")
    _check(command_key is None or (isinstance(command_key, bytes) and len(command_key) == 32),
           "the supplier's command key must be a 32-byte Ed25519 public key")
    # A ledger left without its configuration (provisioning cut short, or both copies lost
    # to flash damage) still closes what it applied.
    carry = _closing_carry(store)
    floor = max(floor, carry[cfg.K_FLOOR])
    first_index = max(first_index, carry[cfg.K_NEXT_RECEIPT])
    if now is None:
        now = board.time()
    now = max(now, carry[cfg.K_CLOCK])     # meter time never goes back past a reset
    set_time = getattr(board, "set_time", None)
    if set_time is not None:
        set_time(now)
    seed = bytes(board.random(32))
    _check(len(seed) == 32 and seed != bytes(32), "board random source failed")
    ka_seed = bytes(board.random(32))
    _check(len(ka_seed) == 32 and ka_seed != bytes(32) and ka_seed != seed, "board random source failed")
    public = ed25519.public_key(seed)
    ka_public = x25519.public_key(ka_seed)

    config = {cfg.C_DEVICE: device, cfg.C_SEED: seed, cfg.C_PUBLIC: public, cfg.C_TRUST: list(trust),
              cfg.C_PROVISIONED_AT: now, cfg.C_FIRST_RECEIPT: first_index,
              cfg.C_KA_SEED: ka_seed, cfg.C_KA_PUBLIC: ka_public}
    if code_key is not None:
        try:
            shared = x25519.x25519(ka_seed, code_key)
        except ValueError:
            raise ProvisioningError("the supplier's code key is not a usable X25519 public key")
        config[cfg.C_CODE_SUPPLIER] = code_key
        config[cfg.C_CODE_KEY] = keycode.derive_key(shared, device, code_key, ka_public)
    if command_key is not None:
        from meter import admin
        config[admin.C_COMMAND_KEY] = command_key
        config[admin.C_COMMAND_LAST] = 0
        config[admin.C_COMMAND_RECEIPTS] = []
    config.update(values)
    # The receipt chain of a new key starts at GENESIS: a new epoch, not a fork (SPEC.md §4).
    state = {cfg.S_BALANCE: initial_credit * 1000, cfg.S_EC: 0, cfg.S_HIGHEST: 0, cfg.S_BITMAP: 0,
             cfg.S_LAST_HASH: receipt_format.GENESIS, cfg.S_CHARGED_TO: now, cfg.S_ENERGY_REM: 0,
             cfg.S_STANDING_REM: 0, cfg.S_WH_TOTAL: 0, cfg.S_REJECTIONS: {}, cfg.S_REJ_RECEIPT_AT: now,
             cfg.S_UPLOADED: first_index, cfg.S_FLOOR: floor, cfg.S_BAD_SIGNATURES: 0,
             cfg.S_BACKOFF_UNTIL: 0, cfg.S_FAULTS_SEEN: {},
             cfg.S_SUPPLY: supply.ON if initial_credit > 0 else supply.INTERRUPTED}
    lockout.clear(state)
    # The config record is the commit point: a cut before it leaves a blank meter, still
    # holding the same carry.
    store.format(carry=_carry_blob(floor, first_index, now))
    store.commit(cfg.encode(state), first_index=first_index)
    store.write_config(cfg.encode(config))
    return public


def _carry_blob(floor, next_receipt, clock):
    return cbor.encode({cfg.K_FLOOR: floor, cfg.K_NEXT_RECEIPT: next_receipt, cfg.K_CLOCK: clock})


def _closing_carry(store):
    """What the ledger on the store closes: the carry it holds, raised by its state (the
    highest sequence applied, its floor, its meter time) and its receipt count."""
    carry = carried(store)
    floor, nxt, clock = carry[cfg.K_FLOOR], carry[cfg.K_NEXT_RECEIPT], carry[cfg.K_CLOCK]
    nxt = max(nxt, store.receipt_count + len(store.pending_receipts()))
    if store.config is not None:
        try:
            floor = max(floor, cfg.decode(store.config).get(_C_FLOOR, 0))
        except Exception:  # noqa: BLE001 - a damaged config: keep what the carry knew
            pass
    if store.state is not None:
        try:
            st = cfg.decode(store.state)
            floor = max(floor, st[cfg.S_HIGHEST], st.get(cfg.S_FLOOR, 0))
            clock = max(clock, st[cfg.S_CHARGED_TO])
        except Exception:  # noqa: BLE001 - a damaged state: keep what the carry knew
            pass
    return {cfg.K_FLOOR: floor, cfg.K_NEXT_RECEIPT: nxt, cfg.K_CLOCK: clock}


def factory_reset(store):
    """Wipe the ledger and the meter key, keeping the carry (see the module comment).
    Provisioning may run again afterwards. Return the carry as {K_*: value}."""
    carry = _closing_carry(store)
    store.format(carry=_carry_blob(carry[cfg.K_FLOOR], carry[cfg.K_NEXT_RECEIPT], carry[cfg.K_CLOCK]))
    return carry


def _board_store(board):
    from meter.store import Store
    if board is None:
        import boards
        board = boards.load().Board()
    store = Store(board.flash)
    store.mount()
    return board, store


def provision_board(device_hex, trust_hex, limits=None, initial_credit=0, board=None, now=None,
                    floor=0, first_index=0, code_key_hex=None, command_key_hex=None):
    """The REPL entry point for `topup provision`: provision this board and print
    `PUBLIC <hex> FIRST <index> FLOOR <sequence> KA <hex>` -- the meter's receipt key, the
    index of its first receipt, the sequence floor and the meter's key-agreement public key
    (keypad codes, SPEC.md §8) -- for the engineer's tool to register.

    device_hex: 16 hex digits; trust_hex: list of 64-hex-digit issuer public keys;
    code_key_hex: the supplier's code key (64 hex digits, X25519 public) or None;
    command_key_hex: the supplier's command key (64 hex digits, Ed25519 public) or None --
    when given, ` CMD <kid hex>` (the command key's kid) ends the printed line.
    """
    import binascii
    board, store = _board_store(board)
    code_key = None
    if code_key_hex is not None:
        try:
            code_key = binascii.unhexlify(code_key_hex)
        except ValueError:
            raise ProvisioningError("the supplier's code key must be 64 hex digits")
    command_key = None
    if command_key_hex is not None:
        try:
            command_key = binascii.unhexlify(command_key_hex)
        except ValueError:
            raise ProvisioningError("the supplier's command key must be 64 hex digits")
    public = provision(store, board, binascii.unhexlify(device_hex),
                       [binascii.unhexlify(k) for k in trust_hex], limits, initial_credit, now,
                       floor, first_index, code_key, command_key)
    c = cfg.decode(store.config)
    st = cfg.decode(store.state)
    line = "PUBLIC %s FIRST %d FLOOR %d KA %s" % (
        binascii.hexlify(public).decode(), c[cfg.C_FIRST_RECEIPT], st[cfg.S_FLOOR],
        binascii.hexlify(c[cfg.C_KA_PUBLIC]).decode())
    if command_key is not None:
        from protocol import cose
        line += " CMD " + binascii.hexlify(cose.kid_for(command_key)).decode()
    print(line)
    return public


def factory_reset_board(board=None):
    """The REPL entry point for `topup provision --factory-reset`: prints
    `RESET FLOOR <sequence> NEXT <receipt index>`."""
    board, store = _board_store(board)
    carry = factory_reset(store)
    print("RESET FLOOR", carry[cfg.K_FLOOR], "NEXT", carry[cfg.K_NEXT_RECEIPT])
