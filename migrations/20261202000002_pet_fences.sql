-- Fencing tokens of pets' leases: a worker takes the next token when it gets a pet's lock,
-- and its commit is refused if a later token has been taken since (it lost the lock and
-- another worker holds the pet now).
CREATE TABLE pet_fences (
    pet_id text   PRIMARY KEY,
    token  bigint NOT NULL
);
-- The outbox relay's look-up: committed jobs not yet on the stream.
CREATE INDEX jobs_outbox ON jobs (created_at) WHERE status = 'queued';
