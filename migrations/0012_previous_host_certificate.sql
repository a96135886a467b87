-- The certificate a host presented when it last renewed stays valid (with
-- the new one) until its next renewal: a host whose renewal was issued but
-- not taken into use (the answer lost, its files not saved) is not locked
-- out by the control plane's "only the latest certificate" rule.
ALTER TABLE hosts ADD COLUMN tls_prev_cert_sha256 BYTEA;
ALTER TABLE hosts ADD COLUMN tls_prev_cert_not_after TIMESTAMPTZ;
