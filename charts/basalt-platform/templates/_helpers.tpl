{{- define "basalt.fullname" -}}
{{- printf "%s-basalt" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "basalt.labels" -}}
app.kubernetes.io/name: basalt
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "basalt.selector" -}}
app.kubernetes.io/name: basalt
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "basalt.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The etcd endpoints the agents use: the chart's own cluster or the external one. */}}
{{- define "basalt.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := printf "%s-etcd" (include "basalt.fullname" .) -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s-%d.%s.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- $eps | toJson -}}
{{- else -}}
{{- .Values.externalEtcd.endpoints | toJson -}}
{{- end -}}
{{- end -}}

{{/* The part of an agent's config every agent shares (the cluster store). */}}
{{- define "basalt.clusterConfig" -}}
cluster:
  store: etcd
  etcd:
    endpoints: {{ include "basalt.etcdEndpoints" . }}
    {{- if and (not .Values.etcd.enabled) .Values.externalEtcd.tlsSecret }}
    ca_file: /etc/basalt/etcd-tls/ca.crt
    cert_file: /etc/basalt/etcd-tls/tls.crt
    key_file: /etc/basalt/etcd-tls/tls.key
    {{- end }}
{{- end -}}

{{/* The directory of the CSI socket on a node, as the kubelet sees it. */}}
{{- define "basalt.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}
