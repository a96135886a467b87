-- Tags bump an instance's metadata document once per transaction, not once
-- per tag row: CreateTags of 50 tags on 1,000 instances wrote 50,000
-- instance updates and outbox rows, now 1,000. One bump per transaction is
-- enough: the relay renders what committed, under the version the bump
-- gave. (An upsert that both adds and changes tags fires the INSERT and
-- the UPDATE statement triggers: the second finds the instance bumped.)
-- And the instances are locked in id order (the documented lock order
-- among instances), so that two tag statements naming the same instances
-- in different orders can no longer deadlock in the bump.
--
-- (Transition tables allow one event per trigger: three triggers.)

-- The transaction that last bumped the document through tags.
ALTER TABLE instances ADD COLUMN doc_bumped_xid BIGINT;

DROP TRIGGER tags_doc_version ON tags;
DROP FUNCTION tags_doc_version();

-- Bumps the documents of the instances among `ids` that this transaction
-- has not bumped yet, each once, locked in id order.
CREATE FUNCTION bump_instance_docs(ids TEXT[]) RETURNS void LANGUAGE sql AS $$
    UPDATE instances SET doc_version = doc_version + 1, doc_bumped_xid = txid_current()
    WHERE id IN (SELECT id FROM instances WHERE id = ANY(ids) ORDER BY id FOR NO KEY UPDATE)
      AND doc_bumped_xid IS DISTINCT FROM txid_current()
$$;

CREATE FUNCTION tags_inserted_doc_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_instance_docs(ARRAY(SELECT DISTINCT resource_id FROM new_tags WHERE resource_id LIKE 'i-%'));
    RETURN NULL;
END $$;
CREATE FUNCTION tags_deleted_doc_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_instance_docs(ARRAY(SELECT DISTINCT resource_id FROM old_tags WHERE resource_id LIKE 'i-%'));
    RETURN NULL;
END $$;
-- An update changes a value (or, in principle, moves a tag): both sides.
CREATE FUNCTION tags_updated_doc_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_instance_docs(ARRAY(
        SELECT resource_id FROM new_tags WHERE resource_id LIKE 'i-%'
        UNION SELECT resource_id FROM old_tags WHERE resource_id LIKE 'i-%'));
    RETURN NULL;
END $$;

CREATE TRIGGER tags_inserted_doc_version AFTER INSERT ON tags
    REFERENCING NEW TABLE AS new_tags
    FOR EACH STATEMENT EXECUTE FUNCTION tags_inserted_doc_version();
CREATE TRIGGER tags_deleted_doc_version AFTER DELETE ON tags
    REFERENCING OLD TABLE AS old_tags
    FOR EACH STATEMENT EXECUTE FUNCTION tags_deleted_doc_version();
CREATE TRIGGER tags_updated_doc_version AFTER UPDATE ON tags
    REFERENCING OLD TABLE AS old_tags NEW TABLE AS new_tags
    FOR EACH STATEMENT EXECUTE FUNCTION tags_updated_doc_version();
