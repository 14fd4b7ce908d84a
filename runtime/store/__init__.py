"""llmplan's job records: every job, its plan, events and metrics, in a database that outlives Ray.

Import the modules you need (this package imports nothing itself, so it stays light):

- `status`: JobStatus (with is_terminal()), JobKind, ErrorClass and ALLOWED_TRANSITIONS.
- `db`: open_store(url) -> Engine, database_url_from_environment(--db value), URL handling.
- `repository`: create_job, transition, update_job, record_metrics, retry_job, get_job,
  get_job_details, list_jobs, count_jobs, and the dataclasses they take.
- `models`: the rows Job, JobEvent, JobMetric (frozen dataclasses) and their SQLAlchemy Core tables.
- `migrate`: alembic migrations (used by open_store; imports alembic only when needed).
- `errors`: StoreError and its subclasses.
"""
