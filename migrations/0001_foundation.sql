-- Nimbus foundation schema: accounts, the instance-type catalog, images, hosts
-- with their capacity counters, reservations and instances.
--
-- Capacity invariant: hosts.used_* is the sum of the resources of the host's
-- instances whose capacity_held is true. The scheduler raises used_* with a
-- conditional UPDATE (used + need <= total) under the row lock; the CHECKs
-- below make an over-commit impossible even if that code were wrong.

CREATE TABLE accounts (
    id          TEXT PRIMARY KEY CHECK (id ~ '^[0-9]{12}$'),
    name        TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO accounts (id, name) VALUES ('000000000000', 'admin');

CREATE TABLE instance_types (
    name        TEXT PRIMARY KEY,
    vcpus       INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mib  BIGINT  NOT NULL CHECK (memory_mib > 0),
    disk_gib    BIGINT  NOT NULL CHECK (disk_gib > 0)
);
INSERT INTO instance_types (name, vcpus, memory_mib, disk_gib) VALUES
    ('t3.nano',    2,   512,  8),
    ('t3.micro',   2,  1024,  8),
    ('t3.small',   2,  2048,  8),
    ('t3.medium',  2,  4096, 16),
    ('t3.large',   2,  8192, 16),
    ('c5.large',   2,  4096, 16),
    ('m5.large',   2,  8192, 32),
    ('m5.xlarge',  4, 16384, 64),
    ('m5.2xlarge', 8, 32768, 128);

CREATE TABLE images (
    id              TEXT PRIMARY KEY CHECK (id ~ '^ami-[0-9a-f]{17}$'),
    account_id      TEXT NOT NULL REFERENCES accounts(id),
    name            TEXT NOT NULL,
    description     TEXT,
    source_url      TEXT NOT NULL,
    kernel          TEXT NOT NULL,
    kernel_sha256   TEXT NOT NULL,
    initrd          TEXT,
    initrd_sha256   TEXT,
    root_disk       TEXT NOT NULL,
    root_disk_sha256 TEXT NOT NULL,
    cmdline         TEXT NOT NULL DEFAULT '',
    is_default      BOOLEAN NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (account_id, name)
);
-- At most one default image.
CREATE UNIQUE INDEX images_one_default ON images (is_default) WHERE is_default;

CREATE TABLE hosts (
    id                TEXT PRIMARY KEY CHECK (id ~ '^h-[0-9a-f]{17}$'),
    name              TEXT NOT NULL UNIQUE,
    availability_zone TEXT NOT NULL,
    hypervisor        TEXT NOT NULL,
    credential_sha256 BYTEA NOT NULL,
    total_vcpus       INTEGER NOT NULL CHECK (total_vcpus >= 0),
    total_memory_mib  BIGINT  NOT NULL CHECK (total_memory_mib >= 0),
    total_disk_gib    BIGINT  NOT NULL CHECK (total_disk_gib >= 0),
    used_vcpus        INTEGER NOT NULL DEFAULT 0,
    used_memory_mib   BIGINT  NOT NULL DEFAULT 0,
    used_disk_gib     BIGINT  NOT NULL DEFAULT 0,
    -- Bumped in every transaction that changes what the host must run; agents
    -- long-poll on it.
    generation        BIGINT  NOT NULL DEFAULT 1,
    last_heartbeat    TIMESTAMPTZ,
    registered_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT hosts_vcpus_not_overcommitted  CHECK (used_vcpus BETWEEN 0 AND total_vcpus),
    CONSTRAINT hosts_memory_not_overcommitted CHECK (used_memory_mib BETWEEN 0 AND total_memory_mib),
    CONSTRAINT hosts_disk_not_overcommitted   CHECK (used_disk_gib BETWEEN 0 AND total_disk_gib)
);

CREATE TABLE reservations (
    id            TEXT PRIMARY KEY CHECK (id ~ '^r-[0-9a-f]{17}$'),
    account_id    TEXT NOT NULL REFERENCES accounts(id),
    client_token  TEXT,
    -- SHA-256 of the launch parameters, to tell a retry from a different request.
    request_sha256 BYTEA NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (account_id, client_token)
);

CREATE TABLE instances (
    id                TEXT PRIMARY KEY CHECK (id ~ '^i-[0-9a-f]{17}$'),
    -- Launch order, the key of pagination.
    seq               BIGSERIAL NOT NULL UNIQUE,
    account_id        TEXT NOT NULL REFERENCES accounts(id),
    reservation_id    TEXT NOT NULL REFERENCES reservations(id),
    ami_launch_index  INTEGER NOT NULL,
    image_id          TEXT NOT NULL REFERENCES images(id),
    instance_type     TEXT NOT NULL REFERENCES instance_types(name),
    vcpus             INTEGER NOT NULL,
    memory_mib        BIGINT NOT NULL,
    disk_gib          BIGINT NOT NULL,
    availability_zone TEXT NOT NULL,
    host_id           TEXT NOT NULL REFERENCES hosts(id),
    state             TEXT NOT NULL CHECK (state IN ('pending','running','shutting-down','terminated','stopping','stopped')),
    desired_state     TEXT NOT NULL CHECK (desired_state IN ('running','stopped','terminated')),
    -- True while the instance's resources count in its host's used_*; set to
    -- false (and used_* lowered) only when the agent confirms the guest is gone.
    capacity_held     BOOLEAN NOT NULL DEFAULT true,
    user_data         BYTEA,
    state_reason      TEXT,
    -- The host generation of the last change to what the agent must do with
    -- this instance (placed, asked to terminate): agents fetch deltas by it.
    changed_generation BIGINT NOT NULL DEFAULT 0,
    launch_time       TIMESTAMPTZ NOT NULL DEFAULT now(),
    state_changed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (capacity_held OR state = 'terminated')
);
CREATE INDEX instances_host_held ON instances (host_id) WHERE capacity_held;
CREATE INDEX instances_host_changes ON instances (host_id, changed_generation);
CREATE INDEX instances_account_seq ON instances (account_id, seq);
CREATE INDEX instances_reservation ON instances (reservation_id);
