"""MLflow "models from code" entry points: the logged model stores one of these files (not a pickle) and MLflow
executes it at load time, which builds the model class from the installed package."""
