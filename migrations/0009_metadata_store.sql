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
--
-- Triggers do the bumping, so that no code path that changes a document
-- can forget it: the instance's own columns the document shows, its tags,
-- its interfaces, their groups and public addresses. A bump is an UPDATE
-- of the instance's row, so versions of one instance are ordered as their
-- transactions commit (the row lock), never as they began.
ALTER TABLE instances ADD COLUMN doc_version BIGINT NOT NULL DEFAULT 0;
CREATE TABLE metadata_outbox (
    seq         BIGSERIAL PRIMARY KEY,
    instance_id TEXT NOT NULL,
    version     BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX metadata_outbox_instance ON metadata_outbox (instance_id);

CREATE FUNCTION instance_doc_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.doc_version := 1;
    ELSIF NEW.doc_version = OLD.doc_version AND (
        NEW.state, NEW.host_id, NEW.instance_type, NEW.user_data, NEW.key_name, NEW.public_key,
        NEW.metadata_tokens_required, NEW.metadata_endpoint_enabled, NEW.metadata_tags_enabled, NEW.metadata_hop_limit
    ) IS DISTINCT FROM (
        OLD.state, OLD.host_id, OLD.instance_type, OLD.user_data, OLD.key_name, OLD.public_key,
        OLD.metadata_tokens_required, OLD.metadata_endpoint_enabled, OLD.metadata_tags_enabled, OLD.metadata_hop_limit
    ) THEN
        NEW.doc_version := OLD.doc_version + 1;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER instances_doc_version BEFORE INSERT OR UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION instance_doc_version();

CREATE FUNCTION instance_doc_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.doc_version <> OLD.doc_version THEN
        INSERT INTO metadata_outbox (instance_id, version) VALUES (NEW.id, NEW.doc_version);
        PERFORM pg_notify('nimbus_outbox', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER instances_doc_outbox AFTER INSERT OR UPDATE ON instances
    FOR EACH ROW EXECUTE FUNCTION instance_doc_outbox();

-- Bumps the document of an instance whose tags or network changed.
CREATE FUNCTION bump_instance_doc(instance TEXT) RETURNS void LANGUAGE sql AS $$
    UPDATE instances SET doc_version = doc_version + 1 WHERE id = instance
$$;

CREATE FUNCTION tags_doc_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.resource_id LIKE 'i-%' THEN
        PERFORM bump_instance_doc(OLD.resource_id);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.resource_id LIKE 'i-%' AND (TG_OP = 'INSERT' OR NEW.resource_id <> OLD.resource_id) THEN
        PERFORM bump_instance_doc(NEW.resource_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER tags_doc_version AFTER INSERT OR UPDATE OR DELETE ON tags
    FOR EACH ROW EXECUTE FUNCTION tags_doc_version();

CREATE FUNCTION interfaces_doc_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.instance_id IS NOT NULL THEN
        PERFORM bump_instance_doc(OLD.instance_id);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.instance_id IS NOT NULL AND (TG_OP = 'INSERT' OR NEW.instance_id IS DISTINCT FROM OLD.instance_id
            OR NEW.private_ip <> OLD.private_ip OR NEW.device_index IS DISTINCT FROM OLD.device_index) THEN
        PERFORM bump_instance_doc(NEW.instance_id);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER interfaces_doc_version AFTER INSERT OR UPDATE OR DELETE ON network_interfaces
    FOR EACH ROW EXECUTE FUNCTION interfaces_doc_version();

CREATE FUNCTION interface_links_doc_version() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    eni TEXT;
BEGIN
    IF TG_TABLE_NAME = 'network_interface_groups' THEN
        eni := CASE WHEN TG_OP = 'DELETE' THEN OLD.interface_id ELSE NEW.interface_id END;
        PERFORM bump_instance_doc(instance_id) FROM network_interfaces WHERE id = eni AND instance_id IS NOT NULL;
    ELSE
        IF TG_OP <> 'INSERT' AND OLD.network_interface_id IS NOT NULL THEN
            PERFORM bump_instance_doc(instance_id) FROM network_interfaces WHERE id = OLD.network_interface_id AND instance_id IS NOT NULL;
        END IF;
        IF TG_OP <> 'DELETE' AND NEW.network_interface_id IS NOT NULL
                AND (TG_OP = 'INSERT' OR NEW.network_interface_id IS DISTINCT FROM OLD.network_interface_id) THEN
            PERFORM bump_instance_doc(instance_id) FROM network_interfaces WHERE id = NEW.network_interface_id AND instance_id IS NOT NULL;
        END IF;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER interface_groups_doc_version AFTER INSERT OR DELETE ON network_interface_groups
    FOR EACH ROW EXECUTE FUNCTION interface_links_doc_version();
CREATE TRIGGER public_addresses_doc_version AFTER INSERT OR UPDATE OR DELETE ON public_addresses
    FOR EACH ROW EXECUTE FUNCTION interface_links_doc_version();

-- Instances that exist already are published once (the trigger bumps them).
UPDATE instances SET doc_version = 1 WHERE state <> 'terminated';
