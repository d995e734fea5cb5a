-- Cluster versions store what changed. A cluster row (with its members) is valid from the
-- version that wrote it (`first_version`) until the version that replaced or dropped it
-- (`until_version`, exclusive; NULL while current), so a job that changes one cluster of a
-- big pet writes that cluster, not the pet. Version v of a pet is its rows with
-- first_version <= v < until_version.
ALTER TABLE clusters ADD COLUMN pet_id text;
ALTER TABLE clusters ADD COLUMN first_version bigint;
ALTER TABLE clusters ADD COLUMN until_version bigint;
UPDATE clusters c
SET pet_id = v.pet_id,
    first_version = v.version,
    until_version = CASE
        WHEN v.version = (SELECT max(l.version) FROM cluster_versions l WHERE l.pet_id = v.pet_id)
        THEN NULL ELSE v.version + 1 END
FROM cluster_versions v
WHERE v.id = c.cluster_version_id;
ALTER TABLE clusters ALTER COLUMN pet_id SET NOT NULL, ALTER COLUMN first_version SET NOT NULL;
-- A row outlives the version that wrote it: it no longer belongs to one version row, and
-- pruning (clustering.keep_versions) deletes rows no kept version sees.
ALTER TABLE clusters DROP COLUMN cluster_version_id;
ALTER TABLE clusters ADD CONSTRAINT clusters_written UNIQUE (pet_id, first_version, cluster_id);
CREATE UNIQUE INDEX clusters_current ON clusters (pet_id, cluster_id) WHERE until_version IS NULL;
CREATE INDEX clusters_validity ON clusters (pet_id, first_version, until_version);
