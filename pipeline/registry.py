"""Looking registered models up by URI or alias, telling "not there" apart from "could not ask".

`resolve_model_uri` turns ``models:/name@alias`` or ``models:/name/version`` into the registered version it names, or
raises `ModelLookupError` whose message is one line a person can act on: the versions and aliases that do exist, a
malformed URI's expected form, or the tracking store that could not be reached.
"""

from __future__ import annotations

import re
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
RESOURCE_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"
# what the registry answers for an alias that its (existing) model does not have
INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"


class ModelLookupError(LookupError):
    """A model URI that names nothing loadable; ``str(e)`` is one line for the user."""


def describe_registered(client: Any, name: str) -> str:
    """'ldm has versions 1, 2 and aliases candidate → 2, champion → 1' (or that there is no such model)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == RESOURCE_DOES_NOT_EXIST:
            names = sorted(m.name for m in client.search_registered_models())
            return f"no registered model {name!r} (registered: {', '.join(names) or 'none'})"
        raise
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = ", ".join(f"{a} → {v}" for a, v in sorted(model.aliases.items())) or "none"
    return f"{name} has versions {', '.join(map(str, versions)) or 'none'} and aliases {aliases}"


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The ModelVersion that ``name@alias`` points at, or None when the model or the alias does not exist.

    Any other error (an unreachable or failing store) propagates: a caller such as the promotion gate must never
    read "could not ask" as "there is none".
    """
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code == RESOURCE_DOES_NOT_EXIST:
            return None
        if e.error_code != INVALID_PARAMETER_VALUE:
            raise
    # INVALID_PARAMETER_VALUE is also what a malformed request gets: believe "no such alias" only once the model's
    # own alias list confirms it
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == RESOURCE_DOES_NOT_EXIST:
            return None
        raise
    if alias in model.aliases:
        raise MlflowException(
            f"the registry has alias {name}@{alias} but would not return its version",
            error_code="TEMPORARILY_UNAVAILABLE",
        )
    return None


def resolve_model_uri(client: Any, uri: str) -> Any:
    """The ModelVersion a ``models:/`` URI names. Raises ModelLookupError (one line) when it names nothing."""
    m = _MODELS_URI.match(uri.strip())
    if m is None:
        raise ModelLookupError(
            f"{uri!r} is not a registered-model URI: use models:/<name>@<alias> or "
            "models:/<name>/<version>, e.g. models:/ldm@champion"
        )
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        try:
            return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException as e:
            # a missing name, version or alias; anything else (a broken store) is not a lookup problem
            if e.error_code not in (RESOURCE_DOES_NOT_EXIST, INVALID_PARAMETER_VALUE):
                raise
            what = f"alias {alias!r}" if alias else f"version {version}"
            raise ModelLookupError(f"{uri}: no {what}; {describe_registered(client, name)}") from None
    except ModelLookupError:
        raise
    except Exception as e:  # the tracking store itself: unreachable server, unreadable database
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLookupError(
            f"cannot reach the MLflow tracking store at {mlflow.get_tracking_uri()}: {first[:200]}"
        ) from None


__all__ = ["ModelLookupError", "describe_registered", "resolve_model_uri", "version_by_alias"]
