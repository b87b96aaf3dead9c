//! Rows as both backends return them, decoded into the interface's types. Each backend's
//! queries name their columns the same way, so one set of decoders serves both; the macro
//! writes them for a backend's row type (sqlx's decoding bounds are per database).

/// Defines `reading_from_row`, `event_from_row`, `entry_from_row`, `rollup_from_row`,
/// `device_from_row` and `command_from_row` for the row type `$row`.
macro_rules! decoders {
    ($row:ty) => {
        /// A reading: seq, device, topic, ts, received_at, payload, flags.
        fn reading_from_row(
            r: &$row,
        ) -> Result<$crate::store::StoredReading, $crate::store::StoreError> {
            use sqlx::Row as _;
            Ok($crate::store::StoredReading {
                seq: r.try_get("seq")?,
                device: r.try_get("device")?,
                topic: r.try_get("topic")?,
                ts: r.try_get("ts")?,
                received_at: r.try_get("received_at")?,
                payload: r.try_get("payload")?,
                flags: r.try_get("flags")?,
            })
        }

        /// A presence or command event: seq, kind, device, ts (its time), payload (data).
        fn event_from_row(
            r: &$row,
        ) -> Result<$crate::store::log::EventRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            let kind: String = r.try_get("kind")?;
            let payload: Vec<u8> = r.try_get("payload")?;
            Ok($crate::store::log::EventRow {
                seq: r.try_get("seq")?,
                kind: $crate::feed::Kind::parse(&kind).unwrap_or($crate::feed::Kind::Status),
                device: std::sync::Arc::from(r.try_get::<String, _>("device")?),
                at: r.try_get("ts")?,
                data: String::from_utf8(payload)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            })
        }

        /// A replayed entry: a reading when its kind says so, else an event.
        fn entry_from_row(r: &$row) -> Result<$crate::store::LogEntry, $crate::store::StoreError> {
            use sqlx::Row as _;
            let kind: String = r.try_get("kind")?;
            if kind == "reading" {
                reading_from_row(r).map($crate::store::LogEntry::Reading)
            } else {
                event_from_row(r).map($crate::store::LogEntry::Event)
            }
        }

        /// A rollup row, every column.
        fn rollup_from_row(
            r: &$row,
        ) -> Result<$crate::store::rollup::RollupRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            let lo: Option<i64> = r.try_get("seq_lo")?;
            let hi: Option<i64> = r.try_get("seq_hi")?;
            Ok($crate::store::rollup::RollupRow {
                device: std::sync::Arc::from(r.try_get::<String, _>("device")?),
                tier: r.try_get("tier")?,
                bucket: r.try_get("bucket")?,
                field: r.try_get("field")?,
                stats: $crate::store::rollup::Stats {
                    count: r.try_get("n")?,
                    sum: r.try_get("total")?,
                    min: r.try_get("lo")?,
                    max: r.try_get("hi")?,
                    first: r.try_get("first_v")?,
                    first_ts: r.try_get("first_ts")?,
                    last: r.try_get("last_v")?,
                    last_ts: r.try_get("last_ts")?,
                },
                seqs: lo.zip(hi),
            })
        }

        /// A device: id, first_seen, last_seen, online.
        fn device_from_row(
            r: &$row,
        ) -> Result<$crate::store::DeviceRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            Ok($crate::store::DeviceRow {
                id: r.try_get("id")?,
                first_seen: r.try_get("first_seen")?,
                last_seen: r.try_get("last_seen")?,
                online: r.try_get::<bool, _>("online")?,
                stale: r.try_get::<bool, _>("stale")?,
            })
        }

        /// An alert row, [`ALERT_COLUMNS`](crate::store::alert::ALERT_COLUMNS).
        fn alert_from_row(
            r: &$row,
        ) -> Result<$crate::store::alert::AlertRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            Ok($crate::store::alert::AlertRow {
                id: r.try_get("id")?,
                rule: r.try_get("rule")?,
                device: r.try_get("device")?,
                severity: r.try_get("severity")?,
                state: r.try_get("state")?,
                field: r.try_get("field")?,
                threshold: r.try_get("threshold")?,
                value: r.try_get("value")?,
                message: r.try_get("message")?,
                fired_at: r.try_get("fired_at")?,
                acked_at: r.try_get("acked_at")?,
                acked_by: r.try_get("acked_by")?,
                resolved_at: r.try_get("resolved_at")?,
            })
        }

        /// A command row, every column.
        fn command_from_row(
            r: &$row,
        ) -> Result<$crate::store::CommandRow, $crate::store::StoreError> {
            use sqlx::Row as _;
            Ok($crate::store::CommandRow {
                id: r.try_get("id")?,
                device: r.try_get("device")?,
                name: r.try_get("name")?,
                params: r.try_get("params")?,
                status: r.try_get("status")?,
                key: r.try_get("idem_key")?,
                created_at: r.try_get("created_at")?,
                expires_at: r.try_get("expires_at")?,
                sent_at: r.try_get("sent_at")?,
                finished_at: r.try_get("finished_at")?,
                result: r.try_get("result")?,
                error: r.try_get("error")?,
            })
        }
    };
}

pub(crate) use decoders;
