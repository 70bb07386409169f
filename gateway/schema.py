"""The tables: every one the store, the auth and the audit modules query (SQLAlchemy Core).

Their history is gateway/migrations (Alembic); a test compares that history with these definitions
on SQLite and PostgreSQL, so a column added here without a migration fails the suite.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# the numbers of tables a big deployment fills by the billion (deliveries, delivery events, receipts):
# 64-bit on PostgreSQL (migrations 0011, 0013); on SQLite an INTEGER PRIMARY KEY (the rowid) is 64-bit
BIG_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

advisories = sa.Table(
    "advisories",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("msg_type", sa.String(16), nullable=False),
    sa.Column("sender", sa.String(200), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, server_default="active"),
    sa.Column("planned", sa.Boolean, nullable=False, server_default=sa.false()),
    # the last recipient id planned: planning resumes after it (a page at a time, see planner)
    sa.Column("plan_cursor", sa.String(128), nullable=False, server_default=""),
    sa.Column("body", sa.JSON, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    # who submitted it: an API token ("token:<id>:<name>"), or "sender:<sender>" straight from Kafka;
    # the second person who approves it must be someone else
    sa.Column("submitted_by", sa.String(200)),
    # a training advisory goes only to the gateway's own sandbox partners (gateway/training.py)
    sa.Column("training", sa.Boolean, nullable=False, server_default=sa.false()),
    # the instance planning it, until when (renewed each page; another takes over once it runs out)
    sa.Column("planner", sa.String(128)),
    sa.Column("plan_lease_until", sa.DateTime(timezone=True)),
)

recipients = sa.Table(
    "recipients",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("languages", sa.String(100), nullable=False, server_default=""),
    sa.Column("phone", sa.String(32)),
    # whether ``phone`` could take an SMS (valid E.164) when the row was stored (migration 0012):
    # planning reads it instead of parsing a million numbers again; NULL: not known (rows stored
    # before 0012), and planning checks the number itself
    sa.Column("phone_valid", sa.Boolean),
    sa.Column("email", sa.String(320)),
    sa.Column("app_user", sa.String(256)),
    sa.Column("country", sa.String(2)),
    sa.Column("region", sa.String(100)),
    # ",tag1,tag2," so that a LIKE '%,tag,%' matches whole tags on every database
    sa.Column("tags", sa.String(1000), nullable=False, server_default=""),
    sa.Column("opt_outs", sa.String(200), nullable=False, server_default=""),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # an audience is read a page at a time in id order after a cursor, per country (migration 0009)
    sa.Index("ix_recipients_country_id", "country", "id"),
)

# the conditions of the partial indexes below, written out as their queries write them (a partial
# index is used for a query that repeats its condition: a bound parameter never matches a literal)
PENDING_ROWS = "status IN ('planned', 'queued')"
SENT_ROWS = "status = 'sent'"
UNCONFIRMED_ROWS = "status IN ('unknown', 'failed') AND cascaded = false"
FAILED_ROWS = "status = 'failed'"

deliveries = sa.Table(
    "deliveries",
    metadata,
    # the row's place in planning order (migration 0011). A new delivery's id starts with it, so the
    # table and each index a broadcast writes grow at their ends: with ids that were hashes alone,
    # every delivery was written into a random place of a million-entry index
    sa.Column("seq", BIG_SEQ, primary_key=True),
    sa.Column("id", sa.String(32), nullable=False),  # also the idempotency key sent to the partner
    sa.Column("advisory_id", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("recipient_id", sa.String(128), nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # Status.rank of status: writes are guarded by "rank < new rank", so nothing moves backwards
    sa.Column("rank", sa.SmallInteger, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # the partner's id of the message (looked up through partner_refs, where receipts need it)
    sa.Column("partner_id", sa.String(128)),
    sa.Column("reason", sa.String(500)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    # the cascade has dealt with this delivery (sent the recipient the next channel, or had none)
    sa.Column("cascaded", sa.Boolean, nullable=False, server_default=sa.false()),
    # the language it is rendered in, chosen at planning (Renderer.choose_language): counted by it
    sa.Column("language", sa.String(16), nullable=False, server_default=""),
    # the instance sending it now, until when: for partners without idempotency keys (SMTP, SMPP)
    sa.Column("claimed_by", sa.String(128)),
    sa.Column("claimed_until", sa.DateTime(timezone=True)),
    sa.Index("ux_deliveries_id", "id", unique=True),
    # one delivery per recipient and channel of an advisory version (a replayed page inserts nothing);
    # also every query of one advisory's deliveries reads a range of it
    sa.Index("ux_deliveries_recipient", "advisory_id", "version", "recipient_id", "channel", unique=True),
    # Rows enter and leave these as they move; a broadcast's many delivered rows are in none of them.
    # cancel and expiry: the pending deliveries of an advisory version
    sa.Index(
        "ix_deliveries_pending",
        "advisory_id",
        "version",
        sqlite_where=sa.text(PENDING_ROWS),
        postgresql_where=sa.text(PENDING_ROWS),
    ),
    # the sweeper (sent, no receipt in time → unknown) and the cascade (not confirmed in time)
    sa.Index(
        "ix_deliveries_sent", "sent_at", sqlite_where=sa.text(SENT_ROWS), postgresql_where=sa.text(SENT_ROWS)
    ),
    sa.Index(
        "ix_deliveries_unconfirmed",
        "channel",
        sqlite_where=sa.text(UNCONFIRMED_ROWS),
        postgresql_where=sa.text(UNCONFIRMED_ROWS),
    ),
    # an advisory's failures (the console's reasons, an operator's replay)
    sa.Index(
        "ix_deliveries_failed",
        "advisory_id",
        "version",
        sqlite_where=sa.text(FAILED_ROWS),
        postgresql_where=sa.text(FAILED_ROWS),
    ),
)

# partner ids of the channels whose receipts name only the partner's id (an SMSC's message id, a
# relay's id of a shared e-mail; Adapter.receipts_by_partner_id): the receipts find their delivery
# here. Written with the partner's answer; other channels' receipts carry our delivery id.
partner_refs = sa.Table(
    "partner_refs",
    metadata,
    sa.Column("channel", sa.String(32), primary_key=True),
    sa.Column("partner_id", sa.String(128), primary_key=True),
    sa.Column("delivery_id", sa.String(32), nullable=False),
    sqlite_with_rowid=False,
)

# partner-side segments (migration 0007): one request per advisory version × channel × segment ×
# language; the partner fans out and reports aggregate receipts, kept in the counts columns
segment_deliveries = sa.Table(
    "segment_deliveries",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # also the idempotency key sent to the partner
    sa.Column("advisory_id", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("segment", sa.String(128), nullable=False),
    sa.Column("language", sa.String(16), nullable=False),
    # this request also carries the segment's users whose language is not among ``languages``
    sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("languages", sa.String(500), nullable=False),  # every language sent to the segment, "|"
    sa.Column("status", sa.String(16), nullable=False),  # planned, sent, failed, cancelled, expired
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("partner_id", sa.String(128), index=True),
    sa.Column("replaces", sa.String(128)),  # the partner id of the earlier version's request it updates
    sa.Column("reason", sa.String(500)),
    sa.Column("cancel", sa.String(16)),  # None, or "done" once the partner has taken our cancel
    # the partner's aggregate receipts (cumulative; a later, larger count replaces an earlier one)
    sa.Column("targeted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("delivered", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("read", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cancelled", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),  # the fan-out is over
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("advisory_id", "version", "channel", "segment", "language"),
    sa.Index("ix_segment_deliveries_status", "status"),
)

# deliveries per advisory × version × channel × language × status, kept by triggers on deliveries in
# the same transaction as every insert and status change (migration 0005): progress without a scan.
# On PostgreSQL the triggers append to delivery_count_deltas, folded in here by the sweeper.
_COUNT_KEY = (
    sa.Column("advisory_id", sa.String(128), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("channel", sa.String(32), primary_key=True),
    sa.Column("language", sa.String(16), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),
)
delivery_counts = sa.Table(
    "delivery_counts", metadata, *_COUNT_KEY, sa.Column("n", sa.BigInteger, nullable=False)
)
delivery_count_deltas = sa.Table(
    "delivery_count_deltas",
    metadata,
    sa.Column("seq", BIG_SEQ, primary_key=True, autoincrement=True),
    *(sa.Column(c.name, c.type, nullable=False) for c in _COUNT_KEY),
    sa.Column("n", sa.BigInteger, nullable=False),
    sa.Index("ix_delivery_count_deltas_advisory", "advisory_id", "version"),
)

# the outbox of delivery events (gateway/events.py): every applied status change of a delivery, written
# by triggers in the same transaction (Store.deliver_events), deleted once on the delivery-events topic
delivery_events = sa.Table(
    "delivery_events",
    metadata,
    sa.Column("seq", BIG_SEQ, primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.String(32), nullable=False),
    sa.Column("advisory_id", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("language", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("previous_status", sa.String(16)),
    sa.Column("reason", sa.String(500)),
    sa.Column("partner_id", sa.String(128)),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    # SQLite: never a number twice, even once the outbox is empty (migration 0013)
    sqlite_autoincrement=True,
)

# advisories withdrawn by a cancel or superseded by an update naming them, even before they arrive:
# an alert whose cancel overtook it on the way is stored withdrawn and never planned
withdrawals = sa.Table(
    "withdrawals",
    metadata,
    sa.Column("advisory_id", sa.String(128), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # cancelled | superseded
    sa.Column("by_id", sa.String(128), nullable=False),
    # the sender of the withdrawing advisory: it applies to a later arrival only with authority
    sa.Column("by_sender", sa.String(200)),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
)

receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("seq", BIG_SEQ, primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.String(32), nullable=False),  # not indexed: nothing reads it by delivery
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("partner_id", sa.String(128)),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)

# receipts naming a partner id no delivery has yet (migration 0010): a partner may report a message
# before the gateway has recorded its answer to the send (an SMSC's DLR before its submit_sm_resp is
# written; a relay's event within its 250's write). Held, applied when the partner id is recorded
# (Store.apply_held), given up after ``receipts.hold_s``.
held_receipts = sa.Table(
    "held_receipts",
    metadata,
    sa.Column("channel", sa.String(32), primary_key=True),
    sa.Column("partner_id", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)


# API tokens (gateway/auth.py): the secret is never stored, only its scrypt hash
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("roles", sa.String(500), nullable=False),  # comma-separated
    sa.Column("hash", sa.String(200), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

# who did what, when (gateway/audit.py): append-only — the code has no UPDATE or DELETE of it
audit = sa.Table(
    "audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("ix_audit_subject", "subject", "seq"),
)
