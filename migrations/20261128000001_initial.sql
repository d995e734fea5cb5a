-- Photos, their embeddings, jobs, and the cluster versions the pipeline writes.

CREATE TABLE images (
    id           uuid PRIMARY KEY,
    pet_id       text        NOT NULL,
    sha256       text        NOT NULL,
    content_type text        NOT NULL,
    byte_size    bigint      NOT NULL,
    width        integer     NOT NULL,
    height       integer     NOT NULL,
    storage_key  text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pet_id, sha256)
);
CREATE INDEX images_pet_created ON images (pet_id, created_at, id);

-- One row per photo and model version: the cache that spares re-embedding.
CREATE TABLE image_embeddings (
    image_id      uuid        NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    model_version text        NOT NULL,
    vector        real[]      NOT NULL,
    sharpness     real        NOT NULL,
    noise         real        NOT NULL,
    exposure      real        NOT NULL,
    pixels        bigint      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_id, model_version)
);

CREATE TABLE jobs (
    id          uuid PRIMARY KEY,
    pet_id      text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('image_added', 'recluster')),
    status      text        NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead_lettered')),
    attempts    integer     NOT NULL DEFAULT 0,
    error       text,
    image_ids   uuid[]      NOT NULL DEFAULT '{}',
    stream_id   text,
    trace_id    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
);
CREATE INDEX jobs_pet_created ON jobs (pet_id, created_at);
CREATE INDEX jobs_status ON jobs (status) WHERE status IN ('queued', 'running');

CREATE TABLE cluster_versions (
    id            bigserial PRIMARY KEY,
    pet_id        text        NOT NULL,
    version       bigint      NOT NULL,
    job_id        uuid        NOT NULL UNIQUE REFERENCES jobs (id),
    model_version text        NOT NULL,
    algorithm     text        NOT NULL,
    params        jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pet_id, version)
);

-- `cluster_id` is the cluster's identity across versions; `id` is this row.
CREATE TABLE clusters (
    id                 uuid PRIMARY KEY,
    cluster_version_id bigint  NOT NULL REFERENCES cluster_versions (id) ON DELETE CASCADE,
    cluster_id         uuid    NOT NULL,
    label              integer NOT NULL,
    hero_image_id      uuid    NOT NULL REFERENCES images (id),
    size               integer NOT NULL,
    UNIQUE (cluster_version_id, label),
    UNIQUE (cluster_version_id, cluster_id)
);

CREATE TABLE cluster_members (
    cluster  uuid             NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    image_id uuid             NOT NULL REFERENCES images (id),
    score    double precision NOT NULL,
    PRIMARY KEY (cluster, image_id)
);
CREATE INDEX cluster_members_image ON cluster_members (image_id);
