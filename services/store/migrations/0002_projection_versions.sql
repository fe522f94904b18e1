-- Projection versions: each version of a projection lives in its own table
-- (`<table>_v<version>`); the stable name `<table>` is a view of the active
-- one. Rebuilds load a new version beside the active one and swap the view.
CREATE TABLE projection_versions (
    projection   text NOT NULL,
    version      int NOT NULL CHECK (version >= 1),
    table_name   text NOT NULL,
    spec         jsonb NOT NULL,
    state        text NOT NULL CHECK (state IN ('building', 'active', 'retained')),
    events_done  bigint NOT NULL DEFAULT 0,
    events_total bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz,
    retired_at   timestamptz,
    PRIMARY KEY (projection, version)
);

CREATE UNIQUE INDEX projection_versions_one_active ON projection_versions (projection) WHERE state = 'active';
