-- Per-account limits, set by the operator; NULL means the control plane's
-- default (--default-max-instances, --default-max-vcpus). Enforced inside
-- the launch transaction, which locks the account row so that concurrent
-- launches of one account count each other.
ALTER TABLE accounts ADD COLUMN max_instances INTEGER CHECK (max_instances >= 0);
ALTER TABLE accounts ADD COLUMN max_vcpus INTEGER CHECK (max_vcpus >= 0);
-- What counts against them: the account's instances that hold capacity.
CREATE INDEX instances_account_held ON instances (account_id) WHERE capacity_held;
