# `topup serve`: the supplier's HTTP API for payment channels (FastAPI on uvicorn).
#
#   app.py         create_app(target, passphrase) — the application, its error handlers,
#                  the body-size bound, /healthz, the routers mounted under /v1
#   deps.py        lend(request, scope): a pooled connection and the caller, in one thread
#   auth.py        API tokens: made by `topup token new`, stored hashed, revocable
#   problems.py    RFC 9457 problem details for every error
#   idempotency.py Idempotency-Key: one stored answer per key, written with the vouchers
#   issuing.py     vouchers (group commit), codes, void, devices (the host modules work)
#   receipts.py    ingest, reconciliation, anomalies;  metrics.py  Prometheus text
