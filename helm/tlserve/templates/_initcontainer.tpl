{{/* model.source=initContainer: fill the models emptyDir before the server starts. */}}
{{- define "tlserve.modelInitContainer" -}}
{{- $init := .Values.model.initContainer }}
{{- $target := printf "%s/%s/%s" .Values.model.mountPath .Values.model.name $init.version }}
- name: fetch-model
  image: {{ $init.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if $init.command }}
  command:
    {{- toYaml $init.command | nindent 4 }}
  {{- else }}
  {{- if not $init.url }}
  {{- fail "model.source=initContainer needs model.initContainer.url, or your own model.initContainer.command" }}
  {{- end }}
  command:
    - sh
    - -ec
    - mkdir -p "$TARGET" && wget -q -O "$TARGET/model.onnx.part" "$MODEL_URL" && mv "$TARGET/model.onnx.part" "$TARGET/model.onnx"
  {{- end }}
  env:
    - name: MODEL_URL
      value: {{ $init.url | quote }}
    - name: TARGET
      value: {{ $target | quote }}
    - name: HOME
      value: /tmp
    {{- with $init.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml $init.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
