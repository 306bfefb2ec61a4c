{{/* Labels every object of this chart carries. */}}
{{- define "hubml-extras.labels" -}}
app.kubernetes.io/part-of: hubml
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The namespace users' jobs and deployments live in (release namespace when none given). */}}
{{- define "hubml-extras.jobsNamespace" -}}
{{- .Values.jobsNamespace | default .Release.Namespace -}}
{{- end -}}

{{/* A name for cluster-scoped objects: unique per release and namespace. */}}
{{- define "hubml-extras.clusterName" -}}
{{- printf "%s-%s-%s" .Release.Namespace .Release.Name .suffix | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* True when the Prometheus Operator's ServiceMonitor CRD is served. */}}
{{- define "hubml-extras.serviceMonitors" -}}
{{- if and .Values.monitoring.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") -}}
true
{{- end -}}
{{- end -}}
