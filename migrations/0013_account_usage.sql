-- What each account holds, kept as counters (as hosts keep used_*), so that a
-- launch checks its account's limits with one conditional UPDATE at the end
-- of its transaction instead of locking the account row for the whole of it
-- (which queued every launch of one account behind the one before).
--
-- instances / vcpus = the account's instances with capacity_held (pending,
-- running, stopping, stopped, shutting-down until the host confirms). Raised
-- by launches and type changes only within the limits, lowered by the
-- report transaction that clears capacity_held; both through usage claims
-- (below), applied at commit.
CREATE TABLE account_usage (
    account_id TEXT PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    instances  INTEGER NOT NULL DEFAULT 0 CHECK (instances >= 0),
    vcpus      INTEGER NOT NULL DEFAULT 0 CHECK (vcpus >= 0)
);

INSERT INTO account_usage (account_id, instances, vcpus)
SELECT a.id, count(i.id), coalesce(sum(i.vcpus), 0)
FROM accounts a LEFT JOIN instances i ON i.account_id = a.id AND i.capacity_held
GROUP BY a.id;

-- Every account has its row from the start.
CREATE FUNCTION account_usage_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO account_usage (account_id) VALUES (NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER accounts_usage_row AFTER INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION account_usage_row();

-- Changes to an account's usage are applied at COMMIT: a transaction
-- inserts a claim (an insert, no lock on anything shared), and a deferred
-- constraint trigger applies it while the transaction commits, refusing it
-- (SQLSTATE NQ001, aborting the commit) if what rises would pass the limit
-- the claim carries. The account's usage row is thus locked only during
-- the commit itself, never across a round trip to the control plane: a
-- launch that has done its work waits for nothing but the commits of the
-- same account's launches before it.
CREATE TABLE usage_claims (
    id            BIGSERIAL PRIMARY KEY,
    account_id    TEXT NOT NULL,
    instances     INTEGER NOT NULL,
    vcpus         INTEGER NOT NULL,
    -- NULL: no limit (a release, or a change that only lowers).
    max_instances BIGINT,
    max_vcpus     BIGINT
);

CREATE FUNCTION apply_usage_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE account_usage SET instances = instances + NEW.instances, vcpus = vcpus + NEW.vcpus
    WHERE account_id = NEW.account_id
      AND (NEW.instances <= 0 OR NEW.max_instances IS NULL OR instances + NEW.instances <= NEW.max_instances)
      AND (NEW.vcpus <= 0 OR NEW.max_vcpus IS NULL OR vcpus + NEW.vcpus <= NEW.max_vcpus);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account % has no room for % instance(s) and % vCPU(s) more', NEW.account_id, NEW.instances, NEW.vcpus
            USING ERRCODE = 'NQ001';
    END IF;
    DELETE FROM usage_claims WHERE id = NEW.id;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER usage_claims_apply AFTER INSERT ON usage_claims
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION apply_usage_claim();
