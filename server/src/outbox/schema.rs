//! The outbox table's SQL: the migration shipped as `server/sql/outbox.sql`
//! (written for `chorus_outbox`) and the relay's statements, for any
//! `--outbox-table`.

use crate::config::OutboxTable;

/// The migration, as shipped (for the table `chorus_outbox`).
pub const MIGRATION: &str = include_str!("../../sql/outbox.sql");

/// The name the shipped migration is written for.
const SHIPPED_NAME: &str = "chorus_outbox";

/// Partitions of rooms (`part` in the table): one relay at a time works on
/// each. Written into the migration's generated column.
pub const PARTITIONS: i16 = 64;

/// Names of the table and of what the migration derives from it.
#[derive(Debug, Clone)]
pub struct Names {
    /// The table as the relay names it in queries (`schema.name` or `name`).
    pub table: String,
    /// The commit trigger, which the relay checks for.
    pub trigger: String,
}

impl Names {
    pub fn new(table: &OutboxTable) -> Self {
        Self {
            table: table.to_string(),
            trigger: format!("{}_stamp", table.name),
        }
    }
}

/// The migration for `table`: the shipped SQL with its name replaced, run
/// with `search_path` set to the table's schema (if given) so that every
/// object lands there and the commit trigger's function keeps finding them.
pub fn migration(table: &OutboxTable) -> String {
    let sql = MIGRATION.replace(SHIPPED_NAME, &table.name);
    match &table.schema {
        Some(schema) => format!("SET LOCAL search_path TO {schema};\n{sql}"),
        None => sql,
    }
}

/// Runs one migration at a time in the database (relays of several pods
/// start together), and then the migration, in the caller's transaction.
pub const MIGRATION_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('chorus_outbox migration'))";

/// The table's oid and schema, and whether it has the commit trigger
/// (`$1`: the table, `$2`: the trigger's name). No row: no such table.
pub const RESOLVE: &str = "SELECT c.oid::int8, n.nspname::text, \
     EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = $2) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.oid = to_regclass($1)";

/// Per partition: committed rows waiting, rows committed without a stamp
/// (inserted with triggers off), and seconds since the oldest waiting
/// row's transaction committed.
pub fn pending(table: &str) -> String {
    format!(
        "SELECT part, count(commit_seq), count(*) - count(commit_seq), \
         coalesce(extract(epoch FROM clock_timestamp() - min(committed_at))::float8, 0) \
         FROM {table} GROUP BY part"
    )
}

/// Stamps rows that were committed without the commit trigger (a `COPY` or
/// restore with triggers off). Only committed rows are visible here, and
/// the trigger stamps every row it sees before its commit, so what is left
/// unstamped and visible never will be otherwise; its order is where the
/// relay finds it.
pub fn adopt(table: &str) -> String {
    format!(
        "UPDATE {table} SET commit_seq = nextval('{table}_commit_seq'), \
         committed_at = clock_timestamp() WHERE commit_seq IS NULL"
    )
}

/// One relay at a time per partition: a transaction-level advisory lock
/// (`$1`: [`partition_lock`]).
pub const LOCK_PARTITION: &str = "SELECT pg_try_advisory_xact_lock($1)";

/// The key of a partition's lock: the table's oid and the partition, in
/// the one-key space (the commit trigger locks rooms in the two-key space,
/// which never meets it).
pub fn partition_lock(oid: u32, part: i16) -> i64 {
    ((u64::from(oid) << 32) | u64::from(part as u16)) as i64
}

/// A partition's next rows in commit order (`$1`: partition, `$2`: limit),
/// with the seconds since their transaction committed.
pub fn batch(table: &str) -> String {
    format!(
        "SELECT id, room, data::text, key, \
         extract(epoch FROM clock_timestamp() - committed_at)::float8 \
         FROM {table} WHERE part = $1 AND commit_seq IS NOT NULL \
         ORDER BY commit_seq, id LIMIT $2"
    )
}

/// Removes relayed rows (`$1`: their ids).
pub fn delete(table: &str) -> String {
    format!("DELETE FROM {table} WHERE id = ANY($1)")
}

/// The notification channel the commit trigger sends to: `schema.name`.
pub fn channel(schema: &str, name: &str) -> String {
    format!("{schema}.{name}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_names_only_the_chosen_table() {
        let table = OutboxTable::parse("app.events_out").unwrap();
        let sql = migration(&table);
        assert!(sql.starts_with("SET LOCAL search_path TO app;"));
        assert!(!sql.contains("chorus_outbox"), "{sql}");
        for name in [
            "events_out_commit_seq",
            "events_out_stamp",
            "events_out_relay",
        ] {
            assert!(sql.contains(name), "{name} missing");
        }
        let plain = migration(&OutboxTable::parse("chorus_outbox").unwrap());
        assert_eq!(plain, MIGRATION);
    }

    #[test]
    fn the_migration_partitions_rooms_as_the_relay_expects() {
        assert!(MIGRATION.contains(&format!("% {PARTITIONS})::smallint")));
    }

    #[test]
    fn partition_locks_differ_per_table_and_partition() {
        assert_ne!(partition_lock(16384, 0), partition_lock(16384, 1));
        assert_ne!(partition_lock(16384, 0), partition_lock(16385, 0));
        assert_eq!(
            partition_lock(u32::MAX, 63) as u64 >> 32,
            u64::from(u32::MAX)
        );
    }
}
