# offline-topup protocol v1: the formats shared by meter and supplier.
# Runs unchanged on MicroPython and CPython; see SPEC.md (normative).
VERSION = "1"
