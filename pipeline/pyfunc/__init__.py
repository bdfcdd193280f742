"""MLflow "models from code" entry points: the logged model stores one of these files (not a pickle) and MLflow
executes it at load time, with the copy of ldm_core shipped in the model's code/ first on sys.path."""
