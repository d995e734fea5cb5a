-- One clustering can complete several coalesced jobs of a pet: each job records the
-- version that completed it. A photo that can never be processed is quarantined with its
-- reason, left out of clustering, and listed as unprocessable.
ALTER TABLE jobs ADD COLUMN cluster_version bigint;
ALTER TABLE images ADD COLUMN error text;
