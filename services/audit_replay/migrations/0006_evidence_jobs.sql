-- SOC2 evidence documents built as jobs, in the export jobs' table and parts: a job's kind is
-- its subject_type ('evidence_soc2', its subject_id the period), params holds its request and
-- the pin the document is built at (so a job built again makes the same bytes), and result the
-- finished document's type, name, sha256 and signature statement.

ALTER TABLE audit_replay.export_jobs DROP CONSTRAINT export_jobs_subject_type_check;
ALTER TABLE audit_replay.export_jobs ADD CONSTRAINT export_jobs_subject_type_check
    CHECK (subject_type IN ('run', 'execution', 'evidence_soc2'));
ALTER TABLE audit_replay.export_jobs ADD COLUMN params jsonb;
ALTER TABLE audit_replay.export_jobs ADD COLUMN result jsonb;
