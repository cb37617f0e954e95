# offline-topup host: the supplier side (key store, device registry, issuer, delivery, CLI).
# CPython only. Imports `protocol`; never `firmware` or `hil`.
