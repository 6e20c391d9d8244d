-- Runs once, when the postgres volume is first created (docker-entrypoint-initdb.d).
-- MLflow uses the database POSTGRES_DB (mlflow); Prefect gets its own, because both keep
-- an alembic_version table and would clash in one.
CREATE DATABASE prefect OWNER rlhf;
