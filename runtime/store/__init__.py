"""llmplan's job records: every job, its plan, events and metrics, in a database that outlives Ray.

Import the modules you need (this package imports nothing itself, so it stays light):

- `status`: JobStatus (with is_terminal()), JobKind, ErrorClass and ALLOWED_TRANSITIONS.
- `opening`: open_store(url) -> Engine: connect and bring the schema up to date (or refuse).
- `db`: connections, database_url_from_environment(--db value), URL handling.
- `repository`: create_job, transition, update_job, record_metrics, retry_job, get_job,
  get_job_details, list_jobs, count_jobs, and the dataclasses they take (SQLModel objects).
- `reading`: the read queries, built once (the repository runs them too), and their Core-only form for
  `llmplan jobs`/`show` and the dashboard: read_jobs, read_job_details, read_latest_metric (rows; no SQLModel).
- `models`: the SQLModel tables Job, JobEvent, JobMetric (the schema); `columns`: their column types (Core).
- `migrate`: alembic migrations (used by opening.open_store; imports alembic only when needed).
- `errors`: StoreError and its subclasses.
"""
