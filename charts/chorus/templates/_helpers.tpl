{{/* Object name prefix: <release>-chorus, or the release name when it already contains the chart name. */}}
{{- define "chorus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Labels that select the operator pods. app.kubernetes.io/name is fixed to
"chorus-operator": the NetworkPolicy the operator writes for each managed
Redis lets pods with that label in (operator/src/build/network_policy.rs).
*/}}
{{- define "chorus.selectorLabels" -}}
app.kubernetes.io/name: chorus-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "chorus.labels" -}}
{{ include "chorus.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: chorus
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "chorus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chorus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "true" when leader election is on: explicitly, or by default with more than one replica. */}}
{{- define "chorus.leaderElection" -}}
{{- if kindIs "bool" .Values.leaderElection.enabled -}}
{{- .Values.leaderElection.enabled -}}
{{- else -}}
{{- gt (int .Values.replicas) 1 -}}
{{- end -}}
{{- end -}}

{{- define "chorus.leaseName" -}}
{{- default (include "chorus.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{- define "chorus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The namespace the operator's workload permissions apply to. */}}
{{- define "chorus.workloadNamespace" -}}
{{- default .Release.Namespace .Values.watchNamespace -}}
{{- end -}}
