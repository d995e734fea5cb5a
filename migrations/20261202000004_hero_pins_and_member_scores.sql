-- Each member's hero-score factors (null in rows written before) and the better-scored
-- member it nearly duplicates; whether the cluster's hero is the owner's pin.
ALTER TABLE cluster_members
    ADD COLUMN sharpness double precision,
    ADD COLUMN noise double precision,
    ADD COLUMN exposure double precision,
    ADD COLUMN resolution double precision,
    ADD COLUMN centrality double precision,
    ADD COLUMN near_duplicate_of uuid;
ALTER TABLE clusters ADD COLUMN hero_pinned boolean NOT NULL DEFAULT false;

-- A hero the owner chose (PUT /v1/pets/{pet_id}/clusters/{cluster_id}/hero): it stays the
-- hero of that cluster id for as long as the photo is one of its members.
CREATE TABLE hero_pins (
    pet_id     text        NOT NULL,
    cluster_id uuid        NOT NULL,
    image_id   uuid        NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    pinned_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pet_id, cluster_id)
);
