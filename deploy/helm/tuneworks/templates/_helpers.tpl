{{/* Names, labels, images. */}}
{{- define "tuneworks.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 30 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 30 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tuneworks.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "api") */}}
{{- define "tuneworks.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tuneworks.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s%s:%s" .root.Values.image.registry .image.repository (.image.tag | default $tag) -}}
{{- end -}}

{{/* DNS-safe short name of an inference model entry (fullname 30 + "-vllm-" + 26 <= 63 characters). */}}
{{- define "tuneworks.modelName" -}}
{{- .name | default (regexReplaceAll "[^a-z0-9]+" (lower .id) "-") | trunc 26 | trimAll "-" -}}
{{- end -}}

{{- define "tuneworks.vllmService" -}}
{{- printf "%s-vllm-%s" (include "tuneworks.fullname" .root) (include "tuneworks.modelName" .model) -}}
{{- end -}}

{{/* The settings computed from the values (JSON strings and lists). */}}
{{- define "tuneworks.baseModels" -}}
{{- $ids := list -}}
{{- range .Values.inference.models }}{{ $ids = append $ids .id }}{{ end -}}
{{- join "," $ids -}}
{{- end -}}

{{- define "tuneworks.extraModels" -}}
{{- $paths := dict -}}
{{- range .Values.inference.models }}{{ if .path }}{{ $_ := set $paths .id .path }}{{ end }}{{ end -}}
{{- toJson $paths -}}
{{- end -}}

{{- define "tuneworks.vllmUrls" -}}
{{- $root := . -}}
{{- $urls := dict -}}
{{- range .Values.inference.models -}}
{{- $_ := set $urls .id (printf "http://%s:8000" (include "tuneworks.vllmService" (dict "root" $root "model" .))) -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}

{{- define "tuneworks.secretName" -}}
{{- printf "%s-connections" (include "tuneworks.fullname" .) -}}
{{- end -}}

{{/*
A generated secret of the chart's Secret: (dict "root" $ "key" <Secret key> "value" <set in values, or "">).
The value when set; else the one the installed Secret already holds (upgrades keep it); else 32 new characters.
*/}}
{{- define "tuneworks.secretValue" -}}
{{- if .value -}}
{{- .value -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "tuneworks.secretName" .root) -}}
{{- $data := $existing.data | default dict -}}
{{- if index $data .key -}}
{{- index $data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* An env value as text; integers stay integers (values arrive as float64). */}}
{{- define "tuneworks.envValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/*
The FT_* environment of one process: (dict "root" $ "settings" <process settings> "managed" <dict> "vllmKey" bool).
Common settings, then the process's, then the chart-managed ones; database and Redis URLs from the Secret, and
the vLLM key for the processes that talk to vLLM (vllmKey: the API and the inference pods, not the worker).
Every metrics server binds all interfaces: Prometheus scrapes pod IPs, and the NetworkPolicies limit who may.
*/}}
{{- define "tuneworks.env" -}}
{{- $root := .root -}}
{{- $merged := merge (dict) (.managed | default dict) (.settings | default dict) ($root.Values.settings | default dict) -}}
{{- $_ := set $merged "home" $root.Values.home -}}
{{- $_ := set $merged "artifacts_url" (printf "file://%s/artifacts" $root.Values.home) -}}
{{- $_ := set $merged "api_host" "0.0.0.0" -}}
{{- $_ := set $merged "metrics_host" "0.0.0.0" -}}
{{- range $name := keys $merged | sortAlpha }}
- name: FT_{{ upper $name }}
  value: {{ include "tuneworks.envValue" (get $merged $name) | quote }}
{{- end }}
- name: FT_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tuneworks.databaseSecret" $root }}
      key: database-url
- name: FT_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tuneworks.redisSecret" $root }}
      key: redis-url
{{- if .vllmKey }}
- name: FT_VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "tuneworks.secretName" $root }}
      key: vllm-api-key
{{- end }}
- name: HOME
  value: {{ $root.Values.home | quote }}
{{- end -}}

{{- define "tuneworks.databaseSecret" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.existingSecret -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- else -}}
{{- include "tuneworks.secretName" . -}}
{{- end -}}
{{- end -}}

{{- define "tuneworks.redisSecret" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecret -}}
{{- else -}}
{{- include "tuneworks.secretName" . -}}
{{- end -}}
{{- end -}}

{{- define "tuneworks.pvcName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-artifacts" (include "tuneworks.fullname" .)) -}}
{{- end -}}

{{/* Volumes of every Tuneworks pod: (dict "root" $ "models" bool "shm" size) */}}
{{- define "tuneworks.volumes" -}}
- name: home
  emptyDir: {}
- name: tmp
  emptyDir: {}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "tuneworks.pvcName" .root }}
{{- if .shm }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- end }}
{{- end -}}

{{- define "tuneworks.volumeMounts" -}}
- name: home
  mountPath: {{ .root.Values.home }}
- name: tmp
  mountPath: /tmp
- name: shared
  mountPath: {{ .root.Values.home }}/artifacts
  subPath: artifacts
{{- if and .models .root.Values.persistence.shareModels }}
- name: shared
  mountPath: {{ .root.Values.home }}/models
  subPath: models
{{- end }}
{{- if .shm }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- end -}}

{{- define "tuneworks.podSpecCommon" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tuneworks.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
