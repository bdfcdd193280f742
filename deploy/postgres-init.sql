-- docker-compose: the MLflow backend store lives beside Dagster's database in the same Postgres server.
CREATE DATABASE mlflow OWNER ldm;
