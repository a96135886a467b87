-- Per-account image limits (issue 18, finding 8): one account could fill
-- the control plane's disk with CreateImage. NULL means the control
-- plane's default (--default-max-images, --default-max-image-bytes).
ALTER TABLE accounts
    ADD COLUMN max_images INTEGER CHECK (max_images >= 0),
    ADD COLUMN max_image_bytes BIGINT CHECK (max_image_bytes >= 0);

-- What an image's disk takes in the image store, set when its upload is
-- published (images made before this column: at the next start's sweep).
ALTER TABLE images ADD COLUMN stored_bytes BIGINT CHECK (stored_bytes >= 0);
