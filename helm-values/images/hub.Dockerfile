# The hub image for the zero-to-jupyterhub chart with hubml (hub.image in
# helm-values/values.yaml), also used by hubml-extras for hubml's hub service.
#
#   docker build -f helm-values/images/hub.Dockerfile -t ghcr.io/hubml/k8s-hub-hubml:0.1.0 .
#
# Built from the repository root. Versions are pinned here and in
# pyproject.toml (jupyterhub, kubespawner, kubernetes_asyncio,
# prometheus_client come from hubml[hub]). The chart mounts its own
# jupyterhub_config.py and z2jh.py into /usr/local/etc/jupyterhub/ and runs
# `jupyterhub --config /usr/local/etc/jupyterhub/jupyterhub_config.py`, so the
# image needs what that file imports: jupyterhub, kubespawner,
# kubernetes_asyncio, pycurl (tornado's curl client) and the authenticators;
# hubml's hub service (same image, in hubml-extras) talks to the MLflow
# registry with MlflowClient, hence mlflow-skinny (the client without the
# server's dependencies; same version as the tracking server).
# Pin the base by digest in production (docker buildx imagetools inspect).
FROM python:3.11.14-slim-bookworm

ARG NB_UID=1000
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# pycurl builds against libcurl; tini reaps the managed services' processes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        libcurl4 libcurl4-openssl-dev libssl-dev gcc tini \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/hubml/
COPY hubml /src/hubml/hubml
COPY spawner /src/hubml/spawner
COPY culler /src/hubml/culler
COPY hub_ext /src/hubml/hub_ext
COPY magics /src/hubml/magics

RUN pip install \
        "/src/hubml[hub]" \
        mlflow-skinny==3.17.2 \
        pycurl==7.45.7 \
        oauthenticator==17.4.0 \
 && apt-get purge -y gcc libcurl4-openssl-dev libssl-dev \
 && apt-get autoremove -y \
 && python3 -c "import hubml.spawner, hubml.culler, hubml.hub_ext, hubml.registry, kubespawner, pycurl, mlflow.tracking"

# The chart runs the hub as uid 1000 with fsGroup 1000 and mounts the sqlite
# PVC at /srv/jupyterhub (the working directory: db_url sqlite:///jupyterhub.sqlite).
RUN useradd --create-home --uid ${NB_UID} --gid users --shell /bin/bash jovyan \
 && mkdir -p /srv/jupyterhub /usr/local/etc/jupyterhub /usr/local/etc/hubml \
 && chown ${NB_UID}:users /srv/jupyterhub
WORKDIR /srv/jupyterhub
USER ${NB_UID}
EXPOSE 8081
ENTRYPOINT ["tini", "--"]
CMD ["jupyterhub", "--config", "/usr/local/etc/jupyterhub/jupyterhub_config.py"]
