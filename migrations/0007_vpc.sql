-- VPC networking (issue 10, the control plane's half): VPCs, subnets,
-- security groups and their rules, network interfaces with their private
-- addresses, and public addresses (Elastic or auto-assigned) from the
-- operator's pool. Every resource is account-scoped.
--
-- Address invariants, held by constraints rather than code:
-- - no two interfaces of a VPC share a private address (UNIQUE (vpc_id, private_ip));
-- - no two subnets of a VPC overlap (an exclusion constraint);
-- - a public address is held once (its PRIMARY KEY) and mapped to at most
--   one interface (UNIQUE (network_interface_id)).

CREATE EXTENSION IF NOT EXISTS btree_gist;

-- The host's address on the underlay network (VXLAN tunnels end there);
-- NULL for a host in QEMU user-mode networking.
ALTER TABLE hosts ADD COLUMN underlay_ip INET CHECK (family(underlay_ip) = 4);

-- Per-account Elastic IP limit; NULL: the control plane's default.
ALTER TABLE accounts ADD COLUMN max_elastic_ips INTEGER CHECK (max_elastic_ips >= 0);

-- One VXLAN network identifier per VPC, never reused.
CREATE SEQUENCE vpc_vni AS INTEGER MINVALUE 1 MAXVALUE 16777215 NO CYCLE;

CREATE TABLE vpcs (
    id          TEXT PRIMARY KEY CHECK (id ~ '^vpc-[0-9a-f]{17}$'),
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    cidr        CIDR NOT NULL CHECK (family(cidr) = 4 AND masklen(cidr) BETWEEN 16 AND 28),
    vni         INTEGER NOT NULL UNIQUE DEFAULT nextval('vpc_vni') CHECK (vni BETWEEN 1 AND 16777215),
    is_default  BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX vpcs_account ON vpcs (account_id);
-- At most one default VPC per account (lazy creation races resolve here).
CREATE UNIQUE INDEX vpcs_one_default ON vpcs (account_id) WHERE is_default;

CREATE TABLE subnets (
    id                      TEXT PRIMARY KEY CHECK (id ~ '^subnet-[0-9a-f]{17}$'),
    account_id              TEXT NOT NULL REFERENCES accounts(id),
    vpc_id                  TEXT NOT NULL REFERENCES vpcs(id),
    availability_zone       TEXT NOT NULL,
    cidr                    CIDR NOT NULL CHECK (family(cidr) = 4 AND masklen(cidr) BETWEEN 16 AND 28),
    default_for_az          BOOLEAN NOT NULL DEFAULT false,
    map_public_ip_on_launch BOOLEAN NOT NULL DEFAULT false,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT subnets_no_overlap EXCLUDE USING gist (vpc_id WITH =, cidr inet_ops WITH &&)
);
CREATE INDEX subnets_account ON subnets (account_id);
CREATE UNIQUE INDEX subnets_one_default_per_az ON subnets (vpc_id, availability_zone) WHERE default_for_az;

CREATE TABLE security_groups (
    id          TEXT PRIMARY KEY CHECK (id ~ '^sg-[0-9a-f]{17}$'),
    account_id  TEXT NOT NULL REFERENCES accounts(id),
    vpc_id      TEXT NOT NULL REFERENCES vpcs(id),
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    description TEXT NOT NULL CHECK (length(description) <= 255),
    is_default  BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT security_groups_name_per_vpc UNIQUE (vpc_id, name)
);
CREATE INDEX security_groups_account ON security_groups (account_id);
CREATE UNIQUE INDEX security_groups_one_default ON security_groups (vpc_id) WHERE is_default;

-- Allow rules. Ports: -1 means "all" (EC2's form); for ICMP, from_port is the
-- type and to_port the code. The peer is a CIDR or a group (a reference,
-- never expanded here): a referenced group cannot be deleted (NO ACTION).
CREATE TABLE security_group_rules (
    id             TEXT PRIMARY KEY CHECK (id ~ '^sgr-[0-9a-f]{17}$'),
    group_id       TEXT NOT NULL REFERENCES security_groups(id) ON DELETE CASCADE,
    egress         BOOLEAN NOT NULL,
    protocol       TEXT NOT NULL CHECK (protocol IN ('-1', 'tcp', 'udp', 'icmp')),
    from_port      INTEGER NOT NULL CHECK (from_port BETWEEN -1 AND 65535),
    to_port        INTEGER NOT NULL CHECK (to_port BETWEEN -1 AND 65535),
    cidr           CIDR CHECK (family(cidr) = 4),
    peer_group_id  TEXT REFERENCES security_groups(id),
    description    TEXT CHECK (length(description) <= 255),
    CHECK ((cidr IS NULL) <> (peer_group_id IS NULL)),
    CONSTRAINT security_group_rules_unique UNIQUE NULLS NOT DISTINCT (group_id, egress, protocol, from_port, to_port, cidr, peer_group_id)
);
CREATE INDEX security_group_rules_peer ON security_group_rules (peer_group_id) WHERE peer_group_id IS NOT NULL;

-- Network interfaces. An interface with an instance is on that instance's
-- host; one without (DeleteOnTermination false, instance gone) is
-- "available" and on no host.
CREATE TABLE network_interfaces (
    id                    TEXT PRIMARY KEY CHECK (id ~ '^eni-[0-9a-f]{17}$'),
    account_id            TEXT NOT NULL REFERENCES accounts(id),
    vpc_id                TEXT NOT NULL REFERENCES vpcs(id),
    subnet_id             TEXT NOT NULL REFERENCES subnets(id),
    private_ip            INET NOT NULL CHECK (family(private_ip) = 4 AND masklen(private_ip) = 32),
    mac                   TEXT NOT NULL UNIQUE CHECK (mac ~ '^02(:[0-9a-f]{2}){5}$'),
    instance_id           TEXT REFERENCES instances(id),
    device_index          INTEGER CHECK (device_index BETWEEN 0 AND 7),
    attachment_id         TEXT UNIQUE CHECK (attachment_id ~ '^eni-attach-[0-9a-f]{17}$'),
    delete_on_termination BOOLEAN NOT NULL DEFAULT true,
    attached_at           TIMESTAMPTZ,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((instance_id IS NULL) = (device_index IS NULL)),
    -- The address invariant: no two interfaces share an address.
    CONSTRAINT network_interfaces_one_address UNIQUE (vpc_id, private_ip),
    CONSTRAINT network_interfaces_one_device UNIQUE (instance_id, device_index)
);
CREATE INDEX network_interfaces_account ON network_interfaces (account_id);
CREATE INDEX network_interfaces_subnet ON network_interfaces (subnet_id);

CREATE TABLE network_interface_groups (
    interface_id  TEXT NOT NULL REFERENCES network_interfaces(id) ON DELETE CASCADE,
    -- NO ACTION: a group in use cannot be deleted.
    group_id      TEXT NOT NULL REFERENCES security_groups(id),
    PRIMARY KEY (interface_id, group_id)
);
CREATE INDEX network_interface_groups_group ON network_interface_groups (group_id);

-- Public addresses from the operator's pool (--public-pool): Elastic IPs
-- (with an allocation id, held until released) and addresses auto-assigned
-- at launch (no allocation id, returned to the pool with their interface).
CREATE TABLE public_addresses (
    public_ip            INET PRIMARY KEY CHECK (family(public_ip) = 4 AND masklen(public_ip) = 32),
    account_id           TEXT NOT NULL REFERENCES accounts(id),
    allocation_id        TEXT UNIQUE CHECK (allocation_id ~ '^eipalloc-[0-9a-f]{17}$'),
    network_interface_id TEXT UNIQUE REFERENCES network_interfaces(id),
    association_id       TEXT UNIQUE CHECK (association_id ~ '^eipassoc-[0-9a-f]{17}$'),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- An auto-assigned address exists only while mapped to its interface.
    CHECK (allocation_id IS NOT NULL OR network_interface_id IS NOT NULL),
    CHECK ((association_id IS NULL) OR (network_interface_id IS NOT NULL))
);
CREATE INDEX public_addresses_account ON public_addresses (account_id);

-- What DescribeInstances filters on about an instance's network, as
-- (instance, filter name, value): the primary interface's for the
-- instance-level names, every interface's for network-interface.*.
CREATE VIEW instance_network_facts (instance_id, name, value) AS
SELECT n.instance_id, f.name, f.value
FROM network_interfaces n
CROSS JOIN LATERAL (VALUES
    ('network-interface.network-interface-id', n.id),
    ('network-interface.vpc-id', n.vpc_id),
    ('network-interface.subnet-id', n.subnet_id),
    ('network-interface.mac-address', n.mac),
    ('network-interface.addresses.private-ip-address', host(n.private_ip)),
    ('network-interface.private-ip-address', host(n.private_ip)),
    ('network-interface.attachment.device-index', n.device_index::text),
    ('network-interface.attachment.attachment-id', n.attachment_id),
    ('network-interface.status', 'in-use'),
    ('vpc-id', CASE WHEN n.device_index = 0 THEN n.vpc_id END),
    ('subnet-id', CASE WHEN n.device_index = 0 THEN n.subnet_id END),
    ('private-ip-address', CASE WHEN n.device_index = 0 THEN host(n.private_ip) END)
) AS f(name, value)
WHERE n.instance_id IS NOT NULL AND f.value IS NOT NULL
UNION ALL
SELECT n.instance_id, f.name, f.value
FROM network_interfaces n
JOIN network_interface_groups ng ON ng.interface_id = n.id
JOIN security_groups g ON g.id = ng.group_id
CROSS JOIN LATERAL (VALUES
    ('instance.group-id', g.id), ('instance.group-name', g.name),
    ('group-id', g.id), ('group-name', g.name),
    ('network-interface.group-id', g.id), ('network-interface.group-name', g.name)
) AS f(name, value)
WHERE n.instance_id IS NOT NULL
UNION ALL
SELECT n.instance_id, f.name, host(p.public_ip)
FROM network_interfaces n
JOIN public_addresses p ON p.network_interface_id = n.id
CROSS JOIN LATERAL (VALUES
    ('network-interface.association.public-ip', true),
    ('ip-address', n.device_index = 0)
) AS f(name, applies)
WHERE n.instance_id IS NOT NULL AND f.applies;
CREATE INDEX network_interfaces_instance ON network_interfaces (instance_id) WHERE instance_id IS NOT NULL;
