{{/* Names, labels and shared pod pieces of the spo-diffusion chart. */}}

{{- define "spo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "spo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spo.labels" -}}
helm.sh/chart: {{ include "spo.chart" . }}
{{ include "spo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* A Kubernetes-safe suffix from a model name ("SPO_SDXL.v2" -> "spo-sdxl-v2"). */}}
{{- define "spo.modelSlug" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower .) "-" | trunc 30 | trimSuffix "-" }}
{{- end }}

{{- define "spo.workerName" -}}
{{- printf "%s-worker-%s" (include "spo.fullname" .root) (include "spo.modelSlug" .model.name) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "spo.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Where the manifest is inside the pods: the inline ConfigMap's mount, else the configured path. */}}
{{- define "spo.manifestPath" -}}
{{- if .Values.manifest.inline }}/etc/spo/models.yaml{{ else }}{{ .Values.manifest.path }}{{ end }}
{{- end }}

{{- define "spo.redisHost" -}}
{{- printf "%s-redis" (include "spo.fullname" .) }}
{{- end }}

{{/* Environment shared by the API and the workers: Redis (bundled URL, or the URL from a Secret), the manifest,
     the served models, the queue settings. */}}
{{- define "spo.env" -}}
{{- if .Values.redis.bundled.enabled -}}
- name: SPO_REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "spo.redisHost" .) | quote }}
{{- else -}}
- name: SPO_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.external.existingSecret is required when redis.bundled.enabled is false" .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.urlKey }}
{{- end }}
- name: SPO_KEY_PREFIX
  value: {{ .Values.redis.keyPrefix | quote }}
- name: SPO_MANIFEST
  value: {{ include "spo.manifestPath" . | quote }}
- name: SPO_QUEUE_MAX_LENGTH
  value: {{ .Values.config.queueMaxLength | quote }}
- name: SPO_JOB_TTL_S
  value: {{ .Values.config.jobTtlS | quote }}
- name: SPO_VISIBILITY_TIMEOUT_S
  value: {{ .Values.config.visibilityTimeoutS | quote }}
- name: SPO_MAX_ATTEMPTS
  value: {{ .Values.config.maxAttempts | quote }}
- name: SPO_SYNC_TIMEOUT_S
  value: {{ .Values.config.syncTimeoutS | quote }}
- name: SPO_HEARTBEAT_INTERVAL_S
  value: {{ .Values.config.heartbeatIntervalS | quote }}
- name: SPO_WORKER_STALE_S
  value: {{ .Values.config.workerStaleS | quote }}
- name: SPO_LOG_LEVEL
  value: {{ .Values.config.logLevel | quote }}
- name: SPO_LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
- name: HF_HOME
  value: /cache/huggingface
{{- with .Values.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes every spo pod mounts: /tmp (the root filesystem is read-only) and the inline manifest. */}}
{{- define "spo.commonVolumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.manifest.inline }}
- name: manifest
  configMap:
    name: {{ include "spo.fullname" . }}-manifest
{{- end }}
{{- end }}

{{- define "spo.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.manifest.inline }}
- name: manifest
  mountPath: /etc/spo
  readOnly: true
{{- end }}
{{- end }}

{{/* checkov findings that do not apply, justified where the objects are (checkov reads these annotations). */}}
{{- define "spo.imageCheckSkips" -}}
checkov.io/skip1: CKV_K8S_43=images are pinned by version tag; to pin a digest set the tag to TAG@sha256:DIGEST
checkov.io/skip2: CKV_K8S_15=IfNotPresent suits immutable version tags; set pullPolicy Always for moving tags
{{- end }}

{{- define "spo.secretEnvSkip" -}}
checkov.io/skip3: CKV_K8S_35=the service reads SPO_REDIS_URL from its environment only (external Redis Secret)
{{- end }}

{{- define "spo.gpuCpuLimitSkip" -}}
checkov.io/skip4: CKV_K8S_11=no CPU limit by default on GPU pods (CFS throttling slows the CPU side of inference;
  the request still reserves CPU); set worker.resources.limits.cpu to add one
{{- end }}
