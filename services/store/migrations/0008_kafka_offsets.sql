-- Kafka-fed projections: for each projection and partition of its topic,
-- the next offset to apply and the log coordinate `(tx_id, position)` of
-- the last event applied from that partition. Written in the transaction
-- that writes the rows, so a message Kafka delivers again (a rebalance, a
-- restart) is skipped by offset, and one the relay published again (it
-- crashed before its checkpoint moved) is skipped by its coordinate: the
-- relay publishes in log order, so within a partition coordinates only
-- grow.
CREATE TABLE kafka_offsets (
    projection    text NOT NULL,
    topic         text NOT NULL,
    partition     integer NOT NULL,
    next_offset   bigint NOT NULL DEFAULT 0,
    tx_id         xid8 NOT NULL DEFAULT '0',
    position      bigint NOT NULL DEFAULT 0,
    applied       bigint NOT NULL DEFAULT 0,
    duplicates    bigint NOT NULL DEFAULT 0,
    last_event_at timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
