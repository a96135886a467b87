-- Access keys of accounts, for AWS Signature Version 4 (the EC2 front door).
-- SigV4 needs the secret itself to recompute signatures, so it cannot be
-- hashed: it is sealed with AES-256-GCM under the control plane's master key
-- (auth/secrets.rs), with the access key id as associated data.
CREATE TABLE access_keys (
    id             TEXT PRIMARY KEY CHECK (id ~ '^AKIA[A-Z2-7]{16}$'),
    account_id     TEXT NOT NULL REFERENCES accounts(id),
    secret_sealed  BYTEA NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX access_keys_account ON access_keys (account_id);
