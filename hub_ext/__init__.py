"""hubml's JupyterHub service: training jobs, models and deployments on Kubernetes.

Modules: ``training_objects`` and ``serving_objects`` (pure manifest builders,
on ``ownership`` for labels and annotations and ``pod_fields`` for what containers share),
``rbac`` (the service's own least privilege), ``policy`` (pure: admission of
requests, assembly of plans, status from API objects), ``kube`` (the one Kubernetes
client), ``training`` and ``serving`` (the I/O around them; runs and the
model registry are ``hubml.registry``, shared with the local backend),
``openapi`` (the REST API document and request validation), ``handlers`` +
``app`` (tornado, ``HubMLService``).
Run it with ``python -m hubml.hub_ext``.
"""
