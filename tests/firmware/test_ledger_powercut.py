# Power loss the littlefs way (both VMs): for a top-up, an emergency-credit take and a
# metering checkpoint, cut power at every erase/program of the operation in turn, reboot
# on the same flash image, and check that the meter is in the old or the new state —
# never between, never twice.
from tests.firmware._meterkit import Kit, issue, T0
from boards.nor import PowerCut
from meter import config as cfg
from protocol import receipt


def _every_cut(kit, operation, check):
    """Run `operation` on copies of kit's flash, cutting power after n = 0, 1, 2, ...
    operations until it completes; `check(recovered_kit, completed)` after each reboot.
    Return the number of cut points exercised."""
    n = 0
    while True:
        trial = kit.copy(seed=n)
        trial.flash.cut_after(n)
        try:
            operation(trial)
            completed = True
        except PowerCut:
            completed = False
        trial.flash.cut_after(None)
        trial.reboot()
        check(trial, completed)
        if completed:
            return n
        n += 1


def _state(kit):
    return cfg.decode(kit.store.state)


def _prepare(kit, checkpoints):
    # Fill the flash with checkpoints so that the operation also meets a block change or
    # a reclaim of the oldest block at some offsets.
    for _ in range(checkpoints):
        kit.clock.now += 1000
        kit.ledger.meter(1, kit.clock.now)
        kit.ledger.checkpoint(kit.clock.now)


def test_top_up_is_atomic_at_every_cut():
    for fill in (0, 7, 23, 61):
        kit = Kit(initial=500)
        kit.ledger.submit(issue(1, 100))
        _prepare(kit, fill)
        before = kit.ledger.balance_mp
        count = kit.ledger.receipt_count
        v = issue(2, 300)

        def check(trial, completed):
            ledger = trial.ledger
            assert ledger.provisioned
            applied = ledger.balance_mp == before + 300000
            assert applied or ledger.balance_mp == before, ledger.balance_mp
            assert applied or not completed
            assert ledger.receipt_count == count + (1 if applied else 0)
            assert ledger.window.is_used(2) == applied
            receipts = trial.receipts()
            if applied:
                assert receipts[-1].sequence == 2 and receipts[-1].balance_after == ledger.balance_mp
            assert _state(trial)[cfg.S_LAST_HASH] == receipts[-1].hash
            # the customer retries: the voucher counts exactly once
            raw, dup = ledger.submit(v)
            assert dup == applied
            assert ledger.balance_mp == before + 300000
            trial.reboot()
            assert trial.ledger.balance_mp == before + 300000

        cuts = _every_cut(kit, lambda t: t.ledger.submit(v), check)
        assert cuts >= 2


def test_emergency_credit_take_is_atomic_at_every_cut():
    kit = Kit(initial=50)
    _prepare(kit, 11)
    balance = kit.ledger.balance_mp
    count = kit.ledger.receipt_count

    def check(trial, completed):
        ledger = trial.ledger
        taken = ledger.emergency_mp == 500000
        assert taken or ledger.emergency_mp == 0
        assert taken or not completed
        assert ledger.balance_mp == balance
        assert ledger.receipt_count == count + (1 if taken else 0)
        if taken:
            assert trial.receipts()[-1].kind == receipt.EMERGENCY

    assert _every_cut(kit, lambda t: t.ledger.take_emergency_credit(), check) >= 2


def test_metering_checkpoint_is_atomic_at_every_cut():
    for fill in (0, 5, 30):
        kit = Kit(initial=1000)
        _prepare(kit, fill)
        saved = kit.ledger.balance_mp
        kit.ledger.meter(500, kit.clock.now)            # 12.25 p unsaved, below the threshold
        unsaved = kit.ledger.balance_mp
        assert unsaved < saved

        def check(trial, completed):
            b = trial.ledger.balance_mp
            assert b in (saved, unsaved)
            assert b == unsaved or not completed

        def operation(trial):
            trial.ledger.meter(500, trial.clock.now)
            trial.ledger.checkpoint(trial.clock.now)

        assert _every_cut(kit, operation, check) >= 1
