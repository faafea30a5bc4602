"""The SQLite layer: a configured, checked connection, the schema, transactions, leases."""

from flowerpets.store.database.connection import IntegrityCheck, open_connection
from flowerpets.store.database.errors import fetch, reading, translate
from flowerpets.store.database.lease import LeaseOwner
from flowerpets.store.database.schema import SCHEMA_VERSION, ensure_schema
from flowerpets.store.database.transaction import (
    consistent_read,
    write_transaction,
)

__all__ = [
    "IntegrityCheck",
    "LeaseOwner",
    "SCHEMA_VERSION",
    "consistent_read",
    "ensure_schema",
    "fetch",
    "open_connection",
    "reading",
    "translate",
    "write_transaction",
]
