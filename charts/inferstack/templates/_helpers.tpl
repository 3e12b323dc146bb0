{{/*
Expand the name of the chart.
*/}}
{{- define "inferstack.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, truncated at 63 chars (DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "inferstack.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "inferstack.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "inferstack.labels" -}}
helm.sh/chart: {{ include "inferstack.chart" . }}
{{ include "inferstack.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels. The component keeps the operator's pods apart from the web/worker pods
of an InferenceService that happens to share the release name (same name/instance labels).
*/}}
{{- define "inferstack.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferstack.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "inferstack.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferstack.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag}; our own images default to the chart's appVersion.
*/}}
{{- define "inferstack.image" -}}
{{- $img := index . 0 }}{{- $chart := index . 1 }}
{{- printf "%s:%s" $img.repository (default $chart.AppVersion $img.tag | toString) }}
{{- end }}
