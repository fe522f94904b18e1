-- The projection catalog: what the services connected to this database
-- serve. One row per declared projection with its desired spec; the
-- operator (from Projection resources), the CLI and the dev stack write it,
-- projector and query processes follow it.
CREATE TABLE projection_catalog (
    name        text PRIMARY KEY,
    spec        jsonb NOT NULL,
    version     int NOT NULL CHECK (version >= 1),
    -- Who declared it: `operator:<namespace>/<name>`, `cli`, `dev`, `files`.
    source      text NOT NULL,
    -- The catalog generation of the row's last change.
    generation  bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One number that moves on every change of what is served (a declaration,
-- a removal, a swap), so a process can tell it is current by comparing it.
CREATE TABLE projection_catalog_generation (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    generation  bigint NOT NULL
);
INSERT INTO projection_catalog_generation (generation) VALUES (1);

-- Projections set up before the catalog keep being served.
INSERT INTO projection_catalog (name, spec, version, source, generation)
SELECT projection, spec, version, 'migrated', 1
FROM projection_versions WHERE state = 'active';

-- Every projector and query process, with the catalog generation it has
-- loaded and a heartbeat; projectors share projections among the live ones.
CREATE TABLE eventplane_processes (
    member              text PRIMARY KEY,
    roles               text[] NOT NULL,
    catalog_generation  bigint NOT NULL DEFAULT 0,
    started_at          timestamptz NOT NULL DEFAULT now(),
    heartbeat_at        timestamptz NOT NULL DEFAULT now()
);

-- Which projector process applies which projection; a lease that is not
-- renewed expires and another live projector takes the projection over.
CREATE TABLE projection_leases (
    projection   text PRIMARY KEY,
    member       text NOT NULL,
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
