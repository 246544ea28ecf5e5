{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "dspark.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. KubeRay derives <fullname>-head-svc from it, so keep it short. */}}
{{- define "dspark.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dspark.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; `component` names the piece (router, redis, ray). */}}
{{- define "dspark.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dspark.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dspark.labels" -}}
helm.sh/chart: {{ include "dspark.chart" .root }}
{{ include "dspark.selectorLabels" . }}
app.kubernetes.io/part-of: dspark
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "dspark.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "dspark.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s-redis:6379/0" (include "dspark.fullname" .) }}
{{- else }}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl }}
{{- end }}
{{- end }}

{{/* KubeRay names the RayService's stable head Service <rayservice>-head-svc. */}}
{{- define "dspark.rayHeadService" -}}
{{- printf "%s-head-svc" (include "dspark.fullname" .) }}
{{- end }}

{{/* Container env shared by Ray nodes and the router. */}}
{{- define "dspark.commonEnv" -}}
- name: DSPARK_REDIS_URL
  value: {{ include "dspark.redisUrl" . | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end }}

{{/* rayStartParams.resources wants a JSON object inside a quoted string: '"{\"pool_x\": 1}"'. */}}
{{- define "dspark.rayResources" -}}
{{- printf "%q" (toJson .) | squote }}
{{- end }}
