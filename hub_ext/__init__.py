"""hubml's JupyterHub service: training jobs, models and deployments on Kubernetes.

Modules: ``objects`` (pure manifest builders), ``policy`` (pure: who may ask
for what, plans, status from API objects), ``kube`` (the one Kubernetes
client), ``training`` and ``serving`` (the I/O around them; runs and the
model registry are ``hubml.registry``, shared with the local backend),
``openapi`` (the REST API document and request validation), ``handlers`` +
``app`` (tornado, ``HubMLService``).
Run it with ``python -m hubml.hub_ext``.
"""
