"""The ledger: tables, sessions, migrations and the queries the system runs."""
