"""alembic's script directory for the job store (env.py, versions/). Run through `store.migrate`."""
