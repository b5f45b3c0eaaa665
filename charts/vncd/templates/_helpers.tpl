{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "vncd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "vncd.fullname" -}}
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

{{- define "vncd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vncd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vncd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vncd.labels" -}}
helm.sh/chart: {{ include "vncd.chart" . }}
{{ include "vncd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: node-agent
{{- end }}

{{- define "vncd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vncd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vncd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The relay's pods: a name of their own, so the controller DaemonSet's selector never
matches them (and that selector, immutable, stays as it was). */}}
{{- define "vncd.relaySelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-relay" (include "vncd.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vncd.relayLabels" -}}
helm.sh/chart: {{ include "vncd.chart" . }}
{{ include "vncd.relaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: relay
{{- end }}

{{/* Where both pods mount the relay's hostPath directory, and the control socket in it. */}}
{{- define "vncd.relayMount" -}}/var/lib/vncd-relay{{- end }}
{{- define "vncd.relaySocket" -}}/var/lib/vncd-relay/relay/relay.sock{{- end }}
