-- Network changes waiting to reach the hosts they concern.
--
-- A transaction that changes what other hosts must know of the network (an
-- interface added to or removed from security groups or a VPC, a group's
-- rules, a VPC's subnets, a host's underlay address) inserts one row here
-- instead of locking the VPC and the groups to compute those hosts itself
-- (which queued every launch into a VPC behind the one before). After it
-- commits, the network relay (control-plane/src/service/network_changes.rs)
-- computes the hosts from what is committed by then, bumps them and deletes
-- the rows: every host whose view a committed change alters is bumped after
-- that commit, or fetches its network after it anyway (see the module doc).
CREATE TABLE network_changes (
    id          BIGSERIAL PRIMARY KEY,
    -- VPCs whose hosts' peers or subnets changed: every host in them.
    vpc_ids     TEXT[] NOT NULL DEFAULT '{}',
    -- Groups whose members changed: hosts with an interface in them or in a
    -- group whose rules name them.
    member_of   TEXT[] NOT NULL DEFAULT '{}',
    -- Groups whose rules changed: hosts with an interface in them.
    rules_of    TEXT[] NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
