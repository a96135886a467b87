-- A host's credential can be reset by the operator: NULL means "awaiting
-- re-registration". Registering a name that exists otherwise needs proof of
-- the host's current credential, so that the join token alone cannot take
-- over a host.
ALTER TABLE hosts ALTER COLUMN credential_sha256 DROP NOT NULL;
