-- Instance metadata in the state store (issue 11).

-- The control plane's certificate authority: one row. Its certificate is
-- public; its private key (PEM) is sealed with AES-256-GCM under the
-- master key (as access-key secrets are), bound to the CA's name.
CREATE TABLE cluster_ca (
    id          BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    common_name TEXT NOT NULL,
    cert_pem    TEXT NOT NULL,
    key_sealed  BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Each host's current certificate (issued at registration for a key the
-- host made): the agent's side of mutual TLS with the control plane must
-- present exactly this one, and its store node listens at store_address.
ALTER TABLE hosts ADD COLUMN tls_cert_sha256 BYTEA;
ALTER TABLE hosts ADD COLUMN tls_cert_not_after TIMESTAMPTZ;
ALTER TABLE hosts ADD COLUMN store_address TEXT;

-- EC2's MetadataOptions of each instance.
ALTER TABLE instances ADD COLUMN metadata_tokens_required BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE instances ADD COLUMN metadata_endpoint_enabled BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE instances ADD COLUMN metadata_tags_enabled BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE instances ADD COLUMN metadata_hop_limit INTEGER NOT NULL DEFAULT 1
    CHECK (metadata_hop_limit BETWEEN 1 AND 64);

-- The transactional outbox of metadata documents: every transaction that
-- changes what an instance's document says bumps its doc_version and
-- inserts a row here, in the same transaction; the relay publishes the
-- document (rendered at that version or later) to the state store, and
-- deletes the rows only once the store acknowledged the write.
ALTER TABLE instances ADD COLUMN doc_version BIGINT NOT NULL DEFAULT 0;
CREATE TABLE metadata_outbox (
    seq         BIGSERIAL PRIMARY KEY,
    instance_id TEXT NOT NULL,
    version     BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX metadata_outbox_instance ON metadata_outbox (instance_id);
-- Instances that exist already are published once.
UPDATE instances SET doc_version = 1 WHERE state <> 'terminated';
INSERT INTO metadata_outbox (instance_id, version) SELECT id, 1 FROM instances WHERE state <> 'terminated';
