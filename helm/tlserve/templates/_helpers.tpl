{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "tlserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, with the chart name appended unless it is already in it. */}}
{{- define "tlserve.fullname" -}}
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

{{- define "tlserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tlserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tlserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tlserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end }}

{{- define "tlserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tlserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: repository@digest, or repository:tag with the tag defaulting to <appVersion>-<cpu|gpu>. */}}
{{- define "tlserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $flavor := ternary "gpu" "cpu" .Values.gpu.enabled }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $flavor) .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* gRPC health service the readiness probe checks. */}}
{{- define "tlserve.readinessService" -}}
{{- if .Values.model.name }}
{{- printf "tlserve.model.%s" .Values.model.name }}
{{- else }}
{{- print "tlserve.v1.Inference" }}
{{- end }}
{{- end }}

{{- define "tlserve.terminationGracePeriodSeconds" -}}
{{- $needed := add .Values.preStopSleepSeconds .Values.server.drainSeconds }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 10 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + server.drainSeconds (%v)" .Values.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Name of the claim holding the model repository (model.source=pvc). */}}
{{- define "tlserve.modelClaim" -}}
{{- if .Values.model.pvc.existingClaim }}
{{- .Values.model.pvc.existingClaim }}
{{- else if .Values.model.pvc.create }}
{{- printf "%s-models" (include "tlserve.fullname" .) }}
{{- else }}
{{- fail "model.source=pvc needs model.pvc.existingClaim, or model.pvc.create=true" }}
{{- end }}
{{- end }}

{{/* Selector of this release's series in PromQL, as the ServiceMonitor labels them. */}}
{{- define "tlserve.promSelector" -}}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "tlserve.fullname" .) }}
{{- end }}

{{- define "tlserve.servicePorts" -}}
- name: grpc
  port: {{ .Values.ports.grpc }}
  targetPort: grpc
  protocol: TCP
  appProtocol: grpc
- name: metrics
  port: {{ .Values.ports.metrics }}
  targetPort: metrics
  protocol: TCP
  appProtocol: http
{{- end }}

{{/* A flag value as the CLI expects it: whole numbers without the float notation YAML numbers get. */}}
{{- define "tlserve.flagValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* The kubernetes.io/tls Secret the server's certificate comes from (tls.enabled). */}}
{{- define "tlserve.tlsSecretName" -}}
{{- if .Values.tls.secretName }}
{{- .Values.tls.secretName }}
{{- else if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "tlserve.fullname" .) }}
{{- else }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret), or tls.certManager.enabled=true" }}
{{- end }}
{{- end }}

{{/* Path of the client CA bundle in the container (tls.clientCA.enabled). */}}
{{- define "tlserve.clientCAPath" -}}
{{- if .Values.tls.clientCA.secretName }}
{{- printf "%s/%s" .Values.tls.clientCA.mountPath .Values.tls.clientCA.key }}
{{- else }}
{{- printf "%s/%s" .Values.tls.mountPath .Values.tls.clientCA.key }}
{{- end }}
{{- end }}

{{/* Security flags of `tlserve serve`, from tls, auth and reflection. */}}
{{- define "tlserve.securityArgs" -}}
- --health-port={{ .Values.ports.health }}
{{- if .Values.tls.enabled }}
- --tls-cert={{ .Values.tls.mountPath }}/tls.crt
- --tls-key={{ .Values.tls.mountPath }}/tls.key
{{- if .Values.tls.clientCA.enabled }}
- --tls-client-ca={{ include "tlserve.clientCAPath" . }}
{{- end }}
{{- if .Values.tls.metrics }}
- --metrics-tls
{{- end }}
{{- else if or .Values.tls.metrics .Values.tls.clientCA.enabled }}
{{- fail "tls.metrics and tls.clientCA.enabled need tls.enabled=true" }}
{{- end }}
{{- if .Values.auth.enabled }}
{{- if not .Values.auth.tokenSecretName }}
{{- fail "auth.enabled needs auth.tokenSecretName (a Secret holding the token file)" }}
{{- end }}
- --token-file={{ .Values.auth.mountPath }}/{{ .Values.auth.tokenSecretKey }}
{{- if .Values.auth.publicReflection }}
- --public-reflection
{{- end }}
{{- end }}
{{- if not .Values.reflection.enabled }}
- --no-reflection
{{- end }}
{{- end }}

{{/* The port the kubelet's gRPC probes ask: always the plaintext health-only port. It speaks no TLS (kubelet
probes cannot), needs no token, and is outside the serving port's cap on concurrent calls and its drain gate, so
a saturated or draining server still answers its probes. */}}
{{- define "tlserve.probePort" -}}
{{- .Values.ports.health }}
{{- end }}
