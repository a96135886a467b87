-- What a host's agent reports wrong with its host (slow guest starts and
-- their likely cause), replaced by every report; empty when healthy.
ALTER TABLE hosts ADD COLUMN problems TEXT[] NOT NULL DEFAULT '{}';
