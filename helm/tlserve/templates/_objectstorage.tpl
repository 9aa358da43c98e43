{{/* model.source=objectStorage: a maintained storage initializer copies the model from a bucket into the models
emptyDir before the server starts (docs/deployment.md, "Models in object storage"). */}}

{{/* Where the files land: one version's folder, or the whole repository root. */}}
{{- define "tlserve.objectStorageTarget" -}}
{{- $store := .Values.model.objectStorage }}
{{- if eq $store.layout "repository" }}
{{- .Values.model.mountPath }}
{{- else }}
{{- if not .Values.model.name }}
{{- fail "model.objectStorage.layout=version needs model.name (the files land in <mountPath>/<model.name>/<version>)" }}
{{- end }}
{{- printf "%s/%s/%s" .Values.model.mountPath .Values.model.name (toString $store.version) }}
{{- end }}
{{- end }}

{{/* The source as rclone names it: s3://b/p -> :s3:b/p, gs://b/p -> :gcs:b/p; anything else is an rclone path. */}}
{{- define "tlserve.rcloneSource" -}}
{{- . | replace "s3://" ":s3:" | replace "gs://" ":gcs:" }}
{{- end }}

{{- define "tlserve.objectStorageInitContainer" -}}
{{- $store := .Values.model.objectStorage }}
{{- if not $store.uri }}
{{- fail "model.source=objectStorage needs model.objectStorage.uri (e.g. s3://bucket/models/fashion/3)" }}
{{- end }}
{{- $target := include "tlserve.objectStorageTarget" . -}}
- name: fetch-model
  {{- if eq $store.initializer "rclone" }}
  image: {{ $store.rcloneImage }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["rclone"]
  args:
    - copy
    - {{ include "tlserve.rcloneSource" $store.uri }}
    - {{ $target }}
    # exit 9 when nothing was copied (a wrong bucket or prefix), instead of starting a server without a model
    - --error-on-no-transfer
    - --retries=5
    - --low-level-retries=20
    - --stats-one-line
    - --stats=30s
    - --verbose
  {{- else }}
  image: {{ $store.kserveImage }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # the image's entrypoint: initializer-entrypoint <storage URI> <destination>
  args:
    - {{ $store.uri | quote }}
    - {{ $target }}
  {{- end }}
  {{- with $store.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  env:
    - name: HOME
      value: /tmp
    {{- if eq $store.initializer "rclone" }}
    - name: XDG_CONFIG_HOME
      value: /tmp
    - name: XDG_CACHE_HOME
      value: /tmp
    # credentials from the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (envFrom), or the pod's
    # workload identity (IRSA, EKS Pod Identity)
    - name: RCLONE_S3_ENV_AUTH
      value: "true"
    - name: RCLONE_S3_PROVIDER
      value: {{ $store.s3Provider | quote }}
    {{- with $store.endpoint }}
    - name: RCLONE_S3_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- with $store.region }}
    - name: RCLONE_S3_REGION
      value: {{ . | quote }}
    {{- end }}
    - name: RCLONE_GCS_ENV_AUTH
      value: "true"
    {{- else }}
    {{- with $store.endpoint }}
    - name: AWS_ENDPOINT_URL
      value: {{ . | quote }}
    {{- end }}
    {{- with $store.region }}
    - name: AWS_DEFAULT_REGION
      value: {{ . | quote }}
    {{- end }}
    {{- end }}
    {{- with $store.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml $store.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
