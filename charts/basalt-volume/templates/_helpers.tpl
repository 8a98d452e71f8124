{{/*
Names and labels. Every named template is prefixed with the chart name (Helm convention: templates are global
across a chart and its subcharts).
*/}}

{{- define "basalt-volume.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name for objects; 52 characters leave room for suffixes like "-replicas". */}}
{{- define "basalt-volume.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "basalt-volume.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The volume's name: the IQN suffix. */}}
{{- define "basalt-volume.volumeName" -}}
{{- default .Release.Name .Values.volume.name }}
{{- end }}

{{- define "basalt-volume.iqn" -}}
iqn.2026-11.io.basalt:{{ include "basalt-volume.volumeName" . }}
{{- end }}

{{/*
The volume's UUID: the configured one, or one derived from namespace and release name, so that it is stable
across upgrades (a random uuidv4 would change on every `helm upgrade` and the replicas would refuse it).
*/}}
{{- define "basalt-volume.volumeId" -}}
{{- if .Values.volume.id }}
{{- .Values.volume.id }}
{{- else }}
{{- $h := sha256sum (printf "basalt-volume/%s/%s" .Release.Namespace .Release.Name) }}
{{- printf "%s-%s-4%s-8%s-%s" (substr 0 8 $h) (substr 8 12 $h) (substr 13 16 $h) (substr 17 20 $h) (substr 20 32 $h) }}
{{- end }}
{{- end }}

{{- define "basalt-volume.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "basalt-volume.labels" -}}
helm.sh/chart: {{ include "basalt-volume.chart" . }}
app.kubernetes.io/name: {{ include "basalt-volume.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ default .Chart.AppVersion .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: basalt
{{- end }}

{{/* Selector labels of one component ("controller" or "replica"); immutable once deployed. */}}
{{- define "basalt-volume.selectorLabels" -}}
app.kubernetes.io/name: {{ include "basalt-volume.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "basalt-volume.replicasService" -}}
{{- include "basalt-volume.fullname" . }}-replicas
{{- end }}

{{/*
The controller's --replica flags: the StatefulSet pods' stable DNS names through the headless Service,
<pod>.<service>.<namespace>.svc:<port>. They resolve even while a pod is not ready
(publishNotReadyAddresses), so the controller can reach a replica that is still starting.
*/}}
{{- define "basalt-volume.replicaArgs" -}}
{{- $full := include "basalt-volume.fullname" . }}
{{- $svc := include "basalt-volume.replicasService" . }}
{{- range $i := until (int .Values.replicas.count) }}
- --replica={{ $full }}-replica-{{ $i }}.{{ $svc }}.{{ $.Release.Namespace }}.svc:{{ $.Values.replicas.port }}
{{- end }}
{{- end }}

{{/* Container hardening shared by both roles. */}}
{{- define "basalt-volume.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end }}

{{- define "basalt-volume.metricsAnnotations" -}}
{{- if .root.Values.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
