-- When each photo was taken (EXIF DateTimeOriginal with its sub-seconds and offset; the
-- camera's wall-clock time read as UTC when the file states no offset), NULL when unknown.
-- A second clustering signal (clustering.capture_time).
ALTER TABLE images ADD COLUMN captured_at timestamptz;
