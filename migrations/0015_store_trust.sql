-- What the state store's readers trust (issue 18, finding 3).

-- The control plane's document key (ECDSA P-256): it signs every instance
-- document and the revocation list; hosts verify with its public key (sent
-- with their certificate). Its private key (PKCS#8, base64) is sealed under
-- the master key, as the CA's is. Made by the first control plane that
-- needs it.
ALTER TABLE cluster_ca ADD COLUMN doc_key_public BYTEA;
ALTER TABLE cluster_ca ADD COLUMN doc_key_sealed BYTEA;

-- Each host's public key (uncompressed P-256 point), recorded when its key
-- is certified: documents are sealed for it, and the host's console and
-- status records must carry its signature.
ALTER TABLE hosts ADD COLUMN public_key BYTEA;

-- Certificates no store node may accept any more: those of hosts whose
-- credential the operator reset (or that were removed), until they expire.
CREATE TABLE revoked_certificates (
    sha256      BYTEA PRIMARY KEY,
    host_id     TEXT,
    not_after   TIMESTAMPTZ NOT NULL,
    revoked_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The IP address each host's store node certificate names (one node's
-- alone: certificates name the IP, not the port). Set at certification;
-- the unique index settles two hosts asking for one address at once.
ALTER TABLE hosts ADD COLUMN store_ip INET;
CREATE UNIQUE INDEX hosts_store_ip ON hosts (store_ip);
