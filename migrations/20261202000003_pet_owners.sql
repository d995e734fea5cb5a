-- A pet belongs to an owner (the JWT's `owner` claim, else its `sub`): the first write to
-- a pet records it, and every /v1 route answers 404 to anyone else. Pets that existed before
-- this table get their owner on their next write.
CREATE TABLE pet_owners (
    pet_id     text        PRIMARY KEY,
    owner      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
