"""Business rules: accounts, plans, the quota ledger, idempotency and admission. Knows no HTTP."""
