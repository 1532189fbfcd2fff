{{/* Labels every object carries. */}}
{{- define "wary.labels" -}}
app.kubernetes.io/name: wary
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The control plane pods' selector. */}}
{{- define "wary.selector" -}}
app.kubernetes.io/name: wary
app.kubernetes.io/component: control-plane
{{- end }}

{{/* An image reference: repository:tag, the tag defaulting to the appVersion. */}}
{{- define "wary.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .chart.AppVersion }}
{{- end }}
{{- end }}

{{/* The control plane's Service name: proxies verify its SPIFFE ID, not this name. */}}
{{- define "wary.service" -}}
wary-control-plane
{{- end }}
