-- Chorus transactional outbox: the table a backend inserts its messages
-- into, inside the transaction that makes its business change; the
-- `chorus-server --outbox` relay publishes them to their rooms once that
-- transaction has committed, in the order the transactions committed.
-- README, "Transactional outbox", explains the design.
--
-- `chorus-server --outbox-init` runs this file (in one transaction, under
-- an advisory lock, with `chorus_outbox` replaced by `--outbox-table`); or
-- copy it into your own migrations. Needs PostgreSQL 13 or newer. Running
-- it again changes nothing.
--
-- A backend names only `room` and `data` (and, optionally, `key`):
--
--   INSERT INTO chorus_outbox (room, data) VALUES ('orders:42', '{"status": "paid"}');

CREATE TABLE IF NOT EXISTS chorus_outbox (
    id           bigserial PRIMARY KEY,
    -- A room name as the protocol allows it (1 to 256 bytes of [A-Za-z0-9_:.@-]).
    room         text NOT NULL CHECK (room ~ '^[A-Za-z0-9_:.@-]+$' AND octet_length(room) <= 256),
    -- The message's `data`: any JSON.
    data         jsonb NOT NULL,
    -- Idempotency key (1 to 128 characters): a message published with a key
    -- already published to the room within --idempotency-window is not
    -- delivered again. Without one, the relay uses the row's id.
    key          text CHECK (char_length(key) BETWEEN 1 AND 128),
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The inserting (top-level) transaction: the stamp finds its own rows by it.
    xact         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- Set at commit by chorus_outbox_stamp(), never by the backend: the
    -- transaction's place in its rooms' commit order, and when it committed.
    commit_seq   bigint,
    committed_at timestamptz,
    -- Relays share the rooms out in 64 partitions (one relay at a time each).
    part         smallint NOT NULL
                 GENERATED ALWAYS AS (((hashtext(room) & 2147483647) % 64)::smallint) STORED
);

-- What the relay reads: a partition's committed rows in commit order.
CREATE INDEX IF NOT EXISTS chorus_outbox_relay
    ON chorus_outbox (part, commit_seq, id) WHERE commit_seq IS NOT NULL;
-- What the stamp reads: the committing transaction's own rows.
CREATE INDEX IF NOT EXISTS chorus_outbox_unstamped
    ON chorus_outbox (xact) WHERE commit_seq IS NULL;

CREATE SEQUENCE IF NOT EXISTS chorus_outbox_commit_seq;

-- The stamp runs as the table's owner (SECURITY DEFINER), so a backend's
-- role needs only INSERT on the table and USAGE on chorus_outbox_id_seq.
-- It finds its table and sequence by the search_path of this migration
-- (the table's schema), then pg_temp: a backend's temporary table cannot
-- stand in for them. (In a transaction, as --outbox-init runs it; outside
-- one, this line lasts only for itself and the function keeps the
-- session's search_path.)
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- At commit (a deferred constraint trigger: it runs after everything else
-- the transaction did), the first call in a transaction stamps all of the
-- transaction's rows:
--   1. it locks each of the transaction's rooms (a transaction-level
--      advisory lock on the room's hash, in sorted order so that two
--      transactions never deadlock on them), waiting for any other
--      committing transaction of the same rooms to finish committing;
--   2. it takes the next commit_seq and stamps the rows with it;
--   3. it wakes the relays (NOTIFY, sent at commit), unless the setting
--      chorus.outbox_notify is off.
-- The locks are released only after the commit is visible, so within a
-- room a higher commit_seq is never visible before a lower one that
-- committed: the relay can publish a room's rows in commit_seq order and
-- never skips a transaction that commits late.
CREATE OR REPLACE FUNCTION chorus_outbox_stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    seq bigint;
BEGIN
    PERFORM 1 FROM chorus_outbox WHERE id = NEW.id AND commit_seq IS NULL;
    IF NOT FOUND THEN
        RETURN NULL; -- stamped by an earlier call of this transaction, or deleted
    END IF;
    PERFORM pg_advisory_xact_lock(TG_RELID::int, h)
       FROM (SELECT DISTINCT hashtext(room) AS h
               FROM chorus_outbox
              WHERE xact = pg_current_xact_id() AND commit_seq IS NULL
              ORDER BY 1) AS rooms;
    seq := nextval('chorus_outbox_commit_seq');
    UPDATE chorus_outbox SET commit_seq = seq, committed_at = clock_timestamp()
     WHERE xact = pg_current_xact_id() AND commit_seq IS NULL;
    -- A NOTIFY makes PostgreSQL take one lock per database from it to the
    -- end of the commit: with it, every outbox commit in the database takes
    -- turns. `chorus.outbox_notify = off` (per role, database or session)
    -- leaves the relays to find rows by polling instead.
    IF coalesce(current_setting('chorus.outbox_notify', true), '') <> 'off' THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, '');
    END IF;
    RETURN NULL;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                    WHERE tgrelid = 'chorus_outbox'::regclass AND tgname = 'chorus_outbox_stamp') THEN
        CREATE CONSTRAINT TRIGGER chorus_outbox_stamp
            AFTER INSERT ON chorus_outbox
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION chorus_outbox_stamp();
    END IF;
END
$$;
