-- Real cloud images (issue 12): two boot styles, owners and visibility,
-- image states, and images made from instances (CreateImage).

-- 'kernel': direct kernel boot (the host gives kernel, initrd, command line);
-- 'disk': the firmware boots the image's own boot loader from its disk
-- (every standard cloud qcow2). A disk-booted image has no kernel.
ALTER TABLE images ADD COLUMN boot TEXT NOT NULL DEFAULT 'kernel' CHECK (boot IN ('kernel', 'disk'));
ALTER TABLE images ALTER COLUMN kernel DROP NOT NULL;
ALTER TABLE images ALTER COLUMN kernel_sha256 DROP NOT NULL;
ALTER TABLE images ADD CONSTRAINT images_kernel_boot_has_kernel
    CHECK (boot = 'disk' OR (kernel IS NOT NULL AND kernel_sha256 IS NOT NULL));
ALTER TABLE images ADD CONSTRAINT images_disk_boot_has_no_kernel
    CHECK (boot = 'kernel' OR (kernel IS NULL AND initrd IS NULL));

-- Public images are visible to (and launchable by) every account; a private
-- image only to its owner. The operator's images so far were all public.
ALTER TABLE images ADD COLUMN is_public BOOLEAN NOT NULL DEFAULT false;
UPDATE images SET is_public = true;

-- pending: being made (CreateImage); available: launchable; failed: it could
-- not be made, or a host found its file differs from its digest;
-- deregistered: gone for the API (the row stays for the instances that run it).
ALTER TABLE images ADD COLUMN state TEXT NOT NULL DEFAULT 'available'
    CHECK (state IN ('pending', 'available', 'failed', 'deregistered'));
ALTER TABLE images ADD COLUMN state_reason TEXT;
ALTER TABLE images ADD COLUMN state_changed_at TIMESTAMPTZ NOT NULL DEFAULT now();

-- Where the files come from: kernel and initrd below source_url; the root
-- disk below source_url too, or, when root_disk_in_store, in the control
-- plane's image store (the images CreateImage makes). The root disk's digest
-- is unknown while such an image is pending.
ALTER TABLE images ALTER COLUMN source_url DROP NOT NULL;
ALTER TABLE images ADD COLUMN root_disk_in_store BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE images ALTER COLUMN root_disk_sha256 DROP NOT NULL;
ALTER TABLE images ADD CONSTRAINT images_available_have_digests
    CHECK (state IN ('pending', 'failed') OR root_disk_sha256 IS NOT NULL);
ALTER TABLE images ADD CONSTRAINT images_files_have_a_source
    CHECK (source_url IS NOT NULL OR (root_disk_in_store AND kernel IS NULL AND initrd IS NULL));
-- The root disk's virtual size in bytes, when known: an instance type with a
-- smaller disk cannot launch the image.
ALTER TABLE images ADD COLUMN root_disk_size BIGINT CHECK (root_disk_size > 0);

-- CreateImage: the instance the image is made from, its host (which makes
-- it: the request reaches that host's agent with the instance's
-- assignment), and whether the guest may keep running meanwhile.
ALTER TABLE images ADD COLUMN source_instance_id TEXT REFERENCES instances(id);
ALTER TABLE images ADD COLUMN source_host_id TEXT REFERENCES hosts(id);
ALTER TABLE images ADD COLUMN no_reboot BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE images ADD CONSTRAINT images_pending_have_a_source_instance
    CHECK (state <> 'pending' OR (source_instance_id IS NOT NULL AND source_host_id IS NOT NULL));
CREATE INDEX images_pending_by_instance ON images (source_instance_id) WHERE state = 'pending';

-- A name is unique among an account's images that are not deregistered
-- (a deregistered image's name may be used again).
ALTER TABLE images DROP CONSTRAINT images_account_id_name_key;
CREATE UNIQUE INDEX images_account_name ON images (account_id, name) WHERE state <> 'deregistered';
-- The default image is public and available.
ALTER TABLE images ADD CONSTRAINT images_default_is_public
    CHECK (NOT is_default OR (is_public AND state = 'available'));

-- The loopback endpoint (127.0.0.1:port on the instance's host) forwarded to
-- the guest's port 22, for guests on QEMU user-mode networking.
ALTER TABLE instances ADD COLUMN ssh_endpoint TEXT;
