# The model-serving image of %deploy (serving.image in helm-values/hubml-extras):
# MLflow's scoring server (`mlflow models serve --env-manager local`) with what
# models registered from %%train need to load, torch first.
#
#   docker build -f helm-values/images/serving.Dockerfile -t ghcr.io/hubml/serving:0.1.0 .
#
# Both serving flavours run it: the Deployment flavour with
# --model-uri models:/NAME/VERSION against the tracking server, KServe's
# ServingRuntime "hubml-mlflow" with --model-uri /mnt/models (the files KServe's
# storage initializer copied). ghcr.io/mlflow/mlflow has no torch, so a PyTorch
# model cannot load there. Versions match pyproject.toml (mlflow, torch); add the
# libraries your models import (scikit-learn, transformers, ...) here, since
# --env-manager local installs nothing at start.
# Pin the base by digest in production (docker buildx imagetools inspect).
FROM python:3.11.14-slim-bookworm

ARG UID=1000
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN pip install \
        mlflow==3.17.2 \
        torch==2.15.0 \
 && python3 -c "import mlflow.pyfunc, mlflow.pytorch, torch"

RUN useradd --uid ${UID} --gid users --no-create-home --shell /usr/sbin/nologin mlflow
USER ${UID}
EXPOSE 8080
ENTRYPOINT ["tini", "--"]
CMD ["mlflow", "models", "serve", "--model-uri", "/mnt/models", "--host", "0.0.0.0", "--port", "8080", "--env-manager", "local"]
