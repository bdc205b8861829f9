-- The table the metadata batcher updates. Rows are created when an agent registers its
-- keys (see metadata_batcher::postgres::register); the batcher only ever UPDATEs them, so an
-- agent cannot invent keys by reporting them.
--
-- fillfactor = 80: every flush rewrites rows in place. Leaving a fifth of each heap page
-- free lets PostgreSQL keep the new row version on the same page (a HOT update), and since
-- no indexed column (workspace_agent_id, key) ever changes, HOT updates need no index
-- writes at all. Without free space each update moves the row and touches the primary key.
CREATE TABLE IF NOT EXISTS workspace_agent_metadata (
    workspace_agent_id uuid NOT NULL,
    key varchar(127) NOT NULL,
    value text NOT NULL DEFAULT '',
    error text NOT NULL DEFAULT '',
    collected_at timestamptz NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    PRIMARY KEY (workspace_agent_id, key)
) WITH (fillfactor = 80);
