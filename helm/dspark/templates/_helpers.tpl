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

{{/* Env of every Ray container and the router. Ray 2.60 turns token authentication on for a
new cluster; KubeRay's pods would each make their own token, so it is switched off
explicitly and the cluster network is the boundary (keep Ray's ports inside the cluster). */}}
{{- define "dspark.rayEnv" -}}
- name: RAY_AUTH_MODE
  value: disabled
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- end }}

{{/* The fleet config (services/config.py FleetConfig) the Serve application and the router
share: .Values.fleet plus redis_url, app_name and one pools entry per pool. */}}
{{- define "dspark.fleetConfig" -}}
{{- $cfg := deepCopy .Values.fleet }}
{{- $_ := set $cfg "redis_url" (include "dspark.redisUrl" .) }}
{{- $_ := set $cfg "app_name" .Values.serve.appName }}
{{- $pools := dict }}
{{- range $name, $p := .Values.pools }}
{{- $pool := dict "replicas" $p.replicas "num_cpus" $p.numCpus "num_gpus" $p.numGpus "device" $p.device "hourly_cost" $p.hourlyCost "max_batch_size" $p.maxBatchSize "resources" (dict (printf "pool_%s" $name) $p.poolResource) }}
{{- if $p.acceleratorType }}
{{- $_ := set $pool "accelerator_type" $p.acceleratorType }}
{{- end }}
{{- $_ := set $pools $name (merge $pool (deepCopy $p.config)) }}
{{- end }}
{{- $_ := set $cfg "pools" $pools }}
{{- toYaml $cfg }}
{{- end }}

{{/* rayStartParams.resources wants a JSON object inside a quoted string: '"{\"pool_x\": 1}"'. */}}
{{- define "dspark.rayResources" -}}
{{- printf "%q" (toJson .) | squote }}
{{- end }}
