-- The outbox relay: one row per relay (a topic it publishes to). It holds
-- where the relay stands in the log (the same (tx_id, position) checkpoint
-- as a projection's) and who may publish now: a lease that its holder
-- renews and that another relay replica takes once it has expired.
CREATE TABLE relays (
    relay             text PRIMARY KEY,
    tx_id             xid8 NOT NULL DEFAULT '0',
    position          bigint NOT NULL DEFAULT 0,
    published         bigint NOT NULL DEFAULT 0,
    last_event_at     timestamptz,
    holder            text,
    acquired_at       timestamptz,
    lease_expires_at  timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
