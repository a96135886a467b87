-- Terminated instances are deleted after the retention period
-- (`service/retention.rs`); an image keeps the id of the instance it was
-- made from (DescribeImages shows it) after that instance is gone.
ALTER TABLE images DROP CONSTRAINT images_source_instance_id_fkey;
