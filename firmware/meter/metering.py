# Exact metering in integers: energy at a unit rate and a daily standing charge, with the
# remainders carried so that no fraction of a milli-penny is ever rounded away.


def energy_cost(wh, rate_mp_per_kwh, remainder):
    """Charge for `wh` Wh. Return (milli-pence, new remainder in 1/1000 mp)."""
    total = wh * rate_mp_per_kwh + remainder
    return total // 1000, total % 1000


def standing_cost(seconds, mp_per_day, remainder):
    """Charge for `seconds` of standing charge. Return (milli-pence, new remainder)."""
    total = seconds * mp_per_day + remainder
    return total // 86400, total % 86400
