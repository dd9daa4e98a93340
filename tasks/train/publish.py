"""Register an exported model in the MLflow model registry, under an alias per stage.

One registered model per pipeline; each training stage moves its alias (``pretrain``, ``sft``,
``aligned`` …) to the version it produced. The version's source is the model folder in the store
(no second copy of the weights in MLflow). Registration is fail-soft: a tracking outage or a
server that refuses the source warns, it never fails a finished training run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping


def register_model(
    uri: str, run_id: str | None, name: str, source: str, alias: str, tags: Mapping[str, str]
) -> str | None:
    """Create a version of ``name`` from ``source`` and point ``alias`` at it; return the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri=uri)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        version = client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags))
        client.set_registered_model_alias(name, alias, version.version)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a trained model
        warnings.warn(f"MLflow model registration of '{name}' failed ({type(exc).__name__}: {exc})", RuntimeWarning)
        return None
    return str(version.version)
