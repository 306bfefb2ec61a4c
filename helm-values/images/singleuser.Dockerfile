# The single-user image (singleuser.image in helm-values/values.yaml): JupyterLab
# with torch, MLflow and hubml's magics loaded in every kernel.
#
#   docker build -f helm-values/images/singleuser.Dockerfile -t ghcr.io/hubml/singleuser:0.1.0 .
#
# Built from the repository root. torch 2.15.0 from PyPI is the CUDA build for
# linux/x86_64 (its CUDA runtime comes as nvidia-* wheels; the node's driver
# comes from the GPU Operator). The training pods that %%train starts on the
# cluster use this same image, so workers import what the notebook imports.
# Pin the base by digest in production (docker buildx imagetools inspect).
FROM python:3.11.14-slim-bookworm

ARG NB_USER=jovyan
ARG NB_UID=1000
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/${NB_USER} \
    SHELL=/bin/bash

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/hubml/
COPY hubml /src/hubml/hubml
COPY spawner /src/hubml/spawner
COPY culler /src/hubml/culler
COPY hub_ext /src/hubml/hub_ext
COPY magics /src/hubml/magics

# jupyterhub provides jupyterhub-singleuser (same version as the hub);
# hubml[notebook] pins torch, mlflow, ipywidgets.
RUN pip install \
        "/src/hubml[notebook]" \
        jupyterhub==6.1.1 \
        jupyterlab==4.6.6 \
        ipykernel==7.4.0 \
 && python3 -c "import hubml.magics, torch, mlflow"

# Every IPython (kernels and terminal) loads hubml's magics.
COPY helm-values/images/ipython/ipython_kernel_config.py /etc/ipython/ipython_kernel_config.py
COPY helm-values/images/ipython/ipython_kernel_config.py /etc/ipython/ipython_config.py

# z2jh runs user pods as uid 1000, fsGroup 100, home on a PVC at /home/jovyan.
# The root-run import check above already made $HOME (HOME is set for the user), owned by
# root: hand it to the user, or pods without a home PVC (training workers) cannot write there.
RUN useradd --create-home --uid ${NB_UID} --gid users --shell /bin/bash ${NB_USER} \
 && chown -R ${NB_UID}:users /home/${NB_USER}
WORKDIR /home/${NB_USER}
USER ${NB_UID}
EXPOSE 8888
ENTRYPOINT ["tini", "--"]
CMD ["jupyterhub-singleuser"]
