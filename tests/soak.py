"""How hard the property tests push: `make test` runs them at scale 1; `make soak` sets
TOPUP_SOAK (default there: 20) to multiply every example count."""
import os

SCALE = max(1, int(os.environ.get("TOPUP_SOAK", "1")))


def examples(n):
    return n * SCALE
