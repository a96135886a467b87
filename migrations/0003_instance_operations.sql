-- Stop/start/reboot, console output, key pairs and tags.

-- Reboots asked for, and carried out by the agent (a counter, not a state:
-- "reboot" is an action, and counting makes it idempotent and crash-safe).
ALTER TABLE instances ADD COLUMN reboots BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN reboots_done BIGINT NOT NULL DEFAULT 0;
-- The tail of the guest's serial console, shipped by the agent.
ALTER TABLE instances ADD COLUMN console_output BYTEA;
ALTER TABLE instances ADD COLUMN console_updated_at TIMESTAMPTZ;
-- The key pair named at launch and its public key, copied: deleting the key
-- pair later does not change what the instance was launched with.
ALTER TABLE instances ADD COLUMN key_name TEXT;
ALTER TABLE instances ADD COLUMN public_key TEXT;

CREATE TABLE key_pairs (
    id           TEXT NOT NULL UNIQUE CHECK (id ~ '^key-[0-9a-f]{17}$'),
    account_id   TEXT NOT NULL REFERENCES accounts(id),
    name         TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    public_key   TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, name)
);

CREATE TABLE tags (
    account_id   TEXT NOT NULL REFERENCES accounts(id),
    resource_id  TEXT NOT NULL,
    key          TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 128),
    value        TEXT NOT NULL DEFAULT '' CHECK (length(value) <= 256),
    PRIMARY KEY (account_id, resource_id, key)
);
CREATE INDEX tags_key ON tags (account_id, key, value);
